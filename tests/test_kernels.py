"""The Triton kernels of ``fxquant.kernels`` against their pure-torch references.

Without a GPU these run under ``TRITON_INTERPRET=1`` (set in conftest.py); on a GPU machine the same tests
compile the kernels for real (``bench/check_kernels_gpu.py`` runs them there, with larger shapes).
Shapes are deliberately odd (M = 1, 7, 33; K and N not multiples of 16) so every masked edge runs.

Tolerances: the int32 accumulation is bit-exact; the fp32 epilogue may differ from the reference by
fp32 contraction (a fused multiply-add) and the transcendental's implementation: 1e-5 relative on fp32
outputs, one ulp of the output dtype for bf16 / fp16 (``conftest.TOLERANCE``). Quantization is bit-exact.
LayerNorm+quantize: y within one ulp of x's dtype (two LayerNorm implementations), y_q within ±1 where
y rounded differently, scale within one ulp of y's dtype. RMSNorm+quantize: bf16 / fp16 y within one ulp
of the reference (fp32 y within 32 ulps: another summation order); y_q and scale bit-exact against
quantizing the kernel's own y.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fxquant.kernels import common, launch, layer_norm_quant as kln, quantize as kq, w8a8_gemm as kg

pytestmark = pytest.mark.skipif(common.why_kernels_cannot_run() is not None, reason=str(common.why_kernels_cannot_run()))

DEVICE = "cuda" if torch.cuda.is_available() and not common.interpreting() else "cpu"
SHAPES = [(1, 32, 16), (7, 40, 33), (33, 96, 48), (33, 100, 20), (7, 64, 64)]  # (M, K, N)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # the interpreter evaluates exp() in NumPy, which warns on the (correct) overflow to inf of e^(-y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def _int8(*shape, gen):
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen).to(DEVICE)


def _tma_choices(k):
    return [False, True] if k % 16 == 0 else [False]


# ------------------------------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_int32_accumulation_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a, w = _int8(m, k, gen=g), _int8(n, k, gen=g)
    ones_m, ones_n = torch.ones(m, device=DEVICE), torch.ones(n, device=DEVICE)
    exact = (a.cpu().to(torch.float64) @ w.cpu().to(torch.float64).T)  # |acc| <= 100·127² < 2^24: fp32-exact
    for tma in _tma_choices(k):
        got = kg.w8a8_linear(a, ones_m, w, ones_n, None, "none", torch.float32, use_tma=tma)
        assert torch.equal(got.cpu().to(torch.float64), exact), f"tma={tma}"


@pytest.mark.parametrize("activation", common.ACTIVATIONS)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES[:3] + [(7, 64, 1), (33, 48, 7)])
def test_gemm_epilogue_matches_activation_torch(m, k, n, activation, out_dtype, rel_close):
    """The Triton epilogue against ``common.activation_torch`` (through the reference) for every activation
    and output dtype. n is the output width: for swiglu W has 2n rows (gate over up), odd n included."""
    g = torch.Generator().manual_seed(7 * m + k)
    rows = 2 * n if activation in common.GATED_ACTIVATIONS else n
    a, w = _int8(m, k, gen=g), _int8(rows, k, gen=g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).to(DEVICE)
    sw = (torch.rand(rows, 1, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = torch.randn(rows, generator=g).to(DEVICE, out_dtype)
    ref = kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), bias.cpu(), activation, out_dtype)
    for tma in _tma_choices(k):
        got = kg.w8a8_linear(a, sa, w, sw, bias, activation, out_dtype, use_tma=tma)
        assert got.dtype == out_dtype and got.shape == (m, n)
        rel_close(got.cpu(), ref)


def test_activation_torch_definitions():
    """The torch epilogue is the torch.nn.functional formula; swiglu halves the last dimension (gate, up)."""
    import torch.nn.functional as F

    y = torch.randn(5, 14, generator=torch.Generator().manual_seed(1)) * 4
    want = {"none": y, "relu": F.relu(y), "gelu": F.gelu(y), "gelu_tanh": F.gelu(y, approximate="tanh"),
            "silu": F.silu(y), "swiglu": F.silu(y[:, :7]) * y[:, 7:],
            "geglu_tanh": F.gelu(y[:, :7], approximate="tanh") * y[:, 7:]}
    assert set(want) == set(common.ACTIVATIONS)
    for act, ref in want.items():
        got = common.activation_torch(y.clone(), act)
        assert torch.equal(got, ref), act
    assert common.activation_torch(y.clone(), "swiglu").is_contiguous()
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'.*swiglu"):
        common.activation_torch(y, "tanh")
    with pytest.raises(ValueError, match="even"):
        common.activation_torch(y[:, :5], "swiglu")


@pytest.mark.parametrize("gated", sorted(common.GATED_ACTIVATIONS))
@pytest.mark.parametrize("m,k,i", [(1, 32, 1), (7, 40, 7), (33, 96, 33), (33, 64, 48)])
def test_swiglu_gemm_is_the_gate_and_up_linears(m, k, i, gated, rel_close):
    """swiglu(W = [gate; up]) equals silu(gate Linear) · (up Linear) computed as two plain GEMMs (geglu_tanh:
    gelu_tanh(gate Linear) · (up Linear))."""
    g = torch.Generator().manual_seed(m + k + i)
    a, w = _int8(m, k, gen=g), _int8(2 * i, k, gen=g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).to(DEVICE)
    sw = (torch.rand(2 * i, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = torch.randn(2 * i, generator=g).to(DEVICE)
    gate_act = common.GATED_ACTIVATIONS[gated]
    gate = kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w[:i].cpu(), sw[:i].cpu(), bias[:i].cpu(), gate_act, torch.float32)
    up = kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w[i:].cpu(), sw[i:].cpu(), bias[i:].cpu(), "none", torch.float32)
    for tma in _tma_choices(k):
        got = kg.w8a8_linear(a, sa, w, sw, bias, gated, torch.float32, use_tma=tma)
        rel_close(got.cpu(), gate * up)


def test_gemm_strided_activation_and_no_bias(rel_close):
    g = torch.Generator().manual_seed(3)
    base = _int8(9, 80, gen=g)
    a = base[:, 8:72]  # row stride 80, K = 64: a view, not contiguous
    w = _int8(24, 64, gen=g)
    sa, sw = torch.rand(9).to(DEVICE) + 0.01, torch.rand(24).to(DEVICE) + 0.01
    got = kg.w8a8_linear(a, sa, w, sw, None, "silu", torch.float32)
    rel_close(got.cpu(), kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), None, "silu", torch.float32))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("per_sm", [1, 2])
def test_persistent_tma_gemm_loops_over_every_tile(rel_close, per_sm, gated):
    """The persistent configs (``per_sm`` programs per SM striding over tiles) compete in the autotuner only
    on a GPU; here 3 "SMs" cover the 9 tiles of a 33x64x48 problem, edges included, against the reference."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    g = torch.Generator().manual_seed(5)
    m, k, n, bm, bn, bk = 33, 64, 48, 16, 16, 32
    rows, act = (2 * n, "swiglu") if gated else (n, "silu")
    a, w = _int8(m, k, gen=g), _int8(rows, k, gen=g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).to(DEVICE)
    sw = (torch.rand(rows, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = torch.randn(rows, generator=g).to(DEVICE)
    c = torch.full((m, n), float("nan"), device=DEVICE)
    programs = kg._programs(common.cdiv(m, bm) * common.cdiv(n, bn), 3, per_sm)
    assert programs == 3 * per_sm
    kg._w8a8_gemm_tma_kernel.fn[(programs,)](
        TensorDescriptor(a, [m, k], [k, 1], [bm, bk]), TensorDescriptor(w, [rows, k], [k, 1], [bn, bk]), c, sa, sw, bias,
        m, n, k, 64, c.stride(0), c.stride(1), 3,
        HAS_BIAS=True, ACTIVATION=act, GATED=gated, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, PERSISTENT=per_sm,
    )
    rel_close(c.cpu(), kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), bias.cpu(), act, torch.float32))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(a=torch.zeros(4, 32)), "int8 a_q and w_q"),
        (dict(w=torch.zeros(8, 31, dtype=torch.int8)), "a_q has K=32 but w_q has K=31"),
        (dict(sa=torch.ones(3)), "one per token"),
        (dict(sw=torch.ones(8, dtype=torch.float16)), "scales must be fp32"),
        (dict(bias=torch.ones(7)), "bias has 7 values"),
        (dict(act="tanh"), "unknown activation 'tanh'"),
        (dict(act="swiglu", w=torch.zeros(7, 32, dtype=torch.int8), sw=torch.ones(7)), "odd number of rows N=7"),
        (dict(out=torch.int32), "out_dtype must be one of"),
    ],
)
def test_gemm_rejects_bad_operands(bad, match):
    args = dict(a=torch.zeros(4, 32, dtype=torch.int8), sa=torch.ones(4), w=torch.zeros(8, 32, dtype=torch.int8),
                sw=torch.ones(8), bias=None, act="none", out=torch.bfloat16)
    args.update(bad)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises((TypeError, ValueError), match=match):
        kg.w8a8_linear(args["a"], args["sa"], args["w"], args["sw"], args["bias"], args["act"], args["out"])


