"""Lowering: which backend each fused node runs, the ``triton`` backend end to end (under the interpreter
without a GPU), and the sharing of one input quantization between sibling Linears."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.targets import backends
from fxquant.kernels import common

needs_triton = pytest.mark.skipif(common.why_kernels_cannot_run() is not None, reason=str(common.why_kernels_cannot_run()))


@pytest.mark.skipif(not common.HAS_TRITON, reason="Triton is not installed")
def test_the_interpreter_runs_the_kernels_from_triton_3_8(monkeypatch):
    """Under TRITON_INTERPRET=1 the kernels (and the ``triton`` backend on a CPU) are usable from Triton 3.8 on: 3.6's
    interpreter fails in the autotuner and the W8A16 K loop, 3.7's in the autotuner (kernels.common); the reason
    names the version found and the one needed."""
    import triton

    monkeypatch.setattr(common, "interpreting", lambda: True)
    try:
        for version, runs in (("3.6.0", False), ("3.7.1", False), ("3.8.0", True), ("3.9.0+git1a2b3c", True),
                              ("4.0.0", True)):
            monkeypatch.setattr(triton, "__version__", version)
            common.why_kernels_cannot_run.cache_clear()
            why = common.why_kernels_cannot_run()
            assert (why is None) is runs, (version, why)
            assert runs or (f"Triton {version}'s interpreter" in why and ">= 3.8" in why)
            assert common.triton_device_ok(torch.device("cpu")) is runs
            assert (backends.pick_backend("triton", torch.device("cpu"), 4, 64, 64, 127) == "triton") is runs
    finally:
        common.why_kernels_cannot_run.cache_clear()


class SwiGLUBlock(torch.nn.Module):
    """A Llama-style block without LayerNorm: q/k/v read one tensor, gate/up read another."""

    def __init__(self, d=256, f=512):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = torch.nn.Linear(d, f, bias=False), torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm without weight
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 16.0, dim=-1) @ self.v(h)
        x = x + self.o(a)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def test_sibling_linears_share_one_quantization(sqnr):
    torch.manual_seed(0)
    model, x = SwiGLUBlock().eval(), torch.randn(2, 8, 256)
    qm = fxquant.compile(model, (x,), config=fxquant.QuantConfig(fuse_siblings=False))  # q, k, v as three GEMMs
    rep = qm.report()
    assert rep.pattern_stats["shared_input_quant"].matched == 1  # {q, k, v}
    assert rep.pattern_stats["swiglu"].matched == 1  # gate and up are one GEMM: nothing left to share
    counts = rep.node_counts
    assert counts["fxquant.quantize_per_token"] == 1
    assert counts["fxquant.int8_linear_q"] == 3 and counts["fxquant.int8_linear"] == 2  # gate+up, o
    assert counts["aten.linear"] == 1  # down reads the SwiGLU product: float by default (gated_output_int8)
    shared = sorted(d.name for d in rep.decisions if d.input_quant == "shared-per-token")
    assert shared == ["k", "q", "v"]
    assert len({d.group for d in rep.decisions if d.name in shared}) == 1
    with torch.no_grad():
        assert sqnr(model(x), qm(x)) > 25


def test_sharing_changes_no_number():
    """Per-token quantization depends on its input alone: shared or not, the outputs are identical."""
    torch.manual_seed(1)
    model, x = SwiGLUBlock().eval(), torch.randn(2, 8, 256)
    shared = fxquant.compile(model, (x,))
    unshared = fxquant.compile(model, (x,))
    # undo the sharing in the second copy: every Linear quantizes the float input again, in its own node
    from fxquant.ir import ops

    g = unshared.graph_module.graph
    for node in list(g.nodes):
        if node.target is ops.INT8_LINEAR_Q:
            args = ops.FusedLinear.of(node)
            quant = args.x_q.args[0]
            assert quant.target is ops.QUANTIZE_PER_TOKEN
            args._replace(x=ops.QUANTIZE_PER_TOKEN_C.record_of(quant).x, x_q=None, x_scale=None).set(node)
    g.eliminate_dead_code()
    unshared.graph_module.recompile()
    assert sum(n.target is ops.QUANTIZE_PER_TOKEN for n in g.nodes) == 0
    with torch.no_grad():
        assert torch.equal(shared(x), unshared(x))


@needs_triton
def test_triton_backend_end_to_end(rel_close):
    """QuantConfig(backend="triton") lowers every fused Linear to the Triton GEMM; same numbers as the
    reference backend (exact int32 accumulation, one fp32 epilogue)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(256, 320), torch.nn.GELU(), torch.nn.Linear(320, 256)).eval()
    x = torch.randn(7, 256)
    qt = fxquant.compile(model, (x,), config=fxquant.QuantConfig(backend="triton"))
    qr = fxquant.compile(model, (x,), config=fxquant.QuantConfig(backend="reference"))
    assert [d.backend for d in qt.report().decisions] == ["triton", "triton"]
    with torch.no_grad():
        rel_close(qt(x), qr(x))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="QuantConfig.backend='cutlass' is unknown"):
        fxquant.QuantConfig(backend="cutlass")


