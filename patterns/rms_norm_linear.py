"""RMSNorm → Linear(s): one ``fxquant.rms_norm_quant`` quantizes the RMSNorm output once for *all* int8
Linears that read it (Llama's q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``);
a float copy is produced only when another consumer needs it.

RMSNorm (Zhang & Sennrich, 2019, eq. 4): y = x · rsqrt(mean(x²) + eps) · g. Three spellings are matched:

* Hugging Face ``LlamaRMSNorm`` (Llama, Qwen2, Qwen3, Mistral), as torch.export records it (the match starts
  at %h, the fp32 value of x: the residual add reads it too)::

      %h = aten.to(%x, float32); %v = aten.mean(aten.pow(%h, 2), [-1], True)
      %n = aten.mul(%h, aten.rsqrt(aten.add(%v, eps))); %y = aten.mul(@weight, aten.to(%n, x.dtype))

  (``cast_before_weight``: the normalized value is rounded to x's dtype before the weight multiply);
* Gemma's ``(1 + weight)`` form, computed in fp32 then cast back (``type_as``): fused with the fp32 tensor
  ``1 + weight`` stored once as ``<norm>.weight_plus_one``;
* ``torch.nn.RMSNorm`` / ``F.rms_norm`` (``aten.rms_norm``), computed in fp32 and rounded once.

After::

    %nq = fxquant.rms_norm_quant(%x, @weight, eps, cast_before_weight, return_float)
    %q = fxquant.int8_linear_q(%nq[1], %nq[2], @q.weight, ...)

Filters: the norm reduces over the last dimension with exponent 2 and keeps it; its output has x's dtype;
the weight is a constant [K] tensor (or absent); at least one int8 Linear reads its output.
"""

from __future__ import annotations

import torch

from fxquant.ir import ops
from fxquant.ir.attrs import fetch_attr, parent_for
from fxquant.ir.meta import Rule, Verdict
from fxquant.ir.meta import InputQuant
from fxquant.ir.rewrite import Match, Pattern, fuse_norm_quant, fuses_int8_linear

aten = torch.ops.aten


# The decomposed forms start at h = x.to(float32): the cast stays outside the match (the residual add reads it
# too); ``_parts`` looks through it to x.
def _normalized(h):
    var = aten.mean.dim(aten.pow.Tensor_Scalar(h, 2), [-1], True)
    return aten.mul.Tensor(h, aten.rsqrt.default(aten.add.Tensor(var, 1e-6)))


def rms_norm_hf(h, weight):
    return aten.mul.Tensor(weight, aten.to.dtype(_normalized(h), torch.bfloat16))


def rms_norm_hf_weight_second(h, weight):
    return aten.mul.Tensor(aten.to.dtype(_normalized(h), torch.bfloat16), weight)


def rms_norm_gemma(h, weight, like):
    scale = aten.add.Tensor(aten.to.dtype(weight, torch.float32), 1.0)
    return aten.type_as.default(aten.mul.Tensor(_normalized(h), scale), like)


def rms_norm_gemma_fp32(h, weight):  # fp32 models: x.float() is x itself, so type_as reads h
    scale = aten.add.Tensor(aten.to.dtype(weight, torch.float32), 1.0)
    return aten.type_as.default(aten.mul.Tensor(_normalized(h), scale), h)


def rms_norm_aten(x, weight):
    return aten.rms_norm.default(x, [1], weight, 1e-6)


def rms_norm_aten_no_weight(x):
    return aten.rms_norm.default(x, [1], None, 1e-6)


def _val(node):
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _eps_add(match: Match):
    """The ``mean(h²) + eps`` node of a decomposed RMSNorm: the input of its rsqrt."""
    return next(g for p, g in match.internal.nodes_map.items() if p.target is aten.rsqrt.default).args[0]


def _parts(match: Match):
    """``(x, weight node or None, eps, cast_before_weight, weight offset)`` of a matched RMSNorm."""
    anchor = match.anchor
    if anchor.target is aten.rms_norm.default:
        args = list(anchor.args) + [None] * (4 - len(anchor.args))
        x, _, w, eps = args[:4]
        return x, w, eps, False, 0.0
    h = match["h"]
    x = h.args[0] if h.op == "call_function" and h.target is aten.to.dtype else h
    eps = _eps_add(match).args[1]
    if anchor.target is aten.type_as.default:
        return x, match["weight"], eps, False, 1.0
    return x, match["weight"], eps, True, 0.0