def test_gemm_configs_respect_wgmma_rules():
    """Large-M configs are wgmma-shaped (BLOCK_M % 64, num_warps % 4, BLOCK_K >= 32 for int8); small-M
    configs exist for decode; the pruner hands each M bucket its group."""
    configs = kg.get_autotune_configs(interpret=False)
    groups = {c.fxquant_group for c in configs}
    assert groups == {"large", "small"}
    for c in configs:
        assert c.kwargs["BLOCK_K"] >= 32 and c.num_warps % 4 == 0 and c.kwargs["BLOCK_N"] >= 32
        if c.fxquant_group == "large":
            assert c.kwargs["BLOCK_M"] % 64 == 0
        else:
            assert c.kwargs["BLOCK_M"] <= 64
    assert {c.fxquant_group for c in kg._prune(configs, {"M_BUCKET": 16})} == {"small"}
    assert {c.fxquant_group for c in kg._prune(configs, {"M_BUCKET": 128})} == {"small", "large"}
    assert {c.fxquant_group for c in kg._prune(configs, {"M_BUCKET": 4096})} == {"large"}
    # the swiglu dual GEMM gets its own twins (BLOCK_N halved: two accumulators in one's registers)
    plain = kg._prune(configs, {"M_BUCKET": 4096}, GATED=False)
    gated = kg._prune(configs, {"M_BUCKET": 4096}, GATED=True)
    assert plain and gated and not any(c.fxquant_gated for c in plain) and all(c.fxquant_gated for c in gated)
    assert sorted(c.kwargs["BLOCK_N"] // 2 for c in plain) == sorted(c.kwargs["BLOCK_N"] for c in gated)


def test_persistent_grid_size():
    """One program per tile (0), else per_sm programs per SM but never more programs than tiles."""
    assert kg._programs(512, 132, 0) == 512
    assert kg._programs(512, 132, 1) == 132
    assert kg._programs(512, 132, 2) == 264
    assert kg._programs(200, 132, 2) == 200


# --------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (7, 5), (33, 48), (7, 100)])
def test_quantize_is_bit_exact(m, k, dtype):
    g = torch.Generator().manual_seed(m + 31 * k)
    x = (torch.randn(m, k, generator=g) * 4).to(DEVICE, dtype)
    q, s = kq.quantize_per_token(x)
    rq, rs = kq.quantize_per_token_reference(x.cpu())
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m, 1)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


