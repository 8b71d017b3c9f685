"""The W8A16 GEMM of ``fxquant.kernels.w8a16_gemm`` against float64 and its pure-torch reference.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` (set in conftest.py); on a GPU machine the same
tests compile it for real (``bench/w8a16_gpu.py`` checks the LLM decode shapes there). Shapes are small and
odd (M = 1, 3, 17; K = 16, 40, 100; N = 8, 24, 33) so every masked edge runs: K tails, N past the tile, rows
past M.

Tolerances: the kernel accumulates exact products in fp32, so against float64 (x · (W_q·s)ᵀ + b, then the
activation) its error is the output dtype's rounding: SQNR ≥ 40 dB for bf16 outputs (8 significant bits,
about 50 dB), ≥ 55 dB for fp16, ≥ 90 dB for fp32 (tf32x3 on a GPU; plain fp32 in the interpreter). The
reference is the float64 formula within fp32 rounding: |ref − exact| ≤ (K + 3) · 2⁻²⁴ · (Σ_k |x·w|·s + |b|).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fxquant.kernels import common, w8a16_gemm as kw

pytestmark = pytest.mark.skipif(common.why_kernels_cannot_run() is not None, reason=str(common.why_kernels_cannot_run()))

DEVICE = "cuda" if torch.cuda.is_available() and not common.interpreting() else "cpu"
X_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MIN_SQNR = {torch.bfloat16: 40.0, torch.float16: 55.0, torch.float32: 90.0}


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # the interpreter evaluates exp() in NumPy, which warns on the (correct) overflow to inf of e^(-y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def _operands(m, k, n_w, x_dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    w = torch.randint(-127, 128, (n_w, k), dtype=torch.int8, generator=g)
    s = torch.rand(n_w, 1, generator=g) * 0.01 + 1e-4
    b = torch.randn(n_w, generator=g) if bias else None
    return x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), (b.to(DEVICE) if bias else None)


def _exact(x, w, s, b, activation):
    """The float64 definition: act(x · (W_q·s)ᵀ + b)."""
    y = x.cpu().double() @ (w.cpu().double() * s.cpu().double().reshape(-1, 1)).T
    if b is not None:
        y = y + b.cpu().double()
    return common.activation_torch(y, activation)


def _sqnr(ref, out):
    ref, out = ref.double(), out.cpu().double()
    assert torch.isfinite(out).all()
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def _check(out, x, w, s, b, activation, out_dtype):
    n = w.shape[0] // 2 if activation in common.GATED_ACTIVATIONS else w.shape[0]
    assert out.shape == (x.shape[0], n) and out.dtype == out_dtype and out.device.type == DEVICE
    q = _sqnr(_exact(x, w, s, b, activation), out)
    assert q >= MIN_SQNR[out_dtype], f"SQNR {q:.1f} dB < {MIN_SQNR[out_dtype]} ({activation}, {out_dtype})"


# ------------------------------------------------------------------------------------------------ kernel
@pytest.mark.parametrize("n", [8, 24, 33])
@pytest.mark.parametrize("k", [16, 40, 100])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_shapes_bf16(m, k, n):
    """Every (M, K, N) with bf16 x, bias on odd N, the default launch configuration."""
    x, w, s, b = _operands(m, k, n, torch.bfloat16, seed=100 * m + 10 * k + n, bias=n % 2 == 1)
    _check(kw.w8a16_gemm(x, w, s, b), x, w, s, b, "none", torch.bfloat16)


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("activation", common.ACTIVATIONS)
def test_activations_and_dtypes(activation, x_dtype):
    """Every activation and x dtype, with and without bias; output in x's dtype (the default) and in fp32.
    The gated ones take W = [gate; up] with 2·12 rows and return 12 columns."""
    for bias, (m, k, n_w) in ((True, (17, 100, 24)), (False, (3, 40, 24))):
        x, w, s, b = _operands(m, k, n_w, x_dtype, seed=len(activation) + m, bias=bias)
        _check(kw.w8a16_gemm(x, w, s, b, activation), x, w, s, b, activation, x_dtype)
    _check(kw.w8a16_gemm(x, w, s, b, activation, torch.float32), x, w, s, b, activation, torch.float32)


@pytest.mark.parametrize("gated", sorted(common.GATED_ACTIVATIONS))
def test_gated_is_gate_times_up(gated):
    """swiglu(W = [gate; up]) equals act(gate GEMM) · (up GEMM), each a plain launch (fp32 outputs)."""
    x, w, s, b = _operands(3, 40, 2 * 24, torch.float16, seed=5)
    gate = kw.w8a16_gemm(x, w[:24], s[:24], b[:24], common.GATED_ACTIVATIONS[gated], torch.float32)
    up = kw.w8a16_gemm(x, w[24:], s[24:], b[24:], "none", torch.float32)
    got = kw.w8a16_gemm(x, w, s, b, gated, torch.float32)
    torch.testing.assert_close(got, gate * up, rtol=1e-5, atol=1e-5)


CONFIGS = [
    kw.W8A16Config(block_n=16, block_k=16, split_k=3),                           # serial split-K, K tail in the last split
    kw.W8A16Config(block_n=16, block_k=32, split_k=2, split_mode="reduce"),      # split-K through the reduce kernel
    kw.W8A16Config(block_n=32, block_k=16, split_k=4, swap=False, cvt=1),        # plain product, bit-pattern conversion
    kw.W8A16Config(block_n=16, block_k=64, split_k=1, swap=True, cvt=1),
]


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}{c.split_mode[0]}{'T' if c.swap else ''}c{c.cvt}")
def test_launch_configs(cfg, x_dtype):
    """Split-K (serial and reduce), both product orientations and both int8 conversions give the same function,
    plain and gated, one M tile (M = 17) and several (M = 70 > 64), and repeat bit for bit (the split-K sum
    runs in split order)."""
    for m, k, n_w, act in ((17, 100, 33, "gelu"), (70, 48, 24, "swiglu")):
        x, w, s, b = _operands(m, k, n_w, x_dtype, seed=m + k)
        got = kw.w8a16_gemm(x, w, s, b, act, config=cfg)
        _check(got, x, w, s, b, act, x_dtype)
        assert torch.equal(got, kw.w8a16_gemm(x, w, s, b, act, config=cfg))


# --------------------------------------------------------------------------------------------- GEMV variant
# The GEMV kernel (W8A16Config.gemv, M <= GEMV_MAX_M) forced through its launch options: per-block tl.sum (1) and
# deferred reduction (2), register prefetch, tl.range pipelining (num_stages > 1), both int8 conversions, no
# split, serial split-K with the K tail in the last split, and split_mode "reduce".
GEMV_CONFIGS = [
    kw.W8A16Config(block_n=16, block_k=32, split_k=1, num_stages=1, cvt=1, gemv=1),
    kw.W8A16Config(block_n=8, block_k=16, split_k=3, num_stages=3, cvt=0, gemv=1, prefetch=True),
    kw.W8A16Config(block_n=16, block_k=64, split_k=2, num_stages=1, cvt=1, gemv=2),
    kw.W8A16Config(block_n=8, block_k=32, split_k=2, num_stages=2, cvt=1, gemv=2, prefetch=True, split_mode="reduce"),
]
# (M, K, N_w, activation, bias): every M up to the cap (M = 3: a masked row of BLOCK_M = 4), odd K (K tails),
# odd N (a partial, wrapped last W tile), gated and not
GEMV_CASES = [(1, 100, 33, "none", True), (2, 40, 24, "swiglu", False), (3, 100, 24, "gelu", True),
              (4, 77, 48, "geglu_tanh", True), (4, 64, 17, "relu", False)]


def _gemv_id(c):
    return f"g{c.gemv}n{c.block_n}k{c.block_k}s{c.split_k}{c.split_mode[0]}p{c.num_stages}c{c.cvt}{'P' if c.prefetch else ''}"


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=_gemv_id)
def test_gemv_configs(cfg, x_dtype):
    """Each GEMV launch option gives the float64 function within the output dtype's rounding (the MIN_SQNR of
    the tl.dot kernel), at M = 1..4, odd K and N, gated and not, with and without bias, in x's dtype and in
    fp32, and repeats bit for bit (split-K partials summed in split order)."""
    for m, k, n_w, act, bias in GEMV_CASES:
        x, w, s, b = _operands(m, k, n_w, x_dtype, seed=7 * m + k + n_w, bias=bias)
        got = kw.w8a16_gemm(x, w, s, b, act, config=cfg)
        _check(got, x, w, s, b, act, x_dtype)
        assert torch.equal(got, kw.w8a16_gemm(x, w, s, b, act, config=cfg))
        _check(kw.w8a16_gemm(x, w, s, b, act, torch.float32, config=cfg), x, w, s, b, act, torch.float32)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_gemv_fp32_error_bound(x_dtype):
    """With 16-bit x every product x·W_q is exact in fp32, so the GEMV kernel's fp32 output differs from the
    float64 formula only by its fp32 sums (any order, split-K included) and the scale and bias roundings:
    |err| ≤ (K + 3) · 2⁻²⁴ · (|x|·|W_q|ᵀ·s + |b|), the bound the reference meets (test below). Each row's sum
    is the same instruction sequence whatever M is, so a row of an M = 4 launch equals its M = 1 launch bit for
    bit, and the serial and "reduce" split-K modes (the same partials, summed in split order) agree bit for bit."""
    for cfg in GEMV_CONFIGS:
        x, w, s, b = _operands(4, 100, 33, x_dtype, seed=cfg.block_k + cfg.gemv)
        got = kw.w8a16_gemm(x, w, s, b, "none", torch.float32, config=cfg).cpu().double()
        exact = _exact(x, w, s, b, "none")
        scale = (x.cpu().double().abs() @ w.cpu().double().abs().T) * s.cpu().double().reshape(1, -1) + b.cpu().double().abs()
        assert ((got - exact).abs() <= (100 + 3) * 2.0 ** -24 * scale).all(), _gemv_id(cfg)
        for r in range(4):
            row = kw.w8a16_gemm(x[r:r + 1], w, s, b, "none", torch.float32, config=cfg).cpu().double()
            assert torch.equal(row[0], got[r]), (_gemv_id(cfg), r)
        if cfg.split_k > 1:
            other = cfg._replace(split_mode="reduce" if cfg.split_mode == "serial" else "serial")
            assert torch.equal(kw.w8a16_gemm(x, w, s, b, "none", torch.float32, config=other).cpu().double(), got)


def test_gemv_selection(monkeypatch):
    """pick_config returns a GEMV config exactly for the _GEMV_TUNED (N, K, gated, M) entries (the H100 sweeps'
    winners: at M = 1 every Llama-3-8B decode shape and four of Qwen2-1.5B's, not its 2048x1536 / 1536x1536; at M = 2
    Llama-3-8B's four per-layer shapes and Qwen2's gate/up; at M = 3..4 none, where GEMV lost on every shape), and
    never one past GEMV_MAX_M; the launcher refuses a GEMV config there."""
    monkeypatch.setattr(kw, "interpreting", lambda: False)  # the table and rule path (the interpreter's is fixed)
    shapes = [(6144, 4096, False), (4096, 4096, False), (14336, 4096, True), (4096, 14336, False), (128256, 4096, False),
              (2048, 1536, False), (1536, 1536, False), (8960, 1536, True), (1536, 8960, False), (151936, 1536, False)]
    for n, k, gated in shapes:
        for m in range(1, 9):
            want = ((m == 1 and (n, k) not in ((2048, 1536), (1536, 1536)))
                    or (m == 2 and (n, k) in ((6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336), (8960, 1536))))
            assert bool(kw.pick_config(m, n, k, gated, 132).gemv) is want, (n, k, gated, m)
    monkeypatch.setattr(kw, "_GEMV_TUNED", {})
    tuned = kw.W8A16Config(16, 512, 2, 4, 3, swap=False, cvt=1, gemv=1)
    monkeypatch.setitem(kw._GEMV_TUNED, (4096, 4096, False, 1), tuned)
    assert kw.pick_config(1, 4096, 4096, False, 132) == tuned
    assert not kw.pick_config(2, 4096, 4096, False, 132).gemv
    assert not kw.pick_config(1, 4096, 4096, True, 132).gemv
    monkeypatch.setitem(kw._GEMV_TUNED, (4096, 4096, False, kw.GEMV_MAX_M + 1), tuned)
    assert not kw.pick_config(kw.GEMV_MAX_M + 1, 4096, 4096, False, 132).gemv
    x, w, s, _ = _operands(kw.GEMV_MAX_M + 1, 40, 24, torch.bfloat16, seed=3)
    with pytest.raises(ValueError, match="GEMV config"):
        kw.w8a16_gemm(x, w, s, config=GEMV_CONFIGS[0])


def test_rule_at_block_m_32(monkeypatch):
    """From BLOCK_M 32 (M = 17..64) the rule takes the H100 M = 32 sweep's winners: gated 64x128, 4 warps, 3 stages;
    LM-head widths 128x256, 8 warps, 3 stages; M ≤ 16 keeps the H200 sweep's configs."""
    monkeypatch.setattr(kw, "interpreting", lambda: False)
    for n, k in ((14336, 4096), (8960, 1536)):
        got = kw.pick_config(32, n, k, True, 132)
        assert (got.block_n, got.block_k, got.split_k, got.num_warps, got.num_stages) == (64, 128, 1, 4, 3)
        got = kw.pick_config(8, n, k, True, 132)
        assert (got.block_k, got.num_stages) == (256, 4)
    for n, k in ((128256, 4096), (151936, 1536)):
        got = kw.pick_config(32, n, k, False, 132)
        assert (got.block_n, got.block_k, got.split_k, got.num_warps, got.num_stages) == (128, 256, 1, 8, 3)
        assert kw.pick_config(8, n, k, False, 132).block_n == 64


