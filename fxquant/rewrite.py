"""The pattern engine: a :class:`Pattern` is float pattern functions + filters + a replacement.

Matching is torch.fx's ``SubgraphMatcher`` on use-def edges of the canonical ATen graph (see
``capture.canonicalize``); a pattern file in ``fxquant.patterns`` declares one ``Pattern`` and the registry
lists them. Every Linear's :class:`LinearDecision` lives in ``node.meta["fxquant"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from ._attrs import fetch_attr, parent_for
from .heuristics import Verdict

__all__ = ["LinearDecision", "Match", "Pattern", "META_KEY", "MEMBERS_KEY", "decision_of", "quantize_linear",
           "fuse_sibling_linears"]

META_KEY = "fxquant"
aten = torch.ops.aten


@dataclass
class LinearDecision:
    """Everything fxquant decided about one Linear; shown row by row in the report.

    Attributes:
        name: module path of the Linear (``encoder.layer.0.attention.self.query``).
        k, n: in and out features (GEMM K and N).
        dtype: the weight's dtype.
        ratio: K·N/(K+N).
        aligned: K and N meet the target's alignment.
        quantize: the heuristics' verdict (int8 when True).
        reason: why, in words.
        weight_qmax: int8 weight range used (127 or 63).
        pattern: the pattern that fused it, or None.
        activation: the epilogue activation fused with it ("none" for a plain Linear).
        input_quant: "per-token" (quantized in the node), "shared-layernorm" (quantized once by a
            LayerNorm→Linear fusion, shared with its sibling Linears) or "shared-per-token" (one
            quantization shared by sibling Linears reading the same tensor).
        backend: the kernel backend chosen by the lowering pass.
        out_dtype: dtype of the fused node's output (``QuantConfig.out_dtype``, else the weight's).
    """

    name: str
    k: int
    n: int
    dtype: Optional[torch.dtype]
    ratio: float
    aligned: bool
    quantize: bool
    reason: str
    weight_qmax: int = 127
    pattern: Optional[str] = None
    activation: str = "none"
    input_quant: Optional[str] = None
    backend: Optional[str] = None
    out_dtype: Optional[torch.dtype] = None


def decision_of(node: fx.Node) -> Optional[LinearDecision]:
    return node.meta.get(META_KEY)


class Match:
    """One match of a pattern: ``match["linear"]`` is the graph node matched by the pattern node of that
    name (pattern nodes take the name of the op they call, e.g. ``linear``, ``gelu``, ``layer_norm``)."""

    def __init__(self, internal: InternalMatch):
        self.internal = internal
        self.nodes = {k.name.removesuffix("_default"): v for k, v in internal.nodes_map.items()}

    def __getitem__(self, name: str) -> fx.Node:
        return self.nodes[name]

    @property
    def anchor(self) -> fx.Node:
        """The node whose value the match returns (its single output)."""
        return self.internal.returning_nodes[0]


Filter = Callable[[Match], Verdict]


@dataclass(frozen=True)
class Pattern:
    """A rewrite: float ``patterns`` (variants of one subgraph), ``filters`` that must all accept a match,
    ``replace(gm, match)`` that builds the int8 subgraph and returns its output node, and ``example()``
    giving a small model and inputs that the pattern fuses (used by the golden tests)."""

    name: str
    patterns: Sequence[Callable]
    replace: Callable[[fx.GraphModule, Match], fx.Node]
    filters: Sequence[Filter] = ()
    description: str = ""
    ignore_literals: bool = False
    example: Optional[Callable[[], tuple[torch.nn.Module, tuple]]] = None  # small model + inputs it fuses
    _graphs: list = field(default_factory=list, compare=False, repr=False)

    def matches(self, gm: fx.GraphModule) -> list[Match]:
        if not self._graphs:
            self._graphs.extend(fx.symbolic_trace(p).graph for p in self.patterns)
        found: list[Match] = []
        seen: set[fx.Node] = set()
        for pg in self._graphs:
            matcher = SubgraphMatcher(
                pg, match_output=False, match_placeholder=False, remove_overlapping_matches=True,
                ignore_literals=self.ignore_literals,
            )
            for m in matcher.match(gm.graph):
                match = Match(m)
                if match.anchor not in seen:
                    seen.add(match.anchor)
                    found.append(match)
        return found

    def check(self, match: Match) -> Verdict:
        for f in self.filters:
            v = f(match)
            if not v:
                return v
        return Verdict(True, "all filters passed")


# ------------------------------------------------------------------ building blocks for replacements
class QuantizedLinearParams(torch.nn.Module):
    """The buffers of one quantized Linear, named as compressed-tensors names them.

    Buffers: ``weight`` int8 [N, K], ``weight_scale`` fp32 [N, 1], ``bias`` [N] (absent without bias).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        if bias is not None:
            self.register_buffer("bias", bias.detach())


