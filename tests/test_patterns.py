"""Each pattern's match / reject counts and fused structure on small models, through both front ends
(torch.export with example inputs, torch.fx.symbolic_trace without), plus end-to-end SQNR."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant import QuantConfig
from fxquant.ir import ops
from fxquant.ir.ops import FusedLinear

OPS = torch.ops.fxquant
FRONT_ENDS = ["export", "symbolic_trace"]
FRONT_END_NAME = {"export": "torch.export", "symbolic_trace": "torch.fx.symbolic_trace"}


def _compile(model, x, front_end, config=None):
    model.eval()
    qm = fxquant.compile(model, (x,) if front_end == "export" else None, config=config)
    assert qm.report().front_end == FRONT_END_NAME[front_end]
    return qm


def _fused(qm, op):
    return [n for n in qm.graph_module.graph.nodes if n.op == "call_function" and n.target is op]


def _decision(qm, name):
    found = [d for d in qm.report().decisions if d.name == name]
    assert len(found) == 1, f"{name}: {[d.name for d in qm.report().decisions]}"
    return found[0]


# The tests whose point is not the beneficial-ratio threshold compile with min_ratio=0: their small
# Linears (64 -> 256: ratio 51.2) sit under the cpu default (96) and would otherwise stay float.
ALL_RATIOS = QuantConfig(min_ratio=0)


def _stats(qm, pattern):
    s = qm.report().pattern_stats[pattern]
    return s.matched, s.rejected


# ------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.act = act
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FunctionalMLP(nn.Module):
    """Activations as functions rather than modules."""

    def __init__(self, kind: str):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64, bias=False)
        self.kind = kind

    def forward(self, x):
        h = self.fc1(x)
        if self.kind == "relu":
            h = F.relu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "silu":
            h = F.silu(h)
        else:
            h = F.gelu(h)
        return self.fc2(h)


class PreActivationReused(nn.Module):
    """fc1's pre-activation value has a second user: fusing GELU into fc1 would lose it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.gelu(h) + h)


class InplaceActivationReused(nn.Module):
    """nn.ReLU(inplace=True) rewrites h itself: the second read of h sees relu(h) in eager PyTorch."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        h = self.fc1(x)
        a = self.act(h)
        return self.fc2(a + h)


class LayerNormQKV(nn.Module):
    def __init__(self, residual: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(64)
        self.q = nn.Linear(64, 64)
        self.k = nn.Linear(64, 64)
        self.v = nn.Linear(64, 64)
        self.residual = residual

    def forward(self, x):
        h = self.ln(x)
        out = torch.tanh(self.q(h)) * self.k(h) + self.v(h)
        return out + h if self.residual else out


class SmallHead(nn.Module):
    """A body Linear over the default threshold (256x256: ratio 128 >= 96) and a small head (256 -> 4:
    ratio 3.9). Takes 256 features (the ``x256`` fixture)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(256, 256)
        self.head = nn.Linear(256, 4)

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


class Named(nn.Module):
    """Distinct module names for skip / filter_fn tests, compiled with min_ratio=0 so that only skip /
    filter_fn keep a Linear float (ratios 51.2 / 128 / 51.2)."""

    def __init__(self):
        super().__init__()
        self.attn_proj = nn.Linear(64, 256)
        self.attn_out = nn.Linear(256, 256)
        self.mlp_fc = nn.Linear(256, 64)

    def forward(self, x):
        return self.mlp_fc(self.attn_out(self.attn_proj(x)))


@pytest.fixture
def x():
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(123))


@pytest.fixture
def x256():
    return torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(123))


