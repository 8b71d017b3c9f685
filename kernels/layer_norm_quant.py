r"""LayerNorm or RMSNorm fused with per-token int8 quantization of its output: one read of x.

Math (LayerNorm: Ba et al. 2016, eq. 4, with PyTorch's biased variance; quantization as in
``kernels/quantize.py``)::

    μ[m]    = (1/K) Σ_k x[m, k]
    σ²[m]   = (1/K) Σ_k (x[m, k] − μ[m])²
    y[m, k] = (x[m, k] − μ[m]) / sqrt(σ²[m] + eps) · γ[k] + β[k]        (fp32, then rounded to x's dtype)
    s[m]    = max(max_k |y[m, k]| / 127, 2^-23),  y_q[m, k] = clamp(round_half_even(y[m, k] · (1 / s[m])), ±127)

RMSNorm (Zhang & Sennrich 2019, eq. 4; the pre-norm of Llama / Qwen2 / Qwen3 / Mistral / Gemma) shares
the kernel (constexpr ``RMS``)::

    n[m, k] = x[m, k] / sqrt((1/K) Σ_k x[m, k]² + eps)                           (fp32)
    cast_before_weight=False:  y = round_dtype(n · float(γ))       torch.nn.RMSNorm / F.rms_norm; Gemma,
                                                                   whose caller passes the fp32 (1 + w)
    cast_before_weight=True:   y = round_dtype(round_dtype(n) · γ)  Hugging Face ``LlamaRMSNorm``:
                                                                   ``weight * hidden_states.to(input_dtype)``
    no γ:                      y = round_dtype(n)

With ``cast_before_weight`` γ has x's dtype and the product is taken in x's dtype; the kernel forms it in
fp32 and rounds once, which is the same number: a product of two bf16 (8-bit significands) or two fp16
(11-bit) values is exact in fp32, so one rounding to x's dtype is what a native bf16 / fp16 multiply gives.
F.rms_norm, checked on torch 2.13 (CPU; bf16 and fp16 x with a weight of x's dtype, which takes the fused
kernel, and with an fp32 weight, which takes the composite path): upcasts x to fp32, multiplies by the
weight in fp32 and rounds once to x's dtype, i.e. ``cast_before_weight=False``, bit for bit on 64x257
random rows; casting before the weight differed in 6 % of the bf16 elements. The kernel's 1/sqrt is IEEE
(``sqrt_rn``, ``div_rn``), as is torch's CPU ``rsqrt``.

The quantization reads y *after* rounding to x's dtype, as ``F.layer_norm`` followed by a quantizer would,
so y_q is what the unfused graph computes up to the 1-ulp differences between two LayerNorm kernels.

Smoothed and static quantization (the forms of ``kernels/quantize.py``): ``act_smooth`` is SmoothQuant's
per-channel 1/s of the consumer's input, X̂ = X diag(s)⁻¹ (Xiao et al. 2023, arXiv 2211.10438, eq. 3);
``act_scale`` a static per-tensor scale s::

    ŷ[m, k] = float(y[m, k]) · act_smooth[k]                 (fp32, one rounding; ŷ = float(y) without it)
    act_scale:     y_q = clamp(round_half_even(ŷ · (1 / s)), ±127),  scale[m] = s for every row
    no act_scale:  y_q, s[m] as above, per token, from ŷ

Only the quantized branch is smoothed / static: the stored y is the plain norm output.

Operands: ``x`` bf16 / fp16 / fp32 [..., K], last dim contiguous, K ≤ 32768 (one row in registers);
``weight`` γ and ``bias`` β [K] or None (RMSNorm: no β). Outputs: ``y`` in x's dtype [..., K] only when ``return_float``
(a non-Linear consumer such as a residual add needs it; else an empty tensor and no write), ``y_q`` int8
[..., K], ``scale`` fp32 [..., 1].
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .common import HAS_TRITON, cdiv, launch_options, next_pow2, row_block_params
from .launch import LaunchCache
from .quantize import _act_operands, _as_rows, quantize_per_token_reference

__all__ = ["layer_norm_quant", "layer_norm_quant_reference", "rms_norm_quant", "rms_norm_quant_reference", "rms_norm_reference",
           "norm_outputs", "get_autotune_configs", "MAX_K"]

MAX_K = 32768
_LAUNCHES = LaunchCache()

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import quantize_rows, quantize_with, round_to, row_amax


def get_autotune_configs(block_k: int) -> dict:
    """Launch parameters for rows of ``block_k`` elements (memory-bound: no search, sized so each thread
    holds ≤ 16 elements of the row and each program has ≥ 4 KB of loads in flight)."""
    return row_block_params(block_k, elems_per_program=2048, max_rows=8, elems_per_thread=16)


if HAS_TRITON:

    @triton.jit
    def _norm_quant_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, q_ptr, s_ptr, act_scale_ptr, act_smooth_ptr, M, K, eps, stride_xm, stride_ym,
        stride_qm, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_FLOAT: tl.constexpr,
        RMS: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
        STATIC: tl.constexpr, SMOOTH: tl.constexpr,
    ):
        """ROWS rows per program, each whole in registers: LayerNorm (RMS=0) or RMSNorm (RMS=1), then the
        per-token quantization of the rounded output (SMOOTH: times act_smooth[k]; STATIC: with the one
        scale at act_scale_ptr)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RMS:
            d = x  # masked lanes loaded as 0
        else:
            mean = tl.sum(x, axis=1) / K
            d = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / K  # RMSNorm: the mean square
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
        y = d * rstd[:, None]
        if HAS_WEIGHT:
            if CAST_BEFORE_WEIGHT:  # γ · round_dtype(n): an exact fp32 product, rounded once below
                y = round_to(y, y_ptr.dtype.element_ty).to(tl.float32)
            y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = round_to(y, y_ptr.dtype.element_ty)  # the model-dtype output the unfused graph would quantize
        if STORE_FLOAT:
            tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], y, mask=mask)
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        if SMOOTH:  # after the store: y itself stays the plain norm output
            yf = yf * tl.load(act_smooth_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if STATIC:  # every row reads the same element: a [ROWS] vector, as quantize_with wants
            scale = tl.load(act_scale_ptr + rows * 0)
            q = quantize_with(yf, tl.math.div_rn(1.0, scale), tl.int8)
        else:
            q, scale = quantize_rows(yf, row_amax(yf), tl.int8)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_ok)


