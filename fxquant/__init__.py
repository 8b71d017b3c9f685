"""fxquant: a graph-rewrite W8A8 quantization compiler for PyTorch inference.

    >>> import fxquant
    >>> qmodel = fxquant.compile(model, example_inputs)      # doctest: +SKIP
    >>> print(qmodel.report())                               # doctest: +SKIP
"""

from pathlib import Path as _Path

from ._layout import map_source_checkout as _map_source_checkout

# No-ops when installed: a source checkout's kernels/ and patterns/ become fxquant.kernels and
# fxquant.patterns before anything imports them (kernels/ imports nothing of fxquant; patterns/ imports
# fxquant.ir, which is loaded on demand).
_map_source_checkout(__name__, _Path(__file__).resolve().parent, ("kernels", "patterns"))

from .targets import backends as _backends  # noqa: F401,E402  (registers the kernels of the fxquant:: ops)
from .api import QuantizedModel, calibrate, compile  # noqa: E402
from .config import TARGETS, QuantConfig  # noqa: E402
from .errors import CalibrationError, CheckpointError, FxquantError, InputError, TraceError  # noqa: E402
from .export.onnx import export_onnx  # noqa: E402

__version__ = "0.1.0"

__all__ = ["compile", "calibrate", "export_onnx", "CalibrationError", "QuantConfig", "QuantizedModel", "TraceError", "InputError", "CheckpointError", "FxquantError", "TARGETS",
           "__version__"]
