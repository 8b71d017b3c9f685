"""Errors a user can cause, each naming the thing at fault and what to do."""

from __future__ import annotations

__all__ = ["FxquantError", "TraceError", "InputError", "CheckpointError"]


class FxquantError(Exception):
    """Base class of fxquant's own errors."""


class TraceError(FxquantError):
    """Capturing the model into an FX graph failed.

    Attributes:
        model_class: the class name of the model.
        front_end: ``"torch.export"`` or ``"torch.fx.symbolic_trace"``.
    The underlying exception is chained (``__cause__``).
    """

    def __init__(self, model: object, front_end: str, cause: BaseException, hint: str = ""):
        self.model_class = type(model).__name__
        self.front_end = front_end
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        msg = f"could not capture {self.model_class} with {front_end}: {type(cause).__name__}: {first_line[:500]}"
        if hint:
            msg += f". What to do: {hint}"
        super().__init__(msg)


class InputError(FxquantError, ValueError):
    """A call of a :class:`~fxquant.QuantizedModel` that it cannot serve: an input of another rank or static
    size than captured, an input that requires grad (the int8 graph is inference-only), or ``train()``. The
    message names the input, the dimension, the captured value and what to do."""


class CheckpointError(FxquantError, ValueError):
    """A checkpoint fxquant cannot read or write: a missing or corrupt file, a quantization scheme it does not
    run, a tensor for a layer the model lacks or of another shape. The message names the file, the layer or
    the scheme field; the user's model and files are untouched."""


class CalibrationError(FxquantError, ValueError):
    """Calibration cannot be done or is missing: a static-scheme model run or exported before
    :func:`fxquant.calibrate`, SmoothQuant asked for without calibration data, an empty iterator of batches, or
    a batch the model cannot take. The message names the batch or the setting and what to do; the model is
    unchanged (scales are installed only after every batch ran)."""