def test_quantize_two_pass_path_is_bit_exact(monkeypatch):
    """Rows longer than MAX_SINGLE_PASS take two passes over BLOCK_K chunks; same numbers."""
    monkeypatch.setattr(kq, "MAX_SINGLE_PASS", 16)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 2, 4100, generator=g) * 3).to(DEVICE, torch.bfloat16)  # 4100 > 4096: a K tail
    q, s = kq.quantize_per_token(x)
    rq, rs = kq.quantize_per_token_reference(x.cpu())
    assert q.shape == x.shape and s.shape == (3, 2, 1)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("single_pass", [True, False])
def test_quantize_zero_and_nonfinite_rows(single_pass, monkeypatch):
    if not single_pass:
        monkeypatch.setattr(kq, "MAX_SINGLE_PASS", 4)
    x = torch.randn(4, 24)
    x[1] = 0.0
    x[2, 3] = float("nan")
    x[3, 7] = float("inf")
    q, s = kq.quantize_per_token(x.to(DEVICE))
    q, s = q.cpu(), s.cpu()
    rq, rs = kq.quantize_per_token_reference(x)
    assert torch.equal(q[:2], rq[:2]) and torch.equal(s[:2], rs[:2])
    assert s[1].item() == torch.finfo(torch.float32).eps and not q[1].any()
    assert torch.isnan(s[2]).all() and not torch.isfinite(s[3]).any()  # non-finite input propagates


# ------------------------------------------------------------------- static scale and SmoothQuant smoothing
ACT_MODES = ["static", "smooth", "static_smooth"]
ACT_SHAPES = [(m, k) for m in (1, 3, 17) for k in (1, 7, 96, 130)]
NORM_ACT_SHAPES = [(1, 1), (3, 7), (17, 96), (3, 130), (1, 130)]  # the norm kernel runs 3x per case: fewer


def _act_args(mode, k, scale, seed):
    """(act_scale, act_smooth) of ``mode``: the static scale ``scale`` (chosen by the caller so that many
    values lie beyond 127·s and clamp) and SmoothQuant factors in [0.5, 2) (one 1/s per channel)."""
    g = torch.Generator().manual_seed(seed)
    act_scale = torch.tensor([scale], device=DEVICE) if "static" in mode else None
    act_smooth = (torch.rand(k, generator=g) * 1.5 + 0.5).to(DEVICE) if "smooth" in mode else None
    return act_scale, act_smooth


def _cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.parametrize("mode", ACT_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", ACT_SHAPES)
def test_quantize_static_and_smooth_are_bit_exact(m, k, dtype, mode):
    """x · act_smooth then a static scale (127·s = 6.35 against |x| up to ~12 and two outliers: the clamp
    runs) or per-token scales: q and scale equal the reference's; a static s fills a contiguous [M, 1]."""
    g = torch.Generator().manual_seed(m + 31 * k)
    x = torch.randn(m, k, generator=g) * 4
    x[0, 0], x[-1, -1] = 30.0, -1000.0
    x = x.to(DEVICE, dtype)
    act_scale, act_smooth = _act_args(mode, k, 0.05, seed=k)
    q, s = kq.quantize_per_token(x, act_scale, act_smooth)
    rq, rs = kq.quantize_per_token_reference(x.cpu(), _cpu(act_scale), _cpu(act_smooth))
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m, 1) and s.is_contiguous()
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)
    if act_scale is not None:
        assert q[-1, -1] == -127  # beyond 127·s: clamped