def layer_norm_quant(
    x: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    return_float: bool = True,
    act_scale: Optional[torch.Tensor] = None,
    act_smooth: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused LayerNorm + per-token (or static / smoothed) int8 quantization (math in the module docstring).

    Args:
        x: bf16 / fp16 / fp32 [..., K]. normalized_shape: ``[K]`` (the last dimension only).
        weight, bias: [K] or None. eps: added to the variance. return_float: also write y.
        act_scale: None (per-token scales) or an fp32 tensor of one element on x's device: the static
            per-tensor scale s of y_q, returned in every row of ``scale``.
        act_smooth: None or fp32 [K] on x's device: SmoothQuant's per-channel 1/s, multiplies y before
            quantization (not the returned y).

    Returns:
        ``(y, y_q, scale)``: y in x's dtype [..., K] (empty when not ``return_float``), int8 [..., K],
        fp32 [..., 1].

    Raises:
        ValueError: normalized_shape is not ``[x.shape[-1]]``, or K > 32768 (use LayerNorm then
        ``quantize_per_token``), or act_scale has not one element / act_smooth not K / either is on another
        device. TypeError: unsupported dtype, or act_scale / act_smooth not fp32. RuntimeError: Triton is
        not installed.
    """
    if not HAS_TRITON:
        raise RuntimeError("layer_norm_quant needs Triton: pip install triton")
    if list(normalized_shape) != [x.shape[-1]]:
        raise ValueError(f"layer_norm_quant normalizes the last dimension only: normalized_shape={list(normalized_shape)}, "
                         f"x.shape={tuple(x.shape)}")
    return _launch("layer_norm_quant", x, weight, bias, eps, return_float, rms=False, cast_before_weight=False,
                   act_scale=act_scale, act_smooth=act_smooth)


def rms_norm_quant(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    cast_before_weight: bool,
    return_float: bool = True,
    act_scale: Optional[torch.Tensor] = None,
    act_smooth: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused RMSNorm + per-token (or static / smoothed) int8 quantization (math in the module docstring).

    Args:
        x: bf16 / fp16 / fp32 [..., K]. weight: [K] or None. eps: added to the mean square.
        cast_before_weight: True for Hugging Face ``LlamaRMSNorm`` (``weight * n.to(x.dtype)``; weight
            must have x's dtype), False for ``torch.nn.RMSNorm`` / ``F.rms_norm`` / Gemma (fp32 product).
        return_float: also write y.
        act_scale, act_smooth: as for :func:`layer_norm_quant` (static scale of y_q; 1/s multiplying y
            before quantization only).

    Returns:
        ``(y, y_q, scale)``: y in x's dtype [..., K] (empty when not ``return_float``), int8 [..., K],
        fp32 [..., 1].

    Raises:
        ValueError: K > 32768, or weight has not K values, or act_scale has not one element / act_smooth
        not K / either is on another device. TypeError: unsupported dtype, a weight not of x's dtype with
        ``cast_before_weight``, or act_scale / act_smooth not fp32. RuntimeError: Triton is not installed.
    """
    if not HAS_TRITON:
        raise RuntimeError("rms_norm_quant needs Triton: pip install triton")
    if cast_before_weight and weight is not None and weight.dtype != x.dtype:
        raise TypeError(f"rms_norm_quant: cast_before_weight multiplies in x's dtype; weight is {weight.dtype}, "
                        f"x is {x.dtype}")
    return _launch("rms_norm_quant", x, weight, None, eps, return_float, rms=True,
                   cast_before_weight=bool(cast_before_weight) and weight is not None, act_scale=act_scale,
                   act_smooth=act_smooth)


def _launch(what, x, weight, bias, eps, return_float, rms, cast_before_weight, act_scale, act_smooth):
    """Check, allocate and launch ``_norm_quant_kernel`` for either norm (``what`` names it in errors)."""
    x2 = _as_rows(x, what)
    m, k = x2.shape
    if k > MAX_K:
        raise ValueError(f"{what} holds a row in registers: K={k} > {MAX_K}; run the norm and quantize_per_token")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != k:
            raise ValueError(f"{what}: {name} has {t.numel()} values, expected K={k}")
    y = torch.empty((m, k) if return_float else (0,), dtype=x.dtype, device=x.device)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    a_arg, sm_arg = _act_operands(what, x, k, act_scale, act_smooth, s)
    if m and k:
        block_k = next_pow2(k)
        p = get_autotune_configs(block_k)
        y_arg = y if return_float else _unwritten(x.device, x.dtype)
        w_arg = weight if weight is not None else s
        b_arg = bias if bias is not None else s
        grid = (cdiv(m, p["ROWS"]), 1)
        ints = (m, k, x2.stride(0), y_arg.stride(0), q.stride(0))
        consts = (weight is not None, bias is not None, return_float, rms, cast_before_weight, p["ROWS"], block_k,
                  act_scale is not None, act_smooth is not None)
        key, hit = _LAUNCHES.lookup(x.device, consts, (x2, w_arg, b_arg, y_arg, q, s, a_arg, sm_arg), ints)
        if hit is not None:
            hit(grid, x.device, (x2, w_arg, b_arg, y_arg, q, s, a_arg, sm_arg, m, k, float(eps), *ints[2:], *consts))
        else:
            compiled = _norm_quant_kernel[grid](
                x2, w_arg, b_arg, y_arg, q, s, a_arg, sm_arg, m, k, float(eps), *ints[2:],
                HAS_WEIGHT=consts[0], HAS_BIAS=consts[1], STORE_FLOAT=return_float, RMS=rms,
                CAST_BEFORE_WEIGHT=cast_before_weight, ROWS=p["ROWS"], BLOCK_K=block_k, STATIC=consts[7],
                SMOOTH=consts[8], num_warps=p["num_warps"], **launch_options(),
            )
            _LAUNCHES.put(key, compiled)
    lead = x.shape[:-1]
    return (y.reshape(x.shape) if return_float else y), q.reshape(x.shape), s.reshape(*lead, 1)


@functools.lru_cache(maxsize=None)
def _unwritten(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A [1, 1] tensor of ``dtype`` standing in for y when the float output is not stored (STORE_FLOAT=False
    gives the kernel y's element type, never writes it). One per device and dtype, not an allocation per call."""
    return torch.empty((1, 1), dtype=dtype, device=device)


def norm_outputs(y: torch.Tensor, return_float: bool, quantize=quantize_per_token_reference, act_scale=None,
                 act_smooth=None):
    """The three outputs of a norm-quant op from the norm's output y: ``(y or empty, y_q, scale)`` with
    ``quantize`` (the reference quantizer, or a backend's bit-identical fast one) of y, smoothed and with a
    static scale when given (see :func:`fxquant.kernels.quantize.quantize_per_token_reference`)."""
    y_q, scale = quantize(y, act_scale, act_smooth)
    return (y if return_float else y.new_empty(0)), y_q, scale


def layer_norm_quant_reference(x, normalized_shape, weight, bias, eps, return_float=True, act_scale=None, act_smooth=None):
    """Plain torch: ``F.layer_norm`` in x's dtype, then the per-token quantizer of ``kernels/quantize.py``
    (or, with ``act_scale`` / ``act_smooth``, its static / smoothed form) of that output."""
    return norm_outputs(F.layer_norm(x, normalized_shape, weight, bias, eps), return_float, act_scale=act_scale,
                        act_smooth=act_smooth)


def rms_norm_reference(x, weight, eps, cast_before_weight):
    """Plain torch RMSNorm in fp32 (as ``F.rms_norm`` and Hugging Face compute it), the weight applied in fp32
    or, with ``cast_before_weight``, in x's dtype after rounding; returns y in x's dtype."""
    xf = x.to(torch.float32)
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return n.to(x.dtype)
    if cast_before_weight:
        return weight * n.to(x.dtype)  # LlamaRMSNorm.forward: self.weight * hidden_states.to(input_dtype)
    return (n * weight.to(torch.float32)).to(x.dtype)


def rms_norm_quant_reference(x, weight, eps, cast_before_weight, return_float=True, act_scale=None, act_smooth=None):
    """Plain torch: :func:`rms_norm_reference`, then the quantizer of ``kernels/quantize.py`` (per-token, or
    static / smoothed with ``act_scale`` / ``act_smooth``)."""
    return norm_outputs(rms_norm_reference(x, weight, eps, cast_before_weight), return_float, act_scale=act_scale,
                        act_smooth=act_smooth)
