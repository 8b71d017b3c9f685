r"""Dynamic per-token (or static per-tensor) int8 quantization in one pass over the activation.

Math (symmetric per-token; compressed-tensors ``QuantizationArgs(strategy="token", dynamic=True,
symmetric=True)``; LLM.int8, Dettmers et al. 2022, §3.2 "vector-wise quantization")::

    s[m]     = max(max_k |X[m, k]| / 127, eps)          fp32, eps = 2^-23 (fp32 machine epsilon)
    X_q[m,k] = clamp(round_half_even(X[m, k] · (1 / s[m])), -127, 127)

With ``act_smooth`` (fp32 [K], SmoothQuant's per-channel 1/s_k: X̂ = X diag(s)⁻¹, Xiao et al. 2023,
arXiv 2211.10438, eq. 3) X is replaced by X[m, k] · act_smooth[k] (fp32, one rounding) before the amax.
With ``act_scale`` (fp32, one element: a static per-tensor scale s from calibration) there is no amax:
s[m] = s for every row, X_q = clamp(round_half_even(X · (1 / s)), ±127), values beyond 127·s clamped.

Each division is IEEE fp32 round-to-nearest; multiplying by the reciprocal (one division per row, not
per element) is what keeps the kernel at memory speed: an IEEE division per element cost as much as
the whole read and write (NVIDIA H200, 12608×3072 bf16: 71 µs with it).

Operands: ``x`` bf16 / fp16 / fp32 [M, K] (last dim contiguous) → ``x_q`` int8 [M, K] and ``scale`` fp32
[M, 1] (a static s is written into every row: the GEMMs read one scale per row). Any M ≥ 1, any K ≥ 1.
When a row fits in one block (K ≤ 16384) each element is read once and kept in registers between the
amax and the quantization; longer rows take a second, L2-resident pass (static: the quantizing pass only).
Bit-identical to :func:`quantize_per_token_reference` (IEEE division and rounding, see
``common.quantize_rows``); with per-token scales a row with NaN or ±Inf gets a NaN scale.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import HAS_TRITON, SCALE_EPS, cdiv, launch_options, next_pow2, row_block_params
from .launch import LaunchCache

__all__ = ["quantize_per_token", "quantize_per_token_reference", "get_autotune_configs", "MAX_SINGLE_PASS"]

MAX_SINGLE_PASS = 16384  # elements of one row held in registers at once
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LAUNCHES = LaunchCache()

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import quantize_rows, quantize_with, row_amax, row_scales


def get_autotune_configs(block_k: int) -> dict:
    """Launch parameters for a row block of ``block_k`` elements (memory-bound, so no search: a program
    holds ≥ 4096 elements; each thread 32, i.e. four 16-byte loads of bf16 in flight, so that more programs
    fit on an SM than with 16 per thread, which ran at 1.9 TB/s on 2048x4096 on an H200)."""
    return row_block_params(block_k, elems_per_program=4096, max_rows=16, elems_per_thread=32)


if HAS_TRITON:

    @triton.jit
    def _quantize_per_token_kernel(
        x_ptr, q_ptr, s_ptr, act_scale_ptr, act_smooth_ptr, M, K, stride_xm, stride_qm,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr, STATIC: tl.constexpr,
        SMOOTH: tl.constexpr,
    ):
        """ROWS rows per program; the whole row in registers when SINGLE_PASS, else two passes of BLOCK_K.
        STATIC: the one scale at act_scale_ptr for every row (no amax). SMOOTH: x · act_smooth[k] first."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        q_row = q_ptr + rows[:, None].to(tl.int64) * stride_qm
        cols = tl.arange(0, BLOCK_K)
        if STATIC:  # every row reads the same element: a [ROWS] vector, as quantize_with wants
            scale = tl.load(act_scale_ptr + rows * 0)
            inv = tl.math.div_rn(1.0, scale)
        if SINGLE_PASS:
            mask = row_ok[:, None] & (cols[None, :] < K)
            x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if SMOOTH:
                x = x * tl.load(act_smooth_ptr + cols, mask=cols < K, other=0.0)[None, :]
            if STATIC:
                q = quantize_with(x, inv, tl.int8)
            else:
                q, scale = quantize_rows(x, row_amax(x), tl.int8)
            tl.store(q_row + cols[None, :], q, mask=mask)
        else:
            if not STATIC:
                amax = tl.zeros((ROWS,), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    mask = row_ok[:, None] & (cols[None, :] + k0 < K)
                    x = tl.load(x_row + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    if SMOOTH:
                        x = x * tl.load(act_smooth_ptr + k0 + cols, mask=cols + k0 < K, other=0.0)[None, :]
                    r = row_amax(x)
                    amax = tl.maximum(amax, r) + (amax + r) * 0.0  # "+ (..)·0" keeps a NaN once seen (max drops it)
                scale, inv = row_scales(amax)
            for k0 in range(0, K, BLOCK_K):
                mask = row_ok[:, None] & (cols[None, :] + k0 < K)
                x = tl.load(x_row + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if SMOOTH:
                    x = x * tl.load(act_smooth_ptr + k0 + cols, mask=cols + k0 < K, other=0.0)[None, :]
                tl.store(q_row + k0 + cols[None, :], quantize_with(x, inv, tl.int8), mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_ok)


def _as_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"{what} needs a bf16 / fp16 / fp32 tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{what} needs at least one dimension (the K axis), got a 0-d tensor")
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    x2 = x.reshape(-1, x.shape[-1]) if x.numel() else x.reshape(0, max(x.shape[-1], 1))
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _act_operands(what: str, x: torch.Tensor, k: int, act_scale, act_smooth, dummy: torch.Tensor):
    """Check ``act_scale`` / ``act_smooth`` against x (K channels) and return the kernel's two pointer
    arguments: the tensors (act_smooth as a contiguous [K]) or, when absent, ``dummy`` (never read)."""
    for name, t, n in (("act_scale", act_scale, 1), ("act_smooth", act_smooth, k)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{what}: {name} must be an fp32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.numel() != n:
            raise ValueError(f"{what}: {name} has {t.numel()} values, expected {'one' if n == 1 else f'K={k}'}")
        if t.device != x.device:
            raise ValueError(f"{what}: {name} is on {t.device}, x on {x.device}")
    if act_smooth is not None and (act_smooth.dim() != 1 or act_smooth.stride(0) != 1):
        act_smooth = act_smooth.reshape(-1).contiguous()  # the kernel reads act_smooth[k] at offset k
    return (dummy if act_scale is None else act_scale), (dummy if act_smooth is None else act_smooth)


def quantize_per_token(x: torch.Tensor, act_scale: Optional[torch.Tensor] = None,
                       act_smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-pass dynamic per-token int8 quantization, or static / smoothed (math in the module docstring).

    Args:
        x: bf16 / fp16 / fp32 [..., K].
        act_scale: None (per-token scales) or an fp32 tensor of one element on x's device: the static
            per-tensor scale s, returned in every row of ``scale``.
        act_smooth: None or fp32 [K] on x's device: SmoothQuant's per-channel 1/s, multiplied into x first.

    Returns:
        ``(x_q, scale)``: int8 [..., K] and fp32 [..., 1] (contiguous) on x's device.

    Raises:
        TypeError: x is not a floating tensor of a supported dtype, or act_scale / act_smooth is not fp32.
        ValueError: act_scale has not one element, act_smooth not K, or either is on another device.
        RuntimeError: Triton is not installed.
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_per_token needs Triton: pip install triton")
    x2 = _as_rows(x, "quantize_per_token")
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    a_arg, sm_arg = _act_operands("quantize_per_token", x, k, act_scale, act_smooth, s)
    if m and k:
        single = k <= MAX_SINGLE_PASS
        block_k = next_pow2(k) if single else 4096
        p = get_autotune_configs(block_k)
        grid = (cdiv(m, p["ROWS"]), 1)
        ints = (m, k, x2.stride(0), q.stride(0))
        consts = (p["ROWS"], block_k, single, act_scale is not None, act_smooth is not None)
        key, hit = _LAUNCHES.lookup(x.device, consts, (x2, q, s, a_arg, sm_arg), ints)
        if hit is not None:
            hit(grid, x.device, (x2, q, s, a_arg, sm_arg, *ints, *consts))
        else:
            compiled = _quantize_per_token_kernel[grid](
                x2, q, s, a_arg, sm_arg, *ints,
                ROWS=p["ROWS"], BLOCK_K=block_k, SINGLE_PASS=single, STATIC=consts[3], SMOOTH=consts[4],
                num_warps=p["num_warps"], **launch_options(),
            )
            _LAUNCHES.put(key, compiled)
    if x.dim() == 2:
        return q, s
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def quantize_per_token_reference(x: torch.Tensor, act_scale: Optional[torch.Tensor] = None,
                                 act_smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the definition the kernel is checked against (fp32 math, round-half-to-even).

    The divisor 127 is a tensor on x's device: CUDA divides by a Python (CPU) scalar as a multiplication
    by its reciprocal, one more rounding than the definition has. ``reciprocal`` is an IEEE division.

    ``act_smooth`` (fp32 [K], SmoothQuant's diag(s)⁻¹, Xiao et al. 2023 eq. 3): x is first multiplied by it
    per channel in fp32 (one rounding). ``act_scale`` (fp32, one element): the static per-tensor scale s
    from calibration, used instead of the per-token one: x_q = clamp(round(x · (1/s)), ±127) and the
    returned scale is s in every row ([..., 1]).
    """
    xf = x.to(torch.float32)
    if act_smooth is not None:
        xf = xf * act_smooth.to(torch.float32)
    if act_scale is not None:
        scale = act_scale.to(torch.float32).reshape(1)
        x_q = torch.round(xf * scale.reciprocal()).clamp(-127, 127).to(torch.int8)
        return x_q, scale.expand(*x.shape[:-1], 1).contiguous()  # a new tensor: an op's output never aliases its input
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / amax.new_full((), 127.0)).clamp_min(SCALE_EPS)
    x_q = torch.round(xf * scale.reciprocal()).clamp(-127, 127).to(torch.int8)  # out of place: traceable
    return x_q, scale