@pytest.mark.parametrize("mode", ACT_MODES)
def test_quantize_static_and_smooth_two_pass_path_is_bit_exact(mode):
    """K > MAX_SINGLE_PASS: the two-pass variant (static: no amax pass; smooth: in both passes)."""
    k = kq.MAX_SINGLE_PASS + 6  # 4 chunks of 4096 and a tail
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, k, generator=g) * 3).to(DEVICE, torch.bfloat16)
    act_scale, act_smooth = _act_args(mode, k, 0.04, seed=3)
    q, s = kq.quantize_per_token(x, act_scale, act_smooth)
    rq, rs = kq.quantize_per_token_reference(x.cpu(), _cpu(act_scale), _cpu(act_smooth))
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("single_pass", [True, False])
def test_quantize_static_clamps_values_far_beyond_127_s(single_pass, monkeypatch):
    """x / s anywhere in fp32's range, ±Inf included, clamps to ±127: the rounding trick of quantize_with is
    exact only for |x / s| < 2^22 (x / s = -2^24 used to come back as +127)."""
    if not single_pass:
        monkeypatch.setattr(kq, "MAX_SINGLE_PASS", 4)
    s = 0.00123
    row = [-2e7 * s, -1.3e7 * s, -2**24 * s, 2e7 * s, 5e6 * s, 1e30, -1e30, float("inf"), float("-inf"), 0.0, 127.5 * s]
    x = torch.tensor([row, [v / 2 for v in row]])
    act_scale = torch.tensor([s])
    q, sc = kq.quantize_per_token(x.to(DEVICE), act_scale.to(DEVICE))
    rq, rs = kq.quantize_per_token_reference(x, act_scale)
    assert torch.equal(q.cpu(), rq) and torch.equal(sc.cpu(), rs)
    assert q[0, :9].cpu().tolist() == [-127, -127, -127, 127, 127, 127, -127, 127, -127]


def test_quantize_accepts_a_strided_smooth_and_a_0d_scale():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 40, generator=g) * 4).to(DEVICE)
    act_smooth = (torch.rand(80, generator=g) + 0.5).to(DEVICE)[::2]  # stride 2: copied, read as [K]
    act_scale = torch.tensor(0.05, device=DEVICE)
    q, s = kq.quantize_per_token(x, act_scale, act_smooth)
    rq, rs = kq.quantize_per_token_reference(x.cpu(), act_scale.cpu(), act_smooth.cpu())
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


def _norm_call(norm, x, w, b, return_float, act_scale=None, act_smooth=None):
    if norm == "layer_norm":
        return kln.layer_norm_quant(x, [x.shape[-1]], w, b, 1e-5, return_float, act_scale, act_smooth)
    return kln.rms_norm_quant(x, w, 1e-6, True, return_float, act_scale, act_smooth)


