"""The CPU paths of issue #12: bf16 compute (QuantConfig.compute_dtype), bf16/fp16 inputs to the fast CPU
quantizer, oneDNN under inference mode, and Inductor's fusion of the quantizers on CPU."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fxquant
from fxquant.ir import ops, reference
from fxquant.targets import backends


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["dynamic", "static", "static+smooth", "smooth"])
def test_fast_cpu_quantizer_takes_half_precision_inputs_bit_exactly(dtype, form):
    """bf16 / fp16 x is quantized by the fast CPU path (upcast inside the first op), bit-identical to the
    reference, which upcasts first."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(67, 96, generator=g) * 4).to(dtype)
    scale = torch.tensor([0.03]) if "static" in form else None
    smooth = torch.rand(96, generator=g) + 0.5 if "smooth" in form else None
    got_q, got_s = backends.quantize_per_token(x, scale, smooth)
    want_q, want_s = reference.quantize_per_token(x, scale, smooth)
    assert torch.equal(got_q, want_q) and torch.equal(got_s, want_s)
    assert int(got_q.abs().max()) >= 100  # the test data exercises the int8 range


@pytest.mark.skipif(not backends.onednn_available(), reason="this torch build has no oneDNN int8 Linear")
def test_onednn_runs_inference_tensors():
    """Weights made under torch.inference_mode have no version counter; the packed-weight cache must still
    work (it raised, and the oneDNN probe then reported oneDNN missing for the whole process)."""
    with torch.inference_mode():
        w_q = torch.randint(-63, 64, (48, 64), dtype=torch.int8)
        x_q = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
        got = backends._onednn_gemm(x_q, w_q, torch.ones(48, 1))
    assert torch.equal(got.to(torch.float64), reference.int8_gemm(x_q, w_q).to(torch.float64))


@pytest.mark.skipif(not backends.onednn_available(), reason="this torch build has no oneDNN int8 Linear")
@pytest.mark.parametrize("m", [1, 37, backends._U8_SRC_MAX_M - 1, backends._U8_SRC_MAX_M])
def test_uint8_src_below_the_row_threshold_on_cpus_without_vnni(monkeypatch, m):
    """Without VNNI, oneDNN gets small-M activations as uint8 with zero point 128 (faster there); the GEMM is
    bit-identical to the int8 form and to the exact reference; with VNNI/AMX, or from the threshold on, int8."""
    g = torch.Generator().manual_seed(m)
    x_q = torch.randint(-127, 128, (m, 96), dtype=torch.int8, generator=g)
    w_q = torch.randint(-63, 64, (40, 96), dtype=torch.int8, generator=g)
    want = reference.int8_gemm(x_q, w_q).to(torch.float64)
    for exact_full_range in (False, True):
        monkeypatch.setattr(backends, "cpu_int8_full_range_exact", lambda v=exact_full_range: v)
        src, zp = backends._src(x_q)
        shifted = not exact_full_range and m < backends._U8_SRC_MAX_M
        assert (src.dtype, zp) == ((torch.uint8, 128) if shifted else (torch.int8, 0))
        assert torch.equal(src.to(torch.int16) - zp, x_q.to(torch.int16))
        assert torch.equal(backends._onednn_gemm(x_q, w_q, torch.ones(40, 1)).to(torch.float64), want)


