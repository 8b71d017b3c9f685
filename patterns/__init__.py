"""fxquant's rewrite patterns, one file each, applied in the order of :data:`REGISTRY`.

Order matters: patterns that fuse several Linears or an epilogue (SwiGLU, Linear→Activation) claim their
Linears before the plain Linear pattern does, and the norm patterns (LayerNorm→Linear, RMSNorm→Linear) then
rewire the int8 Linears the first three produced. The planning pass (``fxquant.plan.planner.plan_input_groups``)
reads the same order.

Adding a pattern = one file here + one row below + one golden test (tests/test_golden.py).
"""

from .fused_gate_up import FUSED_GATE_UP
from .layer_norm_linear import LAYER_NORM_LINEAR
from .linear import LINEAR
from .linear_act import LINEAR_ACT
from .rms_norm_linear import RMS_NORM_LINEAR
from .swiglu import SWIGLU

REGISTRY = (SWIGLU, FUSED_GATE_UP, LINEAR_ACT, LINEAR, LAYER_NORM_LINEAR, RMS_NORM_LINEAR)

__all__ = ["REGISTRY", "SWIGLU", "FUSED_GATE_UP", "LINEAR_ACT", "LINEAR", "LAYER_NORM_LINEAR", "RMS_NORM_LINEAR"]
