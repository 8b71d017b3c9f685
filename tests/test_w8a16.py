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

pytestmark = [
    pytest.mark.skipif(not common.HAS_TRITON, reason="Triton is not installed (pip install 'fxquant[triton]')"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() or common.interpreting()),
        reason="needs a GPU or TRITON_INTERPRET=1",
    ),
]

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