def _norm_reference(norm, x, w, b, act_scale, act_smooth):
    if norm == "layer_norm":
        return kln.layer_norm_quant_reference(x, [x.shape[-1]], w, b, 1e-5, True, act_scale, act_smooth)
    return kln.rms_norm_quant_reference(x, w, 1e-6, True, True, act_scale, act_smooth)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("mode", ACT_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", NORM_ACT_SHAPES)
def test_norm_quant_static_and_smooth_are_bit_exact(m, k, dtype, mode, norm):
    """LayerNorm (affine) / RMSNorm (Llama: cast_before_weight) with act_scale / act_smooth: y is the plain
    norm output, bit for bit; y_q and scale are the reference quantizer's of that y (static 127·s = 2.54:
    the clamp runs), and equal the whole reference's wherever the two norms' y agree (the norms themselves
    may differ by an ulp, see the module docstring); a static scale is s in every row regardless."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    w = (torch.randn(k, generator=g) * 0.5 + 1).to(DEVICE, dtype)
    b = (torch.randn(k, generator=g)).to(DEVICE, dtype) if norm == "layer_norm" else None
    act_scale, act_smooth = _act_args(mode, k, 0.02, seed=k)
    y, q, s = _norm_call(norm, x, w, b, True, act_scale, act_smooth)
    assert torch.equal(y, _norm_call(norm, x, w, b, True)[0])  # not smoothed
    assert q.dtype == torch.int8 and q.shape == (m, k) and s.shape == (m, 1) and s.is_contiguous()
    _, sq, ss = kln.norm_outputs(y.cpu(), True, act_scale=_cpu(act_scale), act_smooth=_cpu(act_smooth))
    assert torch.equal(q.cpu(), sq) and torch.equal(s.cpu(), ss)
    if mode == "static_smooth":  # without the float store (STORE_FLOAT=False): the same y_q and scale
        _, q2, s2 = _norm_call(norm, x, w, b, False, act_scale, act_smooth)
        assert torch.equal(q2, q) and torch.equal(s2, s)
    ry, rq, rs = _norm_reference(norm, x.cpu(), _cpu(w), _cpu(b), _cpu(act_scale), _cpu(act_smooth))
    same = (y.cpu() == ry).all(dim=1)
    assert torch.equal(q.cpu()[same], rq[same]) and torch.equal(s.cpu()[same], rs[same])
    if act_scale is not None:
        assert torch.equal(s.cpu(), rs)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (dict(act_smooth=torch.ones(31)), ValueError, "act_smooth has 31 values, expected K=32"),
        (dict(act_smooth=torch.ones(2, 32)), ValueError, "act_smooth has 64 values"),
        (dict(act_scale=torch.ones(2)), ValueError, "act_scale has 2 values, expected one"),
        (dict(act_scale=torch.ones(1, dtype=torch.float16)), TypeError, "act_scale must be an fp32 tensor"),
        (dict(act_smooth=torch.ones(32, dtype=torch.bfloat16)), TypeError, "act_smooth must be an fp32 tensor"),
        (dict(act_scale=0.05), TypeError, "act_scale must be an fp32 tensor"),
        (dict(act_smooth=torch.ones(32, device="meta")), ValueError, "act_smooth is on meta"),
    ],
)
@pytest.mark.parametrize("op", ["quantize", "layer_norm", "rms_norm"])
def test_static_and_smooth_operands_are_checked(op, bad, error, match):
    x = torch.randn(4, 32).to(DEVICE)
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
              for k, v in bad.items()}
    with pytest.raises(error, match=match):
        if op == "quantize":
            kq.quantize_per_token(x, **kwargs)
        else:
            _norm_call(op, x, None, None, True, **kwargs)


# ------------------------------------------------------------------------------------ LayerNorm+quantize
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 16), (7, 33), (33, 100)])
def test_layer_norm_quant_matches_reference(m, k, dtype, affine):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    w = (torch.randn(k, generator=g)).to(DEVICE, dtype) if affine else None
    b = (torch.randn(k, generator=g)).to(DEVICE, dtype) if affine else None
    y, q, s = kln.layer_norm_quant(x, [k], w, b, 1e-5, return_float=True)
    ry, rq, rs = kln.layer_norm_quant_reference(
        x.cpu().float(), [k], None if w is None else w.cpu().float(), None if b is None else b.cpu().float(), 1e-5,
    )
    ry = ry.to(dtype)  # the fp32 LayerNorm rounded once to x's dtype (the kernel's y)
    ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    assert y.dtype == dtype and q.dtype == torch.int8 and s.shape == (m, 1)
    yd, ryd = y.cpu().double(), ry.double()
    assert ((yd - ryd).abs() <= ulp * ryd.abs() + 1e-6).all()
    # quantizing the kernel's own y reproduces its y_q and scale bit for bit
    sq, ss = kq.quantize_per_token_reference(y.cpu())
    assert torch.equal(q.cpu(), sq) and torch.equal(s.cpu(), ss)
    # and against the fp32 reference: within one step where y rounded differently
    assert (q.cpu().int() - rq.int()).abs().max() <= 1
    assert ((s.cpu() - rs).abs() <= ulp * rs).all()


def test_layer_norm_quant_without_float_output():
    x = torch.randn(5, 40).to(DEVICE)
    y, q, s = kln.layer_norm_quant(x, [40], None, None, 1e-6, return_float=False)
    y2, q2, s2 = kln.layer_norm_quant(x, [40], None, None, 1e-6, return_float=True)
    assert y.numel() == 0 and torch.equal(q, q2) and torch.equal(s, s2)


def test_layer_norm_quant_rejects_bad_operands():
    x = torch.randn(4, 32).to(DEVICE)
    with pytest.raises(ValueError, match="last dimension only"):
        kln.layer_norm_quant(x, [4, 32], None, None, 1e-5)
    with pytest.raises(ValueError, match="weight has 31 values"):
        kln.layer_norm_quant(x, [32], torch.ones(31).to(DEVICE), None, 1e-5)
    with pytest.raises(TypeError, match="bf16 / fp16 / fp32"):
        kq.quantize_per_token(torch.ones(3, 4, dtype=torch.int32).to(DEVICE))


# -------------------------------------------------------------------------------------- RMSNorm+quantize
def _hf_llama_rms_norm(x, weight, eps):
    """Hugging Face ``LlamaRMSNorm.forward`` (also Qwen2 / Qwen3 / Mistral), written out."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _hf_gemma_rms_norm(x, weight, eps):
    """Hugging Face ``GemmaRMSNorm.forward``: fp32 throughout, scale (1 + w), one cast at the end."""
    output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def _rms_inputs(m, k, dtype, weighted, cast_before_weight, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2 + 0.3).to(dtype)
    if not weighted:
        return x, None
    w = torch.randn(k, generator=g) * 0.5 + 1
    return x, (w.to(dtype) if cast_before_weight else w)  # F.rms_norm / Gemma: an fp32 weight is allowed


@pytest.mark.parametrize("return_float", [True, False])
@pytest.mark.parametrize("mode", ["cast_before_weight", "fp32_weight", "no_weight"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (7, 40), (33, 100), (7, 257), (1, 257), (33, 1)])
def test_rms_norm_quant_matches_reference(m, k, dtype, mode, return_float):
    cast = mode == "cast_before_weight"
    x, w = _rms_inputs(m, k, dtype, mode != "no_weight", cast, seed=m * 1000 + k)
    y, q, s = kln.rms_norm_quant(x.to(DEVICE), None if w is None else w.to(DEVICE), 1e-6, cast, return_float)
    ry, rq, rs = kln.rms_norm_quant_reference(x, w, 1e-6, cast, True)
    assert q.dtype == torch.int8 and q.shape == (m, k) and s.dtype == torch.float32 and s.shape == (m, 1)
    if not return_float:
        assert y.numel() == 0
        y = kln.rms_norm_quant(x.to(DEVICE), None if w is None else w.to(DEVICE), 1e-6, cast, True)[0]
    assert y.dtype == dtype and y.shape == (m, k)
    yd, ryd = y.cpu().double(), ry.double()
    # one ulp of bf16 / fp16; fp32 y differs by the mean square's summation order: 32 fp32 ulps (4e-6)
    ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 32 * torch.finfo(dtype).eps
    assert ((yd - ryd).abs() <= ulp * ryd.abs()).all(), (yd - ryd).abs().max()
    # y_q and scale are the per-token quantization of the kernel's own y, bit for bit
    sq, ss = kq.quantize_per_token_reference(y.cpu())
    assert torch.equal(q.cpu(), sq) and torch.equal(s.cpu(), ss)


def test_rms_norm_quant_reference_is_hugging_face_and_torch():
    """cast_before_weight=True is LlamaRMSNorm bit for bit; False is F.rms_norm (torch 2.13: fp32 inside,
    one rounding) and GemmaRMSNorm with the fp32 (1 + w) passed as the weight."""
    import torch.nn.functional as F

    for dtype in DTYPES:
        for m, k in ((7, 40), (33, 257)):
            x, w = _rms_inputs(m, k, dtype, True, True, seed=k)
            assert torch.equal(kln.rms_norm_quant_reference(x, w, 1e-6, True)[0], _hf_llama_rms_norm(x, w, 1e-6))
            wf = w.float() - 1
            gemma = _hf_gemma_rms_norm(x, wf, 1e-6)
            assert torch.equal(kln.rms_norm_quant_reference(x, 1.0 + wf, 1e-6, False)[0], gemma)
            ref = kln.rms_norm_quant_reference(x, w, 1e-6, False)[0].double()
            torch_y = F.rms_norm(x, [k], w, 1e-6).double()
            assert ((torch_y - ref).abs() <= torch.finfo(dtype).eps * ref.abs()).all()  # within one ulp


def test_rms_norm_quant_rejects_bad_operands():
    x = torch.randn(4, 32).to(DEVICE)
    with pytest.raises(ValueError, match="weight has 31 values"):
        kln.rms_norm_quant(x, torch.ones(31).to(DEVICE), 1e-5, False)
    with pytest.raises(TypeError, match="x's dtype"):
        kln.rms_norm_quant(x.bfloat16(), torch.ones(32).to(DEVICE), 1e-5, True)
    with pytest.raises(ValueError, match="holds a row in registers"):
        kln.rms_norm_quant(torch.zeros(1, kln.MAX_K + 1).to(DEVICE), None, 1e-5, False)


# ------------------------------------------------------------------------------------------ LaunchCache
def test_launch_cache_key_separates_every_triton_specialization():
    """A cached compiled kernel may only be reused where Triton would pick the same binary: the key must
    change with dtypes, 16-byte alignment of pointers, and "== 1" / "% 16 == 0" of integer arguments."""
    key = launch.LaunchCache.key
    a = torch.zeros(64, dtype=torch.int8)
    base = key(("cfg",), (a,), (32, 48))
    assert base == key(("cfg",), (torch.zeros(64, dtype=torch.int8),), (64, 80))  # same specialization
    assert base != key(("cfg",), (a.float(),), (32, 48))  # dtype
    assert base != key(("cfg",), (a[1:],), (32, 48))  # misaligned pointer
    assert base != key(("cfg",), (a,), (33, 48))  # % 16
    assert base != key(("cfg",), (a,), (1, 48)) and key(("cfg",), (a,), (1, 48)) != key(("cfg",), (a,), (3, 48))  # == 1
    assert base != key(("other",), (a,), (32, 48))  # the caller's constexprs and autotune key


class _FakeLauncher:
    """Stands in for Triton's ``CudaLauncher`` (``CompiledKernel.run``): records what the C launcher gets."""

    def __init__(self, scratch=0):
        self.global_scratch_size = scratch
        self.profile_scratch_size = 0
        self.launch_cooperative_grid = False
        self.launch_pdl = False
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)


