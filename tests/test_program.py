"""One program, several methods: one plan keyed by Linear FQN and one weight store that every method's graph
references (issue 22). Tested by storage: two graphs of one model hold no second copy of any tensor."""

from __future__ import annotations

import pytest
import torch

import fxquant

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "cpu": fxquant.QuantConfig(min_ratio=0),
    # q/k/v as one GEMM and gate/up as one SwiGLU GEMM, run by the exact reference backend
    "fused": fxquant.QuantConfig(target="cuda", min_ratio=0, min_n_unfused=0, backend="reference"),
    "tied-smooth": None,  # built in the test: a tied LM head + SmoothQuant (factors and smoothed weights shared)
}


def _llama(tie: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


LONG = {"input_ids": torch.arange(2 * 16).reshape(2, 16) % 256}
SHORT = {"input_ids": torch.arange(5).reshape(1, 5) % 256}  # another signature: another batch and length


def _storages(gm: torch.fx.GraphModule) -> dict[int, int]:
    """{storage address: bytes} of every tensor a graph holds."""
    out = {}
    for t in [*gm.parameters(), *gm.buffers()]:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def _compile(kind: str):
    if kind == "tied-smooth":
        model = _llama(tie=True)
        config = fxquant.QuantConfig(min_ratio=0, smoothquant=0.5)
        return model, fxquant.compile(model, LONG, config=config, methods={"short": SHORT},
                                      calibration=[LONG, SHORT], progress=False, generation=False)
    model = _llama()
    return model, fxquant.compile(model, LONG, config=CONFIGS[kind], methods={"short": SHORT}, generation=False)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_two_methods_share_every_tensor(kind):
    model, qm = _compile(kind)
    assert qm.methods == ("forward", "short")
    a, b = (qm.program.methods[m].graph_module for m in qm.methods)
    assert a is not b and a.graph is not b.graph
    sa, sb = _storages(a), _storages(b)
    assert set(sb) <= set(sa), f"{len(set(sb) - set(sa))} tensor storage(s) of 'short' are not the forward graph's"
    # every int8 weight in either graph is the store's own tensor
    store_ptrs = {t.untyped_storage().data_ptr() for _, t in qm.program.store.tensors()}
    int8 = [t for g in (a, b) for t in g.buffers() if t.dtype == torch.int8]
    assert int8 and all(t.untyped_storage().data_ptr() in store_ptrs for t in int8)
    # and both methods compute what a program of one method computes
    single = fxquant.compile(model, SHORT, config=CONFIGS[kind]) if kind != "tied-smooth" else None
    with torch.no_grad():
        out_short = qm.method("short")(**SHORT).logits
        out_long = qm(**LONG).logits
        ref_long = model(**LONG).logits
    if single is not None:
        torch.testing.assert_close(out_short, single(**SHORT).logits, rtol=0, atol=0)
    cos = torch.nn.functional.cosine_similarity(out_long.flatten(), ref_long.flatten(), dim=0)
    assert cos > 0.99, float(cos)


def test_plan_is_keyed_by_fqn_and_shared():
    _, qm = _compile("fused")
    plan = qm.program.plan
    assert plan.decisions["model.layers.0.self_attn.q_proj"].quantize
    down = plan.decisions["model.layers.1.mlp.down_proj"]
    assert not down.quantize and down.rule is fxquant.plan.rules.Rule.GATED_OUTPUT  # float by default, for accuracy
    assert len(plan) == 2 * 7 + 1  # 7 Linears per layer + lm_head
    with pytest.raises(TypeError):
        plan.decisions["lm_head"] = None  # immutable
    # every method's graph executes the plan's verdicts
    for m in qm.program.methods.values():
        for d in fxquant.ir.meta.collect_decisions(m.graph_module):
            assert d.quantize == plan.decisions[d.name].quantize, d.name
    assert plan.overrides == ()


def test_moves_keep_the_methods_sharing():
    """A dtype move converts each shared tensor once: the methods still share every tensor after it. (An MLP: a
    captured fp32 Llama bakes fp32 into its rotary casts, so it does not run in bf16 after a move.)"""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128)).eval()
    qm = fxquant.compile(mlp, (torch.randn(4, 7, 128),), config=fxquant.QuantConfig(min_ratio=0),
                         methods={"rows": (torch.randn(3, 128),)})
    qm.to(torch.bfloat16)
    a, b = (qm.program.methods[m].graph_module for m in qm.methods)
    assert set(_storages(b)) <= set(_storages(a))
    assert all(t.dtype == torch.bfloat16 for g in (a, b) for n, t in g.named_buffers() if n.endswith(".bias"))
    assert all(t.dtype == torch.float32 for g in (a, b) for n, t in g.named_buffers() if n.endswith("weight_scale"))
    x = torch.randn(3, 128)
    with torch.no_grad():
        out = qm.method("rows")(x.to(torch.bfloat16))
        ref = mlp(x)
    assert out.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.99


