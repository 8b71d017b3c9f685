"""fxquant's rewrite patterns, one file each, applied in the order of :data:`REGISTRY`.

Order matters: Linear→Activation must claim its Linears before the plain Linear pattern does, and
LayerNorm→Linear rewires the int8 Linears the first two produced.

Adding a pattern = one file here + one row below + one golden test (tests/test_golden.py).
"""

from .layer_norm_linear import LAYER_NORM_LINEAR
from .linear import LINEAR
from .linear_act import LINEAR_ACT

REGISTRY = (LINEAR_ACT, LINEAR, LAYER_NORM_LINEAR)

__all__ = ["REGISTRY", "LINEAR_ACT", "LINEAR", "LAYER_NORM_LINEAR"]
