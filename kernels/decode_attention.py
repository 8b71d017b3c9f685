r"""Decode attention over a static KV cache: grouped-query heads, one read of K and V, split along the cache.

Math (scaled dot-product attention, Vaswani et al. 2017, eq. 1, with an additive mask; grouped-query attention,
Ainslie et al. 2023, "GQA", §2: query head h reads kv head h // rep)::

    q [B, H, S, D], K, V [B, KV, L, D], H = KV · rep, mask [B or 1, 1, S, L] additive (0 / large negative)
    P[b, h, i, :] = softmax_fp32(q[b, h, i] · K[b, h // rep]ᵀ · scale + mask[b, 0, i, :])
    O[b, h, i]    = P[b, h, i, :] · V[b, h // rep]                         → q's dtype

The program of (b, kv head j, cache split c) holds the rep·S query rows of kv head j as one tile (rows r·S + i
for head j·rep + r, query i: Hugging Face's ``repeat_kv`` order), so K and V are read once per kv head, not once
per query head, and the scores are a ``tl.dot`` [rows, D] × [D, BLOCK_L]. Along its range of the cache it keeps
the online softmax's running max m, sum ℓ and unnormalized output (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax", alg. 3; FlashAttention, Dao et al. 2022, alg. 1)::

    m' = max(m, max_l s_l),  ℓ' = ℓ·e^(m−m') + Σ_l e^(s_l−m'),  acc' = acc·e^(m−m') + Σ_l e^(s_l−m') · V_l

Split along L (flash-decoding, Dao et al. 2023, "Flash-Decoding for long-context inference"): with few programs
(batch 1: B·KV = 8 at Llama-3-8B shapes) each kv head's cache is cut into ``splits`` ranges; each program stores
(m, ℓ, acc) of its range and a second kernel combines them, in split order (deterministic):
O = Σ_c e^(m_c−M)·acc_c / Σ_c e^(m_c−M)·ℓ_c with M = max_c m_c. With one split the first kernel normalizes and
stores O itself.

Only the filled cache is read (``cache_position``): a static cache has ``max_cache_len`` slots (fxquant's default
is up to 4096), of which a decode step needs the ones written so far, ``cache_position[S-1] + 1``. With
``cache_position`` given, the kernel reads that many from the device (no host synchronization: the launch stays
CUDA-graph safe) and divides them among the splits, so a step costs what the filled cache costs, not what the
allocated one does (Llama-3-8B shapes, 4096 slots with 600 filled: a batch-32 step reads 8.6 GB of cache
per token over 32 layers, 1.3 GB of it filled). Slots past it are not read at all, mask included; the decode graph's
causal mask already excludes them (``fxquant.frontend.kv_cache``), so the result is the same as reading them.

Numerics against Hugging Face's eager attention (``eager_attention_forward``: scores rounded to the model's dtype
before the fp32 softmax, P rounded to the model's dtype before P·V): here the scores stay fp32 (not rounded to
bf16 first), the unnormalized e^(s−m) is rounded to V's dtype for the P·V ``tl.dot`` and the division by ℓ comes
after it; the outputs agree to the model dtype's rounding. fp32 models multiply in IEEE fp32 (not tf32).
Positions whose mask is −inf (or dtype-min, Hugging Face's masks) get weight 0, as in the reference; a query row
whose every position is masked gives NaN in both.

Operands: ``q`` [B, H, S, D] (any strides), ``k_cache`` / ``v_cache`` [B, KV, L, D] (any strides, the last
dimension contiguous for speed), ``mask`` [B or 1, 1, S, L] float (any float dtype, broadcast over the batch when
its first size is 1), ``scale`` a Python float; returns a contiguous [B, H, S, D] tensor in q's dtype. S ≤ 64 /
rep (a decode step: S = 1), D ≥ 16 (``tl.dot``'s minimum).

Speed is measured in ``bench/decode_profile_gpu.py`` and ``bench/generate_gpu.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import HAS_TRITON, cdiv, interpreting, next_pow2, num_sms, pdl_early_signal, pdl_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["decode_attention", "decode_attention_reference", "decode_attention_sdpa", "filled_cache", "fits",
           "pick_splits", "MAX_ROWS"]

MAX_ROWS = 64  # rep · S query rows per program (one tile; Llama-3: rep 4, S 1)
BLOCK_L = 64   # cache positions per step of a program's loop


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                               scale: float, cache_position: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The module docstring's math as Hugging Face's eager attention computes it (scores in the model's dtype,
    softmax in fp32, P rounded to the model's dtype): the definition the kernel and :func:`decode_attention_sdpa`
    are tested against, and the grouped-matmul form the GPU bench compares with. Shapes as
    :func:`decode_attention`; with ``cache_position`` only the slots up to ``cache_position[-1]`` are read (one
    host read of it)."""
    k_cache, v_cache, mask = filled_cache(k_cache, v_cache, mask, cache_position)
    b, h, s, d = q.shape
    kv = k_cache.shape[1]
    rep = h // kv
    scores = torch.matmul(q.reshape(b, kv, rep * s, d), k_cache.transpose(-1, -2)).to(torch.float32) * scale
    p = torch.softmax(scores + _grouped_mask(mask, rep, s), dim=-1).to(q.dtype)
    return torch.matmul(p, v_cache).reshape(b, h, s, d)