@pytest.mark.skipif(not backends.onednn_available(), reason="this torch build has no oneDNN int8 Linear")
def test_onednn_epilogue_cache_follows_the_bias_and_scale():
    """oneDNN's fp32 bias and flat weight scale are made once per Linear; a new bias or scale tensor (a dtype
    move) or an in-place write (load_state_dict) must be seen on the next call, never a stale copy."""
    g = torch.Generator().manual_seed(3)
    x_q = torch.randint(-127, 128, (9, 64), dtype=torch.int8, generator=g)
    w_q = torch.randint(-63, 64, (32, 64), dtype=torch.int8, generator=g)
    x_scale = torch.full((9, 1), 0.02)  # one scale for every row: the static path with oneDNN's own epilogue
    w_scale = torch.rand(32, 1, generator=g) * 1e-2 + 1e-3

    def check(bias, scale):
        got = backends.run_linear(x_q, x_scale, ops.INT8_LINEAR_Q_C.record(x_q, x_scale, w_q, scale, bias, "none", "onednn", 63, torch.float32), torch.float32)
        want = reference.int8_linear(x_q, x_scale, w_q, scale, bias, "none", torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    bias = torch.randn(32, generator=g)
    check(bias, w_scale)
    bias.add_(10.0)  # in place: same tensor, new version
    check(bias, w_scale)
    check(bias.to(torch.bfloat16), w_scale)  # a new tensor (the dtype move's)
    check(None, w_scale)
    w_scale.mul_(2.0)
    check(None, w_scale)


def test_bf16_output_of_onednn_only_where_the_cpu_has_bf16(monkeypatch):
    """Without native bf16, oneDNN's bf16 epilogue is a reference kernel (seconds per GEMM): fp32 out and a
    cast instead. The result is the same either way."""
    monkeypatch.setattr(backends, "cpu_native_bf16", lambda: False)
    assert backends._onednn_out_ok(torch.float32) and not backends._onednn_out_ok(torch.bfloat16)
    monkeypatch.setattr(backends, "cpu_native_bf16", lambda: True)
    assert backends._onednn_out_ok(torch.bfloat16) and not backends._onednn_out_ok(torch.float16)


def test_compute_dtype_bf16_keeps_fp32_in_and_out(small_bert, sqnr, untouched, tmp_path):
    """QuantConfig(compute_dtype=bf16) on an fp32 model: float work in bf16, callers see fp32; the user's
    model keeps its fp32 parameters; the report says so; export, save and state_dict write the model's own fp32
    values, byte for byte what the model compiled without compute_dtype writes; a dtype move by the caller hands
    the dtypes back to them."""
    torch.manual_seed(0)
    model = small_bert(2)
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    enc = dict(input_ids=ids, attention_mask=mask)
    qm32 = fxquant.compile(model, enc)
    qm16 = untouched(model, lambda: fxquant.compile(model, enc, config=fxquant.QuantConfig(compute_dtype=torch.bfloat16)))
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        out32, out16 = qm32(**enc), qm16(**enc)
    assert out16.last_hidden_state.dtype == torch.float32 and out16.pooler_output.dtype == torch.float32
    # The bf16 float work adds noise of its own (~45 dB SQNR on the AMX Xeon in both weight ranges, the fp32 path's
    # noise power subtracted), so it costs more dB the cleaner the fp32 path is: the bound on the loss depends on the
    # weight range this CPU gets (127 with VNNI / AMX, 63 without; FXQUANT_CPU_ISA forces it), the floor holds for
    # both. Measured fp32 / bf16 path:
    #   qmax 63:  32.6 / 31.8 dB on the AVX2 EPYC (no VNNI); 47.1 / 42.9 dB on the AMX Xeon with FXQUANT_CPU_ISA=avx2
    #   qmax 127: 50.8 / 44.1 dB on the AMX Xeon (unset, and FXQUANT_CPU_ISA=vnni: fp32 out of oneDNN + a cast)
    # (seeds 0-5 of this model: losses 4.15-4.32 dB with qmax 63, 6.55-6.92 dB with qmax 127, on the AMX Xeon)
    db32, db16 = sqnr(ref, out32.last_hidden_state), sqnr(ref, out16.last_hidden_state)
    qmax = qm32.report().weight_qmax
    assert qm16.report().weight_qmax == qmax
    assert db16 > 25, (qmax, db32, db16)
    assert db32 - db16 < {63: 6, 127: 9}[qmax], (qmax, db32, db16)
    assert any("float work in bfloat16" in n for n in qm16.report().notes)
    assert {p.dtype for n, p in qm16.named_parameters() if p.is_floating_point()} == {torch.bfloat16}
    # save, export and state_dict read the model's own fp32 tensors: the same bytes as the model compiled without
    # compute_dtype; afterwards qm16 computes in bf16 as before
    for qm, tag in ((qm32, "32"), (qm16, "16")):
        fxquant.export_onnx(qm, tmp_path / f"m{tag}.onnx", enc)
        qm.save_pretrained(tmp_path / f"ckpt{tag}")
    assert (tmp_path / "m16.onnx").read_bytes() == (tmp_path / "m32.onnx").read_bytes()
    files = sorted(f.name for f in (tmp_path / "ckpt32").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "ckpt16").iterdir()) and "config.json" in files
    for name in files:
        assert (tmp_path / "ckpt16" / name).read_bytes() == (tmp_path / "ckpt32" / name).read_bytes(), name
    sd16, sd32 = qm16.state_dict(), qm32.state_dict()
    assert sd16.keys() == sd32.keys()
    assert all(torch.equal(sd16[k], sd32[k]) and sd16[k].dtype == sd32[k].dtype for k in sd32)
    assert {p.dtype for n, p in qm16.named_parameters() if p.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(qm16(**enc).last_hidden_state, out16.last_hidden_state)
    qm16.to("cpu")  # a device move (here onto the same device) keeps the masters
    assert all(torch.equal(v, sd32[k]) and v.dtype == sd32[k].dtype for k, v in qm16.state_dict().items())
    qm16.float().to(torch.bfloat16)  # a dtype move by the caller: from then on the dtypes are theirs
    assert qm16(**enc).last_hidden_state.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype=torch.int8"):
        fxquant.QuantConfig(compute_dtype=torch.int8)


@pytest.mark.parametrize("mode, compiled_before", [("1", False), ("cuda", False), ("1", True)])
def test_torch_compile_of_a_cpu_model_fuses_the_quantizers(tmp_path, mode, compiled_before):
    """``FXQUANT_INDUCTOR_FUSION=1`` (default): on CPU, Inductor gets the quantizers' pure-torch definitions and
    fuses them into C++ loops (no fxquant quantizer call left in the compiled code, only the GEMMs);
    ``cuda``: CPU graphs keep the opaque ops as Inductor fallbacks (torch.compile of a CPU model failed with
    "both a fallback and a decomp for same op" on CUDA machines). Either way the compiled model equals the
    eager one. ``compiled_before``: a torch.compile of a float model ran before ``fxquant.compile`` registered the
    decompositions (Inductor had cached its decomposition table without them: the ops stayed opaque on torch
    2.13, and the compile failed on 2.11). A fresh process (the registration is global) with Inductor's on-disk
    caches off: their keys do not include fxquant's decompositions, so a cached artifact would hide which mode
    compiled it."""
    script = textwrap.dedent("""
        import os, torch, fxquant
        import torch._functorch.config as functorch_config, torch._inductor.config as inductor_config
        from torch._inductor.utils import run_and_get_code
        functorch_config.enable_autograd_cache = False
        inductor_config.fx_graph_cache = False
        torch.manual_seed(0)
        if COMPILED_BEFORE:
            with torch.no_grad():
                torch.compile(torch.nn.Linear(8, 8))(torch.randn(4, 8))
        model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 128), torch.nn.GELU(),
                                    torch.nn.Linear(128, 64)).eval()
        x = torch.randn(2, 8, 64)
        calls = [(torch.randn(2, 8, 64),)]
        for cfg, cal in ((fxquant.QuantConfig(min_ratio=0), None),
                         (fxquant.QuantConfig(min_ratio=0, activation_scheme="static-per-tensor", smoothquant=0.5), calls)):
            qm = fxquant.compile(model, (x,), config=cfg, calibration=cal, progress=False)
            torch._dynamo.reset()
            with torch.no_grad():
                want = qm(x)
                got, code = run_and_get_code(torch.compile(qm), x)
            # the per-token form's GELU is the tanh approximation when Inductor decomposes it (mode 1, dynamic
            # scheme: within 4.7e-4 of erf GELU before the second Linear's int8 input); else the same ops as eager
            exact = os.environ["FXQUANT_INDUCTOR_FUSION"] != "1" or cfg.activation_scheme == "static-per-tensor"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 if exact else 5e-3)
            print("sqnr", float(10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean().clamp_min(1e-30))))
            code = "\\n".join(code)
            quantizers = sum(code.count(f"torch.ops.fxquant.{op}.default(") for op in ("layer_norm_quant", "int8_linear"))
            print("calls", quantizers, code.count("torch.ops.fxquant.int8_linear_q.default("))
        print("ok")
    """).replace("COMPILED_BEFORE", str(compiled_before))
    env = {**os.environ, "FXQUANT_INDUCTOR_FUSION": mode}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    calls = [tuple(map(int, line.split()[1:])) for line in done.stdout.splitlines() if line.startswith("calls")]
    sqnr = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("sqnr")]
    assert len(sqnr) == 2 and min(sqnr) > 40, sqnr  # compiled against eager, dB (the int8 error itself is ~35-40 dB)
    # measured (torch 2.13): mode 1 -> (0 quantizer calls, 2 GEMM calls); cuda -> (2 opaque ops, 1 GEMM call)
    want = (0, 2) if mode == "1" else (2, 1)
    assert calls == [want, want]


