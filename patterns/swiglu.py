"""SwiGLU MLP input: ``silu(gate_proj(x)) * up_proj(x)`` → one int8 GEMM over the stacked [gate; up]
weight whose epilogue computes ``silu(g) · u`` (Shazeer, 2020, "GLU Variants Improve Transformer", FFN_SwiGLU
without its output projection; SiLU: Elfwing et al., 2018). Llama, Qwen2/3, Mistral.

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

from fxquant.rewrite import Match, Pattern, decision_of, quantize_linears

from .common import linears_are_int8

aten = torch.ops.aten


def swiglu(x, w_gate, w_up):
    return aten.mul.Tensor(aten.silu.default(aten.linear.default(x, w_gate)), aten.linear.default(x, w_up))


def swiglu_up_first(x, w_gate, w_up):
    return aten.mul.Tensor(aten.linear.default(x, w_up), aten.silu.default(aten.linear.default(x, w_gate)))


def swiglu_bias(x, w_gate, b_gate, w_up, b_up):
    return aten.mul.Tensor(aten.silu.default(aten.linear.default(x, w_gate, b_gate)), aten.linear.default(x, w_up, b_up))


def swiglu_bias_up_first(x, w_gate, b_gate, w_up, b_up):
    return aten.mul.Tensor(aten.linear.default(x, w_up, b_up), aten.silu.default(aten.linear.default(x, w_gate, b_gate)))


def gate_and_up(match: Match):
    """``(gate Linear, up Linear)`` of a match: the gate is the one under the SiLU."""
    mul = match.anchor
    silu = next(a for a in mul.args if a.target is aten.silu.default)
    gate = silu.args[0]
    up = next(a for a in mul.args if a is not silu)
    return gate, up


def both_int8(match: Match):
    return linears_are_int8(gate_and_up(match))


def replace(gm, match: Match):
    gate, up = gate_and_up(match)
    parent, _, g = decision_of(gate).name.rpartition(".")
    u = decision_of(up).name.rpartition(".")[2]
    leaf = "gate_up_proj" if (g, u) == ("gate_proj", "up_proj") else f"{g or 'root'}_{u or 'root'}"  # vLLM's name
    return quantize_linears(gm, [gate, up], "swiglu", anchor=match.anchor, pattern="swiglu",
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
    patterns=(swiglu, swiglu_up_first, swiglu_bias, swiglu_bias_up_first),
    filters=(both_int8,),
    replace=replace,
    linears=lambda match: (gate_and_up(match), "swiglu"),
    description="silu(gate(x)) * up(x) -> one int8 GEMM over [gate; up] with the SwiGLU epilogue",
    example=lambda: (_Example(), (torch.randn(2, 5, 256),)),
)
