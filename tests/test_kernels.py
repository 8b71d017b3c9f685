"""The Triton kernels of ``fxquant.kernels`` against their pure-torch references.

Without a GPU these run under ``TRITON_INTERPRET=1`` (set in conftest.py); on a GPU machine the same tests
compile the kernels for real (``bench/check_kernels_gpu.py`` runs them there, with larger shapes).
Shapes are deliberately odd (M = 1, 7, 33; K and N not multiples of 16) so every masked edge runs.

Tolerances: the int32 accumulation is bit-exact; the fp32 epilogue may differ from the reference by
fp32 contraction (a fused multiply-add) and the transcendental's implementation: 1e-5 relative on fp32
outputs, one ulp of the output dtype for bf16 / fp16 (``conftest.TOLERANCE``). Quantization is bit-exact.
LayerNorm+quantize: y within one ulp of x's dtype (two LayerNorm implementations), y_q within ±1 where
y rounded differently, scale within one ulp of y's dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fxquant.kernels import common, layer_norm_quant as kln, quantize as kq, w8a8_gemm as kg

pytestmark = [
    pytest.mark.skipif(not common.HAS_TRITON, reason="Triton is not installed (pip install 'fxquant[triton]')"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() or common.interpreting()),
        reason="needs a GPU or TRITON_INTERPRET=1",
    ),
]

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
@pytest.mark.parametrize("m,k,n", SHAPES[:3])
def test_gemm_epilogue_matches_reference(m, k, n, activation, out_dtype, rel_close):
    g = torch.Generator().manual_seed(7 * m + k)
    a, w = _int8(m, k, gen=g), _int8(n, k, gen=g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).to(DEVICE)
    sw = (torch.rand(n, 1, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE, out_dtype)
    ref = kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), bias.cpu(), activation, out_dtype)
    for tma in _tma_choices(k):
        got = kg.w8a8_linear(a, sa, w, sw, bias, activation, out_dtype, use_tma=tma)
        assert got.dtype == out_dtype and got.shape == (m, n)
        rel_close(got.cpu(), ref)


def test_gemm_strided_activation_and_no_bias(rel_close):
    g = torch.Generator().manual_seed(3)
    base = _int8(9, 80, gen=g)
    a = base[:, 8:72]  # row stride 80, K = 64: a view, not contiguous
    w = _int8(24, 64, gen=g)
    sa, sw = torch.rand(9).to(DEVICE) + 0.01, torch.rand(24).to(DEVICE) + 0.01
    got = kg.w8a8_linear(a, sa, w, sw, None, "silu", torch.float32)
    rel_close(got.cpu(), kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), None, "silu", torch.float32))


@pytest.mark.parametrize("per_sm", [1, 2])
def test_persistent_tma_gemm_loops_over_every_tile(rel_close, per_sm):
    """The persistent configs (``per_sm`` programs per SM striding over tiles) compete in the autotuner only
    on a GPU; here 3 "SMs" cover the 9 tiles of a 33x64x48 problem, edges included, against the reference."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    g = torch.Generator().manual_seed(5)
    m, k, n, bm, bn, bk = 33, 64, 48, 16, 16, 32
    a, w = _int8(m, k, gen=g), _int8(n, k, gen=g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).to(DEVICE)
    sw = (torch.rand(n, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    c = torch.full((m, n), float("nan"), device=DEVICE)
    programs = kg._programs(common.cdiv(m, bm) * common.cdiv(n, bn), 3, per_sm)
    assert programs == 3 * per_sm
    kg._w8a8_gemm_tma_kernel.fn[(programs,)](
        TensorDescriptor(a, [m, k], [k, 1], [bm, bk]), TensorDescriptor(w, [n, k], [k, 1], [bn, bk]), c, sa, sw, bias,
        m, n, k, 64, c.stride(0), c.stride(1), 3,
        HAS_BIAS=True, ACTIVATION="silu", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, PERSISTENT=per_sm,
    )
    rel_close(c.cpu(), kg.w8a8_linear_reference(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), bias.cpu(), "silu", torch.float32))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(a=torch.zeros(4, 32)), "int8 a_q and w_q"),
        (dict(w=torch.zeros(8, 31, dtype=torch.int8)), "a_q has K=32 but w_q has K=31"),
        (dict(sa=torch.ones(3)), "one per token"),
        (dict(sw=torch.ones(8, dtype=torch.float16)), "scales must be fp32"),
        (dict(bias=torch.ones(7)), "bias has 7 values"),
        (dict(act="tanh"), "unknown activation 'tanh'"),
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
        assert c.kwargs["BLOCK_K"] >= 32 and c.num_warps % 4 == 0
        if c.fxquant_group == "large":
            assert c.kwargs["BLOCK_M"] % 64 == 0
        else:
            assert c.kwargs["BLOCK_M"] <= 64
    assert {c.fxquant_group for c in kg._prune(configs, {"M_BUCKET": 16})} == {"small"}
    assert {c.fxquant_group for c in kg._prune(configs, {"M_BUCKET": 128})} == {"small", "large"}
    assert {c.fxquant_group for c in kg._prune(configs, {"M_BUCKET": 4096})} == {"large"}


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