# ----------------------------------------------------------------------------------- linear_act
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_mlp_gelu_linear_act_and_linear(front_end, x, sqnr):
    m = MLP(nn.GELU())
    qm = _compile(m, x, front_end, ALL_RATIOS)
    rep = qm.report()
    assert _stats(qm, "linear_act") == (1, 0)
    assert _stats(qm, "linear") == (1, 0)
    assert _stats(qm, "layer_norm_linear") == (0, 0)
    assert rep.node_counts.get("fxquant.int8_linear") == 2
    assert "aten.linear" not in rep.node_counts and "aten.gelu" not in rep.node_counts
    fc1, fc2 = _decision(qm, "fc1"), _decision(qm, "fc2")
    assert (fc1.pattern, fc1.activation, fc1.input_quant, fc1.quantize) == ("linear_act", "gelu", "per-token", True)
    assert (fc2.pattern, fc2.activation, fc2.input_quant, fc2.quantize) == ("linear", "none", "per-token", True)
    assert (fc1.k, fc1.n, fc2.k, fc2.n) == (64, 256, 256, 64)
    assert fc1.ratio == pytest.approx(51.2)
    assert rep.num_int8 == 2
    # the activation travels in the op's arguments
    acts = sorted(FusedLinear.of(n).activation for n in _fused(qm, OPS.int8_linear.default))
    assert acts == ["gelu", "none"]
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 25.0  # measured ~36 dB


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize(
    "act, expected",
    [
        (nn.ReLU(), "relu"),
        (nn.SiLU(), "silu"),
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
    ],
)
def test_activation_modules(front_end, act, expected, x, sqnr):
    m = MLP(act)
    qm = _compile(m, x, front_end, ALL_RATIOS)
    assert _stats(qm, "linear_act") == (1, 0)
    assert _stats(qm, "linear") == (1, 0)
    assert _decision(qm, "fc1").activation == expected
    assert _decision(qm, "fc2").activation == "none"
    counts = qm.report().node_counts
    assert counts == {"fxquant.int8_linear": 2}
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 25.0  # measured 35-41 dB


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "silu"])
def test_activation_functions_and_no_bias(front_end, kind, x, sqnr):
    m = FunctionalMLP(kind)
    qm = _compile(m, x, front_end, ALL_RATIOS)
    assert _stats(qm, "linear_act") == (1, 0)
    assert _stats(qm, "linear") == (1, 0)
    assert _decision(qm, "fc1").activation == kind
    fc2 = _decision(qm, "fc2")
    assert fc2.pattern == "linear" and fc2.quantize
    # fc2 has no bias: its op gets None
    (node,) = [n for n in _fused(qm, OPS.int8_linear.default) if FusedLinear.of(n).activation == "none"]
    assert FusedLinear.of(node).bias is None
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 25.0


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_pre_activation_with_other_user_is_not_fused(front_end, x, sqnr):
    m = PreActivationReused()
    qm = _compile(m, x, front_end, ALL_RATIOS)
    assert _stats(qm, "linear_act") == (0, 0)
    assert _stats(qm, "linear") == (2, 0)
    fc1 = _decision(qm, "fc1")
    assert (fc1.pattern, fc1.activation, fc1.quantize) == ("linear", "none", True)
    counts = qm.report().node_counts
    assert counts["fxquant.int8_linear"] == 2
    assert counts["aten.gelu"] == 1  # the activation stays a separate node
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 25.0  # measured ~36 dB


