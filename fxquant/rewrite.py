"""The pattern engine: a :class:`Pattern` is float pattern functions + filters + a replacement.

Matching is torch.fx's ``SubgraphMatcher`` on use-def edges of the canonical ATen graph (see
``capture.canonicalize``); a pattern file in ``fxquant.patterns`` declares one ``Pattern`` and the registry
lists them. Every Linear's :class:`LinearDecision` (an immutable value) lives in ``node.meta["fxquant"]``;
a fused Linear node lists the decisions of the Linears it computes in ``node.meta["fxquant_members"]``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from ._attrs import fetch_attr, parent_for
from .checkpoint import STORED_KEY
from .heuristics import Rule, Verdict

__all__ = ["LinearDecision", "InputQuant", "Match", "Pattern", "META_KEY", "MEMBERS_KEY", "decision_of", "members_of",
           "quantize_linears", "read_quantized_input", "fuse_sibling_linears", "run_patterns"]

META_KEY = "fxquant"
MEMBERS_KEY = "fxquant_members"  # node.meta of a fused Linear: the decisions of the Linears it computes
aten = torch.ops.aten


class InputQuant(str, enum.Enum):
    """Where a fused Linear's per-token int8 input comes from (decided once by ``passes.plan_input_groups``)."""

    PER_TOKEN = "per-token"                # quantized inside the fused node (its own pass)
    SHARED_PER_TOKEN = "shared-per-token"  # one quantize_per_token shared by the Linears reading the tensor
    LAYER_NORM = "shared-layernorm"        # the LayerNorm that produces the tensor quantizes it (layer_norm_quant)
    RMS_NORM = "shared-rmsnorm"            # the RMSNorm that produces the tensor quantizes it (rms_norm_quant)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LinearDecision:
    """Everything fxquant decided about one Linear call; shown row by row in the report. Immutable: a pass
    that learns more stores ``dataclasses.replace(d, ...)`` on the node.

    Attributes:
        name: module path of the Linear (``encoder.layer.0.attention.self.query``).
        k, n: in and out features (GEMM K and N).
        dtype: the weight's dtype.
        ratio: K·N/(K+N).
        aligned: K and N meet the target's alignment.
        quantize: the heuristics' verdict (int8 when True).
        reason: why, in words.
        rule: the rule that decided (:class:`fxquant.heuristics.Rule`), None when every rule passed.
        weight_qmax: int8 weight range used (127 or 63).
        patterns: the patterns that rewrote it, in order (``pattern`` joins them with ``+``).
        activation: the epilogue fused with it ("none" for a plain Linear; "swiglu" for gate/up of SwiGLU).
        input_quant: where its int8 input comes from (:class:`InputQuant`).
        backend: the kernel backend chosen by the lowering pass.
        out_dtype: dtype of the fused node's output (``QuantConfig.out_dtype``, else the weight's).
        group: id of the input group (the Linears reading the same tensor), from the planning pass.
        gemm: id of the GEMM it runs in; Linears with the same id run as one GEMM (siblings, SwiGLU).
        index: position of the Linear call in the captured graph (report order).
        extra_bytes: memory its int8 weights add on top of the model when it goes int8 (nonzero for a weight
            tied to an embedding, which keeps its float copy; its int8 copy lives at ``<name>.int8``).
    """

    name: str
    k: int
    n: int
    dtype: Optional[torch.dtype]
    ratio: float
    aligned: bool
    quantize: bool
    reason: str
    rule: Optional[Rule] = None
    weight_qmax: int = 127
    patterns: tuple[str, ...] = ()
    activation: str = "none"
    input_quant: Optional[InputQuant] = None
    backend: Optional[str] = None
    out_dtype: Optional[torch.dtype] = None
    group: Optional[int] = None
    gemm: Optional[int] = None
    index: int = 0
    extra_bytes: int = 0

    @property
    def pattern(self) -> Optional[str]:
        return "+".join(self.patterns) if self.patterns else None

    def replace(self, **changes) -> "LinearDecision":
        return dataclasses.replace(self, **changes)

    def with_pattern(self, pattern: str) -> "LinearDecision":
        return self if self.patterns[-1:] == (pattern,) else self.replace(patterns=(*self.patterns, pattern))


def decision_of(node: fx.Node) -> Optional[LinearDecision]:
    return node.meta.get(META_KEY)


def members_of(node: fx.Node) -> tuple[LinearDecision, ...]:
    """The decisions of the Linears a fused Linear node computes (one, or several after fusion)."""
    return node.meta.get(MEMBERS_KEY, ())