@pytest.mark.parametrize("cap, warns", [("AVX512_CORE_VNNI", True), ("avx2", True), ("AVX512_CORE_AMX", False),
                                        ("ALL", False), ("", False)])
def test_an_isa_cap_below_amx_warns(monkeypatch, cap, warns):
    """oneDNN capped below an AMX CPU runs torch's AMX-packed int8 weights with its reference kernel: a warning names
    the variable (measured on the H200 host's Xeon: 1.3 s for one 128 x 384 x 1152 GEMM)."""
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx512_vnni", "amx_int8", "amx_tile"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends.warn_if_isa_capped()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == int(warns)
    if warns:
        assert f"ONEDNN_MAX_CPU_ISA={cap}" in messages[0] and "Unset ONEDNN_MAX_CPU_ISA" in messages[0]
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # no AMX: a cap is harmless
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends.warn_if_isa_capped()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def _float_dtypes(qm) -> set:
    return {p.dtype for p in qm.parameters() if p.is_floating_point()}


def test_compute_dtype_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(small_bert, monkeypatch):
    """QuantConfig's default ``compute_dtype="auto"``: bf16 float work for an fp32 model of the cpu target on a CPU
    with native bf16 (AMX-BF16 / AVX512-BF16: the AMX Xeon), the model's fp32 on one without (the AVX2 EPYC, or any
    CPU with FXQUANT_CPU_ISA=avx2 / vnni), never for a bf16 model, with ``compute_dtype=None`` or with
    FXQUANT_AUTO_BF16=0 (the suite's setting); fp32 in and out."""
    monkeypatch.delenv("FXQUANT_AUTO_BF16")
    torch.manual_seed(0)
    model = small_bert(1)
    enc = dict(input_ids=torch.randint(0, 512, (2, 12)))
    native = backends.cpu_native_bf16()
    qm = fxquant.compile(model, enc)
    assert _float_dtypes(qm) == ({torch.bfloat16} if native else {torch.float32})
    assert any("compute_dtype='auto'" in n for n in qm.report().notes) == native
    with torch.no_grad():
        assert qm(**enc).last_hidden_state.dtype == torch.float32
    assert _float_dtypes(fxquant.compile(model, enc, config=fxquant.QuantConfig(compute_dtype=None))) == {torch.float32}
    assert _float_dtypes(fxquant.compile(model.to(torch.bfloat16), enc)) == {torch.bfloat16}
    model.float()
    with pytest.raises(ValueError, match="must be 'auto' or one of"):
        fxquant.QuantConfig(compute_dtype="bf16")
    monkeypatch.setenv("FXQUANT_AUTO_BF16", "0")
    assert _float_dtypes(fxquant.compile(model, enc)) == {torch.float32}
    monkeypatch.delenv("FXQUANT_AUTO_BF16")
    was = os.environ.get("FXQUANT_CPU_ISA")  # a run forcing an ISA keeps it for the tests after this one
    monkeypatch.setenv("FXQUANT_CPU_ISA", "avx2")
    backends.clear_cpu_isa_caches()
    try:
        qm = fxquant.compile(model, enc)
        assert _float_dtypes(qm) == {torch.float32}
        assert not any("compute_dtype='auto'" in n for n in qm.report().notes)
    finally:
        if was is None:
            monkeypatch.delenv("FXQUANT_CPU_ISA")
        else:
            monkeypatch.setenv("FXQUANT_CPU_ISA", was)
        backends.clear_cpu_isa_caches()


