"""The fused nodes of an fxquant graph: ``torch.library`` custom ops with fake (meta) implementations.

Because every op has a fake implementation, a fused GraphModule can itself be ``torch.export``-ed and
``torch.compile``-d; Dynamo treats each op as one opaque call.

==================================  ==========================================================================
op                                  meaning (numerics: :mod:`fxquant.reference`)
==================================  ==========================================================================
``fxquant::quantize_per_token``     x [..., K] float → (int8 [..., K], fp32 scale [..., 1])
``fxquant::int8_linear``            float x [..., K] → quantize per token → int8 GEMM → epilogue → [..., N]
``fxquant::int8_linear_q``          already-quantized (x_q, x_scale) → int8 GEMM → epilogue → [..., N]
``fxquant::layer_norm_quant``       LayerNorm + per-token quantize: (y float or empty, y_q int8, scale fp32)
==================================  ==========================================================================

Arguments shared by the Linear ops: ``w_q`` int8 [N, K], ``w_scale`` fp32 [N, 1], ``bias`` [N] or None,
``activation`` in ``reference.ACTIVATIONS`` (the GEMM epilogue), ``backend`` (the lowering pass's choice,
re-checked per call by :func:`fxquant.backends.pick_backend`), ``w_qmax`` (the weight's range, which
decides whether oneDNN is exact), ``out_dtype`` (None: x's dtype).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import backends

__all__ = ["quantize_per_token", "int8_linear", "int8_linear_q", "layer_norm_quant"]

_NS = "fxquant"

# Registered through ``torch.library.Library`` rather than ``@torch.library.custom_op``: the latter wraps
# every call in Python that checks outputs for aliasing, 40-80 µs per call on an H200 host (cProfile of
# bench/profile_gpu.py), more than the GPU time of a mid-sized int8 GEMM. The schemas are the same.
_LIB = torch.library.Library(_NS, "DEF")
_LIB.define("quantize_per_token(Tensor x) -> (Tensor, Tensor)")
_LIB.define(
    "int8_linear_q(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, str activation, "
    "str backend, int w_qmax, ScalarType out_dtype) -> Tensor"
)
_LIB.define(
    "int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, str activation, str backend, int w_qmax, "
    "ScalarType? out_dtype=None) -> Tensor"
)
_LIB.define(
    "layer_norm_quant(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps, bool return_float) "
    "-> (Tensor, Tensor, Tensor)"
)


def _impl(name):
    """Register ``fn`` as the op's kernel for every backend. Inference ops: run without autograd recording
    (a caller's tensors may require grad; the fused ops have no backward)."""

    def register(fn):
        @functools.wraps(fn)
        def no_grad_fn(*args, **kwargs):
            if not torch.is_grad_enabled():  # the usual inference case; entering no_grad costs ~1 µs
                return fn(*args, **kwargs)
            with torch.no_grad():
                return fn(*args, **kwargs)

        _LIB.impl(name, no_grad_fn, "CompositeExplicitAutograd")
        return fn

    return register


@_impl("quantize_per_token")
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.quantize_per_token(x)


@torch.library.register_fake(f"{_NS}::quantize_per_token")
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _linear_2d(x_q, x_scale, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype):
    if x_q.dim() == 2 and x_scale.dim() == 2:  # decode and flattened inputs: no reshapes (each is host time on a host-bound call)
        return backends.run_linear(x_q, x_scale, w_q, w_scale, bias, activation, backend, out_dtype, w_qmax)
    lead = x_q.shape[:-1]
    y = backends.run_linear(
        x_q.reshape(-1, x_q.shape[-1]), x_scale.reshape(-1, 1), w_q, w_scale, bias,
        activation, backend, out_dtype, w_qmax,
    )
    return y.reshape(*lead, w_q.shape[0])


@_impl("int8_linear_q")
def int8_linear_q(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
    backend: str,
    w_qmax: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _linear_2d(x_q, x_scale, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype)


@torch.library.register_fake(f"{_NS}::int8_linear_q")
def _(x_q, x_scale, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype):
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=out_dtype)


@_impl("int8_linear")
def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
    backend: str,
    w_qmax: int,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    # flatten once: quantization and GEMM both work on [M, K] (every reshape is host time on a host-bound call)
    x_q, x_scale = backends.quantize_per_token(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]))
    y = _linear_2d(x_q, x_scale, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype or x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w_q.shape[0])