def _installed(gm: fx.GraphModule, path: str) -> bool:
    """Has an earlier call of the same Linear module already put its int8 weights at ``path``?"""
    if not path:
        return isinstance(getattr(gm, "weight_scale", None), torch.Tensor)
    try:
        return isinstance(gm.get_submodule(path), QuantizedLinearParams)
    except AttributeError:
        return False


def _install(gm: fx.GraphModule, path: str, params: QuantizedLinearParams) -> None:
    """Put ``params`` at module ``path`` of ``gm``'s own tree (``""``: the Linear is the model's root, so
    its buffers go on ``gm`` itself, replacing the float ones)."""
    if not path:
        for name, buf in params.named_buffers():
            if hasattr(gm, name):
                delattr(gm, name)
            gm.register_buffer(name, buf)
        return
    parent, leaf = parent_for(gm, path)
    if hasattr(parent, leaf) and not isinstance(getattr(parent, leaf), torch.nn.Module):
        delattr(parent, leaf)
    parent.add_module(leaf, params)


def quantize_linear(gm: fx.GraphModule, linear: fx.Node, activation: str, anchor: fx.Node, pattern: str) -> fx.Node:
    """Replace ``anchor`` (the Linear, or the activation after it) with ``fxquant.int8_linear``.

    The weight is quantized per output channel (``reference.quantize_weight_per_channel``) and stored with
    its scale and bias in a :class:`QuantizedLinearParams` at the Linear's module path; further calls of
    the same module reuse them.
    """
    from . import ops, reference

    d = decision_of(linear)
    assert d is not None and d.quantize, "quantize_linear called on a Linear the heuristics kept float"
    b_node = linear.args[2] if len(linear.args) > 2 else None
    b = fetch_attr(gm, b_node.target) if b_node is not None else None
    if not _installed(gm, d.name):
        w_q, w_scale = reference.quantize_weight_per_channel(fetch_attr(gm, linear.args[1].target), d.weight_qmax)
        _install(gm, d.name, QuantizedLinearParams(w_q, w_scale, b))
    prefix = f"{d.name}." if d.name else ""
    g = gm.graph
    with g.inserting_before(anchor):
        wq_node = g.get_attr(f"{prefix}weight")
        ws_node = g.get_attr(f"{prefix}weight_scale")
        b_new = g.get_attr(f"{prefix}bias") if b is not None else None
        new = g.call_function(
            ops.INT8_LINEAR,
            (linear.args[0], wq_node, ws_node, b_new, activation, "auto", d.weight_qmax, d.out_dtype),
        )
    new.meta.update({k: v for k, v in anchor.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
    new.meta[META_KEY] = d
    d.activation = activation
    d.pattern = pattern
    d.input_quant = "per-token"
    anchor.replace_all_uses_with(new)
    return new


def read_quantized_input(g: fx.Graph, lin: fx.Node, x_q: fx.Node, x_scale: fx.Node, input_quant: str, pattern: str) -> fx.Node:
    """Turn ``fxquant.int8_linear(x, ...)`` into ``fxquant.int8_linear_q(x_q, x_scale, ...)`` reading an
    input quantized once elsewhere (by a LayerNorm fusion, or shared by sibling Linears); returns the new
    node, which carries the old one's meta and decision (``input_quant`` and ``pattern`` updated)."""
    from . import ops

    _, w_q, w_s, bias, act, backend, qmax, out_dtype = lin.args
    with g.inserting_before(lin):
        new = g.call_function(ops.INT8_LINEAR_Q, (x_q, x_scale, w_q, w_s, bias, act, backend, qmax, out_dtype))
    new.meta.update(lin.meta)
    d = decision_of(new)
    d.input_quant = input_quant
    if not d.pattern.endswith(f"+{pattern}"):  # a module called several times shares one decision
        d.pattern = f"{d.pattern}+{pattern}"
    lin.replace_all_uses_with(new)
    g.erase_node(lin)
    return new


MEMBERS_KEY = "fxquant_members"  # node.meta of a horizontally fused GEMM: the member Linears' decisions


def fuse_sibling_linears(gm: fx.GraphModule) -> int:
    """Horizontal fusion: int8 Linears that read the same quantized input with the same epilogue become one
    GEMM over their concatenated weights, each member a slice of its output.

    Before::

        %q = fxquant.int8_linear_q(%x_q, %x_s, @q.weight, @q.weight_scale, @q.bias, "none", ...)
        %k = fxquant.int8_linear_q(%x_q, %x_s, @k.weight, @k.weight_scale, @k.bias, "none", ...)

    After::

        %qk = fxquant.int8_linear_q(%x_q, %x_s, @fused_q_k.weight, @fused_q_k.weight_scale, @fused_q_k.bias, ...)
        %q = aten.slice(%qk, -1, 0, N_q)
        %k = aten.slice(%qk, -1, N_q, N_q + N_k)

    Numerics are unchanged (per-channel weights and per-token inputs are the same; the int32 accumulation is
    exact). One GEMM with N = ΣN runs closer to peak than several narrow ones (ViT's q/k/v: 3 × 768). The
    slices are strided views; their ``aten.view`` users become ``aten.reshape`` (same values; a copy only
    where a view is impossible). Returns the number of fused groups.
    """
    from . import ops

    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ops.INT8_LINEAR_Q and isinstance(node.args[2], fx.Node):
            x_q, x_s, _, _, _, act, backend, qmax, out_dtype = node.args
            groups.setdefault((x_q, x_s, act, backend, qmax, out_dtype), []).append(node)
    g = gm.graph
    fused = 0
    for (x_q, x_s, act, backend, qmax, out_dtype), nodes in groups.items():
        weights = [fetch_attr(gm, n.args[2].target) for n in nodes]
        if len(nodes) < 2 or len({w.shape[1] for w in weights}) != 1:
            continue
        members = [decision_of(n) for n in nodes]
        parent = members[0].name.rpartition(".")[0]
        path = (f"{parent}." if parent else "") + "fused_" + "_".join(d.name.rpartition(".")[2] or "root" for d in members)
        if not _installed(gm, path):
            scales = [fetch_attr(gm, n.args[3].target) for n in nodes]
            biases = [fetch_attr(gm, n.args[4].target) if n.args[4] is not None else None for n in nodes]
            bias = None
            if any(b is not None for b in biases):
                dt = next(b.dtype for b in biases if b is not None)
                bias = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=dt, device=w.device)
                                  for b, w in zip(biases, weights)])
            _install(gm, path, QuantizedLinearParams(torch.cat(weights), torch.cat(scales), bias))
        n_total = sum(w.shape[0] for w in weights)
        k = weights[0].shape[1]
        with g.inserting_before(nodes[0]):
            w_node, s_node = g.get_attr(f"{path}.weight"), g.get_attr(f"{path}.weight_scale")
            b_node = g.get_attr(f"{path}.bias") if hasattr(gm.get_submodule(path), "bias") else None
            new = g.call_function(ops.INT8_LINEAR_Q, (x_q, x_s, w_node, s_node, b_node, act, backend, qmax, out_dtype))
            start = 0
            for node, w in zip(nodes, weights):
                piece = g.call_function(aten.slice.Tensor, (new, -1, start, start + w.shape[0]))
                start += w.shape[0]
                for user in list(node.users):
                    if user.op == "call_function" and user.target is aten.view.default:
                        user.target = aten.reshape.default
                node.replace_all_uses_with(piece)
        lead = members[0]
        new.meta.update({kk: v for kk, v in nodes[0].meta.items() if kk in ("nn_module_stack", "stack_trace")})
        new.meta[META_KEY] = LinearDecision(path, k, n_total, lead.dtype, (k * n_total) / (k + n_total), True, True,
                                            "horizontal fusion of sibling Linears", weight_qmax=lead.weight_qmax,
                                            pattern="sibling_fusion", activation=act, input_quant=lead.input_quant,
                                            out_dtype=lead.out_dtype)
        new.meta[MEMBERS_KEY] = members
        for node, d in zip(nodes, members):
            if not d.pattern.endswith("+sibling_fusion"):
                d.pattern = f"{d.pattern}+sibling_fusion"
            g.erase_node(node)
        fused += 1
    if fused:
        gm.delete_all_unused_submodules()
        g.lint()
        gm.recompile()
    return fused


def run_patterns(gm: fx.GraphModule, patterns: Sequence[Pattern]) -> dict[str, dict[str, int]]:
    """Apply each pattern in order; returns ``{pattern: {"matched": n, "rejected": n, <reason>: n}}``."""
    stats: dict[str, dict[str, int]] = {}
    for pat in patterns:
        s = stats.setdefault(pat.name, {"matched": 0, "rejected": 0})
        for match in pat.matches(gm):
            v = pat.check(match)
            if v:
                pat.replace(gm, match)
                s["matched"] += 1
            else:
                s["rejected"] += 1
                s[v.reason] = s.get(v.reason, 0) + 1
        gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return stats
