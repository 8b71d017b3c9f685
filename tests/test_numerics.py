"""Reference W8A8 primitives, kernel backends and the fxquant custom ops, against float64 recomputations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxquant  # noqa: F401  (registers torch.ops.fxquant)
from fxquant.ir import reference
from fxquant.targets import backends

OPS = torch.ops.fxquant
EPS = torch.finfo(torch.float32).eps

# The backends this CPU can run exactly, with the weight range each needs. oneDNN is exact with
# |W_q| <= 63 everywhere; full range only where the probe says so (VNNI / AMX).
CPU_BACKENDS = ["reference", "aten"] + (["onednn"] if backends.onednn_available() else [])


def _qmax_for(backend: str) -> int:
    if backend == "onednn" and not backends.cpu_int8_full_range_exact():
        return 63
    return 127


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quantize_per_token_f64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent recomputation of the per-token scheme.

    max|x| is exact in any precision; ``max/127`` and ``x/scale`` are computed in float64 and rounded
    once to float32, which equals the correctly rounded float32 quotient (53 >= 2*24 + 2), then
    rounded half-to-even and clamped in float64.
    """
    x64 = x.to(torch.float64)
    scale = (x64.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float32).clamp_min(EPS)
    q = (x64 / scale.to(torch.float64)).to(torch.float32).to(torch.float64)
    q = torch.round(q).clamp(-127, 127)
    return q.to(torch.int8), scale


# ----------------------------------------------------------------------------- quantize_per_token
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 64), (2, 3, 33), (4, 1, 2, 7)])
def test_quantize_per_token_matches_float64(dtype, shape):
    x = (torch.randn(shape, generator=_gen(1)) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    x_q, scale = reference.quantize_per_token(x)
    e_q, e_scale = _quantize_per_token_f64(x)
    assert x_q.dtype == torch.int8 and x_q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    assert torch.equal(x_q, e_q)
    assert torch.equal(scale, e_scale)
    # every row uses its range: the max-magnitude element maps to exactly +-127
    assert torch.equal(x_q.abs().amax(-1).to(torch.int64), torch.full(shape[:-1], 127))
    # and dequantization is within half a step
    err = (x_q.to(torch.float64) * scale - x.to(torch.float64)).abs()
    # half a step, plus the fp32 rounding of x / scale (<= 127 * 2**-24 steps) before round()
    assert bool((err <= scale.to(torch.float64) * (0.5 + 1e-5)).all())


def test_quantize_per_token_rounds_half_to_even():
    # max|x| = 127 gives scale = 1 exactly, so x / scale hits the .5 ties exactly.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.5, -125.5, 4.5]])
    x_q, scale = reference.quantize_per_token(x)
    assert scale.item() == 1.0
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, 4, -126, 4]]
    # the custom op gives the same
    o_q, o_scale = OPS.quantize_per_token(x)
    assert torch.equal(o_q, x_q) and torch.equal(o_scale, scale)


def test_quantize_per_token_scale_two_ties():
    # max|x| = 254 -> scale 2: x = 1, 3, 5 are ties at 0.5, 1.5, 2.5
    x = torch.tensor([[254.0, 1.0, 3.0, 5.0, -1.0, -3.0, -5.0]])
    x_q, scale = reference.quantize_per_token(x)
    assert scale.item() == 2.0
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2, -2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_zero_rows(dtype):
    x = torch.randn(4, 16, generator=_gen(2)).to(dtype)
    x[1] = 0
    x[3] = 0
    x_q, scale = reference.quantize_per_token(x)
    assert torch.equal(x_q[1], torch.zeros(16, dtype=torch.int8))
    assert torch.equal(x_q[3], torch.zeros(16, dtype=torch.int8))
    assert scale[1].item() == EPS and scale[3].item() == EPS
    assert bool((scale[[0, 2]] > EPS).all())
    assert torch.isfinite(scale).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_per_token_non_finite_rows(bad):
    x = torch.randn(4, 16, generator=_gen(3))
    x[2, 5] = bad
    x_q, scale = reference.quantize_per_token(x)
    assert x_q.shape == (4, 16) and x_q.dtype == torch.int8
    assert not math.isfinite(scale[2].item())
    # the other rows are unaffected: same as quantizing them alone
    clean_q, clean_s = reference.quantize_per_token(x[[0, 1, 3]])
    assert torch.equal(x_q[[0, 1, 3]], clean_q) and torch.equal(scale[[0, 1, 3]], clean_s)
    # same through the op
    o_q, o_s = OPS.quantize_per_token(x)
    assert torch.equal(o_q[[0, 1, 3]], clean_q) and not math.isfinite(o_s[2].item())