def test_operand_layouts():
    """w_scale as [N] or [N, 1], a transposed (non-contiguous) x, a bias of another dtype, M = 0 and K = 0."""
    x, w, s, b = _operands(3, 40, 24, torch.bfloat16, seed=9)
    want = kw.w8a16_gemm(x, w, s, b)
    assert torch.equal(kw.w8a16_gemm(x, w, s.reshape(-1), b), want)
    assert torch.equal(kw.w8a16_gemm(x.T.contiguous().T, w, s, b), want)
    assert not x.T.contiguous().T.is_contiguous()
    _check(kw.w8a16_gemm(x, w, s, b.bfloat16(), out_dtype=torch.float32), x, w, s, b.bfloat16(), "none", torch.float32)
    assert kw.w8a16_gemm(x[:0], w, s, b).shape == (0, 24)
    empty = kw.w8a16_gemm(x[:, :0], w[:, :0], s, b, "relu")
    assert torch.equal(empty, b.relu().to(torch.bfloat16).expand(3, 24))


def test_bad_inputs():
    x, w, s, b = _operands(3, 40, 24, torch.bfloat16, seed=1)
    with pytest.raises(TypeError, match="x must be one of"):
        kw.w8a16_gemm(x.to(torch.int8), w, s)
    with pytest.raises(TypeError, match="int8 w_q"):
        kw.w8a16_gemm(x, w.float(), s)
    with pytest.raises(ValueError, match="K=40 but w_q has K=39"):
        kw.w8a16_gemm(x, w[:, :39], s)
    with pytest.raises(ValueError, match="odd number of rows N=23"):
        kw.w8a16_gemm(x, w[:23], s[:23], activation="swiglu")
    with pytest.raises(ValueError, match="w_scale must be fp32 with N=24"):
        kw.w8a16_gemm(x, w, s.double())
    with pytest.raises(ValueError, match="bias has 23 values"):
        kw.w8a16_gemm(x, w, s, b[:23])
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        kw.w8a16_gemm(x, w, s, activation="tanh")
    with pytest.raises(TypeError, match="out_dtype"):
        kw.w8a16_gemm(x, w, s, out_dtype=torch.int32)