@torch.library.register_fake(f"{_NS}::int8_linear")
def _(x, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype=None):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=out_dtype or x.dtype)


@_impl("layer_norm_quant")
def layer_norm_quant(
    x: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    return_float: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.layer_norm_quant(x, normalized_shape, weight, bias, eps, return_float)


@torch.library.register_fake(f"{_NS}::layer_norm_quant")
def _(x, normalized_shape, weight, bias, eps, return_float):
    y = x.new_empty(x.shape) if return_float else x.new_empty(0)
    return y, x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# The OpOverloads that fused graph nodes call (the functions above are their implementations).
QUANTIZE_PER_TOKEN = torch.ops.fxquant.quantize_per_token.default
INT8_LINEAR = torch.ops.fxquant.int8_linear.default
INT8_LINEAR_Q = torch.ops.fxquant.int8_linear_q.default
LAYER_NORM_QUANT = torch.ops.fxquant.layer_norm_quant.default


# ------------------------------------------------------------------------- torch.compile (Inductor) fusion
def _register_inductor_decompositions() -> bool:
    """Let Inductor fuse the per-token quantization into the ops around it, on CUDA.

    Under ``torch.compile`` the custom ops are opaque, so a quantization would stay one kernel of its own
    after, say, a residual add, an RMSNorm or SiLU·mul that Inductor already fused. These decompositions
    (applied by Inductor only, never in eager mode or ``torch.export``) rewrite ``quantize_per_token`` into
    its pure-torch definition (:func:`fxquant.reference.quantize_per_token`), ``int8_linear`` into that
    plus ``int8_linear_q``, and ``layer_norm_quant`` into ``layer_norm`` plus that, so Inductor emits one
    fused kernel for "whatever precedes → LayerNorm → quantize". The GEMM stays fxquant's Triton kernel.

    Numerics: Inductor divides with the GPU's fast fp32 division (≤ 2 ulp), so a value at an exact
    rounding tie can land one int8 step away from the reference; every other value is identical.
    Opt out with ``FXQUANT_INDUCTOR_FUSION=0``. CPU graphs keep the opaque ops (the decompositions decline).
    Uses ``torch._inductor.decomposition.register_decomposition``, a private API present since torch 2.0;
    where it is missing, nothing is registered and the ops stay opaque.
    """
    import os

    if os.environ.get("FXQUANT_INDUCTOR_FUSION", "1") == "0":
        return False
    try:
        from torch._inductor.decomposition import register_decomposition
    except ImportError:  # pragma: no cover - torch without Inductor
        return False
    from . import reference

    @register_decomposition([QUANTIZE_PER_TOKEN])
    def _quantize(x):
        if x.device.type != "cuda":
            return NotImplemented
        return reference.quantize_per_token(x)

    @register_decomposition([INT8_LINEAR])
    def _int8_linear(x, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype=None):
        if x.device.type != "cuda":
            return NotImplemented
        x_q, x_scale = reference.quantize_per_token(x)
        return INT8_LINEAR_Q(x_q, x_scale, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype or x.dtype)

    @register_decomposition([LAYER_NORM_QUANT])
    def _layer_norm_quant(x, normalized_shape, weight, bias, eps, return_float):
        if x.device.type != "cuda":
            return NotImplemented
        y = torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)
        y_q, scale = reference.quantize_per_token(y)
        return (y if return_float else y.new_empty(0)), y_q, scale

    return True


INDUCTOR_FUSION = torch.cuda.is_available() and _register_inductor_decompositions()
