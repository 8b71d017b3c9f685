"""The fused-op contract (``fxquant.ir.ops``): each op's argument record is derived from its registered schema,
and building, reading and rewriting nodes through it round-trips; the planning analysis writes one group and
one GEMM id per Linear that the rewrites then execute."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import fxquant
from fxquant.ir import ops
from fxquant.plan.rules import Rule

CONTRACTS = list(ops.CONTRACTS.values())


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.name)
def test_record_fields_are_the_registered_schema(contract):
    schema = contract.op._schema
    assert contract.fields == tuple(a.name for a in schema.arguments)
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    assert {f: d for f, d in contract.record._field_defaults.items()} == defaults


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.name)
def test_call_then_read_round_trips(contract):
    g = fx.Graph()
    values = {f: g.placeholder(f) for f in contract.fields}
    record = contract.record(**values)
    node = contract.call(g, record)
    assert node.target is contract.op and contract.record_of(node) == record
    changed = record._replace(**{contract.fields[0]: g.placeholder("other")})
    contract.set(node, changed)
    assert contract.record_of(node) == changed and ops.contract_of(node) is contract


def test_fused_linear_view_of_both_ops():
    g = fx.Graph()
    x, x_q, x_s, w, s = (g.placeholder(n) for n in ("x", "x_q", "x_s", "w", "s"))
    plain = ops.FusedLinear(x, None, None, w, s, None, "gelu", "auto", 127, None)
    node = plain.call(g)
    assert node.target is ops.INT8_LINEAR and ops.FusedLinear.of(node) == plain
    quantized = plain._replace(x=None, x_q=x_q, x_scale=x_s, out_dtype=torch.bfloat16)
    quantized.set(node)  # the same node becomes int8_linear_q
    assert node.target is ops.INT8_LINEAR_Q and ops.FusedLinear.of(node) == quantized
    assert ops.FusedLinear.is_fused_linear(node) and not ops.FusedLinear.is_fused_linear(x)


class _Block(torch.nn.Module):
    """RMSNorm-less Llama block in miniature: q/k/v read one tensor (one group), gate/up one GEMM."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(256, 256, bias=False) for _ in range(3))
        self.gate_proj, self.up_proj = torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(256, 512, bias=False)
        self.down_proj = torch.nn.Linear(512, 256, bias=False)

    def forward(self, x):
        h = self.q(x) + self.k(x) + self.v(x)
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


@pytest.mark.parametrize("target, fuse_siblings", [("cpu", None), ("cuda", None), ("cpu", False)])
def test_plan_groups_and_gemms(target, fuse_siblings):
    """What the planning pass decides is what the graph computes: siblings share one group (and, unless
    ``fuse_siblings=False``, one GEMM), SwiGLU's gate and up one GEMM, down_proj its own group (float by the gated
    rule)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 256)
    qm = fxquant.compile(_Block().eval(), (x,), config=fxquant.QuantConfig(target=target, min_ratio=0, min_n_unfused=0,
                                                                           backend="reference", fuse_siblings=fuse_siblings))
    d = {dec.name: dec for dec in qm.report().decisions}
    assert d["q"].group == d["k"].group == d["v"].group != d["gate_proj"].group
    assert d["gate_proj"].group == d["up_proj"].group and d["gate_proj"].gemm == d["up_proj"].gemm
    sibling_gemms = {d[n].gemm for n in "qkv"}
    assert len(sibling_gemms) == (3 if fuse_siblings is False else 1)
    assert not d["down_proj"].quantize and d["down_proj"].rule is Rule.GATED_OUTPUT
    gemm_nodes = [n for n in qm.graph_module.graph.nodes if ops.FusedLinear.is_fused_linear(n)]
    # one node per planned GEMM of int8 Linears
    assert len(gemm_nodes) == len({dec.gemm for dec in d.values() if dec.quantize})
    with torch.no_grad():
        assert qm(x).shape == (2, 5, 256)
