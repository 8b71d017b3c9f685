"""Gated MLP written as one fused Linear: ``y = gate_up_proj(x); g, u = y.chunk(2, -1); act(g) * u`` (Phi-3's
``Phi3MLP``) → the same int8 GEMM with a gated epilogue as :mod:`fxquant.patterns.swiglu` (Shazeer, 2020, "GLU
Variants Improve Transformer", FFN_SwiGLU / FFN_GEGLU without their output projection).

Before::

    %y = aten.linear(%h, @mlp.gate_up_proj.weight)
    %c = aten.chunk(%y, 2, -1)
    %s = aten.silu(%c[0])
    %o = aten.mul(%c[1], %s)

After::

    %o = fxquant.int8_linear(%h, @mlp.gate_up_proj.weight:int8[2I, K], @mlp.gate_up_proj.weight_scale, None, "swiglu", ...)

The weight is already stacked gate rows first (``chunk``'s first half is the gate), exactly the [2I, K] layout
the gated epilogue reads, so no rows move. Because the product is recognised as a gated MLP's output, the
planning pass treats ``down_proj`` after it as it does after a two-Linear SwiGLU (float unless
``gated_output_int8``), and the weight-only decode path runs it int8.

Filters: the Linear is int8; the gate's activation is SiLU or the tanh GELU.
"""

from __future__ import annotations

import operator

import torch

from fxquant.ir.meta import Rule, Verdict
from fxquant.ir.rewrite import Match, Pattern, quantize_linears

from .common import gate_activation, gated_epilogue, has_gated_epilogue, linears_are_int8, named_variants

aten = torch.ops.aten

def _variants():
    def make(epilogue, act):
        def up_first(x, w):
            c = aten.chunk.default(aten.linear.default(x, w), 2, -1)
            return aten.mul.Tensor(operator.getitem(c, 1), act(operator.getitem(c, 0)))

        def gate_first(x, w):
            c = aten.chunk.default(aten.linear.default(x, w), 2, -1)
            return aten.mul.Tensor(act(operator.getitem(c, 0)), operator.getitem(c, 1))

        def up_first_bias(x, w, b):
            c = aten.chunk.default(aten.linear.default(x, w, b), 2, -1)
            return aten.mul.Tensor(operator.getitem(c, 1), act(operator.getitem(c, 0)))

        def gate_first_bias(x, w, b):
            c = aten.chunk.default(aten.linear.default(x, w, b), 2, -1)
            return aten.mul.Tensor(act(operator.getitem(c, 0)), operator.getitem(c, 1))

        return up_first, gate_first, up_first_bias, gate_first_bias

    return named_variants(make)


def the_linear(match: Match):
    """The fused gate/up Linear (under the chunk the activation's getitem reads)."""
    return gate_activation(match).args[0].args[0].args[0]


def sole_reader(match: Match) -> Verdict:
    if len(the_linear(match).users) != 1:
        return Verdict(False, "the gate/up Linear's output is read elsewhere too", Rule.PATTERN)
    return Verdict(True, "the chunk is the Linear's only reader")


def replace(gm, match: Match, store):
    return quantize_linears(gm, store, [the_linear(match)], gated_epilogue(match), anchor=match.anchor,
                            pattern="fused_gate_up")


class _Example(torch.nn.Module):
    """Phi-3's MLP: down(up * silu(gate)) with gate and up as one Linear."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(256, 1024, bias=False)
        self.down_proj = torch.nn.Linear(512, 256, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * torch.nn.functional.silu(gate))


FUSED_GATE_UP = Pattern(
    name="fused_gate_up",
    patterns=_variants(),
    structure=(has_gated_epilogue, sole_reader),
    filters=(lambda m: linears_are_int8([the_linear(m)]),),
    replace=replace,
    linears=lambda match: ((the_linear(match),), gated_epilogue(match)),
    example=lambda: (_Example(), (torch.randn(2, 5, 256),)),
)