class _FakeCompiled:
    def __init__(self, scratch=0):
        self.run = _FakeLauncher(scratch)
        self.function = 1234
        self.packed_metadata = (4, 1, 0)
        self.runner_calls = []

    def __getitem__(self, grid):
        return lambda *args, stream: self.runner_calls.append((grid, args, stream))


def test_cached_launch_calls_the_c_launcher_with_integer_pointers(monkeypatch):
    """The relaunch hands Triton's C launcher its 13 leading arguments (grid, stream, function, launch
    flags, no scratch, metadata, no hooks) and then the kernel's arguments with tensors as device pointers."""
    monkeypatch.setattr(launch, "_current_stream", lambda device: 77)
    t = torch.zeros(8)
    compiled = _FakeCompiled()
    cache = launch.LaunchCache()
    cache.put(("k",), compiled, config=(16, 32))
    entry = cache._entries[("k",)]
    assert entry.config == (16, 32)
    entry((3, 2), torch.device("cpu"), (t, 5, "silu", True))
    assert compiled.run.calls == [(3, 2, 1, 77, 1234, False, False, None, None, (4, 1, 0), None, None, None,
                                   t.data_ptr(), 5, "silu", True)]
    assert compiled.runner_calls == []


def test_cached_launch_falls_back_to_triton_when_the_kernel_needs_scratch(monkeypatch):
    monkeypatch.setattr(launch, "_current_stream", lambda device: 77)
    t = torch.zeros(8)
    compiled = _FakeCompiled(scratch=256)
    cache = launch.LaunchCache()
    cache.put(("k",), compiled)
    cache._entries[("k",)]((3, 1), torch.device("cpu"), (t, 5))
    assert compiled.run.calls == [] and compiled.runner_calls == [((3, 1, 1), (t, 5), 77)]


