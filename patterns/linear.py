"""Linear → ``fxquant.int8_linear`` (per-token activation quantization inside the node).

Before::

    %linear = aten.linear(%x, @fc.weight, @fc.bias)

After::

    %int8_linear = fxquant.int8_linear(%x, @fc.weight[int8], @fc.weight_scale, @fc.bias, "none", ...)

Filters: the heuristics' verdict for this Linear (``LinearDecision.quantize``).
"""

from __future__ import annotations

import torch

from fxquant.ir.rewrite import Match, Pattern, quantize_linears

from .common import linear_is_int8

aten = torch.ops.aten


def linear(x, w, b):
    return aten.linear.default(x, w, b)


def linear_no_bias(x, w):
    return aten.linear.default(x, w)


def replace(gm, match: Match, store):
    return quantize_linears(gm, store, [match["linear"]], "none", anchor=match["linear"], pattern="linear")


LINEAR = Pattern(
    name="linear",
    patterns=(linear, linear_no_bias),
    filters=(linear_is_int8,),
    replace=replace,
    linears=lambda match: ((match["linear"],), "none"),
    example=lambda: (torch.nn.Sequential(torch.nn.Linear(256, 192), torch.nn.Linear(192, 256, bias=False)), (torch.randn(4, 256),)),
)