# --------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_reference_is_the_float64_formula(x_dtype):
    """w8a16_gemm_reference (fp32 out) is the float64 formula within fp32 rounding: recursive summation of K
    exact-ish products plus the scale and bias roundings, |err| ≤ (K + 3) · 2⁻²⁴ · (|x|·|W_q|ᵀ·s + |b|)."""
    for m, k, n in ((1, 16, 8), (3, 100, 33), (17, 40, 24)):
        x, w, s, b = (t.cpu() if t is not None else None for t in _operands(m, k, n, x_dtype, seed=k))
        ref = kw.w8a16_gemm_reference(x, w, s, b, "none", torch.float32).double()
        exact = _exact(x, w, s, b, "none")
        scale = (x.double().abs() @ w.double().abs().T) * s.double().reshape(1, -1) + b.double().abs()
        assert ((ref - exact).abs() <= (k + 3) * 2.0 ** -24 * scale).all()
        for act in common.ACTIVATIONS:  # the activation on fp32 adds a few fp32 ulps of the output
            if act in common.GATED_ACTIVATIONS and n % 2:
                continue
            got = kw.w8a16_gemm_reference(x, w, s, b, act, torch.float32).double()
            want = _exact(x, w, s, b, act)
            assert _sqnr(want, got) > 120, act
        assert kw.w8a16_gemm_reference(x, w, s, b).dtype == x_dtype


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replay():
    """A split-K launch captured after an eager warm-up replays to the eager result on new inputs."""
    x, w, s, b = _operands(3, 4096, 256, torch.bfloat16, seed=2)
    cfg = kw.W8A16Config(block_n=32, block_k=256, split_k=4)
    kw.w8a16_gemm(x, w, s, b, "silu", config=cfg)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        out = kw.w8a16_gemm(x, w, s, b, "silu", config=cfg)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, kw.w8a16_gemm(x, w, s, b, "silu", config=cfg))


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs an sm_90+ GPU")
def test_pdl_computes_the_same(monkeypatch):
    """PDL changes when a launch may start, not what it computes: each GEMV config, and the tl.dot kernel at M = 8
    and 32, give the output without PDL bit for bit, with the early dependents signal and without it, in a CUDA
    graph too (kernels.common.use_pdl, pdl_early_signal)."""
    cases = [(cfg, 4) for cfg in GEMV_CONFIGS] + [(None, 8), (None, 32)]
    for cfg, m in cases:
        x, w, s, b = _operands(m, 300, 96, torch.bfloat16, seed=m, bias=True)
        monkeypatch.setenv("FXQUANT_PDL", "0")
        assert not common.use_pdl(x.device)
        want = kw.w8a16_gemm(x, w, s, b, "swiglu", config=cfg)
        monkeypatch.setenv("FXQUANT_PDL", "1")
        assert common.use_pdl(x.device)
        monkeypatch.setenv("FXQUANT_PDL_TRIGGER", "0")
        assert torch.equal(kw.w8a16_gemm(x, w, s, b, "swiglu", config=cfg), want)
        monkeypatch.delenv("FXQUANT_PDL_TRIGGER")
        assert common.pdl_early_signal()
        assert torch.equal(kw.w8a16_gemm(x, w, s, b, "swiglu", config=cfg), want)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = kw.w8a16_gemm(x, w, s, b, "swiglu", config=cfg)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
