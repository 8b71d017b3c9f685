"""fxquant: a graph-rewrite W8A8 quantization compiler for PyTorch inference.

    >>> import fxquant
    >>> qmodel = fxquant.compile(model, example_inputs)      # doctest: +SKIP
    >>> print(qmodel.report())                               # doctest: +SKIP
"""

from . import ops  # noqa: F401  (registers the fxquant:: custom ops)
from .api import QuantizedModel, compile
from .config import TARGETS, QuantConfig
from .errors import FxquantError, TraceError

__version__ = "0.1.0"
__all__ = ["compile", "QuantConfig", "QuantizedModel", "TraceError", "FxquantError", "TARGETS", "__version__"]
