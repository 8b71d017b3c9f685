"""Gated MLP input: ``act(gate_proj(x)) * up_proj(x)`` → one int8 GEMM over the stacked [gate; up] weight
whose epilogue computes ``act(g) · u`` (Shazeer, 2020, "GLU Variants Improve Transformer", FFN_SwiGLU and
FFN_GEGLU without their output projection). SwiGLU (act = SiLU, Elfwing et al., 2018: Llama, Qwen2/3,
Mistral) and GeGLU with the tanh GELU (Gemma): epilogues ``swiglu`` and ``geglu_tanh``.

Before::

    %g = aten.linear(%h, @mlp.gate_proj.weight)
    %s = aten.silu(%g)
    %u = aten.linear(%h, @mlp.up_proj.weight)
    %y = aten.mul(%s, %u)

After::

    %y = fxquant.int8_linear(%h, @mlp.gate_up_proj.weight:int8[2I, K], @mlp.gate_up_proj.weight_scale, None, "swiglu", ...)

The int8 weights of gate and up are stacked (gate rows first) under ``<mlp>.gate_up_proj``, each row with its
own per-channel scale, so the numerics are those of two separate int8 Linears. One GEMM reads the input once,
writes [M, I] instead of two [M, I] outputs, and the two float tensors never exist. The output's own
per-token quantization (for ``down_proj``) stays a separate pass: a row's scale needs the amax over all I
columns, which no single GEMM tile sees.

Filters: gate and up are both int8 (the planning pass judges them as one GEMM, K × 2I).
"""

from __future__ import annotations

import torch

from fxquant.ir.meta import decision_of
from fxquant.ir.rewrite import Match, Pattern, quantize_linears

from .common import gate_activation, gated_epilogue, has_gated_epilogue, linears_are_int8, named_variants

aten = torch.ops.aten


def _variants():
    """For each gate activation: gate first or up first, without or with biases."""
    def make(epilogue, act):
        def gated(x, w_gate, w_up):
            return aten.mul.Tensor(act(aten.linear.default(x, w_gate)), aten.linear.default(x, w_up))

        def up_first(x, w_gate, w_up):
            return aten.mul.Tensor(aten.linear.default(x, w_up), act(aten.linear.default(x, w_gate)))

        def gated_bias(x, w_gate, b_gate, w_up, b_up):
            return aten.mul.Tensor(act(aten.linear.default(x, w_gate, b_gate)), aten.linear.default(x, w_up, b_up))

        def up_first_bias(x, w_gate, b_gate, w_up, b_up):
            return aten.mul.Tensor(aten.linear.default(x, w_up, b_up), act(aten.linear.default(x, w_gate, b_gate)))

        return gated, up_first, gated_bias, up_first_bias

    return named_variants(make)


def gate_and_up(match: Match):
    """``(gate Linear, up Linear)`` of a match: the gate is the one under the activation."""
    act = gate_activation(match)
    return act.args[0], next(a for a in match.anchor.args if a is not act)


def both_int8(match: Match):
    return linears_are_int8(gate_and_up(match))


def replace(gm, match: Match, store):
    gate, up = gate_and_up(match)
    parent, _, g = decision_of(gate).name.rpartition(".")
    u = decision_of(up).name.rpartition(".")[2]
    leaf = "gate_up_proj" if (g, u) == ("gate_proj", "up_proj") else f"{g or 'root'}_{u or 'root'}"  # vLLM's name
    return quantize_linears(gm, store, [gate, up], gated_epilogue(match), anchor=match.anchor, pattern="swiglu",
                            path=(f"{parent}." if parent else "") + leaf)


class _Example(torch.nn.Module):
    """A Llama MLP: down(silu(gate(x)) * up(x)), and a second MLP written up-first."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(256, 512, bias=False)
        self.down_proj = torch.nn.Linear(512, 256, bias=False)
        self.gate2, self.up2 = torch.nn.Linear(256, 512), torch.nn.Linear(256, 512)

    def forward(self, x):
        h = self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.up2(h) * torch.nn.functional.silu(self.gate2(h))


SWIGLU = Pattern(
    name="swiglu",
    patterns=_variants(),
    structure=(has_gated_epilogue,),
    filters=(both_int8,),
    replace=replace,
    linears=lambda match: (gate_and_up(match), gated_epilogue(match)),
    example=lambda: (_Example(), (torch.randn(2, 5, 256),)),
)