def is_rms_norm(match: Match) -> Verdict:
    """The matched subgraph computes RMSNorm over the last dim, in fp32, returning x's dtype."""
    nodes = match.internal.nodes_map
    for p, g in nodes.items():
        if p.op != "call_function":
            continue
        if p.target is aten.pow.Tensor_Scalar and g.args[1] != 2:
            return Verdict(False, "not an RMSNorm: exponent is not 2", Rule.PATTERN)
        if p.target is aten.mean.dim and not (list(g.args[1]) in ([-1], [_ndim(g.args[0]) - 1]) and g.args[2] is True):
            return Verdict(False, "not an RMSNorm: the mean is not over the last dim with keepdim", Rule.PATTERN)
    if match.anchor.target is not aten.rms_norm.default:  # the decomposed forms
        if not isinstance(_eps_add(match).args[1], float):
            return Verdict(False, "not an RMSNorm: eps is not a constant", Rule.PATTERN)
        if _val(match["h"]) is None or _val(match["h"]).dtype != torch.float32:
            return Verdict(False, "not an RMSNorm computed in fp32", Rule.PATTERN)
    x, w, _, _, _ = _parts(match)
    xv, yv = _val(x), _val(match.anchor)
    if xv is None or yv is None:
        return Verdict(False, "RMSNorm without shape metadata (capture with example inputs)", Rule.PATTERN)
    if yv.dtype != xv.dtype:
        return Verdict(False, f"RMSNorm returns {yv.dtype} from a {xv.dtype} input: kept as is", Rule.PATTERN)
    if match.anchor.target is aten.rms_norm.default and len(match.anchor.args[1]) != 1:
        return Verdict(False, "RMSNorm over several dims", Rule.PATTERN)
    if w is not None:
        wv = _val(w)
        if w.op != "get_attr" or wv is None or list(wv.shape) != [xv.shape[-1]]:
            return Verdict(False, "RMSNorm weight is not a constant [K] tensor", Rule.PATTERN)
        if match.anchor.target is aten.mul.Tensor and wv.dtype != xv.dtype:
            return Verdict(False, f"RMSNorm weight {wv.dtype} differs from the input's {xv.dtype}", Rule.PATTERN)
    return Verdict(True, "RMSNorm")


def _ndim(node) -> int:
    v = _val(node)
    return v.dim() if v is not None else -1


def replace(gm, match: Match, store):
    x, w, eps, cast_before_weight, offset = _parts(match)
    if eps is None:  # F.rms_norm's default: the input dtype's machine epsilon
        eps = torch.finfo(_val(x).dtype).eps
    if offset and w is not None:  # Gemma: store 1 + weight in fp32 once, beside the weight
        path = f"{w.target}_plus_one"
        weight = fetch_attr(gm, w.target)
        parent, leaf = parent_for(gm, path)
        parent.register_buffer(leaf, store.derived(path, lambda: weight.detach().float() + offset))
        with gm.graph.inserting_before(match.anchor):
            w = gm.graph.get_attr(path)
    return fuse_norm_quant(gm, match.anchor, ops.RMS_NORM_QUANT_C,
                           lambda return_float: (x, w, float(eps), cast_before_weight, return_float),
                           InputQuant.RMS_NORM, "rms_norm_linear")


class _Example(torch.nn.Module):
    """A Llama-style block in miniature: the Hugging Face RMSNorm feeds q/k/v and the residual,
    ``torch.nn.RMSNorm`` feeds only fc."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(256) + 0.5)
        self.q, self.k, self.v = (torch.nn.Linear(256, 256, bias=False) for _ in range(3))
        self.norm2 = torch.nn.RMSNorm(256, eps=1e-5)
        self.fc = torch.nn.Linear(256, 256)

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.weight * h.to(x.dtype)
        h = self.q(h) * self.k(h) + self.v(h) + h
        return self.fc(self.norm2(h))


RMS_NORM_LINEAR = Pattern(
    name="rms_norm_linear",
    patterns=(rms_norm_hf, rms_norm_hf_weight_second, rms_norm_gemma, rms_norm_gemma_fp32, rms_norm_aten, rms_norm_aten_no_weight),
    structure=(is_rms_norm,),
    filters=(fuses_int8_linear(InputQuant.RMS_NORM, "RMSNorm"),),
    replace=replace,
    quantized_output=InputQuant.RMS_NORM,
    ignore_literals=True,  # any eps, dtype and normalized_shape; checked by is_rms_norm
    example=lambda: (_Example(), (torch.randn(2, 5, 256),)),
)