# ------------------------------------------------------------------------------------------ LaunchCache
def test_launch_cache_key_separates_every_triton_specialization():
    """A cached compiled kernel may only be reused where Triton would pick the same binary: the key must
    change with dtypes, 16-byte alignment of pointers, and "== 1" / "% 16 == 0" of integer arguments."""
    key = common.LaunchCache.key
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
    monkeypatch.setattr(common, "_current_stream", lambda device: 77)
    t = torch.zeros(8)
    compiled = _FakeCompiled()
    cache = common.LaunchCache()
    cache.put(("k",), compiled, config=(16, 32))
    entry = cache._entries[("k",)]
    assert entry.config == (16, 32)
    entry((3, 2), torch.device("cpu"), (t, 5, "silu", True))
    assert compiled.run.calls == [(3, 2, 1, 77, 1234, False, False, None, None, (4, 1, 0), None, None, None,
                                   t.data_ptr(), 5, "silu", True)]
    assert compiled.runner_calls == []


def test_cached_launch_falls_back_to_triton_when_the_kernel_needs_scratch(monkeypatch):
    monkeypatch.setattr(common, "_current_stream", lambda device: 77)
    t = torch.zeros(8)
    compiled = _FakeCompiled(scratch=256)
    cache = common.LaunchCache()
    cache.put(("k",), compiled)
    cache._entries[("k",)]((3, 1), torch.device("cpu"), (t, 5))
    assert compiled.run.calls == [] and compiled.runner_calls == [((3, 1, 1), (t, 5), 77)]


def test_cached_launch_sees_a_profilers_launch_hook():
    """With a launch hook installed (a profiler's), relaunches go through Triton's runner, which calls it."""
    import triton

    hooks = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hooks, "add"):
        pytest.skip("this Triton keeps launch hooks in a plain attribute")
    assert common._no_launch_hooks()

    def hook(metadata):
        return None

    hooks.add(hook)
    try:
        assert not common._no_launch_hooks()
    finally:
        hooks.remove(hook)
    assert common._no_launch_hooks()


def test_plain_integer_launch_arithmetic():
    assert [common.cdiv(a, 4) for a in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [common.next_pow2(n) for n in (1, 2, 3, 768, 4096, 4097)] == [1, 2, 4, 1024, 4096, 8192]


def test_launch_cache_lookup_serves_only_cuda():
    key, hit = common.LaunchCache().lookup(torch.device("cpu"), ("k",), (torch.zeros(2),), (4,))
    assert key is None and hit is None


def test_launch_cache_is_off_under_the_interpreter_and_on_cpu():
    assert not common.LaunchCache.enabled(torch.device("cpu"))
    if common.interpreting():
        assert not common.LaunchCache.enabled(torch.device("cuda"))
