"""LayerNorm → Linear(s): one ``fxquant.layer_norm_quant`` quantizes the LayerNorm output once for *all*
int8 Linears that read it (q, k, v share one int8 tensor); a float copy is produced only when another
consumer (a residual add) needs it.

Before (after the Linear patterns ran)::

    %ln = aten.layer_norm(%x, [384], @ln.weight, @ln.bias, 1e-12)
    %q = fxquant.int8_linear(%ln, @q.weight, ...)
    %k = fxquant.int8_linear(%ln, @k.weight, ...)
    %add = aten.add(%ln, %attn)

After::

    %lnq = fxquant.layer_norm_quant(%x, [384], @ln.weight, @ln.bias, 1e-12, True)
    %y, %y_q, %y_scale = %lnq[0], %lnq[1], %lnq[2]
    %q = fxquant.int8_linear_q(%y_q, %y_scale, @q.weight, ...)
    %k = fxquant.int8_linear_q(%y_q, %y_scale, @k.weight, ...)
    %add = aten.add(%y, %attn)

Filters: at least one user of the LayerNorm is an int8 Linear reading it as its input.
"""

from __future__ import annotations

import torch

from fxquant.ir import ops
from fxquant.ir.meta import InputQuant
from fxquant.ir.rewrite import Match, Pattern, fuse_norm_quant, fuses_int8_linear

aten = torch.ops.aten


def layer_norm(x, w, b):
    return aten.layer_norm.default(x, [1], w, b, 1e-5)


def layer_norm_no_affine(x):
    return aten.layer_norm.default(x, [1], None, None, 1e-5)


def replace(gm, match: Match, store):
    ln = match.anchor
    x, shape, w, b, eps = (list(ln.args) + [None, None, 1e-5])[:5]
    return fuse_norm_quant(gm, ln, ops.LAYER_NORM_QUANT_C, lambda return_float: (x, shape, w, b, eps, return_float),
                           InputQuant.LAYER_NORM, "layer_norm_linear")


class _Example(torch.nn.Module):
    """Pre-LN attention-style block: ln1 feeds q, k, v and a residual (float copy kept); ln2 feeds only fc."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(256), torch.nn.LayerNorm(256)
        self.q, self.k, self.v = (torch.nn.Linear(256, 256) for _ in range(3))
        self.fc = torch.nn.Linear(256, 256)

    def forward(self, x):
        h = self.ln1(x)
        h = self.q(h) * self.k(h) + self.v(h) + h
        return self.fc(self.ln2(h))


LAYER_NORM_LINEAR = Pattern(
    name="layer_norm_linear",
    patterns=(layer_norm, layer_norm_no_affine),
    filters=(fuses_int8_linear(InputQuant.LAYER_NORM, "LayerNorm"),),
    replace=replace,
    quantized_output=InputQuant.LAYER_NORM,
    ignore_literals=True,  # any normalized_shape and eps
    example=lambda: (_Example(), (torch.randn(2, 5, 256),)),
)
