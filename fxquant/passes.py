"""The passes of ``fxquant.compile``: annotate → fuse → lower. GraphModule in, GraphModule out; all state
lives in ``node.meta["fxquant"]`` (a :class:`~fxquant.rewrite.LinearDecision` per Linear)."""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from . import backends, heuristics, ops
from ._attrs import fetch_attr
from .config import QuantConfig
from .rewrite import MEMBERS_KEY, META_KEY, LinearDecision, decision_of, fuse_sibling_linears, read_quantized_input, run_patterns

__all__ = ["annotate", "fuse", "share_input_quantization", "lower", "resolve_weight_qmax", "backend_for", "linear_name"]

aten = torch.ops.aten
FUSED_LINEAR_OPS = (ops.INT8_LINEAR, ops.INT8_LINEAR_Q)


def resolve_weight_qmax(config: QuantConfig) -> int:
    """The int8 weight range: the config's or the target's value; for ``cpu`` with neither, 127 when the
    CPU's oneDNN int8 GEMM is exact at full range (VNNI/AMX), else 63 (see ``fxquant.backends``)."""
    qmax = config.spec.weight_qmax
    if qmax is not None:
        return qmax
    return 127 if backends.cpu_int8_full_range_exact() else 63


def linear_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """Module path of a Linear node: its weight's path without ``.weight``, else its module stack."""
    w = node.args[1]
    if isinstance(w, fx.Node) and w.op == "get_attr" and (w.target == "weight" or w.target.endswith(".weight")):
        return w.target[: -len("weight")].rstrip(".")  # "" when the model itself is the Linear
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return node.name


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.Tensor]:
    w = node.args[1]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    try:
        obj = fetch_attr(gm, w.target)
    except AttributeError:
        return None
    return obj if isinstance(obj, torch.Tensor) else None


def _owned_by(target: str, name: str) -> bool:
    """Is the attribute path ``target`` part of the module at ``name`` ("" = the root Linear itself)?"""
    if not name:
        return target in ("weight", "bias")
    return target == name or target.startswith(name + ".")


def _tied(attrs: list[fx.Node], node: fx.Node, name: str) -> bool:
    """True when an attribute of the Linear's module is read by anything but a Linear call of that same
    module (a tied embedding, say). A module called several times (ALBERT's shared layers) is not tied:
    each call is quantized against the one set of int8 weights."""
    weight = f"{name}.weight" if name else "weight"

    def same_linear(user: fx.Node, attr: fx.Node) -> bool:
        w = user.args[1] if user.op == "call_function" and user.target is aten.linear.default else None
        return isinstance(w, fx.Node) and w.op == "get_attr" and w.target == weight and attr in user.args[1:3] and attr is not user.args[0]

    return any(_owned_by(n.target, name) and not all(same_linear(u, n) for u in n.users) for n in attrs)


def annotate(gm: fx.GraphModule, config: QuantConfig, model: Optional[torch.nn.Module] = None) -> list[LinearDecision]:
    """Decide int8 or float for every ``aten.linear`` node; store the decision in ``node.meta``.

    Rules, first failing one wins: constant weight; dtype (fp32/fp16/bf16); not tied to another op;
    skip list; ``filter_fn``; alignment; beneficial ratio. Returns the decisions in graph order.
    """
    spec = config.spec
    qmax = resolve_weight_qmax(config)
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    decisions = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        name = linear_name(gm, node)
        w = _weight_of(gm, node)
        if w is None or w.dim() != 2:
            d = LinearDecision(name, -1, -1, None, 0.0, False, False, "weight is not a constant 2-D parameter: kept float")
            node.meta[META_KEY] = d
            decisions.append(d)
            continue
        n, k = w.shape
        ratio = heuristics.beneficial_ratio(k, n)
        aligned = heuristics.is_aligned(k, n, spec.alignment)
        verdict = _first_failure(attrs, node, name, w, config, spec, model, aligned, k, n)
        d = LinearDecision(name, k, n, w.dtype, ratio, aligned.ok, verdict.ok, verdict.reason, weight_qmax=qmax,
                           out_dtype=config.out_dtype or w.dtype)
        node.meta[META_KEY] = d
        decisions.append(d)
    if spec.fuse_siblings:
        _apply_sibling_ratio(gm, spec.min_ratio)
    if spec.min_n_unfused:
        _apply_quantize_pass_rule(gm, spec.min_n_unfused)
    return decisions


_ACTIVATION_OPS = (aten.relu.default, aten.gelu.default, aten.silu.default)


def _apply_sibling_ratio(gm: fx.GraphModule, min_ratio: float) -> None:
    """Where sibling Linears (same input, no activation after them) will run as one fused GEMM
    (``rewrite.fuse_sibling_linears``), judge the beneficial ratio on that GEMM: K and the sum of their N.
    Flips only Linears that failed on the ratio alone."""
    groups: dict[fx.Node, list[LinearDecision]] = {}
    for node in gm.graph.nodes:
        d = node.meta.get(META_KEY) if node.op == "call_function" and node.target is aten.linear.default else None
        if d is None or d.k < 0 or any(u.op == "call_function" and u.target in _ACTIVATION_OPS for u in node.users):
            continue
        if d.quantize or d.reason == heuristics.int8_pays_off(d.k, d.n, min_ratio).reason:  # failed on the ratio alone
            groups.setdefault(node.args[0], []).append(d)
    for ds in groups.values():
        if len(ds) < 2 or all(d.quantize for d in ds):
            continue
        k, n = ds[0].k, sum(d.n for d in ds)
        verdict = heuristics.int8_pays_off(k, n, min_ratio)
        if verdict:
            for d in ds:
                if not d.quantize:
                    d.quantize, d.reason = True, f"{verdict.reason} as one GEMM with its siblings (K={k}, N={n})"