def _set_members(node: fx.Node, members: Sequence[LinearDecision]) -> None:
    node.meta[MEMBERS_KEY] = tuple(members)
    if len(members) == 1:
        node.meta[META_KEY] = members[0]


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


class _Matcher(SubgraphMatcher):
    """torch.fx's matcher, with ``ignore_literals`` meaning what it says: a literal in the pattern matches any
    literal in the graph. (torch's own flag also lets a pattern *subgraph* match a graph literal, which
    leaves that subgraph's placeholders unbound and fails with a KeyError: the rotary ``mul(cos, 1.0)`` of
    Hugging Face Llama against RMSNorm's ``mul(weight, cast)``.)"""

    wildcard_literals = False

    def _match_literals(self, pn, gn, match) -> bool:
        if self.wildcard_literals and not isinstance(pn, fx.Node) and not isinstance(gn, fx.Node):
            return True
        return super()._match_literals(pn, gn, match)


@dataclass(frozen=True)
class Pattern:
    """A rewrite: float ``patterns`` (variants of one subgraph), ``filters`` that must all accept a match,
    ``replace(gm, match)`` that builds the int8 subgraph and returns its output node, and ``example()``
    giving a small model and inputs that the pattern fuses (used by the golden tests).

    What a pattern declares for the planning pass (``passes.plan_input_groups``), which decides once
    which Linears go int8, which share a quantized input and which run as one GEMM:

    * ``linears(match)``: the Linear nodes a match turns into one fused GEMM, and its epilogue
      (``({linear}, "gelu")``; SwiGLU: ``((gate, up), "swiglu")``). Patterns earlier in the registry claim first.
    * ``quantized_output``: the pattern's anchor (a norm) emits the per-token int8 copy of its output for the
      int8 Linears that read it; the value is how the report names that input.
    """

    name: str
    patterns: Sequence[Callable]
    replace: Callable[[fx.GraphModule, Match], fx.Node]
    filters: Sequence[Filter] = ()
    description: str = ""
    ignore_literals: bool = False
    example: Optional[Callable[[], tuple[torch.nn.Module, tuple]]] = None  # small model + inputs it fuses
    linears: Optional[Callable[[Match], tuple[Sequence[fx.Node], str]]] = None
    quantized_output: Optional[InputQuant] = None
    structure: Sequence[Filter] = ()  # filters on the float graph alone (dtypes, shapes), checked when planning too
    _graphs: list = field(default_factory=list, compare=False, repr=False)

    def matches(self, gm: fx.GraphModule) -> list[Match]:
        if not self._graphs:
            self._graphs.extend(fx.symbolic_trace(p).graph for p in self.patterns)
        found: list[Match] = []
        seen: set[fx.Node] = set()
        for pg in self._graphs:
            matcher = _Matcher(pg, match_output=False, match_placeholder=False, remove_overlapping_matches=True)
            matcher.wildcard_literals = self.ignore_literals
            for m in matcher.match(gm.graph):
                match = Match(m)
                if match.anchor not in seen:
                    seen.add(match.anchor)
                    found.append(match)
        return found

    def check_structure(self, match: Match) -> Verdict:
        for f in self.structure:
            v = f(match)
            if not v:
                return v
        return Verdict(True, "structure accepted")

    def check(self, match: Match) -> Verdict:
        for f in (*self.structure, *self.filters):
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


TIED_SUFFIX = "int8"  # a tied Linear's int8 copy lives at <name>.int8, beside the float weight it shares


def params_path(d: LinearDecision) -> str:
    """Module path of a Linear's int8 buffers: its own path, or ``<name>.int8`` when its float weight is
    tied to an embedding that keeps reading it."""
    if d.extra_bytes:
        return f"{d.name}.{TIED_SUFFIX}" if d.name else TIED_SUFFIX
    return d.name


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _stacked_params(weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                    biases: Sequence[Optional[torch.Tensor]]) -> QuantizedLinearParams:
    """The int8 rows of one or several Linears as one :class:`QuantizedLinearParams` (exact: every row keeps its
    own scale); a Linear without bias contributes zeros where the others have one."""
    bias = None
    if any(b is not None for b in biases):
        dt = next(b.dtype for b in biases if b is not None)
        bias = _stack([b.detach() if b is not None else torch.zeros(w.shape[0], dtype=dt, device=w.device)
                       for b, w in zip(biases, weights)])
    return QuantizedLinearParams(_stack(weights), _stack(scales), bias)


