r"""W8A8 GEMM with a fused dequantize / bias / activation epilogue.

Math (the compressed-tensors "int-quantized" W8A8 scheme; SmoothQuant, Xiao et al. 2023, §2; LLM.int8,
Dettmers et al. 2022, §3.2)::

    acc[m, n] = Σ_k A_q[m, k] · W_q[n, k]                  exact int32 (tl.dot(..., out_dtype=tl.int32))
    Y[m, n]   = act((acc[m, n] · s_w[n]) · s_x[m] + b[n])  fp32, then cast to the output dtype

SwiGLU (``activation="swiglu"``; Shazeer 2020, "GLU Variants Improve Transformer", §2, FFN_SwiGLU without
its down projection; silu as Elfwing et al. 2018): W_q [2I, K] stacks gate_proj (rows [0, I)) over up_proj
(rows [I, 2I)), s_w and b have 2I values, and the output is [M, I]::

    g[m, n] = (acc[m, n] · s_w[n]) · s_x[m] + b[n]                 n < I
    u[m, n] = (acc[m, I + n] · s_w[I + n]) · s_x[m] + b[I + n]
    Y[m, n] = silu(g[m, n]) · u[m, n]                              fp32, then cast

a dual GEMM: each program accumulates the gate tile and the matching up tile (two int32 accumulators, two
W loads per K step), then one epilogue; the [M, 2I] pre-activation never reaches memory. Its configs
(``GATED``, part of the autotune key) are the plain ones with BLOCK_N halved: two BLOCK_N/2 accumulators
hold as many registers as one BLOCK_N accumulator.

Operands:

* ``a_q``  int8 [M, K], K-contiguous (row-major activations, quantized per token);
* ``w_q``  int8 [N, K], K-contiguous (the ``nn.Linear`` weight layout, quantized per output channel);
* ``a_scale`` fp32 [M] (or [M, 1]); ``w_scale`` fp32 [N] (or [N, 1]); ``bias`` [N] any float dtype or None;
* output bf16 / fp16 / fp32 [M, N].

Shapes: any M ≥ 1 (decode to prefill), any N ≥ 1 (even for swiglu), any K ≥ 1 (tails are masked). The fastest path (TMA
descriptors, CUDA sm_90+) needs K % 16 == 0 (16-byte row strides of the int8 operands, a TMA rule: CUDA
driver API, ``cuTensorMapEncodeTiled``); other K run the pointer kernel. |acc| ≤ K·127² stays inside int32
for K < 133 143.

Two kernels share one epilogue: ``_w8a8_gemm_kernel`` (pointer loads; any strides, any target, the
interpreter) and ``_w8a8_gemm_tma_kernel`` (Hopper's bulk tensor copy engine through host-side
``TensorDescriptor``). Configs: wgmma wants BLOCK_M % 64 == 0, num_warps % 4 == 0 and K tiles ≥ 32 for
8-bit operands (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate", wgmma.mma_async
shapes m64nNk32 for .s8); decode-sized M gets small BLOCK_M configs (mma.sync, m16n8k32).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .common import ACTIVATIONS, GATED_ACTIVATIONS, HAS_TRITON, activation_torch, cdiv, interpreting
from .common import num_sms as _num_sms
from .launch import LaunchCache

_TensorDescriptor = None
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import apply_activation, gate_activation

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor  # Triton >= 3.4
    except ImportError:  # pragma: no cover - older Triton: pointer kernel only
        pass

__all__ = ["w8a8_linear", "w8a8_linear_reference", "get_autotune_configs", "tma_ok"]

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LAUNCHES = LaunchCache()
_SMALL_M = 64  # M at or below this takes the small-M configs
# Decode-sized M takes the pointer kernel even where TMA works: it ran as fast on the GPU (H200, 4096x4096:
# 13.8 vs 13.3 µs at M = 16, 17.2 vs 17.9 µs at M = 128) and skips building two descriptors per call on the
# host (19 vs 26 µs per launch), which is what a decode step waits on.
_TMA_MIN_M = 128


def _m_bucket(m: int) -> int:
    """Autotune key for M: tuning is per bucket, not per sequence length (next power of two, capped)."""
    return min(1 << max(m - 1, 0).bit_length(), 8192)


# ------------------------------------------------------------------------------------ autotune configs
def get_autotune_configs(interpret: Optional[bool] = None) -> list:
    """Configs for the W8A8 GEMM: Hopper wgmma tiles for large M and mma.sync tiles for small M.

    Each config comes twice: plain (``fxquant_gated=False``) and for the swiglu dual GEMM
    (``fxquant_gated=True``) with BLOCK_N halved, so that its two accumulators take the registers of one.
    Under ``TRITON_INTERPRET=1`` (or ``interpret=True``) one small config of each: the interpreter times
    nothing and would run every config.
    """
    if not HAS_TRITON:
        return []
    cfg = triton.Config
    if interpreting() if interpret is None else interpret:
        return _with_gated([cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)])
    large = [
        # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 256, 128, 3, 8),
        (128, 256, 64, 4, 8),
        (256, 128, 128, 3, 8),
        (128, 128, 128, 4, 8),
        (128, 128, 128, 4, 4),
        (128, 128, 128, 3, 4),  # 96 KB of stages: two programs share an SM, one's epilogue hides in the other's loop
        (128, 128, 64, 5, 4),
        (64, 256, 128, 4, 4),
        (64, 128, 128, 5, 4),
    ]
    small = [
        (16, 64, 256, 4, 4),
        (16, 128, 128, 5, 4),
        (32, 64, 256, 4, 4),
        (32, 128, 128, 4, 4),
        (64, 64, 256, 4, 4),
        (64, 128, 128, 4, 4),
    ]
    out = []
    for group, table in (("large", large), ("small", small)):
        for bm, bn, bk, stages, warps in table:
            c = cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
            c.fxquant_group = group
            out.append(c)
    return _with_gated(out)


# Gated twins left out: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) = (32, 64, 128, 4) hit an illegal memory access
# on an H200 (Triton 3.6, pointer kernel) at I = 33 with a K tail (K = 40, 100), any num_stages; 8 warps, 32x32
# tiles, I = 1, 48, 64 or an even K ran correctly, as did the other 14 gated configs at that shape.
_GATED_BROKEN = {(32, 64, 128, 4)}


def _with_gated(configs: list) -> list:
    """``configs`` (tagged ``fxquant_gated=False``) followed by their swiglu twins with BLOCK_N halved."""
    out = []
    for gated in (False, True):
        for c in configs:
            kw = dict(c.kwargs, BLOCK_N=c.kwargs["BLOCK_N"] // 2) if gated else dict(c.kwargs)
            if gated and (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps) in _GATED_BROKEN:
                continue
            twin = triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=c.pre_hook)
            twin.fxquant_group = getattr(c, "fxquant_group", "large")
            twin.fxquant_gated = gated
            out.append(twin)
    return out


def _arg(named_args, kwargs, name, default=None):
    return named_args[name] if name in named_args else kwargs.get(name, default)


def _prune(configs, named_args, **kwargs):
    """The configs of the launch's kind (plain or ``GATED``); of those, small-M configs for M ≤ 64, the
    wgmma ones above 128, and both at M ≤ 128: there the weight read bounds the time, and the small tiles'
    extra programs can stream it faster (H200, 128x4096x4096: the wgmma tiles left the GEMM at 17 µs, 64
    programs for 132 SMs)."""
    m_bucket = _arg(named_args, kwargs, "M_BUCKET")
    gated = bool(_arg(named_args, kwargs, "GATED", False))
    configs = [c for c in configs if getattr(c, "fxquant_gated", False) == gated] or configs
    want = {"small"} if m_bucket <= _SMALL_M else {"small", "large"} if m_bucket <= 2 * _SMALL_M else {"large"}
    kept = [c for c in configs if getattr(c, "fxquant_group", "large") in want]
    return kept or configs


if HAS_TRITON:

    @triton.jit
    def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Grouped ("super-grouping") tile order for L2 reuse (Triton matmul tutorial, §L2 cache)."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _dequant(acc, s_x, cols, mask_n, w_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
        """(acc · s_w[cols]) · s_x + b[cols] in fp32."""
        s_w = tl.load(w_scale_ptr + cols, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * s_w[None, :]
        y = y * s_x[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        return y

    @triton.jit
    def _epilogue(acc, acc_up, pid_m, pid_n, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, w_scale_ptr, bias_ptr,
                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Y = act((acc · s_w) · s_x + b) → c's dtype, masked to [M, N]; GATED: Y = gate_act(g) · u with g from
        ``acc`` (columns n) and u from ``acc_up`` (columns N + n of s_w and b)."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        s_x = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
        y = _dequant(acc, s_x, offs_n, mask_n, w_scale_ptr, bias_ptr, HAS_BIAS)
        if GATED:
            y = gate_activation(y, ACTIVATION) * _dequant(acc_up, s_x, N + offs_n, mask_n, w_scale_ptr, bias_ptr, HAS_BIAS)
        else:
            y = apply_activation(y, ACTIVATION)
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.autotune(configs=get_autotune_configs(), key=["M_BUCKET", "N", "K", "GATED"], prune_configs_by={"early_config_prune": _prune})
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _w8a8_gemm_kernel(
        a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
        M, N, K, M_BUCKET,
        stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """One [BLOCK_M, BLOCK_N] output tile per program; pointer loads (any strides, any target). GATED:
        N is the output width I, and W rows N + n (up_proj) accumulate beside rows n (gate_proj)."""
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # rows/cols past the edge wrap (% M, % N) so the main loop needs no M/N masks; the store masks them
        offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_wn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_wn[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN] = Wᵀ tile
        u_ptrs = w_ptrs + tl.cast(N, tl.int64) * stride_wn  # GATED only: up_proj rows N + n (N == 1 is a constexpr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # GATED only
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
                if GATED:
                    acc_up = tl.dot(a, tl.load(u_ptrs), acc_up, out_dtype=tl.int32)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
                if GATED:
                    acc_up = tl.dot(a, tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0), acc_up, out_dtype=tl.int32)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
            if GATED:
                u_ptrs += BLOCK_K * stride_wk
        _epilogue(acc, acc_up, pid_m, pid_n, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, w_scale_ptr, bias_ptr,
                  HAS_BIAS, ACTIVATION, GATED, BLOCK_M, BLOCK_N)

    def _set_tma_blocks(nargs):
        """Autotune pre-hook: the TMA descriptors' block shapes follow the config being tried."""
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["a_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk]

    def _tma_configs() -> list:
        """The shared configs, each one tile per program (PERSISTENT=0), plus persistent wgmma configs
        (PERSISTENT=p: p programs per SM looping over the tiles). Measured on an H200: the 128x256 ones (one
        program per SM) won 3-12 % at 8192x4096x4096, 2048x4096x14336 and 12608x768x3072 and lost 3 % at
        2048x4096x4096; the 128x128x128 one with two programs per SM (96 KB of stages each) ran
        2048x4096x4096 in 53.0 µs against 55.1 µs one tile per program and 59.9 µs for the best config
        before it. All compete in the autotuner."""
        out = []
        for c in get_autotune_configs():
            c.kwargs["PERSISTENT"] = 0
            c.pre_hook = _set_tma_blocks
            out.append(c)
        if not interpreting():
            persistent = []
            for bm, bn, bk, stages, warps, per_sm in ((128, 256, 128, 3, 8, 1), (128, 256, 64, 4, 8, 1),
                                                      (128, 128, 128, 3, 4, 2)):
                c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": per_sm},
                                  num_stages=stages, num_warps=warps, pre_hook=_set_tma_blocks)
                c.fxquant_group = "large"
                persistent.append(c)
            out += _with_gated(persistent)
        return out

    @triton.jit
    def _tma_tile(tile_id, a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K, stride_cm, stride_cn,
                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """One output tile: A and W tiles fetched by the TMA engine (out-of-bounds reads are zero-filled by
        the descriptor, so K tails need no mask), then the epilogue. GATED: the up_proj tile comes from the
        same descriptor at row N + off_n (a gate tile running past N reads up rows, whose columns the
        epilogue's store masks)."""
        pid_m, pid_n = _tile_ids(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # GATED only
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
            if GATED:
                acc_up = tl.dot(a, w_desc.load([N + off_n, k * BLOCK_K]).T, acc_up, out_dtype=tl.int32)
        _epilogue(acc, acc_up, pid_m, pid_n, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, w_scale_ptr, bias_ptr,
                  HAS_BIAS, ACTIVATION, GATED, BLOCK_M, BLOCK_N)

    @triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K", "GATED"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _w8a8_gemm_tma_kernel(
        a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
        M, N, K, M_BUCKET,
        stride_cm, stride_cn, NUM_SMS,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        PERSISTENT: tl.constexpr,
    ):
        """As ``_w8a8_gemm_kernel`` with tiles fetched by the TMA engine. PERSISTENT = p > 0: NUM_SMS · p
        programs stride over the tiles (``tl.range(..., flatten=True)`` lets the compiler pipeline one
        tile's epilogue with the next tile's loads); PERSISTENT = 0: one program per tile."""
        if PERSISTENT > 0:
            num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
            for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS * PERSISTENT, flatten=True):
                _tma_tile(tile_id, a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K, stride_cm, stride_cn,
                          HAS_BIAS, ACTIVATION, GATED, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        else:
            _tma_tile(tl.program_id(0), a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K,
                      stride_cm, stride_cn, HAS_BIAS, ACTIVATION, GATED, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# --------------------------------------------------------------------------------------------- launcher
def tma_ok(a_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Can the TMA kernel take these operands? CUDA sm_90+, Triton with ``TensorDescriptor``, both
    operands K-contiguous with 16-byte-aligned base and row stride (K % 16 == 0)."""
    if a_q.device.type != "cuda" or not _tma_device(a_q.device.index or 0):
        return False
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a_q, w_q))


@functools.lru_cache(maxsize=None)
def _tma_device(index: int) -> bool:
    if not HAS_TRITON or interpreting() or _TensorDescriptor is None:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def _check(a_q, a_scale, w_q, w_scale, bias, activation, out_dtype) -> tuple[int, int, int]:
    if a_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise TypeError(f"w8a8_linear needs int8 a_q and w_q, got {a_q.dtype} and {w_q.dtype}")
    if a_q.dim() != 2 or w_q.dim() != 2:
        raise ValueError(f"w8a8_linear needs 2-D a_q [M, K] and w_q [N, K], got {tuple(a_q.shape)} and {tuple(w_q.shape)}")
    m, k = a_q.shape
    n, k2 = w_q.shape
    if activation in GATED_ACTIVATIONS and n % 2:
        raise ValueError(f"w8a8_linear: {activation} needs w_q [2I, K] (gate_proj rows over up_proj rows), got an odd "
                         f"number of rows N={n}")
    if k != k2:
        raise ValueError(f"w8a8_linear: a_q has K={k} but w_q has K={k2} (w_q is [N, K], the nn.Linear layout)")
    if a_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"w8a8_linear: a_scale needs {m} values (one per token) and w_scale {n} (one per channel), "
                         f"got {a_scale.numel()} and {w_scale.numel()}")
    if a_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        raise TypeError(f"w8a8_linear: scales must be fp32, got {a_scale.dtype} and {w_scale.dtype}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"w8a8_linear: bias has {bias.numel()} values, expected N={n}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"w8a8_linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"w8a8_linear: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if k >= 133_143:
        raise ValueError(f"w8a8_linear: K={k} could overflow the int32 accumulator (K·127² ≥ 2³¹)")
    return m, k, n


def w8a8_linear(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    use_tma: Optional[bool] = None,
) -> torch.Tensor:
    """Y = act((A_q·W_qᵀ) · s_w · s_x + b), one kernel (see the module docstring for the math).

    Args:
        a_q: int8 [M, K], last dim contiguous. a_scale: fp32, M values. w_q: int8 [N, K]. w_scale: fp32,
            N values. bias: N values or None. activation: one of ``none relu gelu gelu_tanh silu swiglu geglu_tanh``;
            ``swiglu`` / ``geglu_tanh``: w_q is [2I, K], gate_proj rows over up_proj rows, and the output is
            silu(g) · u / gelu_tanh(g) · u.
        out_dtype: bf16, fp16 or fp32. use_tma: force the TMA kernel on/off (None: when :func:`tma_ok`).

    Returns:
        ``out_dtype`` [M, N] on a_q's device ([M, N/2] for ``swiglu``).

    Raises:
        TypeError / ValueError: naming the operand whose dtype or shape is wrong.
        RuntimeError: Triton is not installed.
    """
    if not HAS_TRITON:
        raise RuntimeError("w8a8_linear needs Triton: pip install triton (or use fxquant's 'aten' backend)")
    m, k, n_w = _check(a_q, a_scale, w_q, w_scale, bias, activation, out_dtype)
    gated = activation in GATED_ACTIVATIONS
    n = n_w // 2 if gated else n_w  # the output width; the kernels' N
    c = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return w8a8_linear_reference(a_q, a_scale, w_q, w_scale, bias, activation, out_dtype)
    # [M] or [M, 1] (and [N] or [N, 1]): the kernels index element i at base + i, so contiguity is enough
    if not a_scale.is_contiguous():
        a_scale = a_scale.contiguous()
    if not w_scale.is_contiguous():
        w_scale = w_scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else w_scale  # any valid pointer; unread when HAS_BIAS=False
    if a_q.stride(1) != 1:
        a_q = a_q.contiguous()
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    mb = _m_bucket(m)
    if use_tma is None:
        use_tma = m > _TMA_MIN_M and tma_ok(a_q, w_q)
    has_bias = bias is not None
    num_sms = _num_sms(a_q.device) if use_tma else 0  # only the TMA kernel has persistent configs
    ints = (m, n, k, mb, c.stride(0), c.stride(1), num_sms) if use_tma else (
        m, n, k, mb, a_q.stride(0), a_q.stride(1), w_q.stride(0), w_q.stride(1), c.stride(0), c.stride(1))
    key, hit = _LAUNCHES.lookup(a_q.device, (use_tma, mb, n, k, activation, has_bias),
                                (a_q, w_q, c, a_scale, w_scale, bias_arg), ints)
    if hit is not None:
        bm, bn, bk, gm, persistent = hit.config
        tiles = cdiv(m, bm) * cdiv(n, bn)
        if use_tma:
            a_desc = _TensorDescriptor(a_q, [m, k], [a_q.stride(0), 1], [bm, bk])
            w_desc = _TensorDescriptor(w_q, [n_w, k], [w_q.stride(0), 1], [bn, bk])
            hit((_programs(tiles, num_sms, persistent), 1), a_q.device,
                (a_desc, w_desc, c, a_scale, w_scale, bias_arg, *ints, has_bias, activation, gated,
                 bm, bn, bk, gm, persistent))
        else:
            hit((tiles, 1), a_q.device, (a_q, w_q, c, a_scale, w_scale, bias_arg, *ints, has_bias, activation, gated,
                                         k % bk == 0, bm, bn, bk, gm))
        return c

    def grid(meta):
        return (_programs(cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), num_sms, meta.get("PERSISTENT", 0)),)

    if use_tma:
        # block shapes are placeholders: the autotune pre-hook sets them per config
        a_desc = _TensorDescriptor(a_q, [m, k], [a_q.stride(0), 1], [64, 64])
        w_desc = _TensorDescriptor(w_q, [n_w, k], [w_q.stride(0), 1], [64, 64])
        kernel = _w8a8_gemm_tma_kernel
        compiled = kernel[grid](a_desc, w_desc, c, a_scale, w_scale, bias_arg, *ints, HAS_BIAS=has_bias,
                                ACTIVATION=activation, GATED=gated)
    else:
        kernel = _w8a8_gemm_kernel
        compiled = kernel[grid](a_q, w_q, c, a_scale, w_scale, bias_arg, *ints, HAS_BIAS=has_bias,
                                ACTIVATION=activation, GATED=gated)
    best = getattr(kernel, "best_config", None)
    if best is not None:
        kw = best.kwargs
        _LAUNCHES.put(key, compiled, (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], kw.get("PERSISTENT", 0)))
    return c


def _programs(tiles: int, num_sms: int, per_sm: int) -> int:
    """Grid size: one program per tile, or for a persistent config (``per_sm`` > 0) ``per_sm`` programs per
    SM striding over the tiles, never more programs than tiles."""
    return min(tiles, num_sms * per_sm) if per_sm else tiles


# ------------------------------------------------------------------------------------ pure-torch reference
def w8a8_linear_reference(a_q, a_scale, w_q, w_scale, bias=None, activation="none", out_dtype=torch.bfloat16) -> torch.Tensor:
    """The same function in plain torch: exact int32 accumulation through float64, then the fp32 epilogue
    in the kernel's order, ((acc · s_w) · s_x + b) over all N (for swiglu the full [M, 2I] pre-activation),
    then :func:`common.activation_torch` and the cast."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    acc = (a_q.to(torch.float64) @ w_q.to(torch.float64).T).to(torch.int32)
    y = acc.to(torch.float32) * w_scale.reshape(1, -1).to(torch.float32)
    y = y * a_scale.reshape(-1, 1).to(torch.float32)
    if bias is not None:
        y = y + bias.reshape(1, -1).to(torch.float32)
    return activation_torch(y, activation).to(out_dtype)