def _apply_quantize_pass_rule(gm: fx.GraphModule, min_n: int) -> None:
    """Keep float the int8 candidates whose input needs its own quantization pass (not a LayerNorm output)
    when the candidates sharing that input have too few output columns in total
    (:func:`fxquant.heuristics.quantize_pass_pays_off`)."""
    groups: dict[fx.Node, list[LinearDecision]] = {}
    for node in gm.graph.nodes:
        d = node.meta.get(META_KEY) if node.op == "call_function" and node.target is aten.linear.default else None
        x = node.args[0] if d is not None and d.quantize else None
        if isinstance(x, fx.Node) and not (x.op == "call_function" and x.target is aten.layer_norm.default):
            groups.setdefault(x, []).append(d)
    for ds in groups.values():
        verdict = heuristics.quantize_pass_pays_off(sum(d.n for d in ds), min_n)
        if not verdict:
            for d in ds:
                d.quantize, d.reason = False, verdict.reason


def _first_failure(attrs, node, name, w, config, spec, model, aligned, k, n) -> heuristics.Verdict:
    dt = heuristics.dtype_supported(w.dtype)
    if not dt:
        return dt
    if _tied(attrs, node, name):
        return heuristics.Verdict(False, "weight is shared with another op (tied): kept float")
    skipped = heuristics.is_skipped(name, config.skip)
    if skipped:
        return heuristics.Verdict(False, skipped.reason)
    if config.filter_fn is not None:
        module = None
        if model is not None:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
        if not config.filter_fn(name, module):
            return heuristics.Verdict(False, "rejected by filter_fn")
    if not aligned:
        return aligned
    return heuristics.int8_pays_off(k, n, spec.min_ratio)


def fuse(gm: fx.GraphModule, patterns=None, fuse_siblings: bool = False) -> dict[str, dict[str, int]]:
    """Apply the registered patterns (``fxquant.patterns.REGISTRY``), then :func:`share_input_quantization`
    and, where the target asks for it, :func:`fxquant.rewrite.fuse_sibling_linears`; returns match/reject
    counts per pattern (the passes under ``"shared_input_quant"`` and ``"sibling_fusion"``)."""
    from .patterns import REGISTRY

    stats = run_patterns(gm, REGISTRY if patterns is None else patterns)
    stats["shared_input_quant"] = {"matched": share_input_quantization(gm), "rejected": 0}
    if fuse_siblings:
        stats["sibling_fusion"] = {"matched": fuse_sibling_linears(gm), "rejected": 0}
    return stats


def share_input_quantization(gm: fx.GraphModule) -> int:
    """Quantize once what several int8 Linears read: Llama's q/k/v after RMSNorm, gate/up of a SwiGLU MLP.

    Before::

        %q = fxquant.int8_linear(%h, @q.weight, ...)
        %k = fxquant.int8_linear(%h, @k.weight, ...)

    After::

        %hq = fxquant.quantize_per_token(%h)
        %q = fxquant.int8_linear_q(%hq[0], %hq[1], @q.weight, ...)
        %k = fxquant.int8_linear_q(%hq[0], %hq[1], @k.weight, ...)

    Same numerics (per-token quantization depends on the input alone), one quantization kernel instead of
    one per consumer. Returns the number of shared quantizations inserted.
    """
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ops.INT8_LINEAR:
            groups.setdefault(node.args[0], []).append(node)
    g = gm.graph
    shared = 0
    for x, lins in groups.items():
        if len(lins) < 2:
            continue
        with g.inserting_before(lins[0]):
            quant = g.call_function(ops.QUANTIZE_PER_TOKEN, (x,))
            x_q = g.call_function(operator.getitem, (quant, 0))
            x_scale = g.call_function(operator.getitem, (quant, 1))
        for lin in lins:
            read_quantized_input(g, lin, x_q, x_scale, "shared-per-token", "shared_input_quant")
        shared += 1
    if shared:
        g.lint()
        gm.recompile()
    return shared


def lower(gm: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Pick each fused Linear's kernel backend for the target; writes it into the node and its decision."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FUSED_LINEAR_OPS:
            d = decision_of(node)
            backend = config.backend or backend_for(config.target, d.weight_qmax)
            args = list(node.args)
            args[-3] = backend  # (..., activation, backend, w_qmax, out_dtype)
            node.args = tuple(args)
            d.backend = backend
            for member in node.meta.get(MEMBERS_KEY, ()):
                member.backend = backend
    gm.graph.lint()
    gm.recompile()
    return gm


def backend_for(target: str, weight_qmax: int) -> str:
    """The int8 GEMM backend a target's nodes are lowered to (see ``fxquant.backends``): ``triton`` on
    CUDA when Triton is installed (else cuBLAS through ``aten``); on CPU targets ``triton`` only under a
    Triton CPU backend, else oneDNN / ``aten`` (:func:`fxquant.backends.cpu_backend`)."""
    if target == "cuda":
        return "triton" if backends.triton_serves(torch.device("cuda")) else "aten"
    if backends.triton_serves(torch.device("cpu")):
        return "triton"
    return backends.cpu_backend(weight_qmax) if target == "cpu" else "aten"
