"""fxquant: a graph-rewrite W8A8 quantization compiler for PyTorch inference.

    >>> import fxquant
    >>> qmodel = fxquant.compile(model, example_inputs)      # doctest: +SKIP
    >>> print(qmodel.report())                               # doctest: +SKIP
"""

from pathlib import Path as _Path

from ._layout import map_source_checkout as _map_source_checkout

# No-ops when installed. kernels/ first: fxquant's own modules import it (and it imports nothing of
# fxquant); patterns/ last, since its modules import fxquant.ops.
_map_source_checkout(__name__, _Path(__file__).resolve().parent, ("kernels",))

from . import ops  # noqa: F401  (registers the fxquant:: custom ops)
from .api import QuantizedModel, compile
from .calibration import calibrate
from .config import TARGETS, QuantConfig
from .errors import CalibrationError, CheckpointError, FxquantError, InputError, TraceError
from .onnx_export import export_onnx

__version__ = "0.1.0"

_map_source_checkout(__name__, _Path(__file__).resolve().parent, ("patterns",))

__all__ = ["compile", "calibrate", "export_onnx", "CalibrationError", "QuantConfig", "QuantizedModel", "TraceError", "InputError", "CheckpointError", "FxquantError", "TARGETS",
           "__version__"]