def test_cached_launch_sees_a_profilers_launch_hook():
    """With a launch hook installed (a profiler's), relaunches go through Triton's runner, which calls it."""
    import triton

    hooks = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hooks, "add"):
        pytest.skip("this Triton keeps launch hooks in a plain attribute")
    assert launch._no_launch_hooks()

    def hook(metadata):
        return None

    hooks.add(hook)
    try:
        assert not launch._no_launch_hooks()
    finally:
        hooks.remove(hook)
    assert launch._no_launch_hooks()


def test_plain_integer_launch_arithmetic():
    assert [common.cdiv(a, 4) for a in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [common.next_pow2(n) for n in (1, 2, 3, 768, 4096, 4097)] == [1, 2, 4, 1024, 4096, 8192]


@pytest.mark.parametrize("raw", [None, "0", "1", "", " 1 "])
def test_pdl_is_off_where_no_gpu_launches(raw, monkeypatch):
    """Programmatic dependent launch (on by default on sm_90+ GPUs): a CPU, or the interpreter, never gets it."""
    if raw is None:
        monkeypatch.delenv("FXQUANT_PDL", raising=False)
    else:
        monkeypatch.setenv("FXQUANT_PDL", raw)
    assert common.use_pdl(torch.device("cpu")) is False
    assert common.pdl_launch(torch.device("cpu")) == (False, {})
    if common.interpreting():
        assert common.use_pdl(torch.device("cuda")) is False
        assert common.pdl_launch(torch.device("cuda")) == (False, {})


def test_pdl_launch_gives_the_keyword_with_the_flag(monkeypatch):
    """``pdl_launch``: the kernel's PDL constexpr and Triton's ``launch_pdl`` keyword come together."""
    monkeypatch.setattr(common, "use_pdl", lambda device: True)
    assert common.pdl_launch(torch.device("cuda")) == (True, {"launch_pdl": True})
    monkeypatch.setattr(common, "use_pdl", lambda device: False)
    assert common.pdl_launch(torch.device("cuda")) == (False, {})


@pytest.mark.parametrize("raw", ["2", "-1", "on", "true"])
def test_pdl_setting_names_a_bad_value(raw, monkeypatch):
    monkeypatch.setenv("FXQUANT_PDL", raw)
    with pytest.raises(ValueError, match=f"FXQUANT_PDL='{raw}': expected 1 \\(on, the default on sm_90\\+ GPUs"):
        common.use_pdl(torch.device("cpu"))


@pytest.mark.parametrize("raw, early", [(None, True), ("", True), ("1", True), (" 0 ", False), ("0", False)])
def test_pdl_early_signal_setting(raw, early, monkeypatch):
    """The PDL kernels signal their dependents early by default; ``FXQUANT_PDL_TRIGGER=0`` moves it to their exit."""
    if raw is None:
        monkeypatch.delenv("FXQUANT_PDL_TRIGGER", raising=False)
    else:
        monkeypatch.setenv("FXQUANT_PDL_TRIGGER", raw)
    assert common.pdl_early_signal() is early


@pytest.mark.parametrize("raw", ["2", "yes", "-1"])
def test_pdl_early_signal_names_a_bad_value(raw, monkeypatch):
    monkeypatch.setenv("FXQUANT_PDL_TRIGGER", raw)
    with pytest.raises(ValueError, match=f"FXQUANT_PDL_TRIGGER='{raw}': expected 1 \\(signal early, the default\\) or 0"):
        common.pdl_early_signal()


@pytest.mark.skipif(not common.HAS_TRITON, reason="the kernels' sources need Triton")
def test_pdl_kernels_signal_only_after_their_wait():
    """The early dependents signal comes after the kernel's ``griddepcontrol.wait`` in every PDL kernel: Inductor's
    kernels wait only before loading their predecessor's buffers, so a kernel that signalled before its own wait
    could let a successor read an older grid's output while that grid still runs (common.pdl_early_signal)."""
    import inspect

    from fxquant.kernels import decode_attention as kd, w8a16_gemm as kw

    kernels = [kw._w8a16_gemm_kernel, kw._w8a16_gemv_kernel, kd._decode_attention_kernel, kd._decode_attention_combine]
    for kernel in kernels:
        src = inspect.getsource(kernel.fn)
        wait, signal = src.find("gdc_wait()"), src.find("gdc_launch_dependents()")
        assert 0 <= wait < signal, kernel.fn.__name__
        assert src.count("gdc_launch_dependents()") == 1, kernel.fn.__name__


def test_launch_cache_lookup_serves_only_cuda():
    key, hit = launch.LaunchCache().lookup(torch.device("cpu"), ("k",), (torch.zeros(2),), (4,))
    assert key is None and hit is None


def test_launch_cache_is_off_under_the_interpreter_and_on_cpu():
    assert not launch.LaunchCache.enabled(torch.device("cpu"))
    if common.interpreting():
        assert not launch.LaunchCache.enabled(torch.device("cuda"))


def test_launch_cache_is_off_on_an_unchecked_triton(monkeypatch):
    """The fast path leans on Triton's private launcher ABI: on a Triton version not in CHECKED_TRITON the
    cache is off (no entry is made) and every kernel takes ``kernel[grid](...)``, with the same results."""
    import triton

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert launch.version_checked()
    assert launch.LaunchCache.enabled(cuda) == (not common.interpreting())
    monkeypatch.setattr(triton, "__version__", "99.0.0")
    assert not launch.version_checked() and not launch.LaunchCache.enabled(cuda)
    assert launch.LaunchCache().lookup(cuda, ("k",), (torch.zeros(2),), (4,)) == (None, None)
    caches = (kq._LAUNCHES, kln._LAUNCHES, kg._LAUNCHES)
    before = [len(c._entries) for c in caches]
    for run, ref in _cached_kernel_runs(7):
        for _ in range(2):
            assert _equal(run(), ref())
    assert [len(c._entries) for c in caches] == before


def _equal(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b, strict=True))