def _get_params(gm: fx.GraphModule, graph: fx.Graph, path: str, has_bias: bool) -> tuple[fx.Node, fx.Node, Optional[fx.Node]]:
    prefix = f"{path}." if path else ""
    return (graph.get_attr(f"{prefix}weight"), graph.get_attr(f"{prefix}weight_scale"),
            graph.get_attr(f"{prefix}bias") if has_bias else None)


_SOURCE_META = ("nn_module_stack", "stack_trace")  # where a node came from in the user's code


def _keep_meta(new: fx.Node, old: fx.Node, keys: Sequence[str] = ("val", "tensor_meta", *_SOURCE_META)) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k in keys})


def quantize_linears(gm: fx.GraphModule, linears: Sequence[fx.Node], activation: str, anchor: fx.Node, pattern: str,
                     path: Optional[str] = None) -> fx.Node:
    """Replace ``anchor`` (the Linear, the activation after it, or SwiGLU's product) with one
    ``fxquant.int8_linear`` computing ``linears`` (all reading the same input) as one GEMM.

    Each weight is quantized per output channel (``reference.quantize_weight_per_channel``), or taken as stored
    when compile read a checkpoint (``gm.meta[checkpoint.STORED_KEY]``); several Linears'
    int8 weights are stacked in order (SwiGLU: gate then up), which is exact since every row keeps its own
    scale. The buffers go in a :class:`QuantizedLinearParams` at ``path`` (default: the Linear's
    :func:`params_path`); further calls of the same module reuse them.
    """
    from . import ops, reference

    decisions = [decision_of(lin) for lin in linears]
    assert all(d is not None and d.quantize for d in decisions), "quantize_linears called on a Linear kept float"
    d0 = decisions[0]
    path = params_path(d0) if path is None else path
    biases = [lin.args[2] if len(lin.args) > 2 else None for lin in linears]
    has_bias = any(b is not None for b in biases)
    if not _installed(gm, path):
        stored = gm.meta.get(STORED_KEY, {})  # a checkpoint's int8 weights and scales, used as they are
        qs = [stored[d.name] if d.name in stored else
              reference.quantize_weight_per_channel(fetch_attr(gm, lin.args[1].target), d0.weight_qmax)
              for lin, d in zip(linears, decisions)]
        _install(gm, path, _stacked_params([q for q, _ in qs], [s for _, s in qs],
                                           [fetch_attr(gm, b.target) if b is not None else None for b in biases]))
    g = gm.graph
    with g.inserting_before(anchor):
        w_q, w_scale, b = _get_params(gm, g, path, has_bias)
        new = ops.FusedLinear(linears[0].args[0], None, None, w_q, w_scale, b, activation, "auto", d0.weight_qmax,
                              d0.out_dtype).call(g)
    _keep_meta(new, anchor)
    _set_members(new, [d.replace(activation=activation).with_pattern(pattern) for d in decisions])
    anchor.replace_all_uses_with(new)
    return new


def read_quantized_input(g: fx.Graph, lin: fx.Node, x_q: fx.Node, x_scale: fx.Node, input_quant: InputQuant,
                         pattern: str) -> fx.Node:
    """Turn ``fxquant.int8_linear(x, ...)`` into ``fxquant.int8_linear_q(x_q, x_scale, ...)`` reading an
    input quantized once elsewhere (by a norm fusion, or shared by sibling Linears); returns the new node,
    which carries the old one's meta with its decisions updated."""
    from . import ops

    with g.inserting_before(lin):
        new = ops.FusedLinear.of(lin)._replace(x=None, x_q=x_q, x_scale=x_scale).call(g)
    new.meta.update(lin.meta)
    _set_members(new, [d.replace(input_quant=input_quant).with_pattern(pattern) for d in members_of(lin)])
    lin.replace_all_uses_with(new)
    g.erase_node(lin)
    return new


