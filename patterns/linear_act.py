"""Linear → Activation (ReLU, GELU exact and tanh, SiLU) → one ``fxquant.int8_linear`` with the
activation in the GEMM epilogue.

Before::

    %linear = aten.linear(%x, @fc1.weight, @fc1.bias)
    %gelu = aten.gelu(%linear)

After::

    %int8_linear = fxquant.int8_linear(%x, @fc1.weight[int8], @fc1.weight_scale, @fc1.bias, "gelu", ...)

Filters: the heuristics' verdict for the Linear. The matcher itself rejects a Linear whose output has
another user besides the activation (it would need the pre-activation value).
"""

from __future__ import annotations

import torch

from fxquant.ir.rewrite import Match, Pattern, quantize_linears

from .common import linear_is_int8

aten = torch.ops.aten

# activation name in the epilogue -> how the canonical graph spells it
_ACTS = {
    "relu": lambda y: aten.relu.default(y),
    "gelu": lambda y: aten.gelu.default(y),
    "gelu_tanh": lambda y: aten.gelu.default(y, approximate="tanh"),
    "silu": lambda y: aten.silu.default(y),
}


def _variants():
    def make(act_name, act):
        def with_bias(x, w, b):
            return act(aten.linear.default(x, w, b))

        def no_bias(x, w):
            return act(aten.linear.default(x, w))

        with_bias.__name__, no_bias.__name__ = f"linear_{act_name}", f"linear_no_bias_{act_name}"
        return with_bias, no_bias

    return tuple(f for name, act in _ACTS.items() for f in make(name, act))


def _activation_of(node) -> str:
    if node.target is aten.gelu.default:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    return node.target.__name__.split(".")[0]


def replace(gm, match: Match, store):
    act_node = match.anchor
    return quantize_linears(gm, store, [match["linear"]], _activation_of(act_node), anchor=act_node, pattern="linear_act")


class _Example(torch.nn.Module):
    """One Linear per epilogue activation, plus a Linear whose pre-activation output is reused (not fused)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range(5))
        self.acts = [torch.nn.functional.relu, torch.nn.functional.gelu,
                     lambda y: torch.nn.functional.gelu(y, approximate="tanh"), torch.nn.functional.silu]

    def forward(self, x):
        for fc, act in zip(self.fc, self.acts):
            x = act(fc(x))
        pre = self.fc[4](x)
        return torch.nn.functional.relu(pre) + pre


LINEAR_ACT = Pattern(
    name="linear_act",
    patterns=_variants(),
    filters=(linear_is_int8,),
    replace=replace,
    linears=lambda match: ((match["linear"],), _activation_of(match.anchor)),
    example=lambda: (_Example(), (torch.randn(2, 3, 256),)),
)
