"""Pass ``share_input_quant``: execute the planned shared quantizations (``InputQuant.SHARED_PER_TOKEN``
groups): quantize once what several int8 Linears read (q/k/v of a block without a fused norm, say).

Before::

    %q = fxquant.int8_linear(%h, @q.weight, ...)
    %k = fxquant.int8_linear(%h, @k.weight, ...)

After::

    %hq = fxquant.quantize_per_token(%h)
    %q = fxquant.int8_linear_q(%hq[0], %hq[1], @q.weight, ...)
    %k = fxquant.int8_linear_q(%hq[0], %hq[1], @k.weight, ...)

Same numerics (per-token quantization depends on the input alone), one quantization kernel instead of one
per consumer.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir import ops
from ..ir.meta import InputQuant, members_of
from ..ir.rewrite import PatternStats, read_quantized_input
from .base import FxquantPass


def share_input_quantization(gm: fx.GraphModule) -> int:
    """Insert one ``quantize_per_token`` per planned shared group; returns how many were inserted."""
    groups: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ops.INT8_LINEAR:
            d = members_of(node)[0]
            if d.input_quant is InputQuant.SHARED_PER_TOKEN:
                groups.setdefault(d.group, []).append(node)
    g = gm.graph
    for lins in groups.values():
        x = ops.FusedLinear.of(lins[0]).x
        assert len(lins) > 1 and all(ops.FusedLinear.of(n).x is x for n in lins), "planned group must share one input"
        with g.inserting_before(lins[0]):
            quant = ops.QUANTIZE_PER_TOKEN_C.call(g, ops.QUANTIZE_PER_TOKEN_C.record(x))
            x_q = g.call_function(operator.getitem, (quant, 0))
            x_scale = g.call_function(operator.getitem, (quant, 1))
        for lin in lins:
            read_quantized_input(g, lin, x_q, x_scale, InputQuant.SHARED_PER_TOKEN, "shared_input_quant")
    if groups:
        g.lint()
        gm.recompile()
    return len(groups)


class ShareInputQuantization(FxquantPass):
    name = "shared_input_quant"

    def call(self, gm: fx.GraphModule) -> PassResult:
        n = share_input_quantization(gm)
        self.ctx.record(self.name, PatternStats(matched=n))
        return PassResult(gm, n > 0)