def test_unknown_method_and_bad_methods_argument():
    model, qm = _compile("cpu")
    with pytest.raises(KeyError, match="no method 'decode'.*'forward', 'short'"):
        qm.method("decode")
    with pytest.raises(TypeError, match="methods must be a dict"):
        fxquant.compile(model, LONG, methods={"forward": SHORT})
    with pytest.raises(TypeError, match="Python identifier"):
        fxquant.compile(model, LONG, methods={"not a name": SHORT})


def test_static_scales_are_calibrated_once_for_every_method():
    model = _llama()
    config = fxquant.QuantConfig(min_ratio=0, activation_scheme="static-per-tensor")
    qm = fxquant.compile(model, LONG, config=config, methods={"short": SHORT}, calibration=[LONG], progress=False)
    assert qm.methods == ("forward", "short", "prefill", "decode")
    a, b, prefill, decode = (qm.program.methods[m].graph_module for m in qm.methods)
    scales_a = {n: t for n, t in a.named_buffers() if n.endswith("input_scale")}
    scales_b = {n: t for n, t in b.named_buffers() if n.endswith("input_scale")}
    assert scales_a and scales_a.keys() == scales_b.keys()
    assert all(scales_a[n] is scales_b[n] for n in scales_a)
    assert {n for n, _ in qm.program.store.tensors()} >= set(scales_a)
    # the generation methods quantize with the same calibrated scales (prefill W8A8; decode weight-only where a
    # kernel for it pays on this CPU, else W8A8 with the same scales)
    scales_p = {n: t for n, t in prefill.named_buffers() if n.endswith("input_scale")}
    assert scales_p and all(scales_p[n] is scales_a[n] for n in scales_p)
    assert all(t is scales_a[n] for n, t in decode.named_buffers() if n.endswith("input_scale"))


def test_a_module_called_in_and_out_of_a_sibling_group_shares_its_rows():
    """v is called twice: once with q and k (one stacked GEMM), once alone. Its lone call reads a view of the stacked
    rows (no second int8 copy), also after a dtype move."""
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(128, 128) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x) + self.v(torch.relu(x))

    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(2, 8, 128)
    qm = fxquant.compile(model, (x,), config=fxquant.QuantConfig(min_ratio=0))
    gm = qm.graph_module
    stacked = [b for n, b in gm.named_buffers() if n.endswith("weight") and b.dtype == torch.int8 and b.shape[0] == 384]
    alone = gm.get_submodule("v").weight
    assert len(stacked) == 1 and alone.untyped_storage().data_ptr() == stacked[0].untyped_storage().data_ptr()
    qm.to(torch.float64)
    alone, stacked = gm.get_submodule("v").weight, qm.program.store._gemms["fused_q_k_v"].weight
    assert alone.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    with torch.no_grad():
        out = qm(x.double())
    assert out.dtype == torch.float64
    assert torch.nn.functional.cosine_similarity(out.flatten(), model(x).double().flatten(), dim=0) > 0.999