def test_quantize_per_token_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, 64, dtype=torch.bfloat16)
        q, s = OPS.quantize_per_token(x)
        assert q.shape == (3, 5, 64) and q.dtype == torch.int8
        assert s.shape == (3, 5, 1) and s.dtype == torch.float32


# ------------------------------------------------------------------------- weight per channel
@pytest.mark.parametrize("qmax", [127, 63, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_weight_per_channel(qmax, dtype):
    w = (torch.randn(48, 80, generator=_gen(4)) * torch.logspace(-2, 2, 48).unsqueeze(1)).to(dtype)
    w[7] = 0  # all-zero output channel
    w_q, scale = reference.quantize_weight_per_channel(w, qmax)
    assert w_q.dtype == torch.int8 and w_q.shape == (48, 80)
    assert scale.dtype == torch.float32 and scale.shape == (48, 1)
    assert int(w_q.abs().max()) <= qmax
    assert torch.equal(w_q[7], torch.zeros(80, dtype=torch.int8))
    assert scale[7].item() == EPS
    rows = [i for i in range(48) if i != 7]
    # every non-zero channel reaches +-qmax exactly
    assert torch.equal(w_q[rows].abs().amax(1).to(torch.int64), torch.full((47,), qmax))
    w64 = w.to(torch.float64)
    expected_scale = (w64.abs().amax(1, keepdim=True) / qmax).to(torch.float32).clamp_min(EPS)
    assert torch.equal(scale, expected_scale)
    expected_q = torch.round((w64 / scale.to(torch.float64)).to(torch.float32).to(torch.float64)).clamp(-qmax, qmax)
    assert torch.equal(w_q, expected_q.to(torch.int8))
    err = (w_q.to(torch.float64) * scale - w64).abs()
    # half a step, plus the fp32 rounding of x / scale (<= 127 * 2**-24 steps) before round()
    assert bool((err <= scale.to(torch.float64) * (0.5 + 1e-5)).all())


def test_quantize_weight_per_channel_does_not_modify_input():
    w = torch.randn(8, 16, generator=_gen(5), requires_grad=True)
    before = w.detach().clone()
    w_q, scale = reference.quantize_weight_per_channel(w, 63)
    assert torch.equal(w.detach(), before)
    assert not w_q.requires_grad and not scale.requires_grad


# ------------------------------------------------------------------------- exact int32 GEMM
def _int_operands(m, k, n, w_qmax, seed, worst=False):
    g = _gen(seed)
    if worst:
        # extreme values: with s8 -> u8 shifting the worst int16 pair sums, the saturation case
        x_q = torch.where(torch.rand(m, k, generator=g) < 0.5, -127, 127).to(torch.int8)
        w_q = torch.where(torch.rand(n, k, generator=g) < 0.5, -w_qmax, w_qmax).to(torch.int8)
        x_q[:, : k // 2] = -127
        w_q[:, : k // 2] = -w_qmax
    else:
        x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        w_q = torch.randint(-w_qmax, w_qmax + 1, (n, k), dtype=torch.int8, generator=g)
    return x_q, w_q


def test_reference_int8_gemm_is_exact():
    x_q, w_q = _int_operands(9, 300, 5, 127, seed=6)
    acc = reference.int8_gemm(x_q, w_q)
    assert acc.dtype == torch.int32 and acc.shape == (9, 5)
    expected = [[sum(int(a) * int(b) for a, b in zip(xr.tolist(), wr.tolist())) for wr in w_q] for xr in x_q]
    assert acc.tolist() == expected


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 7, 33])
@pytest.mark.parametrize("k", [1, 8, 33, 64])  # k = 1: torch._int_mm on VNNI / AMX (backends._aten_gemm)
@pytest.mark.parametrize("n", [3, 17])
@pytest.mark.parametrize("worst", [False, True])
def test_backend_gemm_exact(backend, m, k, n, worst):
    qmax = _qmax_for(backend)
    x_q, w_q = _int_operands(m, k, n, qmax, seed=m * 1000 + k * 10 + n, worst=worst)
    got = backends.BACKENDS[backend](x_q, w_q, torch.ones(n, 1))
    assert got.shape == (m, n)
    assert got.dtype == torch.float32
    expected = reference.int8_gemm(x_q, w_q).to(torch.float64)
    assert torch.equal(got.to(torch.float64), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_applies_weight_scale(backend):
    qmax = _qmax_for(backend)
    x_q, w_q = _int_operands(5, 64, 17, qmax, seed=7)
    w_scale = torch.rand(17, 1, generator=_gen(8)) + 0.01
    got = backends.BACKENDS[backend](x_q, w_q, w_scale)
    expected = reference.int8_gemm(x_q, w_q).to(torch.float32) * w_scale.reshape(1, -1)
    # exact integers times one fp32 scale: at most one fp32 rounding apart
    assert torch.allclose(got, expected, rtol=2 * EPS, atol=0)


@pytest.mark.skipif(not backends.onednn_available(), reason="this torch build has no oneDNN int8 Linear")
def test_full_range_probe_is_consistent_with_onednn():
    """The probe's verdict matches what oneDNN does with full-range worst-case operands (in either src form: the
    uint8 one below the row threshold is what a CPU without VNNI gets); fxquant's choice is the probe's unless
    FXQUANT_CPU_ISA=avx2 forces the 7-bit range (vnni / amx are refused where the probe says False)."""
    x_q = torch.randint(64, 128, (64, 256), dtype=torch.int8, generator=_gen(0))
    w_q = torch.randint(100, 128, (64, 256), dtype=torch.int8, generator=_gen(0))
    exact = torch.equal(
        backends.BACKENDS["onednn"](x_q, w_q, torch.ones(64, 1)).to(torch.float64),
        reference.int8_gemm(x_q, w_q).to(torch.float64),
    )
    assert exact is backends._probe_int8_full_range_exact()
    want = False if backends.forced_cpu_isa() == "avx2" else exact
    assert backends.cpu_int8_full_range_exact() is want


@pytest.mark.parametrize("requested", ["onednn", "auto", "aten", "reference"])
def test_op_with_full_range_weights_is_exact_on_any_backend_request(requested):
    """Full-range (qmax 127) weights must never reach a backend that is inexact for them: the op's
    per-call backend check has to route around oneDNN on a CPU without VNNI."""
    g = _gen(9)
    x = torch.randn(33, 256, generator=g) * 4
    w = torch.randn(64, 256, generator=g)
    w_q, w_s = reference.quantize_weight_per_channel(w, 127)
    x_q, x_s = reference.quantize_per_token(x)
    ref = reference.int8_linear(x_q, x_s, w_q, w_s, None, "none", torch.float32)
    out = OPS.int8_linear(x, w_q, w_s, None, "none", requested, 127, None)
    max_err = (out.double() - ref.double()).abs().max().item()
    assert max_err <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_op_empty_batch(backend):
    w_q, w_s = reference.quantize_weight_per_channel(torch.randn(17, 33, generator=_gen(10)), 63)
    for shape in [(0, 33), (2, 0, 33), (0, 4, 33)]:
        out = OPS.int8_linear(torch.randn(shape), w_q, w_s, torch.randn(17), "relu", backend, 63, None)
        assert out.shape == (*shape[:-1], 17) and out.dtype == torch.float32


# --------------------------------------------------------------- int8_linear op: property tests
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(0, 40),
    k=st.integers(1, 96),
    n=st.integers(1, 48),
    lead=st.sampled_from([(), (2,)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    backend=st.sampled_from(CPU_BACKENDS + ["auto"]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_linear_op_matches_reference(rel_close, activation, m, k, n, lead, dtype, backend, with_bias, seed):
    g = _gen(seed)
    qmax = _qmax_for("onednn") if backend in ("onednn", "auto") else 127
    x = (torch.randn(*lead, m, k, generator=g) * 3).to(dtype)
    rows = 2 * n if activation in backends.GATED else n  # SwiGLU: [gate; up] stacked
    w = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(rows, generator=g).to(dtype) if with_bias else None
    w_q, w_s = reference.quantize_weight_per_channel(w, qmax)

    out = OPS.int8_linear(x, w_q, w_s, bias, activation, backend, qmax, None)

    x_q, x_s = reference.quantize_per_token(x.reshape(-1, k))
    ref = reference.int8_linear(x_q, x_s, w_q, w_s, bias, activation, dtype).reshape(*lead, m, n)
    assert out.dtype == dtype
    rel_close(out, ref, dtype, _gelu_input_max(activation, backend, x_q, x_s, w_q, w_s, bias))


def _gelu_input_max(activation, backend, x_q, x_s, w_q, w_s, bias) -> float:
    """max |y| before a GELU that oneDNN's epilogue may evaluate (conftest.assert_rel_close), else 0."""
    if activation not in ("gelu", "gelu_tanh") or backend not in ("onednn", "auto") or x_q.numel() == 0:
        return 0.0
    return float(reference.int8_linear(x_q, x_s, w_q, w_s, bias, "none", torch.float32).abs().max())


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 24),
    k=st.integers(1, 64),
    n=st.integers(1, 32),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_linear_q_op_matches_reference(rel_close, activation, m, k, n, out_dtype, seed):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g)
    rows = 2 * n if activation in backends.GATED else n  # SwiGLU: [gate; up] stacked
    w_q, w_s = reference.quantize_weight_per_channel(torch.randn(rows, k, generator=g), 63)
    bias = torch.randn(rows, generator=g)
    x_q, x_s = reference.quantize_per_token(x)
    out = OPS.int8_linear_q(x_q, x_s, w_q, w_s, bias, activation, "auto", 63, out_dtype)
    ref = reference.int8_linear(x_q, x_s, w_q, w_s, bias, activation, out_dtype)
    assert out.dtype == out_dtype
    rel_close(out, ref, out_dtype, _gelu_input_max(activation, "auto", x_q, x_s, w_q, w_s, bias))


@pytest.mark.parametrize("qmax", sorted({63, _qmax_for("onednn"), 127}))
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_int8_linear_op_sqnr_vs_float(sqnr, qmax, activation):
    g = _gen(11)
    x = torch.randn(64, 256, generator=g)
    w = torch.randn(128, 256, generator=g) / 16
    b = torch.randn(128, generator=g) / 4
    w_q, w_s = reference.quantize_weight_per_channel(w, qmax)
    out = OPS.int8_linear(x, w_q, w_s, b, activation, "auto", qmax, None)
    y = F.linear(x, w, b)
    ref = F.gelu(y) if activation == "gelu" else y
    # measured: ~40 dB with 7-bit weights (qmax 63), ~44 dB with qmax 127
    assert sqnr(ref, out) >= 30.0


def test_int8_linear_op_unknown_activation_raises():
    w_q, w_s = reference.quantize_weight_per_channel(torch.randn(8, 16), 63)
    with pytest.raises(ValueError, match="unknown activation"):
        OPS.int8_linear(torch.randn(2, 16), w_q, w_s, None, "tanh", "reference", 63, None)


def test_int8_linear_op_out_dtype_argument():
    w_q, w_s = reference.quantize_weight_per_channel(torch.randn(8, 16, generator=_gen(12)), 63)
    x = torch.randn(3, 16, generator=_gen(13))
    out = OPS.int8_linear(x, w_q, w_s, None, "none", "reference", 63, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    full = OPS.int8_linear(x, w_q, w_s, None, "none", "reference", 63, None)
    assert full.dtype == torch.float32
    assert torch.equal(out, full.to(torch.bfloat16))


# ---------------------------------------------------------------------------- layer_norm_quant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("return_float", [True, False])
def test_layer_norm_quant_op(dtype, affine, return_float):
    g = _gen(14)
    x = (torch.randn(2, 5, 64, generator=g) * 3 + 1).to(dtype)
    w = (torch.rand(64, generator=g) + 0.5).to(dtype) if affine else None
    b = torch.randn(64, generator=g).to(dtype) if affine else None
    y, y_q, s = OPS.layer_norm_quant(x, [64], w, b, 1e-5, return_float)
    expected_y = F.layer_norm(x, [64], w, b, 1e-5)
    e_q, e_s = _quantize_per_token_f64(expected_y)
    assert y_q.dtype == torch.int8 and y_q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (2, 5, 1)
    assert torch.equal(y_q, e_q)
    assert torch.equal(s, e_s)
    if return_float:
        assert y.dtype == dtype and torch.equal(y, expected_y)
    else:
        assert y.numel() == 0


def test_layer_norm_quant_op_then_linear_q_equals_int8_linear_on_layer_norm():
    g = _gen(15)
    x = torch.randn(3, 7, 64, generator=g)
    lw, lb = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    w_q, w_s = reference.quantize_weight_per_channel(torch.randn(32, 64, generator=g), 63)
    bias = torch.randn(32, generator=g)
    _, y_q, s = OPS.layer_norm_quant(x, [64], lw, lb, 1e-5, False)
    fused = OPS.int8_linear_q(y_q, s, w_q, w_s, bias, "silu", "auto", 63, torch.float32)
    unfused = OPS.int8_linear(F.layer_norm(x, [64], lw, lb, 1e-5), w_q, w_s, bias, "silu", "auto", 63, None)
    assert torch.equal(fused, unfused)


def test_quantize_workspace_across_inference_mode():
    """The CPU quantizer's reused workspace must serve calls inside and outside inference_mode alike."""
    from fxquant.ir import reference
    from fxquant.targets import backends

    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        inside = backends.quantize_per_token(x * 2)  # first use may allocate the workspace here
    outside = backends.quantize_per_token(x * 2)
    want = reference.quantize_per_token(x * 2)
    for got in (inside, outside):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