@pytest.mark.skipif(not backends.cpu_native_bf16(), reason="compute_dtype='auto' is the model's fp32 on this CPU")
def test_compute_dtype_auto_keeps_fp32_where_the_graph_cannot_run_in_bf16(monkeypatch, tmp_path):
    """A Hugging Face Llama captured in fp32 casts RoPE's cos / sin to fp32 inside the graph, so after a bf16 move its
    SDPA would get fp32 queries and keys beside bf16 values (a RuntimeError): "auto" tries the example inputs once
    and, when they fail, hands the model's own tensors back (fp32, what compute_dtype=None computes) with a note."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.delenv("FXQUANT_AUTO_BF16")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 9))
    qm = fxquant.compile(model, (ids,), generation=False)
    ref = fxquant.compile(model, (ids,), generation=False, config=fxquant.QuantConfig(compute_dtype=None))
    assert _float_dtypes(qm) == {torch.float32}
    assert any("compute_dtype='auto': float work stays float32; the graph does not run in bf16" in n
               for n in qm.report().notes)
    with torch.no_grad():
        assert torch.equal(qm(ids).logits, ref(ids).logits)
    qm.save_pretrained(tmp_path / "a")
    ref.save_pretrained(tmp_path / "b")
    for f in (tmp_path / "b").iterdir():
        assert (tmp_path / "a" / f.name).read_bytes() == f.read_bytes(), f.name


def test_compile_forward_default_follows_the_machine(small_bert, monkeypatch):
    """``compile_forward=None``: ``$FXQUANT_TORCH_COMPILE`` (0 / 1) when set (the suite sets 0), else on exactly when
    a C++ compiler is found for this CPU model on an x86 CPU (off on ARM); an explicit True / False wins; anything else
    is a TypeError."""
    torch.manual_seed(0)
    model = small_bert(1)
    enc = dict(input_ids=torch.randint(0, 512, (2, 12)))
    qm = fxquant.compile(model, enc, compile_forward=False)
    assert not qm.compiles_forward()
    assert any("forward runs eager (compile_forward=False)" in n for n in qm.report().notes)
    qm._compile_forward = None
    for env, want in (("0", False), ("1", True)):
        monkeypatch.setenv("FXQUANT_TORCH_COMPILE", env)
        assert qm.compiles_forward() is want
    monkeypatch.delenv("FXQUANT_TORCH_COMPILE")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert qm.compiles_forward() is (x86 and backends.cpp_compiler() is not None)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # ARM: not measured there, so off
    assert qm.compiles_forward() is False
    with pytest.raises(TypeError, match="compile_forward must be True, False or None"):
        fxquant.compile(model, enc, compile_forward="yes")


@pytest.mark.skipif(backends.cpp_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_forward_runs_the_fused_form_and_compiles_once(small_bert, monkeypatch):
    """``compile_forward=True``: ``fxquant.compile`` compiles forward on the example inputs (the report gives the time);
    calls under no_grad and under inference_mode reuse that compile (Dynamo guards on the inputs' dispatch keys,
    which inference_mode changes: the graph runs under one mode); outputs equal the eager graph's within the compute
    dtype's rounding (bf16 where auto picks it: Inductor's epilogue rounds once where the eager op rounds after oneDNN's
    fp32 output) and the compiled GELU's approximation."""
    from torch._dynamo.utils import counters

    monkeypatch.delenv("FXQUANT_AUTO_BF16")  # the default form of this CPU
    torch.manual_seed(0)
    model = small_bert(1)
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    enc = dict(input_ids=ids, attention_mask=mask)
    eager = fxquant.compile(model, enc, compile_forward=False)
    qm = fxquant.compile(model, enc, compile_forward=True)
    assert any(n.startswith("forward: compiled by torch.compile (Inductor) on first use in") for n in qm.report().notes)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        want = eager(**enc).last_hidden_state
        got = qm(**enc).last_hidden_state
    with torch.inference_mode():
        again = qm(**enc).last_hidden_state
    assert counters["stats"]["unique_graphs"] == graphs  # no second compile
    assert torch.equal(got, again) and got.dtype == torch.float32
    real = mask.bool()
    if backends.cpu_native_bf16():
        rtol = 2 * torch.finfo(torch.bfloat16).eps
        torch.testing.assert_close(got[real], want[real], rtol=rtol, atol=rtol * float(want[real].abs().max()))
    # both: the compiled form's GELU is the tanh approximation (within 4.7e-4 of the eager erf GELU,
    # fxquant.ir.reference.gelu_sigmoid_form), which can move a per-token int8 value of the next Linear by a step.
    # Measured (torch 2.13, AMX Xeon): fp32 compute 71.5-72.5 dB (max |Δ| 1.2e-3), bf16 44.8 dB.
    err = (got[real] - want[real]).double()
    sqnr = 10 * torch.log10(want[real].double().pow(2).mean() / err.pow(2).mean().clamp_min(1e-30))
    assert sqnr > (40 if backends.cpu_native_bf16() else 60), float(sqnr)