def _cached_kernel_runs(seed, m=33):
    """(kernel call, what it must return) for each kernel and launch path: results are bit-exact (quantize)
    or compared against the same kernel run again (norms, GEMMs), on inputs drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, 96, generator=g) * 3).to(DEVICE, torch.bfloat16)
    w = torch.randn(96, generator=g).to(DEVICE, torch.bfloat16)
    a, wq = _int8(m, 96, gen=g), _int8(96, 96, gen=g)
    sa, sw = (torch.rand(m, generator=g) * 0.01 + 1e-3).to(DEVICE), (torch.rand(96, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = torch.randn(96, generator=g).to(DEVICE)
    act_scale, act_smooth = torch.tensor([0.02], device=DEVICE), (torch.rand(96, generator=g) + 0.5).to(DEVICE)
    runs = [
        (lambda: kq.quantize_per_token(x), lambda: kq.quantize_per_token_reference(x)),
        (lambda: kq.quantize_per_token(x, act_scale, act_smooth),
         lambda: kq.quantize_per_token_reference(x, act_scale, act_smooth)),
        (lambda: kq.quantize_per_token(x, None, act_smooth), lambda: kq.quantize_per_token_reference(x, None, act_smooth)),
        (lambda: kln.layer_norm_quant(x, [96], w, w, 1e-5), None),
        (lambda: kln.layer_norm_quant(x, [96], w, w, 1e-5, True, act_scale, act_smooth), None),
        (lambda: kln.rms_norm_quant(x, w, 1e-6, True), None),
        (lambda: kln.rms_norm_quant(x, w, 1e-6, False, False), None),
        (lambda: kln.rms_norm_quant(x, w, 1e-6, False, False, act_scale), None),
    ]
    for tma in _tma_choices(96):
        runs += [(lambda tma=tma: kg.w8a8_linear(a, sa, wq, sw, bias, "gelu", torch.bfloat16, use_tma=tma), None),
                 (lambda tma=tma: kg.w8a8_linear(a, sa, wq, sw, bias, "swiglu", torch.float16, use_tma=tma), None)]
    return [(run, ref or (lambda run=run: tuple(t.clone() for t in _as_tuple(run())))) for run, ref in runs]


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


@pytest.mark.skipif(DEVICE != "cuda", reason="the launch cache serves compiled CUDA kernels only")
def test_cached_launch_is_bit_identical_to_the_first_launch(monkeypatch):
    """For each kernel (quantize, LayerNorm/RMSNorm+quantize, the GEMM incl. TMA and swiglu): the first launch
    of a specialization makes a cache entry; the second, on fresh inputs of the same shape, takes the cached
    path and returns exactly what Triton's own launch path returns for those inputs."""
    if not launch.version_checked():
        pytest.skip(f"Triton {__import__('triton').__version__} is not in launch.CHECKED_TRITON")
    caches = (kq._LAUNCHES, kln._LAUNCHES, kg._LAUNCHES)
    for c in caches:
        c._entries.clear()
    first = _cached_kernel_runs(11)
    for run, _ in first:
        run()
    assert all(c._entries for c in caches)
    made = {id(c): dict(c._entries) for c in caches}
    for run, _ in _cached_kernel_runs(12):  # same shapes, fresh inputs: cache hits
        cached = tuple(t.clone() for t in _as_tuple(run()))
        monkeypatch.setattr(launch.LaunchCache, "enabled", staticmethod(lambda device: False))
        plain = _as_tuple(run())  # Triton's launch path, same autotuned config
        monkeypatch.undo()
        assert _equal(cached, plain)
    assert all(c._entries == made[id(c)] for c in caches)  # served from the cache, nothing recompiled