@pytest.mark.parametrize(
    "front_end",
    ["export", "symbolic_trace"],
)
def test_inplace_activation_module_semantics_preserved(front_end, x):
    m = InplaceActivationReused().eval()
    # min_ratio=inf keeps every Linear float: any difference comes from capture, not quantization
    qm = _compile(m, x, front_end, QuantConfig(min_ratio=float("inf")))
    assert qm.report().num_int8 == 0
    with torch.no_grad():
        ref = m(x.clone())
        out = qm(x.clone())
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- layer_norm_linear
@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("residual", [True, False])
def test_layer_norm_qkv(front_end, residual, x, sqnr):
    m = LayerNormQKV(residual)
    qm = _compile(m, x, front_end, QuantConfig(min_ratio=0, fuse_siblings=False))  # q, k, v as three GEMMs
    rep = qm.report()
    assert _stats(qm, "linear") == (3, 0)
    assert _stats(qm, "layer_norm_linear") == (1, 0)
    assert rep.node_counts["fxquant.layer_norm_quant"] == 1
    assert rep.node_counts["fxquant.int8_linear_q"] == 3
    assert "fxquant.int8_linear" not in rep.node_counts
    assert "aten.layer_norm" not in rep.node_counts
    (lnq,) = _fused(qm, OPS.layer_norm_quant.default)
    ln_args = ops.LAYER_NORM_QUANT_C.record_of(lnq)
    assert ln_args.return_float is residual  # the float output only when it has another user
    assert ln_args.normalized_shape == [64] and ln_args.eps == pytest.approx(1e-5)
    # the three Linears read the one shared quantization
    lin_q = [FusedLinear.of(n) for n in _fused(qm, OPS.int8_linear_q.default)]
    assert len({a.x_q for a in lin_q}) == 1 and len({a.x_scale for a in lin_q}) == 1
    assert all(a.x_q.args == (lnq, ops.NORM_QUANT_Q) for a in lin_q)
    for name in ("q", "k", "v"):
        d = _decision(qm, name)
        assert d.quantize and d.input_quant == "shared-layernorm"
        assert d.pattern == "linear+layer_norm_linear"
        assert d.ratio == pytest.approx(32.0)
    with torch.no_grad():
        # measured ~44 dB (residual) / ~39 dB (no residual)
        assert sqnr(m(x), qm(x)) >= 25.0


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_layer_norm_without_int8_consumer_is_rejected(front_end, x):
    # default min_ratio 96: 64x64 Linears (ratio 32) stay float, so the LayerNorm has no int8 reader
    m = LayerNormQKV()
    qm = _compile(m, x, front_end)
    rep = qm.report()
    assert _stats(qm, "linear") == (0, 3)
    assert _stats(qm, "layer_norm_linear") == (0, 1)
    assert rep.pattern_stats["layer_norm_linear"].reasons["no int8 Linear reads this LayerNorm"] == 1
    assert rep.node_counts["aten.layer_norm"] == 1 and rep.node_counts["aten.linear"] == 3
    assert "fxquant.layer_norm_quant" not in rep.node_counts
    with torch.no_grad():
        assert torch.equal(qm(x), m(x))


# ------------------------------------------------------------------------------- ratio rejection
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_small_linear_rejected_by_ratio(front_end, x256, sqnr):
    # default config (cpu min_ratio 96): the body (ratio 128) is int8, the head (ratio 3.9) stays float
    x = x256
    m = SmallHead()
    qm = _compile(m, x, front_end)
    rep = qm.report()
    assert _stats(qm, "linear_act") == (1, 0)
    assert _stats(qm, "linear") == (0, 1)
    reasons = list(rep.pattern_stats["linear"].reasons)
    assert len(reasons) == 1 and "ratio" in reasons[0]
    assert rep.pattern_stats["linear"].reasons[reasons[0]] == 1
    head = _decision(qm, "head")
    assert not head.quantize and "ratio" in head.reason and head.pattern is None
    assert (head.k, head.n) == (256, 4)
    assert head.ratio == pytest.approx(1024 / 260)
    assert rep.node_counts["aten.linear"] == 1 and rep.node_counts["fxquant.int8_linear"] == 1
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 25.0  # measured ~38 dB


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_min_ratio_zero_quantizes_small_linear(front_end, x256):
    qm = _compile(SmallHead(), x256, front_end, QuantConfig(min_ratio=0))
    assert _stats(qm, "linear") == (1, 0)
    assert _decision(qm, "head").quantize


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_alignment_rejection(front_end):
    m = nn.Sequential(nn.Linear(66, 256), nn.Linear(256, 64))
    xx = torch.randn(3, 66)
    qm = _compile(m, xx, front_end, QuantConfig(alignment=8, min_ratio=0))
    d0, d1 = _decision(qm, "0"), _decision(qm, "1")
    assert not d0.quantize and not d0.aligned and "K=66" in d0.reason and "N=" not in d0.reason
    assert d1.quantize and d1.aligned


