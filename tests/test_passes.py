"""IR-in / IR-out golden tests of every pass of the pipeline (the way LLVM's FileCheck tests and Inductor's
pattern tests pin a pass), plus the debug dumps that write the same text after every pass.

The model: a Llama block in miniature (Hugging Face RMSNorm → q/k/v, SwiGLU MLP) and a symbolic_trace variant
(so ``shared_input_quant`` has work: symbolic_trace sees no RMSNorm). Each pass's snapshot is the graph after
it; its input is the previous snapshot. Update with ``pytest tests/test_passes.py --snapshot-update`` and read
the diff in review.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.frontend.capture import capture
from fxquant.ir.printer import golden_text
from fxquant.passes.base import CompileContext, run_pipeline
from fxquant.passes.pipeline import analysis_passes, transform_passes
from fxquant.plan.planner import QuantPlan


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(256) + 0.5)
        self.q, self.k, self.v = (torch.nn.Linear(256, 256, bias=False) for _ in range(3))
        self.gate, self.up = torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(256, 512, bias=False)
        self.down = torch.nn.Linear(512, 256, bias=False)

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.weight * h.to(x.dtype)
        a = self.q(h) * self.k(h) + self.v(h) + x
        return a + self.down(torch.nn.functional.silu(self.gate(a)) * self.up(a))


X = torch.randn(2, 5, 256)
PIPELINES = {"export": (X,), "symbolic_trace": None}
EXPECTED = {  # the pipeline's pass names, in order, for the default cpu target
    "names": ["captured", "annotate", "apply_plan", "fuse_patterns", "shared_input_quant", "sibling_fusion", "lower",
              "weight_only", "decode_attention", "verify"],  # the two decode passes leave other methods as they are
}


@pytest.mark.parametrize("front_end", PIPELINES)
def test_every_pass_golden(front_end, tmp_path, snapshot):
    torch.manual_seed(0)
    model = Block().eval()
    qm = fxquant.compile(model, PIPELINES[front_end], config=fxquant.QuantConfig(min_ratio=0), debug_dir=tmp_path)
    files = sorted((tmp_path / "forward").iterdir())
    assert [f.stem.split("-", 1)[1] for f in files] == EXPECTED["names"]
    texts = {f.stem: f.read_text() for f in files}
    assert texts == snapshot
    # the last dump is the compiled graph; the dumps differ where a pass changed the graph
    assert texts[files[-1].stem] == qm.golden()
    assert texts["01-annotate"] == texts["00-captured"]  # decisions are metadata
    assert texts["03-fuse_patterns"] != texts["02-apply_plan"]
    assert ("fxquant.quantize_per_token" in texts["04-shared_input_quant"]) == (front_end == "symbolic_trace")
    assert "fused_q_k_v" in texts["05-sibling_fusion"] and "fused_q_k_v" not in texts["04-shared_input_quant"]


def test_each_pass_runs_alone_and_matches_the_pipeline(tmp_path):
    """Build a context by hand, run the passes one at a time on a fresh capture: each output equals the dump
    of the same pass in a full compile."""
    torch.manual_seed(0)
    model = Block().eval()
    config = fxquant.QuantConfig(min_ratio=0)
    fxquant.compile(model, (X,), config=config, debug_dir=tmp_path)
    dumps = {f.stem.split("-", 1)[1]: f.read_text() for f in (tmp_path / "forward").iterdir()}
    gm = capture(model, (X,)).graph_module
    ctx = CompileContext(config, fxquant.plan.planner.resolve_weight_qmax(config), model=model)
    for p in analysis_passes(ctx):
        gm = p(gm).graph_module
        assert golden_text(gm) == dumps[p.name], p.name
    ctx.plan = QuantPlan.merge({"forward": gm}, ctx.weight_qmax)
    for p in transform_passes(ctx):
        gm = p(gm).graph_module
        assert golden_text(gm) == dumps[p.name], p.name


def test_debug_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_DEBUG_DIR", str(tmp_path / "dbg"))
    model = torch.nn.Sequential(torch.nn.Linear(128, 256)).eval()
    fxquant.compile(model, (torch.randn(3, 128),), config=fxquant.QuantConfig(min_ratio=0), methods={"one": (torch.randn(1, 128),)})
    for method in ("forward", "one"):
        names = sorted(p.name for p in (tmp_path / "dbg" / method).iterdir())
        assert names[0] == "00-captured.txt" and names[-1].endswith("-verify.txt"), names
        assert "fxquant.int8_linear" in (tmp_path / "dbg" / method / names[-1]).read_text()
    assert not list(Path(tmp_path / "dbg").rglob(".*.tmp"))  # written under a temporary name, then renamed


def test_verify_catches_a_private_copy_and_a_wrong_scale():
    """The verifier fails, naming the node, on a graph whose int8 weight is not the store's or whose scale has
    the wrong shape (both built by hand from a good compile)."""
    from fxquant.passes.verify import VerifyError, verify

    torch.manual_seed(0)
    qm = fxquant.compile(Block().eval(), (X,), config=fxquant.QuantConfig(min_ratio=0))
    gm, store = qm.graph_module, qm.program.store
    verify(gm, store)  # the compiled graph holds
    path = next(n.rpartition(".")[0] for n, _ in gm.named_buffers() if n.endswith("weight_scale"))
    owner = gm.get_submodule(path)
    gm.add_module(path, copy.deepcopy(owner))  # a private copy of the store's GEMM module
    with pytest.raises(VerifyError, match="not the weight store's tensor"):
        verify(gm, store)
    gm.add_module(path, owner)
    good = owner.weight_scale
    owner.weight_scale = good.reshape(-1)
    with pytest.raises(VerifyError, match=r"not float32 \["):
        verify(gm, store)
    owner.weight_scale = good
    verify(gm, store)

