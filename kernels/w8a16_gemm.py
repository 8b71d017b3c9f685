r"""W8A16 GEMM (int8 weights, float activations) for LLM decode, with a fused dequantize / bias / activation epilogue.

Math (weight-only int8, per-output-channel symmetric scales: LLM.int8, Dettmers et al. 2022, §3.1 "vector-wise"
quantization applied to W alone; the compressed-tensors "W8A16" scheme)::

    acc[m, n] = Σ_k x[m, k] · W_q[n, k]          fp32 accumulator; W_q converted to x's dtype in registers
    Y[m, n]   = act(acc[m, n] · s_w[n] + b[n])  fp32, then rounded to the output dtype (round-half-to-even)

Every int8 value is exact in bf16, fp16 and tf32 (|w| ≤ 127 needs 7 significant bits), and each product of a
bf16 / fp16 x with it is exact in the tensor core's fp32 accumulator, so the only roundings are the fp32
accumulation and the epilogue's. fp32 x goes through ``tl.dot(..., input_precision="tf32x3")``: x split into
a tf32 high part and a tf32 remainder, W exact in tf32 (its remainder term is zero), about fp32 accuracy at
tensor-core speed (the "3xTF32" of CUTLASS, ``cutlass/gemm/warp/mma_tensor_op_fast_f32.h``).

SwiGLU (``activation="swiglu"``, as ``w8a8_gemm``; Shazeer 2020, "GLU Variants Improve Transformer", §2):
W_q [2I, K] stacks gate_proj (rows [0, I)) over up_proj (rows [I, 2I)), s_w and b have 2I values, the
output is [M, I]; each program accumulates a gate tile and the matching up tile (a dual GEMM), then
Y = silu(acc_g · s_w[n] + b[n]) · (acc_u · s_w[I + n] + b[I + n]). ``geglu_tanh`` likewise with gelu_tanh.

Decode is memory-bound: at M ≤ 64 the time is the read of W_q (N·K bytes; x and Y are ≤ 1 % of it at the
shapes this was tuned on), so the kernel is built to stream W at HBM bandwidth:

* one M tile (BLOCK_M = 16, 32 or 64 ≥ M: tl.dot's minimum is 16; rows past M wrap onto real rows, and
  the store masks them), so each W byte is read once;
* ``SWAP``: the product is computed transposed, accᵀ = W_tile · x_tileᵀ, putting the converted weights
  on the MMA's A operand, which Hopper's wgmma (and mma.sync) take from registers, where the int8 → float
  conversion leaves them; x, the small operand, is the B operand in shared memory;
* ``CVT=1``: the int8 → bf16 / fp16 conversion by integer arithmetic on the bit pattern instead of the
  conversion instructions, which run at a quarter of the ALU rate on sm_90 (CUDA C Programming Guide,
  "Arithmetic Instructions" throughput table) and would otherwise bound the kernel near HBM speed.
  fp16: the bits 0x6400 + (w + 128) are the fp16 number 1024 + w + 128, so w = that − 1152 (exact);
  bf16 / fp32: the fp32 bits 0x4B000000 + (w + 128) are 2²³ + w + 128, so w = that − 8 388 736 (exact),
  then an exact cast. (NVIDIA FasterTransformer, ``cutlass_extensions/interleaved_numeric_conversion.h``,
  ``FastInterleavedAndBiasedNumericArrayConverter``; the same constants.)
* split-K (``SPLIT_K`` > 1, grid axis 1) where N alone gives too few programs for the GPU's SMs (o_proj
  4096×4096, down_proj 4096×14336, Qwen2's 1536×8960): each program stores its fp32 partial tile into a
  workspace [SPLIT_K, M, N] (``torch.empty`` per call: no zeroing), then bumps a per-tile arrival counter
  (``tl.atomic_add``, acq_rel, GPU scope, after a CTA barrier); the program that arrives last sums the
  SPLIT_K partials *in split order* (deterministic, unlike fp32 atomics), resets the counter to 0 and runs
  the epilogue. One kernel, no second launch, no memset ("serial" split-K with a semaphore, as CUTLASS's
  ``GemmUniversalMode::kGemm`` with ``split_k_slices`` > 1 and a ``Semaphore``; Stream-K, Osama et al.
  2023, §4, fixes up partial tiles the same way). The counters (int32, one per output tile) live in a
  buffer kept per (device, stream), zeroed once and left zeroed by every launch.

GEMV variant (``W8A16Config.gemv`` ≥ 1, M ≤ :data:`GEMV_MAX_M` = 4; ``_w8a16_gemv_kernel``), for decode, where the
tl.dot kernel's BLOCK_M ≥ 16 tile wastes ≥ 15/16 of every MMA at M = 1 and the sweep above left the smaller
projections at 36-66 % of HBM bandwidth. No tl.dot: program (n tile, K split) loads K-contiguous int8 W tiles
[BLOCK_N, BLOCK_K] (16-byte vector loads, ``evict_first``: W is read once; GATED: the up_proj twin tile too),
converts each once to fp32 in registers (``_convert``; CVT 1: the fp32 bit-pattern trick above, no quarter-rate
I2F), and for each of the M ≤ 4 rows of x (unrolled, one accumulator each: see the comment at the kernel)

    acc[m, n] += Σ_{k in block} fp32(x[m, k]) · fp32(W_q[n, k])      (fp32 multiply-adds, ``tl.sum`` along K)

either reducing each block as it is read (gemv = 1: with BLOCK_K ≤ 512 a row's block lies within one warp, 16
bytes a lane, so that is a few shuffles per block; BLOCK_K 1024 spans two warps and suits gemv = 2) or keeping [BLOCK_N, BLOCK_K] elementwise partial sums and reducing once
after the loop (gemv = 2: no cross-lane work in the loop, more registers). 16-bit x times an int8 is exact in
fp32, so as in the tl.dot kernel the only roundings are the fp32 sums and the epilogue's (summation order differs,
so outputs match the tl.dot kernel's to rounding, not bit for bit). Split-K, its serial in-split-order reduction
and the epilogue are the tl.dot kernel's own (``_finish``, ``_partial_ptrs``, ``_counters``, ``_epilogue``); the
launch is as CUDA-graph-safe. Streaming knobs: ``num_stages`` > 1 pipelines the K loop (``tl.range(num_stages=…)``,
which, unlike the kernel-level option, also pipelines loads that feed no tl.dot: cp.async into shared memory,
checked by compiling for sm_90 with Triton 3.9), ``prefetch`` loads block i+1 into registers before using block i;
only the K tail (odd K, in the last split) takes a masked step. Its speed is UNMEASURED: nothing selects it until
``bench/w8a16_gpu.py --gemv-only`` (or ``--sweep``) has been run on an H100 / H200 and its winners entered in
:data:`_GEMV_TUNED`, which :func:`pick_config` consults first.

Programmatic dependent launch (``common.use_pdl``: sm_90+, on by default, ``FXQUANT_PDL=0`` turns it off): the
kernels are launched with the PDL attribute and wait (``griddepcontrol.wait``) before their first read of x, W, the
workspace or the counters, so a launch overlaps the previous kernel's tail. Once a program's K loop has read W
it signals ``griddepcontrol.launch_dependents`` (``common.pdl_early_signal``; ``FXQUANT_PDL_TRIGGER=0``: at exit),
so the next kernel's programs launch during the epilogue and the split-K reduction (8-layer decode step, H100:
1.5-2.3 % faster). Three other forms were measured slower and dropped (docs/benchmarks.md): the first W block
loaded into registers before the wait (it forces the prefetching loop on configs tuned without it), the same with
the dependents signalled once x is read, and the program's first W blocks hinted into L2
(``prefetch.global.L2``) before the wait (1-4 % slower with 1-2 blocks, 25 % with 8, where the ``evict_last``
lines crowded L2; why the smaller hints lose was not profiled).

CUDA graphs: the launch does no host synchronization and no data-dependent allocation (the workspace's
size follows the shape). The config comes from a fixed table (:func:`pick_config`, measured on an H100 /
H200), never from autotuning, so no call benchmarks. Before capturing, call once eagerly with each shape
(it compiles the kernel, which capture cannot do, and allocates the split-K counters of that device
outside the graph); a split-K launch captured without that warm-up still runs correctly but allocates
zeroed counters inside the graph (one extra memset node per GEMM). Captured graphs share one counter
buffer per device: replay graphs that hold split-K GEMMs on one stream at a time (concurrent eager
launches on different streams are safe: their counters differ).

Operands:

* ``x``  bf16 / fp16 / fp32 [M, K] (K-contiguous after ``.contiguous()``);
* ``w_q`` int8 [N, K] (the ``nn.Linear`` layout, per output channel), ``w_scale`` fp32 [N] or [N, 1];
* ``bias`` [N] any float dtype or None; output ``out_dtype`` (default x's dtype) [M, N] ([M, N/2] gated).

Shapes: any M, N, K ≥ 1 (tails are masked; N even for the gated activations). Tuned for M ≤ 32 (M = 33..64
takes BLOCK_M 64 tiles, not measured); larger M runs (several BLOCK_M = 64 tiles) but is not what this kernel
is for (``w8a8_gemm`` and cuBLAS serve prefill).

Measured (NVIDIA H200, torch 2.11, Triton 3.6, bf16 x, weights streamed from HBM in a CUDA graph: see
``bench/w8a16_gpu.py``), µs and the int8 weight bytes' share of 4.8 TB/s, M = 1 / 8 / 32:

* Llama-3-8B lm_head 128256×4096: 126.5 / 132.0 / 203.2 µs, 87 / 83 / 54 % (bf16 ``F.linear``: 239 / 241 / 255);
  down_proj 4096×14336 (split-K 4): 19.4 / 20.0 / 27.4 µs, 63 / 61 / 45 %; gate/up + swiglu 28672×4096:
  37.0 / 40.9 / 52.0 µs, 66 / 60 / 47 %; q/k/v 6144×4096 (split-K 2): 11.4 / 11.9 / 16.6 µs, 46 / 44 / 32 %;
  o_proj 4096×4096: 9.7 / 9.8 / 11.6 µs, 36 / 36 / 30 %.
* Qwen2-1.5B lm_head 151936×1536: 61.7 / 64.8 / 102.0 µs, 79 / 75 / 48 %; the 2-3 MB projections take 4.9-5.5 µs
  (10-13 %), as cuBLAS's bf16 GEMMs of them do (5.2-6.5 µs): a fixed cost per kernel, not bandwidth.

The bit-pattern conversion won for fp16 x (23.7 → 15.4 µs at 6144×4096, M = 8); for bf16 x Triton's own cast
(itself a bit trick: LOP3/PRMT and packed bf16 adds) was faster. ``SWAP`` lost at every shape measured (Triton
puts the converted W tile of a BLOCK_N ≥ 64 wgmma through 2-byte shared-memory loads) and is off by default.
Serial split-K beat split_mode "reduce" (a second kernel) in 26 of 36 pairs, by 0.1-1 µs.

Triton's interpreter (3.9) computes ``tl.dot`` of bf16 tiles on their uint16 bit patterns and casts int8 to
bf16 the same way; under it, a bf16 x is multiplied in fp32 (``DOT_DTYPE``), which gives the same exact
products, so the tests still check the bf16 path's indexing, masking and epilogue.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .common import ACTIVATIONS, GATED_ACTIVATIONS, HAS_TRITON, _cuda_index, activation_torch, cdiv, interpreting, pdl_early_signal, pdl_launch
from .common import num_sms as _num_sms
from .launch import LaunchCache

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import apply_activation, gate_activation, round_to

    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

__all__ = ["w8a16_gemm", "w8a16_gemm_reference", "W8A16Config", "pick_config"]

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LAUNCHES = LaunchCache()
_REDUCE_LAUNCHES = LaunchCache()
_GEMV_LAUNCHES = LaunchCache()
_MAX_BLOCK_M = 64
_COUNTER_SLOTS = 8192  # tiles of a split-K launch served by the cached counters (more: zeroed per call)
GEMV_MAX_M = 4  # the GEMV variant's largest M: its kernel unrolls one accumulator per row (4 of them)


class W8A16Config(NamedTuple):
    """One launch configuration. BLOCK_M follows M (:func:`block_m`); ``block_n`` is the width of each
    accumulator (the gated kernel holds two); ``split_k`` programs share each output tile's K range (1: no
    split); ``swap``: the transposed product (W on the MMA's A operand); ``cvt``: 1 = bit-pattern int8
    conversion, 0 = Triton's cast; ``split_mode``: "serial" (last arriving program reduces) or "reduce"
    (a second kernel sums the partials; kept for measurement).

    ``gemv`` (M ≤ :data:`GEMV_MAX_M` only): 0 = the tl.dot kernel; 1 = the GEMV kernel without tl.dot, each
    K block reduced with ``tl.sum`` as it is read; 2 = the GEMV kernel accumulating [BLOCK_N, BLOCK_K]
    products elementwise and reducing once after the K loop (no cross-thread work in the loop, but BLOCK_M such
    fp32 tiles in registers: 16x512 at M = 4 spills on sm_90, so meant for M ≤ 2). ``True`` means 1. GEMV configs ignore ``swap``; their ``num_stages`` also pipelines the K
    loop (``tl.range(num_stages=…)``, which pipelines loads that feed no tl.dot; 1: no pipelining) and
    ``prefetch`` loads the next W block into registers before converting and multiplying the current one
    (manual double buffering). ``cvt`` 1 is the fp32 bit-pattern conversion there (x is multiplied in fp32)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    swap: bool = True
    cvt: int = 1
    split_mode: str = "serial"
    gemv: int = 0
    prefetch: bool = False


def block_m(m: int) -> int:
    """BLOCK_M of the (single, for M ≤ 64) M tile: the next power of two ≥ M, at least 16 (tl.dot's
    minimum), at most 64."""
    return min(max(16, 1 << max(m - 1, 0).bit_length()), _MAX_BLOCK_M)


# The sweep's winners (bench/w8a16_gpu.py --sweep: NVIDIA H200, Triton 3.6, bf16 x, M = 1, 8 → BLOCK_M 16 and
# M = 32 → BLOCK_M 32) where :func:`_rule` chose another config and lost by more than ~4 %. Key: (N (I for the
# gated), K, gated, BLOCK_M); value: (block_n, block_k, split_k, num_warps, num_stages).
# M = 32 rows re-measured on an NVIDIA H100 (the sweep with 2-3 stage and 128-wide K kinds, weights from HBM,
# 2026-12-06; µs, the rule's config in brackets): fewer stages let two programs share an SM.
_TUNED = {
    (4096, 4096, False, 32): (32, 512, 1, 4, 4),    # o_proj, M = 32: 11.6 µs; the rule's 32x256 split 2: 13.2 (H100: 11.4)
    (1536, 8960, False, 32): (32, 256, 8, 4, 4),    # Qwen2 down, M = 32: 13.2 µs; the rule's split 6: 14.3
    (6144, 4096, False, 32): (64, 256, 4, 4, 3),    # Llama-3 q/k/v: 16.1 µs [16.6]
    (4096, 14336, False, 32): (64, 256, 4, 4, 3),   # Llama-3 down: 28.7 µs [29.0]
}


def gemv_block_m(m: int) -> int:
    """BLOCK_M of the GEMV kernel: M rounded up to a power of two (1, 2 or 4; rows past M are masked)."""
    return 1 << max(m - 1, 0).bit_length()


# GEMV configs measured to beat the tl.dot kernel's choice (bench/w8a16_gpu.py --gemv-only / --sweep, which print
# ready-made entries). Key: (N (I for the gated), K, gated, M) with M ≤ GEMV_MAX_M; value: a W8A16Config with
# gemv ≥ 1. Shapes and M not listed take the tl.dot kernel.
# Measured: NVIDIA H100 80GB HBM3, torch 2.11, Triton 3.6, bf16 x, M = 1, weights from HBM (bench/w8a16_gpu.py
# --gemv-only, 2026-12-06); every entry beat pick_config's tl.dot config, by 2.9 % (the LM head) to 19 %. Not chosen (GEMV lost): Qwen2-1.5B's
# 2048x1536 and 1536x1536 (5.5 / 5.2 µs against 5.1 / 4.9: a fixed cost per kernel, not bandwidth).
# M = 2 and 4 (the same card and versions, --gemv-only --gemv-ms 2,4, 2026-12-07): at M = 2 the GEMV kernel beat
# the tl.dot config by 3.9-16 % on the five shapes listed, was level on the LM heads and Qwen2's down_proj (0.99-1.01x)
# and lost on Qwen2's small q/k/v and o_proj (0.80 / 0.86x); at M = 4 it lost on every shape (0.72-0.89x: four fp32
# FMAs per weight element on the CUDA cores cost more than tl.dot's 16-row MMA, which wastes 12 of its rows), so M = 3
# and 4 take the tl.dot kernel.
_GEMV_TUNED: dict = {
    (6144, 4096, False, 1): W8A16Config(8, 512, 1, 4, 4, swap=False, cvt=1, gemv=1, prefetch=False),     # 11.3 µs 66 %; tl.dot 13.0
    (4096, 4096, False, 1): W8A16Config(16, 512, 3, 4, 1, swap=False, cvt=1, gemv=1, prefetch=False),    # 10.1 µs 50 %; tl.dot 10.5
    (14336, 4096, True, 1): W8A16Config(16, 256, 1, 4, 3, swap=False, cvt=1, gemv=1, prefetch=False),    # 42.1 µs 83 %; tl.dot 44.9
    (4096, 14336, False, 1): W8A16Config(16, 512, 3, 4, 1, swap=False, cvt=1, gemv=1, prefetch=False),   # 23.8 µs 73 %; tl.dot 25.4
    (128256, 4096, False, 1): W8A16Config(16, 512, 1, 4, 1, swap=False, cvt=1, gemv=1, prefetch=False),  # 168.0 µs 93 %; tl.dot 172.9
    (8960, 1536, True, 1): W8A16Config(8, 512, 1, 4, 1, swap=False, cvt=1, gemv=1, prefetch=False),      # 11.7 µs 70 %; tl.dot 14.0
    (1536, 8960, False, 1): W8A16Config(16, 512, 6, 4, 1, swap=False, cvt=1, gemv=1, prefetch=False),    # 9.4 µs 44 %; tl.dot 10.7
    (151936, 1536, False, 1): W8A16Config(16, 512, 1, 4, 1, swap=False, cvt=1, gemv=1, prefetch=False),  # 76.4 µs 91 %; tl.dot 80.4
    (6144, 4096, False, 2): W8A16Config(8, 512, 1, 4, 4, swap=False, cvt=1, gemv=1, prefetch=False),     # 12.4 µs 61 %; tl.dot 14.3
    (4096, 4096, False, 2): W8A16Config(32, 256, 5, 4, 3, swap=False, cvt=1, gemv=1, prefetch=False),    # 10.8 µs 46 %; tl.dot 11.2
    (14336, 4096, True, 2): W8A16Config(16, 256, 1, 4, 3, swap=False, cvt=1, gemv=1, prefetch=False),    # 44.0 µs 80 %; tl.dot 45.7
    (4096, 14336, False, 2): W8A16Config(32, 256, 5, 4, 3, swap=False, cvt=1, gemv=1, prefetch=False),   # 25.9 µs 68 %; tl.dot 26.9
    (8960, 1536, True, 2): W8A16Config(16, 256, 1, 4, 3, swap=False, cvt=1, gemv=1, prefetch=False),     # 13.5 µs 61 %; tl.dot 14.7
}


def _gemv_config(m: int, n: int, k: int, gated: bool, num_sms: int, x_dtype: torch.dtype) -> Optional[W8A16Config]:
    """The GEMV config for this decode shape, or None (then the tl.dot kernel's table and rule decide). The hook
    pick_config consults first: today only :data:`_GEMV_TUNED` (measured shapes); a rule for unmeasured shapes
    can go here once the sweep shows one. Any x dtype: the GEMV kernel multiplies in fp32 whatever x is."""
    if m > GEMV_MAX_M:
        return None
    return _GEMV_TUNED.get((n, k, gated, m))


def _rule(m: int, n: int, k: int, gated: bool, num_sms: int) -> tuple:
    """(block_n, block_k, split_k, num_warps, num_stages) for a 16-bit x, from the H200 sweep's pattern:

    * plain: a grid of ≥ 1.9 programs per SM (split-K where N/BLOCK_N alone is fewer), each split at least
      4 K blocks (1024 columns); BLOCK_N 64 where that leaves each program ≥ 2048 columns of K (or no split is
      needed), else 32 (shorter programs stream worse than more of them); M > 16 with too few tiles and K too
      short to split: BLOCK_N 16 with BLOCK_K 512;
    * gated (two accumulators): BLOCK_N 64 with 8 warps once N/64 tiles give ≥ 1.5 programs per SM (or M > 16),
      else 32 with 4 warps; split-K only where the tiles are fewer than the SMs.

    BLOCK_M ≥ 32 (the H100 sweep of 2026-12-06, Llama-3-8B and Qwen2-1.5B shapes at M = 32): gated 64x128 with 4
    warps and 3 stages (Llama-3 gate/up 46.8 against 53.7 µs, Qwen2 17.7 against 21.1); a plain N wide enough for
    ≥ 1.9 programs per SM without split (the LM heads) 128x256 with 8 warps and 3 stages (187.5 against 202.7 µs,
    Qwen2 92.9 against 103.5).
    """
    bm = block_m(m)
    m_tiles = cdiv(m, bm)
    target = 1.9 * num_sms

    def split_for(bn: int, bk: int, goal: float) -> tuple[int, int]:
        tiles = m_tiles * cdiv(n, bn)
        cap = max(1, cdiv(k, bk) // 4)
        return tiles, min(cap, max(1, -(-int(goal) // tiles)), _COUNTER_SLOTS // tiles or 1)

    if gated:
        if bm >= 32:
            tiles, split = split_for(64, 128, target)
            return 64, 128, split if tiles < num_sms else 1, 4, 3
        bn, warps = (64, 8) if bm > 16 or cdiv(n, 64) >= 1.5 * num_sms else (32, 4)
        tiles, split = split_for(bn, 256, target)
        return bn, 256, split if tiles < num_sms else 1, warps, 4
    tiles64, split64 = split_for(64, 256, target)
    if bm >= 32 and split64 == 1 and tiles64 >= target:
        return 128, 256, 1, 8, 3
    if (split64 == 1 and tiles64 >= target) or cdiv(k, split64) >= 2048:
        return 64, 256, split64, 4, 4
    tiles, split = split_for(32, 256, target)
    if bm > 16 and split == 1 and tiles < num_sms:
        return 16, 512, 1, 4, 4
    return 32, 256, split, 4, 4


def pick_config(m: int, n: int, k: int, gated: bool, num_sms: int, x_dtype: torch.dtype = torch.bfloat16) -> W8A16Config:
    """The launch configuration for M rows, output width ``n`` (I for gated), reduction ``k`` on ``num_sms``
    SMs: a GEMV config where :data:`_GEMV_TUNED` holds one (M ≤ :data:`GEMV_MAX_M`; the H100 sweep's M = 1 winners), else
    :data:`_TUNED` where the H200 sweep measured the shape, else :func:`_rule`; never autotuned (a
    CUDA-graph-safe, deterministic choice). fp16 x takes the bit-pattern conversion (measured 15.4 against
    23.7 µs with Triton's cast, which is a quarter-rate I2F per element); bf16 x takes Triton's cast (its
    own bit trick: faster than ours at every shape measured); fp32 x a 64x64 tile (tf32x3: three MMAs per
    step; BLOCK_K ≥ 128 spills). BLOCK_M 64 (M > 32, not measured) caps BLOCK_K at 256, BLOCK_N at 64 and
    takes 3 stages, so that its wgmma operands fit in shared memory."""
    if interpreting():
        return W8A16Config(block_n=32, block_k=32)
    gemv = _gemv_config(m, n, k, gated, num_sms, x_dtype)
    if gemv is not None:
        return gemv
    bm = block_m(m)
    if x_dtype == torch.float32:
        bn, bk, warps, stages = (32 if gated else 64), 64, 4, 5
        tiles = cdiv(m, bm) * cdiv(n, bn)
        split = min(max(1, cdiv(k, bk) // 8), max(1, -(-int(1.9 * num_sms) // tiles)), _COUNTER_SLOTS // tiles or 1)
        return W8A16Config(bn, bk, split, warps, stages, swap=False, cvt=0)
    bn, bk, split, warps, stages = _TUNED.get((n, k, gated, min(bm, 32))) or _rule(m, n, k, gated, num_sms)
    if bm > 32:
        bn, bk, stages = min(bn, 64), min(bk, 256), 3
        tiles = cdiv(m, bm) * cdiv(n, bn)
        split = min(split, max(1, cdiv(k, bk) // 4), _COUNTER_SLOTS // tiles or 1)
    return W8A16Config(bn, bk, split, warps, stages, swap=False, cvt=1 if x_dtype == torch.float16 else 0)


if HAS_TRITON:

    @triton.jit
    def _convert(w, DTYPE: tl.constexpr, CVT: tl.constexpr):
        """An int8 tile as DTYPE, exactly (see the module docstring for CVT = 1's bit-pattern arithmetic)."""
        if CVT == 1:
            if DTYPE == tl.float16:
                b = w.to(tl.int16) + 0x6480  # fp16 bits of 1024 + (w + 128); ≤ 0x647F + 0x80 < 2¹⁵
                return b.to(tl.float16, bitcast=True) - 1152.0
            else:
                b = w.to(tl.int32) + 0x4B000080  # fp32 bits of 2²³ + (w + 128)
                return (b.to(tl.float32, bitcast=True) - 8388736.0).to(DTYPE)
        else:
            return w.to(DTYPE)

    @triton.jit
    def _epilogue(acc, acc_up, rows, cols, M, N, c_ptr, stride_cm, stride_cn, w_scale_ptr, bias_ptr,
                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
        """Y = act(acc · s_w + b) → c's dtype (round-half-to-even, ``common.round_to``), masked to [M, N];
        GATED: Y = gate_act(g) · u with u from ``acc_up`` and the s_w / b entries N + n."""
        mask_m = rows < M
        mask_n = cols < N
        y = acc * tl.load(w_scale_ptr + cols, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            u = acc_up * tl.load(w_scale_ptr + N + cols, mask=mask_n, other=0.0)[None, :]
            if HAS_BIAS:
                u = u + tl.load(bias_ptr + N + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            y = gate_activation(y, ACTIVATION) * u
        else:
            y = apply_activation(y, ACTIVATION)
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, round_to(y, c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _partial_ptrs(ws_ptr, split, rows, cols, M, NW):
        """Addresses of a [BLOCK_M, BLOCK_N] tile of the split-K workspace [SPLIT_K, M, NW] (NW = N, or 2N gated)."""
        return ws_ptr + (split * M + rows[:, None]).to(tl.int64) * NW + cols[None, :]

    @triton.jit
    def _finish(acc, acc_up, rows, cols, tile, pid_k, M, N, c_ptr, stride_cm, stride_cn, w_scale_ptr, bias_ptr, ws_ptr,
                cnt_ptr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr):
        """The end of a program of output tile ``tile`` over K split ``pid_k`` with its fp32 [BLOCK_M, BLOCK_N]
        accumulators: SPLIT 0 the epilogue; else the partial into the workspace, and (SPLIT 1, serial split-K)
        the program arriving last at the tile's counter sums the partials in split order, re-zeroes the
        counter and runs the epilogue (SPLIT 2: ``_w8a16_reduce_kernel`` does that). Shared by both kernels."""
        if SPLIT == 0:
            _epilogue(acc, acc_up, rows, cols, M, N, c_ptr, stride_cm, stride_cn, w_scale_ptr, bias_ptr,
                      HAS_BIAS, ACTIVATION, GATED)
        else:
            NW = 2 * N if GATED else N
            mask = (rows < M)[:, None] & (cols < N)[None, :]
            p_ptrs = _partial_ptrs(ws_ptr, pid_k, rows, cols, M, NW)
            tl.store(p_ptrs, acc, mask=mask)
            if GATED:
                tl.store(p_ptrs + N, acc_up, mask=mask)
            if SPLIT == 1:
                # every thread's partial is stored before the (one-thread) release of the counter
                tl.debug_barrier()
                arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
                if arrived == tl.num_programs(1) - 1:
                    tot = tl.zeros_like(acc)
                    tot_up = tl.zeros_like(acc)
                    for s in range(0, tl.num_programs(1)):  # split order: the sum does not depend on arrival
                        q_ptrs = _partial_ptrs(ws_ptr, s, rows, cols, M, NW)
                        tot += tl.load(q_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                        if GATED:
                            tot_up += tl.load(q_ptrs + N, mask=mask, other=0.0, cache_modifier=".cg")
                    tl.atomic_xchg(cnt_ptr + tile, 0)  # left zeroed for the next launch
                    _epilogue(tot, tot_up, rows, cols, M, N, c_ptr, stride_cm, stride_cn, w_scale_ptr, bias_ptr,
                              HAS_BIAS, ACTIVATION, GATED)

    @triton.jit
    def _w8a16_gemm_kernel(
        x_ptr, w_ptr, c_ptr, w_scale_ptr, bias_ptr, ws_ptr, cnt_ptr,
        M, N, K, K_SPLIT,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, EVEN_M: tl.constexpr,
        EVEN_K: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, CVT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
        TRIGGER: tl.constexpr,
    ):
        """One [BLOCK_M, BLOCK_N] output tile (and, GATED, its up_proj twin at W rows N + n) over the K range
        [pid_k · K_SPLIT, (pid_k + 1) · K_SPLIT) of program (tile, pid_k). SPLIT: 0 no split-K, 1 serial
        (the last arriving program reduces and stores), 2 partials only (``_w8a16_reduce_kernel`` finishes)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_pid_m  # M tiles fastest: programs sharing a W tile run together (L2 reuse, M > 64)
        pid_n = pid // num_pid_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # W rows past N wrap onto real ones (no mask in the main loop; stores mask them); x rows past M are
        # masked instead, so that a decode step (M = 1) moves one row of x, not BLOCK_M copies of it
        mask_xm = rows < M
        offs_xm = tl.where(mask_xm, rows, 0)
        offs_wn = cols % N
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_xm[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
        w_ptrs = w_ptr + offs_wn[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk  # [BN, BK]
        u_ptrs = w_ptrs + tl.cast(N, tl.int64) * stride_wn  # GATED only: up_proj rows N + n
        if PDL:  # launched before the previous kernel ended (common.use_pdl): nothing is read before it has
            tl.extra.cuda.gdc_wait()
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # GATED only
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GATED only
        for k in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                if EVEN_M:
                    xt = tl.load(x_ptrs)
                else:
                    xt = tl.load(x_ptrs, mask=mask_xm[:, None], other=0.0)
                wt = tl.load(w_ptrs)
                if GATED:
                    ut = tl.load(u_ptrs)
            else:
                k_mask = (k + tl.arange(0, BLOCK_K)) < k_hi
                xt = tl.load(x_ptrs, mask=mask_xm[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=k_mask[None, :], other=0)
                if GATED:
                    ut = tl.load(u_ptrs, mask=k_mask[None, :], other=0)
            xt = xt.to(DOT_DTYPE)  # x's own dtype, except bf16 under the interpreter (see the launcher)
            wt = _convert(wt, DOT_DTYPE, CVT)
            if SWAP:
                acc = tl.dot(wt, tl.trans(xt), acc, input_precision=PRECISION)
                if GATED:
                    acc_up = tl.dot(_convert(ut, DOT_DTYPE, CVT), tl.trans(xt), acc_up, input_precision=PRECISION)
            else:
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
                if GATED:
                    acc_up = tl.dot(xt, tl.trans(_convert(ut, DOT_DTYPE, CVT)), acc_up, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            if GATED:
                u_ptrs += BLOCK_K * stride_wk
        if TRIGGER:  # W is read: the next kernel may launch now (it still waits for this grid to end)
            tl.extra.cuda.gdc_launch_dependents()
        if SWAP:
            acc = tl.trans(acc)
            if GATED:
                acc_up = tl.trans(acc_up)
        _finish(acc, acc_up, rows, cols, pid, pid_k, M, N, c_ptr, stride_cm, stride_cn, w_scale_ptr, bias_ptr, ws_ptr,
                cnt_ptr, HAS_BIAS, ACTIVATION, GATED, SPLIT)

    # ------------------------------------------------------------------------------ GEMV (M ≤ GEMV_MAX_M)
    # Rows of x are unrolled by hand (up to 4: one accumulator per row, the rows a BLOCK_M of 1, 2 or 4 holds)
    # rather than multiplied as a 3-D broadcast x[BM, 1, BK] · W[1, BN, BK]: in the 3-D form W's tile goes
    # through a [BM, BN, BK] layout that Triton's layout propagation may reach by converting W through shared
    # memory every K step, whereas here every W tile keeps the (16-byte vector) layout it is loaded in and only
    # the x rows, BN times smaller, are broadcast into it, the shape of Triton's well-trodden GEMV kernels (Triton
    # 3.9 for sm_90: without pipelining, each x row block goes through shared memory once per K step to reach W's
    # layout; with num_stages > 1 it is read from its cp.async buffer in that layout, no conversion in the loop).

    @triton.jit
    def _gemv_x(x_ptrs, r: tl.constexpr, stride_xm, M, k_mask, MASK_K: tl.constexpr, EVEN_M: tl.constexpr):
        """Row r of an x block [BLOCK_K] as fp32 (0 past M, and, MASK_K, past the K range): a 1-D vector that
        broadcasts along the W tile's rows."""
        ptrs = x_ptrs + r * stride_xm
        if MASK_K:
            if EVEN_M or r == 0:
                v = tl.load(ptrs, mask=k_mask, other=0.0)
            else:
                v = tl.load(ptrs, mask=k_mask & _uniform_mask(M - r, 1, ptrs.shape[0]), other=0.0)
        else:
            if EVEN_M or r == 0:
                v = tl.load(ptrs)
            else:
                v = tl.load(ptrs, mask=_uniform_mask(M - r, 1, ptrs.shape[0]), other=0.0)
        return v.to(tl.float32)

    @triton.jit
    def _uniform_mask(rem, R: tl.constexpr, C: tl.constexpr):
        """(rem > 0) as an [R, C] (R = 1: [C]) mask, every element the same: the form whose constancy Triton's
        axis analysis sees, so masked loads still vectorize (a scalar mask would too when compiled, but Triton
        3.9's interpreter splats a scalar i1 as int32 and rejects it)."""
        if R == 1:
            return tl.zeros((C,), dtype=tl.int32) < rem
        else:
            return tl.zeros((R, C), dtype=tl.int32) < rem

    @triton.jit
    def _gemv_fma(a, wf, xv, DEFER: tl.constexpr):
        """One row's accumulator += W_tile · x_block: DEFER keeps the [BLOCK_N, BLOCK_K] products elementwise
        (summed after the K loop), else the block's dot products are summed along K now (``tl.sum``)."""
        if DEFER:
            return a + wf * xv[None, :]
        else:
            return a + tl.sum(wf * xv[None, :], axis=1)

    @triton.jit
    def _gemv_step(a0, a1, a2, a3, g0, g1, g2, g3, wt, ut, x_ptrs, stride_xm, M, k_mask,
                   MASK_K: tl.constexpr, EVEN_M: tl.constexpr, GATED: tl.constexpr, CVT: tl.constexpr,
                   DEFER: tl.constexpr, BLOCK_M: tl.constexpr):
        """One K block: the int8 tile(s) converted to fp32 once, multiplied by each of the BLOCK_M x rows
        (a0..a3: W rows n; g0..g3, GATED: W rows N + n); rows ≥ BLOCK_M keep their (unused) accumulators."""
        x0 = _gemv_x(x_ptrs, 0, stride_xm, M, k_mask, MASK_K, EVEN_M)
        wf = _convert(wt, tl.float32, CVT)
        a0 = _gemv_fma(a0, wf, x0, DEFER)
        if GATED:
            uf = _convert(ut, tl.float32, CVT)
            g0 = _gemv_fma(g0, uf, x0, DEFER)
        if BLOCK_M > 1:
            x1 = _gemv_x(x_ptrs, 1, stride_xm, M, k_mask, MASK_K, EVEN_M)
            a1 = _gemv_fma(a1, wf, x1, DEFER)
            if GATED:
                g1 = _gemv_fma(g1, uf, x1, DEFER)
        if BLOCK_M > 2:
            x2 = _gemv_x(x_ptrs, 2, stride_xm, M, k_mask, MASK_K, EVEN_M)
            x3 = _gemv_x(x_ptrs, 3, stride_xm, M, k_mask, MASK_K, EVEN_M)
            a2 = _gemv_fma(a2, wf, x2, DEFER)
            a3 = _gemv_fma(a3, wf, x3, DEFER)
            if GATED:
                g2 = _gemv_fma(g2, uf, x2, DEFER)
                g3 = _gemv_fma(g3, uf, x3, DEFER)
        return a0, a1, a2, a3, g0, g1, g2, g3

    @triton.jit
    def _gemv_stack(a0, a1, a2, a3, DEFER: tl.constexpr, BLOCK_M: tl.constexpr):
        """The row accumulators as one fp32 [BLOCK_M, BLOCK_N] tile (DEFER: each reduced along K first)."""
        if DEFER:
            a0 = tl.sum(a0, axis=1)
        r = tl.arange(0, BLOCK_M)[:, None]
        acc = tl.where(r == 0, a0[None, :], 0.0)
        if BLOCK_M > 1:
            if DEFER:
                a1 = tl.sum(a1, axis=1)
            acc = tl.where(r == 1, a1[None, :], acc)
        if BLOCK_M > 2:
            if DEFER:
                a2 = tl.sum(a2, axis=1)
                a3 = tl.sum(a3, axis=1)
            acc = tl.where(r == 2, a2[None, :], acc)
            acc = tl.where(r == 3, a3[None, :], acc)
        return acc

    @triton.jit
    def _w8a16_gemv_kernel(
        x_ptr, w_ptr, c_ptr, w_scale_ptr, bias_ptr, ws_ptr, cnt_ptr,
        M, N, K, K_SPLIT,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, EVEN_M: tl.constexpr,
        EVEN_K: tl.constexpr, SPLIT: tl.constexpr, CVT: tl.constexpr, DEFER: tl.constexpr, PREFETCH: tl.constexpr,
        LOOP_STAGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr, TRIGGER: tl.constexpr,
    ):
        """The GEMV variant (M ≤ BLOCK_M ≤ 4, no tl.dot): program (pid_n, pid_k) computes the [BLOCK_M, BLOCK_N]
        output tile of W rows pid_n · BLOCK_N + [0, BLOCK_N) (GATED: and their up_proj twins N + n) over the K
        range [pid_k · K_SPLIT, (pid_k + 1) · K_SPLIT), as Σ_k fp32(x[m, k]) · fp32(W_q[n, k]) with fp32 FMAs,
        then finishes exactly as the tl.dot kernel (``_finish``: epilogue, or the split-K partial and the
        serial in-order reduction). W is streamed in K-contiguous [BLOCK_N, BLOCK_K] int8 tiles (16-byte
        vector loads, ``evict_first``: each byte is read once); whole K blocks take unmasked loads, only the
        K tail (odd K, last split) a masked step after the loop."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_wn = cols % N  # W rows past N wrap onto real ones (no mask in the loop); the stores mask them
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        if EVEN_K:
            k_full = k_hi
        else:
            k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K  # end of the whole K blocks
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + offs_wn[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :] * stride_wk
        u_ptrs = w_ptrs + tl.cast(N, tl.int64) * stride_wn  # GATED only: up_proj rows N + n
        x_ptrs = x_ptr + (k_lo + offs_k) * stride_xk  # row 0; row r at + r · stride_xm
        if DEFER:
            a0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            a0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        # rows ≥ BLOCK_M and the up accumulators of a plain launch are never updated (loop-invariant: the
        # compiler drops them)
        a1 = a0
        a2 = a0
        a3 = a0
        g0 = a0
        g1 = a0
        g2 = a0
        g3 = a0
        if PDL:  # launched before the previous kernel ended: nothing is read before it has (common.use_pdl)
            tl.extra.cuda.gdc_wait()
        if PREFETCH:  # the first block; each step then loads the next before using the current one
            first = _uniform_mask(k_full - k_lo, 1, BLOCK_K)[None, :]
            wn = tl.load(w_ptrs, mask=first, other=0, eviction_policy="evict_first")
            un = wn
            if GATED:
                un = tl.load(u_ptrs, mask=first, other=0, eviction_policy="evict_first")
        for k in tl.range(k_lo, k_full, BLOCK_K, num_stages=LOOP_STAGES):
            if PREFETCH:
                wt = wn
                ut = un
                nxt = _uniform_mask(k_full - k - BLOCK_K, 1, BLOCK_K)[None, :]  # k + BLOCK_K < k_full
                wn = tl.load(w_ptrs + BLOCK_K * stride_wk, mask=nxt, other=0, eviction_policy="evict_first")
                if GATED:
                    un = tl.load(u_ptrs + BLOCK_K * stride_wk, mask=nxt, other=0, eviction_policy="evict_first")
            else:
                wt = tl.load(w_ptrs, eviction_policy="evict_first")
                ut = wt
                if GATED:
                    ut = tl.load(u_ptrs, eviction_policy="evict_first")
            a0, a1, a2, a3, g0, g1, g2, g3 = _gemv_step(a0, a1, a2, a3, g0, g1, g2, g3, wt, ut, x_ptrs, stride_xm, M,
                                                        offs_k, False, EVEN_M, GATED, CVT, DEFER, BLOCK_M)
            w_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K * stride_xk
        if not EVEN_K:
            if k_full < k_hi:  # the K tail (only the last split has one): a masked step
                k_mask = (k_full + offs_k) < k_hi
                wt = tl.load(w_ptrs, mask=k_mask[None, :], other=0)
                ut = wt
                if GATED:
                    ut = tl.load(u_ptrs, mask=k_mask[None, :], other=0)
                a0, a1, a2, a3, g0, g1, g2, g3 = _gemv_step(a0, a1, a2, a3, g0, g1, g2, g3, wt, ut, x_ptrs, stride_xm,
                                                            M, k_mask, True, EVEN_M, GATED, CVT, DEFER, BLOCK_M)
        if TRIGGER:  # W is read: the next kernel may launch now (it still waits for this grid to end)
            tl.extra.cuda.gdc_launch_dependents()
        acc = _gemv_stack(a0, a1, a2, a3, DEFER, BLOCK_M)
        acc_up = acc
        if GATED:
            acc_up = _gemv_stack(g0, g1, g2, g3, DEFER, BLOCK_M)
        rows = tl.arange(0, BLOCK_M)
        _finish(acc, acc_up, rows, cols, pid_n, pid_k, M, N, c_ptr, stride_cm, stride_cn, w_scale_ptr, bias_ptr, ws_ptr,
                cnt_ptr, HAS_BIAS, ACTIVATION, GATED, SPLIT)

    @triton.jit
    def _w8a16_reduce_kernel(
        ws_ptr, c_ptr, w_scale_ptr, bias_ptr, M, N, SPLIT_K, stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """split_mode "reduce": Σ over the SPLIT_K partials of one [BLOCK_M, BLOCK_N] tile, then the epilogue."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        NW = 2 * N if GATED else N
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, SPLIT_K):
            q_ptrs = _partial_ptrs(ws_ptr, s, rows, cols, M, NW)
            acc += tl.load(q_ptrs, mask=mask, other=0.0)
            if GATED:
                acc_up += tl.load(q_ptrs + N, mask=mask, other=0.0)
        _epilogue(acc, acc_up, rows, cols, M, N, c_ptr, stride_cm, stride_cn, w_scale_ptr, bias_ptr,
                  HAS_BIAS, ACTIVATION, GATED)


# --------------------------------------------------------------------------------------------- launcher
def _check(x, w_q, w_scale, bias, activation, out_dtype) -> tuple[int, int, int]:
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"w8a16_gemm: x must be one of {_X_DTYPES}, got {x.dtype}")
    if w_q.dtype != torch.int8:
        raise TypeError(f"w8a16_gemm needs int8 w_q, got {w_q.dtype}")
    if x.dim() != 2 or w_q.dim() != 2:
        raise ValueError(f"w8a16_gemm needs 2-D x [M, K] and w_q [N, K], got {tuple(x.shape)} and {tuple(w_q.shape)}")
    m, k = x.shape
    n, k2 = w_q.shape
    if k != k2:
        raise ValueError(f"w8a16_gemm: x has K={k} but w_q has K={k2} (w_q is [N, K], the nn.Linear layout)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"w8a16_gemm: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if activation in GATED_ACTIVATIONS and n % 2:
        raise ValueError(f"w8a16_gemm: {activation} needs w_q [2I, K] (gate_proj rows over up_proj rows), got an odd "
                         f"number of rows N={n}")
    if w_scale.dtype != torch.float32 or w_scale.numel() != n:
        raise ValueError(f"w8a16_gemm: w_scale must be fp32 with N={n} values ([N] or [N, 1]), got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"w8a16_gemm: bias has {bias.numel()} values, expected N={n}")
    if out_dtype not in _X_DTYPES:
        raise TypeError(f"w8a16_gemm: out_dtype must be one of {_X_DTYPES}, got {out_dtype}")
    devices = {t.device for t in (x, w_q, w_scale) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"w8a16_gemm: operands on several devices: {sorted(map(str, devices))}")
    return m, k, n


def w8a16_gemm(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    out_dtype: Optional[torch.dtype] = None,
    *,
    config: Optional[W8A16Config] = None,
) -> torch.Tensor:
    """Y = act((x · W_qᵀ) · s_w + b) in one kernel (see the module docstring for the math and CUDA graphs).

    Args:
        x: bf16 / fp16 / fp32 [M, K]. w_q: int8 [N, K]. w_scale: fp32, N values ([N] or [N, 1]).
        bias: N values (any float dtype) or None. activation: one of ``none relu gelu gelu_tanh silu swiglu
            geglu_tanh``; the gated two take w_q [2I, K] (gate_proj rows over up_proj rows) and return [M, I].
        out_dtype: bf16, fp16 or fp32; None: x's dtype.
        config: a launch configuration instead of :func:`pick_config`'s (tuning and tests).

    Returns:
        ``out_dtype`` [M, N] on x's device ([M, N/2] gated).

    Raises:
        TypeError / ValueError: naming the operand whose dtype or shape is wrong.
        RuntimeError: Triton is not installed.
    """
    if not HAS_TRITON:
        raise RuntimeError("w8a16_gemm needs Triton: pip install triton (or use w8a16_gemm_reference)")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    m, k, n_w = _check(x, w_q, w_scale, bias, activation, out_dtype)
    gated = activation in GATED_ACTIVATIONS
    n = n_w // 2 if gated else n_w  # the output width: the kernel's N
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return w8a16_gemm_reference(x, w_q, w_scale, bias, activation, out_dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    if not w_scale.is_contiguous():  # [N] or [N, 1]: element i at base + i once contiguous
        w_scale = w_scale.contiguous()
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else w_scale  # any valid pointer; unread when HAS_BIAS=False
    cfg = config or pick_config(m, n, k, gated, _num_sms(x.device), x.dtype)
    gemv = int(cfg.gemv)
    if gemv and m > GEMV_MAX_M:
        raise ValueError(f"w8a16_gemm: a GEMV config (gemv={cfg.gemv}) serves M <= {GEMV_MAX_M}, got M={m}")
    bm, bn, bk = (gemv_block_m(m) if gemv else block_m(m)), cfg.block_n, cfg.block_k
    # split-K: SPLIT_K programs per tile, each over a whole number of K blocks (the last may run short)
    per_split = cdiv(cdiv(k, bk), max(1, cfg.split_k))
    split_k = cdiv(cdiv(k, bk), per_split)
    k_split = per_split * bk
    tiles = cdiv(m, bm) * cdiv(n, bn)
    split_mode = 0 if split_k == 1 else (1 if cfg.split_mode == "serial" else 2)
    if split_mode:
        ws = torch.empty((split_k, m, n_w), dtype=torch.float32, device=x.device)
        cnt = _counters(x.device, tiles) if split_mode == 1 else ws
    else:
        ws = cnt = c  # unread
    even_k = k % bk == 0
    ints = (m, n, k, k_split, x.stride(0), x.stride(1), w_q.stride(0), w_q.stride(1), c.stride(0), c.stride(1))
    tensors = (x, w_q, c, w_scale, bias_arg, ws, cnt)
    pdl, launch = pdl_launch(x.device)
    trigger = pdl and pdl_early_signal()
    if gemv:  # constexprs in the kernel's signature order (the cached relaunch passes them positionally)
        consts = (has_bias, activation, gated, m % bm == 0, even_k, split_mode, cfg.cvt, gemv == 2, bool(cfg.prefetch),
                  cfg.num_stages, bm, bn, bk, pdl, trigger)
        key, hit = _GEMV_LAUNCHES.lookup(x.device, (consts, cfg.num_warps, cfg.num_stages), tensors, ints)
        if hit is not None:
            hit((tiles, split_k), x.device, tensors + ints + consts)
        else:
            compiled = _w8a16_gemv_kernel[(tiles, split_k)](
                *tensors, *ints, HAS_BIAS=has_bias, ACTIVATION=activation, GATED=gated, EVEN_M=m % bm == 0, EVEN_K=even_k,
                SPLIT=split_mode, CVT=cfg.cvt, DEFER=gemv == 2, PREFETCH=bool(cfg.prefetch), LOOP_STAGES=cfg.num_stages,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl, TRIGGER=trigger,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch)
            _GEMV_LAUNCHES.put(key, compiled)
    else:
        precision = "tf32x3" if x.dtype == torch.float32 else "tf32"  # "tf32" is unused for 16-bit x
        # Triton's interpreter (3.9) multiplies bf16 tiles as their uint16 bit patterns in tl.dot and casts int8 to
        # bf16 the same way; there the bf16 product runs in fp32, which gives the same exact products
        dot_dtype = tl.float32 if x.dtype == torch.bfloat16 and interpreting() else _TL_DTYPES[x.dtype]
        consts = (has_bias, activation, gated, m % bm == 0, even_k, split_mode, bool(cfg.swap), cfg.cvt, precision,
                  dot_dtype, bm, bn, bk, pdl, trigger)
        key, hit = _LAUNCHES.lookup(x.device, (consts, cfg.num_warps, cfg.num_stages), tensors, ints)
        if hit is not None:
            hit((tiles, split_k), x.device, tensors + ints + consts)
        else:
            compiled = _w8a16_gemm_kernel[(tiles, split_k)](
                *tensors, *ints, HAS_BIAS=has_bias, ACTIVATION=activation, GATED=gated, EVEN_M=m % bm == 0, EVEN_K=even_k,
                SPLIT=split_mode, SWAP=bool(cfg.swap), CVT=cfg.cvt, PRECISION=precision, DOT_DTYPE=dot_dtype, BLOCK_M=bm,
                BLOCK_N=bn, BLOCK_K=bk, PDL=pdl, TRIGGER=trigger, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **launch)
            _LAUNCHES.put(key, compiled)
    if split_mode == 2:
        rbm, rbn = min(bm, 16), 128
        rgrid = (cdiv(m, rbm), cdiv(n, rbn))
        rints = (m, n, split_k, c.stride(0), c.stride(1))
        rconsts = (has_bias, activation, gated, rbm, rbn)
        rtensors = (ws, c, w_scale, bias_arg)
        key, hit = _REDUCE_LAUNCHES.lookup(x.device, rconsts, rtensors, rints)
        if hit is not None:
            hit(rgrid, x.device, rtensors + rints + rconsts)
        else:
            compiled = _w8a16_reduce_kernel[rgrid](*rtensors, *rints, HAS_BIAS=has_bias, ACTIVATION=activation,
                                                   GATED=gated, BLOCK_M=rbm, BLOCK_N=rbn, num_warps=4)
            _REDUCE_LAUNCHES.put(key, compiled)
    return c


_COUNTERS: dict = {}


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for a serial split-K launch of ``tiles`` output tiles. Each launch leaves
    them zeroed, so one buffer serves every launch that cannot overlap it: one per (device, stream) for
    eager launches, one per device for CUDA-graph capture (allocated with the first eager one). A capture
    before any eager launch, or more tiles than the buffer holds, gets a fresh zeroed buffer (a memset)."""
    if device.type != "cuda":  # the interpreter (CPU tensors, programs run one after another)
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    index = _cuda_index(device)
    capturing = torch.cuda.is_current_stream_capturing()
    key = (index, None) if capturing else (index, torch.cuda.current_stream(index).cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is None and not capturing:
        buf = _COUNTERS[key] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
        _COUNTERS.setdefault((index, None), torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device))
    if buf is None or tiles > buf.numel():
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    return buf


# ------------------------------------------------------------------------------------ pure-torch reference
def w8a16_gemm_reference(x, w_q, w_scale, bias=None, activation="none", out_dtype=None) -> torch.Tensor:
    """The same function in plain torch, fp32 math: (x · W_qᵀ) · s_w + b over all N (for the gated activations
    the full [M, 2I] pre-activation), then :func:`common.activation_torch` and the cast to ``out_dtype``
    (default x's dtype)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    y = (x.to(torch.float32) @ w_q.to(torch.float32).T) * w_scale.reshape(1, -1).to(torch.float32)
    if bias is not None:
        y = y + bias.reshape(1, -1).to(torch.float32)
    return activation_torch(y, activation).to(out_dtype)