def test_compiled_forward_falls_back_to_eager_when_torch_compile_fails(small_bert, monkeypatch):
    """Where torch.compile cannot build the graph (no C++ compiler, an Inductor error), forward runs its eager graph
    for good, and the report says so and why; the model's outputs are the eager ones."""
    torch.manual_seed(0)
    model = small_bert(1)
    enc = dict(input_ids=torch.randint(0, 512, (2, 12)))

    class BackendCompilerFailed(RuntimeError):  # what Dynamo raises (matched by name, as torch's own class)
        pass

    def failing_compile(gm, **kwargs):
        def run(*args, **kw):
            raise BackendCompilerFailed("backend='inductor' raised: CppCompileError: C++ compile error")
        return run

    eager = fxquant.compile(model, enc, compile_forward=False)
    monkeypatch.setattr(torch, "compile", failing_compile)
    qm = fxquant.compile(model, enc, compile_forward=True)
    assert not qm.compiles_forward()
    assert any("forward: runs eager; torch.compile failed (backend='inductor' raised" in n for n in qm.report().notes)
    with torch.no_grad():
        assert torch.equal(qm(**enc).last_hidden_state, eager(**enc).last_hidden_state)


@pytest.mark.skipif(not backends.onednn_available(), reason="this torch build has no oneDNN int8 Linear")
def test_inductor_takes_per_token_epilogues_and_leaves_one_scale_linears_to_onednn():
    """Under Inductor on a CPU, ``int8_linear_q`` with per-token scales decomposes into the oneDNN GEMM (src scale 1,
    no bias: acc·s_w, in bf16 where the output is bf16) plus the epilogue as ATen ops, equal to the eager op except
    that GELU is the sigmoid form of its tanh approximation (within 4.7e-4 of erf GELU) and a bf16 output is rounded
    twice; with one scale for every row (a static quantizer's [1] scale broadcast with stride 0, as the quantizers'
    decompositions return it) it declines, so oneDNN applies scale, bias and activation inside the GEMM."""
    from torch._inductor.decomposition import decompositions

    ops.register_inductor_decompositions()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g)
    w_q = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=g)
    w_scale = torch.rand(48, 1, generator=g) * 0.01
    bias = torch.randn(48, generator=g)
    x_q, x_scale = reference.quantize_per_token(x)
    decomposed = decompositions[ops.INT8_LINEAR_Q]
    for act in ("none", "gelu", "gelu_tanh", "relu"):
        args = (x_q, x_scale, w_q, w_scale, bias, act, "onednn", 127, torch.float32)
        got = decomposed(*args)
        want = ops.INT8_LINEAR_Q(*args)
        # erf GELU against its tanh approximation: max |Δ| 4.7e-4 (Hendrycks & Gimpel 2016, §2), + fp32 rounding
        torch.testing.assert_close(got, want, rtol=1e-6, atol=4.8e-4 if act == "gelu" else 1e-5)
        assert act != "gelu" or (got - want).abs().max() > 1e-5  # the approximation is in use, not erf
        # a bf16 output: the GEMM hands acc·s_w over in bf16 here (an error of ≤ 2⁻⁹ of acc·s_w·s_x, before the bias;
        # oneDNN's conversion measured up to 2⁻⁸), so the outputs may differ by that and one bf16 step (≤ 2⁻⁷ of it)
        args16 = args[:-1] + (torch.bfloat16,)
        got16, want16 = decomposed(*args16), ops.INT8_LINEAR_Q(*args16)
        assert got16.dtype == want16.dtype == torch.bfloat16
        product = ops.INT8_LINEAR_Q(x_q, x_scale, w_q, w_scale, None, "none", "onednn", 127, torch.float32).abs()
        bound = 2 ** -8 * product + 2 ** -7 * want16.float().abs() + (4.8e-4 if act == "gelu" else 1e-6)
        assert bool(((got16.float() - want16.float()).abs() <= bound).all()), act
    y = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    gap = (reference.gelu_sigmoid_form(y) - torch.nn.functional.gelu(y)).abs().max()
    assert 4.5e-4 < gap < 4.8e-4
    torch.testing.assert_close(reference.gelu_sigmoid_form(y), torch.nn.functional.gelu(y, approximate="tanh"),
                               rtol=1e-14, atol=1e-14)
    one = torch.tensor([0.02]).expand(37, 1)
    assert decomposed(x_q, one, w_q, w_scale, bias, "gelu", "onednn", 127, torch.float32) is NotImplemented
    quantize = decompositions[ops.QUANTIZE_PER_TOKEN]
    q, s = quantize(x, torch.tensor([0.02]))
    assert s.shape == (37, 1) and s.stride() == (0, 1) and torch.equal(q, reference.quantize_per_token(x, torch.tensor([0.02]))[0])
