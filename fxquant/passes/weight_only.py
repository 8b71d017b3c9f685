"""Pass ``weight_only``: at decode-sized M, every Linear runs weight-only int8 (W8A16): its int8 weight is read by
a kernel that keeps the activation in its float dtype (``fxquant::int8_weight_linear``).

Why: with M ≤ ``targets.backends.WEIGHT_ONLY_MAX_M`` rows the Linear is memory-bound (an H200's int8 ridge is
about 400 ops per byte; a CPU's far lower), so what decides its time is the weight bytes and the launches,
not the multiply: the int8 weight halves bf16's bytes, and the activation needs no quantization pass. With no
activation rounding, the Linears the plan keeps float for W8A8's accuracy (``down_proj`` after a gated MLP,
``lm_head``) go int8 too, from an int8 copy the store makes once (:meth:`WeightStore.weight_only`); a Linear the
user excluded (``QuantConfig.skip`` / ``filter_fn``) or that is not a constant 2-D float weight stays float.

Which Linears: in the decode method only (``CompileContext.decode_methods``; ``forward``, prefill and the
user's methods keep the plan's W8A8, which the report and the exporters describe), those whose input has a
static row count 1 ≤ M ≤ ``weight_only_max_m(target device, input dtype, K)``. The M is the capture's, so the
choice is made once, not per call.

Before (decode, M = 1)::

    %n = fxquant.rms_norm_quant(%h, @norm.weight, 1e-6, True, False)
    %q = fxquant.int8_linear_q(%n[1], %n[2], @q.weight, @q.weight_scale, None, 'none', 'auto', 127, bf16)
    %d = aten.linear(%m, @down.weight)

After::

    %n = fxquant.rms_norm_quant(%h, @norm.weight, 1e-6, True, True)
    %q = fxquant.int8_weight_linear(%n[0], @q.weight, @q.weight_scale, None, 'none', 'auto', bf16)
    %d = fxquant.int8_weight_linear(%m, @down.weight_only.weight, @down.weight_only.weight_scale, None, 'none', 'auto')
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir import ops
from ..ir.attrs import fetch_attr
from ..ir.notes import NoteKind
from ..ir.meta import MEMBERS_KEY, META_KEY, Rule, decision_of
from ..ir.rewrite import get_params, install_params, keep_meta
from ..ir.views import AtenLinear, attr_target, static_shape
from ..targets import backends
from .base import FxquantPass

_DECISION_KEYS = (META_KEY, MEMBERS_KEY)
# Decisions that keep a Linear float for reasons of the W8A8 path only; weight-only int8 serves them at decode.
_W8A8_ONLY_RULES = (Rule.GATED_OUTPUT, Rule.QUANTIZE_PASS, Rule.RATIO, Rule.ALIGNMENT, Rule.TIED, Rule.PATTERN, None)


def static_rows(node: fx.Node) -> Optional[int]:
    """M of a tensor [..., K] from the capture's fake value: the product of its leading dims when every one is
    fixed, else None."""
    shape = static_shape(node)
    return math.prod(shape[:-1]) if shape else None


def _dtype(node: fx.Node) -> Optional[torch.dtype]:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _quantized_from(x_q: fx.Node):
    """``(contract, node)`` of the fxquant op whose int8 output ``x_q`` is, or (None, None)."""
    if not (x_q.op == "call_function" and x_q.target is operator.getitem):
        return None, None
    src = x_q.args[0]
    c = ops.contract_of(src)
    return (c, src) if c is ops.QUANTIZE_PER_TOKEN_C or c in ops.NORM_QUANT_CONTRACTS else (None, None)


def _float_input(g: fx.Graph, c, src: fx.Node) -> tuple[fx.Node, Optional[fx.Node]]:
    """The float tensor ``src`` quantizes (a norm-quant op is made to return it) and the SmoothQuant factor it
    applied before quantizing (or None)."""
    r = c.record_of(src)
    if c is ops.QUANTIZE_PER_TOKEN_C:
        return r.x, r.act_smooth
    if not r.return_float:
        c.set(src, r._replace(return_float=True))
    for user in src.users:
        if user.target is operator.getitem and user.args[1] == ops.NORM_QUANT_FLOAT:
            return user, r.act_smooth
    with g.inserting_after(src):
        return g.call_function(operator.getitem, (src, ops.NORM_QUANT_FLOAT)), r.act_smooth


def _float_norm_if_unquantized(g: fx.Graph, node: fx.Node) -> None:
    """A norm-quant op whose int8 outputs nothing reads any more becomes the plain float norm (ATen ops, the
    numerics of :func:`fxquant.ir.reference.rms_norm` / ``F.layer_norm``): no quantization computed for nothing."""
    c = ops.contract_of(node)
    if c not in ops.NORM_QUANT_CONTRACTS or any(u.target is not operator.getitem or u.args[1] != ops.NORM_QUANT_FLOAT
                                                for u in node.users):
        return
    r = c.record_of(node)
    dtype = _dtype(r.x)
    if dtype is None:
        return
    aten = torch.ops.aten
    with g.inserting_before(node):
        if c is ops.LAYER_NORM_QUANT_C:
            y = g.call_function(aten.layer_norm.default, (r.x, list(r.normalized_shape), r.weight, r.bias, r.eps))
        else:
            xf = g.call_function(aten._to_copy.default, (r.x,), {"dtype": torch.float32})
            ms = g.call_function(aten.mean.dim, (g.call_function(aten.pow.Tensor_Scalar, (xf, 2)), [-1], True))
            n = g.call_function(aten.mul.Tensor, (xf, g.call_function(aten.rsqrt.default, (
                g.call_function(aten.add.Tensor, (ms, r.eps)),))))
            if r.weight is None:
                y = g.call_function(aten._to_copy.default, (n,), {"dtype": dtype})
            elif r.cast_before_weight:
                y = g.call_function(aten.mul.Tensor, (r.weight, g.call_function(aten._to_copy.default, (n,),
                                                                                {"dtype": dtype})))
            else:
                w = g.call_function(aten._to_copy.default, (r.weight,), {"dtype": torch.float32})
                y = g.call_function(aten._to_copy.default, (g.call_function(aten.mul.Tensor, (n, w)),), {"dtype": dtype})
    for user in list(node.users):
        user.replace_all_uses_with(y)
        g.erase_node(user)
    g.erase_node(node)


def _k_of(gm: fx.GraphModule, w: fx.Node) -> int:
    """K of a Linear from its weight attribute [N, K]."""
    return int(fetch_attr(gm, w.target).shape[1])


def weight_only(gm: fx.GraphModule, device: str, store) -> int:
    """Rewrite the Linears of ``gm`` with a small static M into ``int8_weight_linear`` (module docstring);
    returns how many were rewritten."""
    g = gm.graph
    count = 0
    for node in list(g.nodes):
        if ops.FusedLinear.is_fused_linear(node):
            lin = ops.FusedLinear.of(node)
            c, src = (None, None) if lin.x is not None else _quantized_from(lin.x_q)
            like = lin.x if lin.x is not None else (ops.contract_of(src).record_of(src).x if src is not None else None)
            m = static_rows(like) if like is not None else None  # fused nodes carry no fake value: read the input's
            if not m or m > backends.weight_only_max_m(device, _dtype(like), _k_of(gm, lin.w_q)):
                continue
            x, smooth = (lin.x, lin.act_smooth) if lin.x is not None else _float_input(g, c, src)
            with g.inserting_before(node):
                new = ops.INT8_WEIGHT_LINEAR_C.call(g, ops.INT8_WEIGHT_LINEAR_C.record(
                    x, lin.w_q, lin.w_scale, lin.bias, lin.activation, "auto", lin.out_dtype, smooth))
        elif node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            view = AtenLinear.of(node)
            d = decision_of(node)
            w_attr = attr_target(view.weight)
            b_attr = attr_target(view.bias) if view.bias is not None else None
            if d is None or d.quantize or d.rule not in _W8A8_ONLY_RULES or w_attr is None:
                continue
            if view.bias is not None and b_attr is None:
                continue
            dtype = _dtype(view.input)
            m = static_rows(view.input)
            k = _k_of(gm, view.weight)
            if dtype is None or not dtype.is_floating_point or not m or m > backends.weight_only_max_m(device, dtype, k):
                continue
            params = store.weight_only(gm, d.name, w_attr, b_attr)
            path = f"{d.name}.weight_only" if d.name else "weight_only"
            install_params(gm, path, params)
            with g.inserting_before(node):
                w_q, w_scale, bias = get_params(g, path, b_attr is not None)
                new = ops.INT8_WEIGHT_LINEAR_C.call(g, ops.INT8_WEIGHT_LINEAR_C.record(
                    view.input, w_q, w_scale, bias, "none", "auto", None, None))
        else:
            continue
        keep_meta(new, node, ("val", "tensor_meta", "nn_module_stack", "stack_trace", *_DECISION_KEYS))
        node.replace_all_uses_with(new)
        g.erase_node(node)
        count += 1
    if count:
        g.eliminate_dead_code()
        for node in list(g.nodes):
            _float_norm_if_unquantized(g, node)
        gm.delete_all_unused_submodules()
        g.lint()
        gm.recompile()
    return count


class WeightOnly(FxquantPass):
    name = "weight_only"

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.ctx.method not in self.ctx.decode_methods or not self.ctx.config.decode_weight_only:
            return PassResult(gm, False)
        n = weight_only(gm, self.ctx.spec.device, self.ctx.store)
        if n:
            self.ctx.note(NoteKind.GENERATION, f"decode: {n} Linear GEMM(s) weight-only int8 (W8A16: int8 weights, float "
                          "activations, no activation quantization), down_proj and the LM head included", self.name)
        return PassResult(gm, n > 0)