def fuse_sibling_linears(gm: fx.GraphModule) -> int:
    """Horizontal fusion, as planned: the int8 Linears whose decisions share a ``gemm`` id (siblings reading
    one quantized input with the same epilogue, ``passes.plan_input_groups``) become one GEMM over their
    concatenated weights, each member a slice of its output.

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

    groups: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        members = members_of(node) if ops.FusedLinear.is_fused_linear(node) else ()
        if len(members) == 1 and members[0].gemm is not None:
            groups.setdefault(members[0].gemm, []).append(node)
    g = gm.graph
    fused = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        args = [ops.FusedLinear.of(n) for n in nodes]
        a0 = args[0]
        assert all((a.x_q, a.x_scale, a.activation, a.w_qmax, a.out_dtype) == (a0.x_q, a0.x_scale, a0.activation, a0.w_qmax, a0.out_dtype)
                   for a in args), "planned siblings must read one quantized input with one epilogue"
        members = [members_of(n)[0] for n in nodes]
        parent = members[0].name.rpartition(".")[0]
        path = (f"{parent}." if parent else "") + "fused_" + "_".join(d.name.rpartition(".")[2] or "root" for d in members)
        weights = [fetch_attr(gm, a.w_q.target) for a in args]
        if not _installed(gm, path):
            _install(gm, path, _stacked_params(weights, [fetch_attr(gm, a.w_scale.target) for a in args],
                                               [fetch_attr(gm, a.bias.target) if a.bias is not None else None for a in args]))
        with g.inserting_before(nodes[0]):
            w_node, s_node, b_node = _get_params(gm, g, path, hasattr(gm.get_submodule(path), "bias"))
            new = a0._replace(w_q=w_node, w_scale=s_node, bias=b_node).call(g)
            start = 0
            for node, w in zip(nodes, weights):
                piece = g.call_function(aten.slice.Tensor, (new, -1, start, start + w.shape[0]))
                start += w.shape[0]
                for user in list(node.users):
                    if user.op == "call_function" and user.target is aten.view.default:
                        user.target = aten.reshape.default
                node.replace_all_uses_with(piece)
        _keep_meta(new, nodes[0], _SOURCE_META)
        _set_members(new, [d.with_pattern("sibling_fusion") for d in members])
        for node in nodes:
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


# ------------------------------------------------------------------ norm → quantized input of int8 Linears
def int8_consumers(node: fx.Node, source: InputQuant) -> list[fx.Node]:
    """The int8 Linears that read ``node`` as their input and were planned to take it quantized by
    ``source`` (the norm producing it)."""
    from . import ops

    return [u for u in node.users if u.op == "call_function" and u.target is ops.INT8_LINEAR
            and ops.FusedLinear.of(u).x is node and members_of(u)[0].input_quant is source]


def fuses_int8_linear(source: InputQuant, what: str) -> Filter:
    """Filter of a norm pattern: accept when an int8 Linear planned to read its quantized output reads it."""

    def feeds_int8_linear(match: Match) -> Verdict:
        if int8_consumers(match.anchor, source):
            return Verdict(True, "feeds int8 Linear(s)")
        return Verdict(False, f"no int8 Linear reads this {what}", Rule.PATTERN)

    return feeds_int8_linear


def fuse_norm_quant(gm: fx.GraphModule, anchor: fx.Node, contract, build: Callable[[bool], tuple], source: InputQuant,
                    pattern: str) -> fx.Node:
    """Replace the norm whose output is ``anchor`` by a norm-quant op (``contract``: ``layer_norm_quant`` or
    ``rms_norm_quant``, arguments ``build(return_float)``) that also emits the per-token int8 copy of its
    output; its int8 consumers read that copy (``int8_linear_q``), and a float copy is written only when
    another consumer (a residual add) needs it.

    Before::

        %n = <norm>(%x, ...)
        %q = fxquant.int8_linear(%n, @q.weight, ...)
        %add = aten.add(%n, %attn)

    After::

        %nq = fxquant.<norm>_quant(%x, ..., return_float=True)
        %q = fxquant.int8_linear_q(%nq[1], %nq[2], @q.weight, ...)
        %add = aten.add(%nq[0], %attn)
    """
    import operator

    from . import ops

    consumers = int8_consumers(anchor, source)
    needs_float = len(anchor.users) > len(consumers)
    g = gm.graph
    with g.inserting_after(anchor):
        fused = contract.call(g, contract.record(*build(needs_float)))
    outs = []
    prev = fused
    for i in (ops.NORM_QUANT_FLOAT, ops.NORM_QUANT_Q, ops.NORM_QUANT_SCALE):
        with g.inserting_after(prev):
            prev = g.call_function(operator.getitem, (fused, i))
        outs.append(prev)
    y, y_q, y_scale = outs
    for node in (fused, y):
        _keep_meta(node, anchor, _SOURCE_META)
    for lin in consumers:
        read_quantized_input(g, lin, y_q, y_scale, source, pattern)
    anchor.replace_all_uses_with(y)
    return fused