def filled_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                 cache_position: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V [B, KV, L, D] and the mask [.., L] cut to slots ``0 .. cache_position[-1]`` (at least 1, at most L):
    the ones a step attends to; unchanged for ``cache_position`` None. Reads ``cache_position`` on the host: a
    device synchronization on a GPU."""
    if cache_position is None:
        return k_cache, v_cache, mask
    n = max(1, min(int(cache_position[-1]) + 1, k_cache.shape[2]))
    return k_cache[:, :, :n], v_cache[:, :, :n], mask[..., :n]


def _grouped_mask(mask: torch.Tensor, rep: int, s: int) -> torch.Tensor:
    """mask [B or 1, 1, S, L] as the stacked query rows' [B or 1, 1, rep·S, L]: row r·S + i is query i of head
    j·rep + r (``repeat_kv``'s order)."""
    return mask.unsqueeze(2).expand(mask.shape[0], 1, rep, s, mask.shape[-1]).reshape(mask.shape[0], 1, rep * s, -1)


def decode_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                          scale: float, cache_position: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The module docstring's math as one ``F.scaled_dot_product_attention`` call over the filled slots only when
    ``cache_position`` is given (read on the host), K and V read once per kv head: for rep·S ≤ :data:`MAX_ROWS` (a
    decode step) the rep·S query rows of a kv head are stacked as that head's queries ([B, KV, rep·S, D], one
    query block per kv head), above it (a prefill block) SDPA's ``enable_gqa``. fxquant's decode and CPU prefill
    attention where the Triton kernel does not run (CPUs: ATen's flash attention for CPU, fp32 accumulation and
    softmax; shapes the kernel does not take on CUDA). Shapes as :func:`decode_attention`, any S; returns a
    contiguous [B, H, S, D] tensor in q's dtype.

    Measured on 2 AMX cores (torch 2.13, bf16, Qwen2-0.5B's 2 kv heads × 7, D 64, 150 slots filled): 19.8 µs at
    batch 1 and 55.8 at batch 8, against 67.4 and 121.5 for the grouped matmuls through ``torch.compile``; with
    4096 slots allocated, 19.7 and 55.4 against 174.5 and 784.7. A 128-token prefill block at batch 8 with 4096
    slots: 1.6 ms against 110 ms for SDPA over ``repeat_kv``'s copies of the whole cache."""
    b, h, s, d = q.shape
    kv = k_cache.shape[1]
    rep = h // kv
    k_cache, v_cache, mask = filled_cache(k_cache, v_cache, mask, cache_position)
    mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if rep * s > MAX_ROWS:
        return sdpa(q, k_cache, v_cache, attn_mask=mask, scale=scale, enable_gqa=rep > 1).contiguous()
    out = sdpa(q.reshape(b, kv, rep * s, d), k_cache, v_cache, attn_mask=_grouped_mask(mask, rep, s) if s > 1 else mask,
               scale=scale)
    return out.reshape(b, h, s, d).contiguous()


def fits(heads: int, kv_heads: int, queries: int, head_dim: int) -> bool:
    """The kernel takes this step: query heads a multiple of the kv heads, rep·S query rows in one tile
    (≤ :data:`MAX_ROWS`), D ≥ 16 (``tl.dot``'s minimum)."""
    return heads % kv_heads == 0 and heads // kv_heads * queries <= MAX_ROWS and head_dim >= 16


def pick_splits(programs: int, length: int, num_sms: int) -> int:
    """Cache splits per (batch row, kv head): enough programs for one per SM, each split at least two BLOCK_L steps
    long (a split's fixed cost, its partial's store and the combine, against its reads).

    Measured (NVIDIA H100, Triton 3.6, ``bench/decode_attention_gpu.py``, Llama-3-8B's 8 kv heads × 4, D 128, L 640,
    bf16, µs): batch 1 (8 programs) splits 1 / 2 / 4 / 5 / 8: 16.7 / 11.4 / 9.7 / 8.5 / 9.1; batch 8 (64): 20.0 /
    15.9 / 15.8 / 15.6 (5) / 15.6; batch 32 (256): 33.4 / 37.3 / 40.0 / - / 41.5."""
    want = cdiv(num_sms, max(programs, 1))
    return max(1, min(want, cdiv(length, 2 * BLOCK_L)))


if HAS_TRITON:

    @triton.jit
    def _ranges(pos_ptr, S, L, L_SPLIT, SPLITS, BLOCK_L: tl.constexpr, HAS_POS: tl.constexpr):
        """(filled slots, slots per range) of a launch with SPLITS ranges per (b, kv head). HAS_POS: the cache
        holds ``pos_ptr[S - 1] + 1`` filled slots (read here, on the device), cut into ranges of whole BLOCK_L
        steps, at least two a range (as :func:`pick_splits` asks of the host's split: splits chosen for all L slots
        would otherwise cut a short filled cache into one-step ranges); else all L slots in ranges of L_SPLIT."""
        if HAS_POS:
            filled = tl.minimum(tl.maximum(tl.load(pos_ptr + S - 1).to(tl.int32) + 1, 0), L)
            l_split = tl.maximum(tl.cdiv(tl.cdiv(filled, SPLITS), BLOCK_L), 2) * BLOCK_L
        else:
            filled = L
            l_split = L_SPLIT
        return filled, l_split

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, ws_ptr, ml_ptr, pos_ptr,
        KV, S, L, L_SPLIT, scale,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_vb, stride_vh, stride_vl, stride_vd,
        stride_mb, stride_ms, stride_ml,
        REP: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
        SPLIT: tl.constexpr, DOT_F32: tl.constexpr, HAS_POS: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr,
    ):
        """Program (b · KV + j, c): the rep·S query rows of kv head j of batch row b over cache range c. SPLIT 0:
        normalize and store O [B, H, S, D] (contiguous); 1: store acc, m and ℓ into the workspaces. The ranges,
        one a program of axis 1, are :func:`_ranges`'; a range past the filled slots reads and stores nothing."""
        if PDL:  # launched before the previous kernel ended (common.use_pdl): nothing is read before it has
            tl.extra.cuda.gdc_wait()
        if TRIGGER:  # after the wait (every earlier grid is done): the next kernel may launch, it waits for this one
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        c = tl.program_id(1)
        b = pid // KV
        j = pid % KV
        r = tl.arange(0, ROWS)
        row_ok = r < REP * S
        head = j * REP + r // S
        qi = r % S
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qs
                    + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + j.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + j.to(tl.int64) * stride_vh
        m_base = mask_ptr + b.to(tl.int64) * stride_mb + qi * stride_ms
        filled, l_split = _ranges(pos_ptr, S, L, L_SPLIT, tl.num_programs(1), BLOCK_L, HAS_POS)
        lo = c * l_split
        hi = tl.minimum(filled, lo + l_split)
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            pos_ok = pos < hi
            kt = tl.load(k_base + pos[:, None] * stride_kl + d[None, :] * stride_kd,
                         mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
                s = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            add = tl.load(m_base[:, None] + pos[None, :] * stride_ml, mask=row_ok[:, None] & pos_ok[None, :],
                          other=float("-inf")).to(tl.float32)
            s = s * scale + add
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no inf - inf
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_base + pos[:, None] * stride_vl + d[None, :] * stride_vd,
                         mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if SPLIT == 0:
            o_ptrs = o_ptr + ((b.to(tl.int64) * KV * REP + head[:, None]) * S + qi[:, None]) * D + d[None, :]
            tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            # a range past the filled slots stores nothing: the combine reads only the busy ranges (c = 0 always is)
            busy = r < tl.where((lo < filled) | (c == 0), ROWS, 0)  # [ROWS], all alike (no scalar mask)
            part = pid.to(tl.int64) * tl.num_programs(1) + c
            tl.store(ws_ptr + (part * ROWS + r[:, None]) * BLOCK_D + d[None, :], acc, mask=busy[:, None])
            tl.store(ml_ptr + (part * 2) * ROWS + r, m_i, mask=busy)
            tl.store(ml_ptr + (part * 2 + 1) * ROWS + r, l_i, mask=busy)

    @triton.jit
    def _decode_attention_combine(ws_ptr, ml_ptr, o_ptr, pos_ptr, KV, S, L, L_SPLIT, SPLITS,
                                  REP: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_L: tl.constexpr, HAS_POS: tl.constexpr, PDL: tl.constexpr,
                                  TRIGGER: tl.constexpr):
        """Program b · KV + j: O of its rows from the partials (acc, m, ℓ) of the SPLITS ranges, summed in split
        order. HAS_POS: only the ranges that hold filled slots (the first kernel's :func:`_ranges`) are read; the
        others stored nothing (a 4096-slot cache with 600 filled: 5 of 17)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        b = pid // KV
        j = pid % KV
        r = tl.arange(0, ROWS)
        d = tl.arange(0, BLOCK_D)
        base = pid.to(tl.int64) * SPLITS
        filled, l_split = _ranges(pos_ptr, S, L, L_SPLIT, SPLITS, BLOCK_L, HAS_POS)
        busy = tl.minimum(tl.maximum(tl.cdiv(filled, l_split), 1), SPLITS)
        m_max = tl.full((ROWS,), float("-inf"), tl.float32)
        for c in range(0, busy):
            m_max = tl.maximum(m_max, tl.load(ml_ptr + ((base + c) * 2) * ROWS + r))
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
        acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
        den = tl.zeros((ROWS,), tl.float32)
        for c in range(0, busy):
            w = tl.exp(tl.load(ml_ptr + ((base + c) * 2) * ROWS + r) - m_use)
            den += w * tl.load(ml_ptr + ((base + c) * 2 + 1) * ROWS + r)
            acc += w[:, None] * tl.load(ws_ptr + ((base + c) * ROWS + r[:, None]) * BLOCK_D + d[None, :])
        head = j * REP + r // S
        qi = r % S
        ok = (r < REP * S)[:, None] & (d < D)[None, :]
        o_ptrs = o_ptr + ((b.to(tl.int64) * KV * REP + head[:, None]) * S + qi[:, None]) * D + d[None, :]
        tl.store(o_ptrs, (acc / den[:, None]).to(o_ptr.dtype.element_ty), mask=ok)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                     scale: float, cache_position: Optional[torch.Tensor] = None,
                     splits: Optional[int] = None) -> torch.Tensor:
    """Grouped-query decode attention (module docstring) as one Triton kernel (plus the split combine).

    Args:
        q: [B, H, S, D] bf16 / fp16 / fp32; ``k_cache``, ``v_cache``: [B, KV, L, D], q's dtype, H a multiple of KV;
        mask: [B or 1, 1, S, L] additive float mask; scale: the scores' factor (usually D^-1/2);
        cache_position: None (read all L slots) or int32 / int64 [S] on q's device, the slots the S query tokens
            were written to (ascending): only slots ``<= cache_position[S-1]`` are read (module docstring);
        splits: cache splits per (b, kv head); None picks them (:func:`pick_splits`). No host synchronization:
            safe to capture in a CUDA graph.

    Returns:
        O [B, H, S, D], contiguous, q's dtype.

    Raises:
        RuntimeError: no Triton. ValueError: shapes or dtypes outside the above.
    """
    if not HAS_TRITON:
        raise RuntimeError("fxquant.kernels.decode_attention needs Triton; use decode_attention_reference")
    b, h, s, d = q.shape
    kb, kv, length, kd = k_cache.shape
    if (kb != b or kd != d or v_cache.shape != k_cache.shape or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[0] not in (1, b) or mask.shape[2] != s or mask.shape[3] != length):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k/v {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, "
                         f"mask {tuple(mask.shape)} do not fit [B, H, S, D], [B, KV, L, D] and [B or 1, 1, S, L]")
    if not fits(h, kv, s, d) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: H = {h} over KV = {kv} heads, rep·S = {h // kv * s} (at most {MAX_ROWS}), "
                         f"D = {d} (at least 16), dtypes {q.dtype} / {k_cache.dtype} / {v_cache.dtype} (one dtype)")
    if cache_position is not None and (cache_position.shape != (s,) or cache_position.device != q.device
                                       or cache_position.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"decode_attention: cache_position must be an int32 / int64 [S] = [{s}] tensor on {q.device}, "
                         f"got {cache_position.dtype} {tuple(cache_position.shape)} on {cache_position.device}")
    rep = h // kv
    rows, block_d = max(16, next_pow2(rep * s)), max(16, next_pow2(d))
    out = torch.empty(b, h, s, d, dtype=q.dtype, device=q.device)
    if splits is None:
        splits = pick_splits(b * kv, length, num_sms(q.device))
    l_split = cdiv(cdiv(length, splits), BLOCK_L) * BLOCK_L
    splits = cdiv(length, l_split)
    dot_f32 = interpreting() or q.dtype == torch.float32
    if splits > 1:
        ws = torch.empty(b * kv * splits * rows * block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b * kv * splits * 2 * rows, dtype=torch.float32, device=q.device)
    else:
        ws = ml = out
    smb = mask.stride(0) if mask.shape[0] > 1 else 0
    pos = out if cache_position is None else cache_position.contiguous()
    pdl, launch = pdl_launch(q.device)
    trigger = pdl and pdl_early_signal()
    _decode_attention_kernel[(b * kv, splits)](
        q, k_cache, v_cache, mask, out, ws, ml, pos,
        kv, s, length, l_split, float(scale),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), smb, mask.stride(2), mask.stride(3),
        REP=rep, D=d, ROWS=rows, BLOCK_D=block_d, BLOCK_L=BLOCK_L, SPLIT=int(splits > 1), DOT_F32=dot_f32,
        HAS_POS=cache_position is not None, PDL=pdl, TRIGGER=trigger,
        num_warps=4, num_stages=2, **launch)
    if splits > 1:
        _decode_attention_combine[(b * kv,)](ws, ml, out, pos, kv, s, length, l_split, splits, REP=rep, D=d, ROWS=rows,
                                             BLOCK_D=block_d, BLOCK_L=BLOCK_L, HAS_POS=cache_position is not None,
                                             PDL=pdl, TRIGGER=trigger, num_warps=4, **launch)
    return out
