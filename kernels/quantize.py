r"""Dynamic per-token int8 quantization in one pass over the activation.

Math (symmetric per-token; compressed-tensors ``QuantizationArgs(strategy="token", dynamic=True,
symmetric=True)``; LLM.int8, Dettmers et al. 2022, §3.2 "vector-wise quantization")::

    s[m]     = max(max_k |X[m, k]| / 127, eps)          fp32, eps = 2^-23 (fp32 machine epsilon)
    X_q[m,k] = clamp(round_half_even(X[m, k] · (1 / s[m])), -127, 127)

Each division is IEEE fp32 round-to-nearest; multiplying by the reciprocal (one division per row, not
per element) is what keeps the kernel at memory speed: an IEEE division per element cost as much as
the whole read and write (NVIDIA H200, 12608×3072 bf16: 71 µs with it).

Operands: ``x`` bf16 / fp16 / fp32 [M, K] (last dim contiguous) → ``x_q`` int8 [M, K] and ``scale`` fp32
[M, 1]. Any M ≥ 1, any K ≥ 1. When a row fits in one block (K ≤ 16384) each element is read once and
kept in registers between the amax and the quantization; longer rows take a second, L2-resident pass.
Bit-identical to :func:`quantize_per_token_reference` (IEEE division and rounding, see
``common.quantize_rows``); a row with NaN or ±Inf gets a NaN scale.
"""

from __future__ import annotations

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
        x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
        ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ):
        """ROWS rows per program; the whole row in registers when SINGLE_PASS, else two passes of BLOCK_K."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        q_row = q_ptr + rows[:, None].to(tl.int64) * stride_qm
        cols = tl.arange(0, BLOCK_K)
        if SINGLE_PASS:
            mask = row_ok[:, None] & (cols[None, :] < K)
            x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            q, scale = quantize_rows(x, row_amax(x), tl.int8)
            tl.store(q_row + cols[None, :], q, mask=mask)
        else:
            amax = tl.zeros((ROWS,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_ok[:, None] & (cols[None, :] + k0 < K)
                x = tl.load(x_row + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                r = row_amax(x)
                amax = tl.maximum(amax, r) + (amax + r) * 0.0  # "+ (..)·0" keeps a NaN once seen (max drops it)
            scale, inv = row_scales(amax)
            for k0 in range(0, K, BLOCK_K):
                mask = row_ok[:, None] & (cols[None, :] + k0 < K)
                x = tl.load(x_row + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-pass dynamic per-token int8 quantization (math in the module docstring).

    Args:
        x: bf16 / fp16 / fp32 [..., K].

    Returns:
        ``(x_q, scale)``: int8 [..., K] and fp32 [..., 1] on x's device.

    Raises:
        TypeError: x is not a floating tensor of a supported dtype. RuntimeError: Triton is not installed.
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_per_token needs Triton: pip install triton")
    x2 = _as_rows(x, "quantize_per_token")
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and k:
        single = k <= MAX_SINGLE_PASS
        block_k = next_pow2(k) if single else 4096
        p = get_autotune_configs(block_k)
        grid = (cdiv(m, p["ROWS"]), 1)
        ints = (m, k, x2.stride(0), q.stride(0))
        key, hit = _LAUNCHES.lookup(x.device, (block_k, single), (x2, q, s), ints)
        if hit is not None:
            hit(grid, x.device, (x2, q, s, *ints, p["ROWS"], block_k, single))
        else:
            compiled = _quantize_per_token_kernel[grid](
                x2, q, s, *ints,
                ROWS=p["ROWS"], BLOCK_K=block_k, SINGLE_PASS=single, num_warps=p["num_warps"], **launch_options(),
            )
            _LAUNCHES.put(key, compiled)
    if x.dim() == 2:
        return q, s
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the definition the kernel is checked against (fp32 math, round-half-to-even).

    The divisor 127 is a tensor on x's device: CUDA divides by a Python (CPU) scalar as a multiplication
    by its reciprocal, one more rounding than the definition has. ``reciprocal`` is an IEEE division.
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / amax.new_full((), 127.0)).clamp_min(SCALE_EPS)
    x_q = torch.round(xf * scale.reciprocal()).clamp(-127, 127).to(torch.int8)  # out of place: traceable
    return x_q, scale
