"""Pass ``sibling_fusion`` (horizontal fusion, as planned): the int8 Linears whose decisions share a ``gemm``
id (siblings reading one quantized input with the same epilogue, ``plan.planner.plan_input_groups``)
become one GEMM over their concatenated weights (made once, in the store), each member a slice of its output.

Before::

    %q = fxquant.int8_linear_q(%x_q, %x_s, @q.weight, @q.weight_scale, @q.bias, "none", ...)
    %k = fxquant.int8_linear_q(%x_q, %x_s, @k.weight, @k.weight_scale, @k.bias, "none", ...)

After::

    %qk = fxquant.int8_linear_q(%x_q, %x_s, @fused_q_k.weight, @fused_q_k.weight_scale, @fused_q_k.bias, ...)
    %q = aten.slice(%qk, -1, 0, N_q)
    %k = aten.slice(%qk, -1, N_q, N_q + N_k)

Numerics are unchanged (per-channel weights and per-token inputs are the same; the int32 accumulation is
exact). One GEMM with N = ΣN runs closer to peak than several narrow ones (ViT's q/k/v: 3 × 768). The
slices are strided views; their ``aten.view`` users become ``aten.reshape`` (same values; a copy only
where a view is impossible).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir import ops
from ..ir.meta import members_of, set_members
from ..ir.rewrite import SOURCE_META, PatternStats, get_params, install_params, keep_meta
from .base import FxquantPass

aten = torch.ops.aten


def _gemm_path(weight_attr: str) -> str:
    return weight_attr[: -len("weight")].rstrip(".")


def fuse_sibling_linears(gm: fx.GraphModule, store) -> int:
    """Fuse every planned sibling group of ``gm``; returns the number of groups fused."""
    groups: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        members = members_of(node) if ops.FusedLinear.is_fused_linear(node) else ()
        if len(members) == 1 and members[0].gemm is not None:
            groups.setdefault(members[0].gemm, []).append(node)
    g = gm.graph
    fused = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        args = [ops.FusedLinear.of(n) for n in nodes]
        a0 = args[0]
        assert all((a.x_q, a.x_scale, a.activation, a.w_qmax, a.out_dtype) == (a0.x_q, a0.x_scale, a0.activation, a0.w_qmax, a0.out_dtype)
                   for a in args), "planned siblings must read one quantized input with one epilogue"
        members = [members_of(n)[0] for n in nodes]
        parent = members[0].name.rpartition(".")[0]
        path = (f"{parent}." if parent else "") + "fused_" + "_".join(d.name.rpartition(".")[2] or "root" for d in members)
        params = store.stack(path, [_gemm_path(a.w_q.target) for a in args])
        install_params(gm, path, params)
        with g.inserting_before(nodes[0]):
            w_node, s_node, b_node = get_params(g, path, hasattr(params, "bias"))
            new = a0._replace(w_q=w_node, w_scale=s_node, bias=b_node).call(g)
            start = 0
            for node, d in zip(nodes, members):
                piece = g.call_function(aten.slice.Tensor, (new, -1, start, start + d.n))
                start += d.n
                for user in list(node.users):
                    if user.op == "call_function" and user.target is aten.view.default:
                        user.target = aten.reshape.default
                node.replace_all_uses_with(piece)
        keep_meta(new, nodes[0], SOURCE_META)
        set_members(new, [d.with_pattern("sibling_fusion") for d in members])
        for node in nodes:
            g.erase_node(node)
        fused += 1
    if fused:
        g.eliminate_dead_code()  # the parts' get_attr nodes: without this their int8 copies stayed in the graph
        gm.delete_all_unused_submodules()
        g.lint()
        gm.recompile()
    return fused


class FuseSiblings(FxquantPass):
    name = "sibling_fusion"

    def call(self, gm: fx.GraphModule) -> PassResult:
        n = fuse_sibling_linears(gm, self.ctx.store)
        self.ctx.record(self.name, PatternStats(matched=n))
        return PassResult(gm, n > 0)