# ---------------------------------------------------------------------------- skip and filter_fn
@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize(
    "skip, floats, reason",
    [
        (["attn_out"], {"attn_out"}, "skipped by name"),
        (["re:attn_.*"], {"attn_proj", "attn_out"}, "skipped by pattern 're:attn_.*'"),
        (["re:attn"], set(), None),  # fullmatch: a partial match skips nothing
        (["attn"], set(), None),
        (["mlp_fc", "re:.*_proj"], {"mlp_fc", "attn_proj"}, None),
    ],
)
def test_skip(front_end, skip, floats, reason, x, sqnr):
    m = Named()
    qm = _compile(m, x, front_end, QuantConfig(skip=skip, min_ratio=0))
    rep = qm.report()
    for d in rep.decisions:
        if d.name in floats:
            assert not d.quantize and "skipped" in d.reason and d.pattern is None
            if reason is not None:
                assert d.reason == reason
        else:
            assert d.quantize, (d.name, d.reason)
    assert rep.node_counts.get("aten.linear", 0) == len(floats)
    assert rep.node_counts.get("fxquant.int8_linear", 0) == 3 - len(floats)
    assert _stats(qm, "linear") == (3 - len(floats), len(floats))
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 25.0


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_filter_fn(front_end, x, sqnr):
    m = Named()
    calls = []

    def keep(name, module):
        calls.append((name, module))
        return name != "attn_out"

    qm = _compile(m, x, front_end, QuantConfig(filter_fn=keep, min_ratio=0))
    # called once per Linear, with the user's own module object
    assert sorted(n for n, _ in calls) == ["attn_out", "attn_proj", "mlp_fc"]
    for name, module in calls:
        assert module is m.get_submodule(name)
    d = _decision(qm, "attn_out")
    assert not d.quantize and d.reason == "rejected by filter_fn"
    assert _decision(qm, "attn_proj").quantize and _decision(qm, "mlp_fc").quantize
    assert qm.report().node_counts["aten.linear"] == 1
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 25.0


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_skip_takes_precedence_over_filter_fn(front_end, x):
    seen = []
    config = QuantConfig(skip=["mlp_fc"], filter_fn=lambda n, mod: seen.append(n) or True, min_ratio=0)
    qm = _compile(Named(), x, front_end, config)
    assert "skipped" in _decision(qm, "mlp_fc").reason
    assert "mlp_fc" not in seen  # the first failing rule wins, later ones are not consulted


# ---------------------------------------------------------------------------------- out_dtype
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_out_dtype_config_is_applied(front_end, x):
    qm = _compile(nn.Sequential(nn.Linear(64, 256)), x, front_end, QuantConfig(out_dtype=torch.bfloat16, min_ratio=0))
    assert qm.report().num_int8 == 1
    (node,) = _fused(qm, OPS.int8_linear.default)
    assert FusedLinear.of(node).out_dtype == torch.bfloat16
    assert qm(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------- report / graph views
def test_golden_and_networkx_views(x):
    qm = _compile(LayerNormQKV(), x, "export", QuantConfig(min_ratio=0, fuse_siblings=False))
    text = qm.golden(only_fused=True)
    lines = text.strip().splitlines()
    assert sum("fxquant.layer_norm_quant(" in ln for ln in lines) == 1
    assert sum("fxquant.int8_linear_q(" in ln for ln in lines) == 3
    assert "@q.weight:int8[64, 64]" in text and "@q.weight_scale:float32[64, 1]" in text
    assert qm.golden() == qm.golden()  # deterministic
    g = qm.to_networkx()
    targets = [a["target"] for _, a in g.nodes(data=True)]
    assert targets.count("fxquant.int8_linear_q") == 3
    decided = [a["decision"].name for _, a in g.nodes(data=True) if a["decision"] is not None and a["target"].startswith("fxquant.")]
    assert sorted(decided) == ["k", "q", "v"]
    s = str(qm.report())
    assert "3/3 Linears int8" in s