@pytest.mark.parametrize(
    "requested, m, k, n, expected",
    [
        ("triton", 2048, 4096, 4096, "triton"),
        ("triton", 1, 4096, 4096, "triton"),  # decode: Triton's small-M configs
        ("triton", 64, 4100, 4096, "triton"),  # K % 8 != 0: Triton masks, cuBLAS would refuse
        ("aten", 2048, 4096, 4096, "aten"),
        ("aten", 16, 4096, 4096, "triton"),  # cuBLAS int8 rejects M <= 16
        ("reference", 2048, 4096, 4096, "reference"),
    ],
)
def test_cuda_backend_policy(monkeypatch, requested, m, k, n, expected):
    monkeypatch.setattr(backends, "triton_serves", lambda device: device.type == "cuda")
    assert backends.pick_backend(requested, torch.device("cuda"), m, k, n, 127) == expected


def test_cuda_without_triton_falls_back_to_cublas_then_reference(monkeypatch):
    monkeypatch.setattr(backends, "triton_serves", lambda device: False)
    assert backends.pick_backend("triton", torch.device("cuda"), 2048, 4096, 4096, 127) == "aten"
    assert backends.pick_backend("triton", torch.device("cuda"), 8, 4096, 4096, 127) == "reference"


def test_cuda_target_lowers_to_triton_when_installed(monkeypatch):
    monkeypatch.setattr(backends, "triton_serves", lambda device: device.type == "cuda")
    assert backends.backend_for_target("cuda", 127) == "triton"
    assert backends.backend_for_target("cuda", 127, requested="reference") == "reference"
    monkeypatch.setattr(backends, "triton_serves", lambda device: False)
    assert backends.backend_for_target("cuda", 127) == "aten"


class LNAttentionInput(torch.nn.Module):
    """LayerNorm → q, k, v (768 → 768 each; v without bias) and an fc after GELU, ViT-style."""

    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(768)
        self.q, self.k = torch.nn.Linear(768, 768), torch.nn.Linear(768, 768)
        self.v = torch.nn.Linear(768, 768, bias=False)

    def forward(self, x):
        h = self.ln(x)
        q, k, v = (lin(h).view(*h.shape[:-1], 12, 64).transpose(1, 2) for lin in (self.q, self.k, self.v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)


def test_sibling_linears_run_as_one_gemm_on_cuda_target():
    """q/k/v: ratio 384 each (< 512) but 576 as one K=768, N=2304 GEMM, so int8 and horizontally fused;
    the fused graph computes exactly what three separate int8 GEMMs compute."""
    torch.manual_seed(3)
    model, x = LNAttentionInput().eval(), torch.randn(2, 5, 768)
    qm = fxquant.compile(model, (x,), config=fxquant.QuantConfig(target="cuda"))
    rep = qm.report()
    assert rep.pattern_stats["sibling_fusion"].matched == 1
    assert rep.node_counts["fxquant.int8_linear_q"] == 1 and rep.node_counts["fxquant.layer_norm_quant"] == 1
    for d in rep.decisions:
        assert d.quantize and "as one GEMM with its siblings (K=768, N=2304)" in d.reason, d
        assert d.pattern.endswith("+sibling_fusion") and d.backend is not None
    separate = fxquant.compile(model, (x,), config=fxquant.QuantConfig(target="cuda", min_ratio=0, fuse_siblings=False))
    assert separate.report().node_counts["fxquant.int8_linear_q"] == 3
    with torch.no_grad():
        assert torch.equal(qm(x), separate(x))
        for shape in ((1, 3, 768), (4, 9, 768)):  # other batch and sequence sizes
            xs = torch.randn(shape)
            assert torch.equal(qm(xs), separate(xs))
