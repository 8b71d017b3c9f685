"""The pattern engine: a :class:`Pattern` is float pattern functions + filters + a replacement, and the
building blocks replacements use.

Matching is torch.fx's ``SubgraphMatcher`` on use-def edges of the canonical ATen graph (see
``fxquant.frontend.capture.canonicalize``); a pattern file in ``fxquant.patterns`` declares one ``Pattern``
and the registry lists them. Decisions live in node metadata (:mod:`fxquant.ir.meta`); int8 weights come
from the program's weight store (``fxquant.weights.store.WeightStore``), handed to ``replace`` by the
pass that runs the patterns, so every graph of one program references the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from . import ops
from .attrs import parent_for
from .meta import InputQuant, LinearDecision, Rule, Verdict, decision_of, members_of, set_members
from .views import AtenLinear

__all__ = ["Match", "Pattern", "PatternStats", "QuantizedLinearParams", "quantize_linears", "read_quantized_input", "run_patterns",
           "install_params", "params_path", "fuse_norm_quant", "int8_consumers", "fuses_int8_linear", "keep_meta",
           "SOURCE_META"]

aten = torch.ops.aten


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


def install_params(gm: fx.GraphModule, path: str, params: QuantizedLinearParams) -> None:
    """Put ``params`` (an object of the program's weight store, shared by every graph) at module ``path`` of
    ``gm``'s own tree (``""``: the Linear is the model's root, so its buffers go on ``gm`` itself, replacing
    the float ones)."""
    if not path:
        for name, buf in params.named_buffers():
            if hasattr(gm, name):
                delattr(gm, name)
            gm.register_buffer(name, buf)
        return
    parent, leaf = parent_for(gm, path)
    if getattr(parent, leaf, None) is params:
        return
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


def get_params(graph: fx.Graph, path: str, has_bias: bool) -> tuple[fx.Node, fx.Node, Optional[fx.Node]]:
    """``get_attr`` nodes of the int8 weight, its scale and the bias at ``path``."""
    prefix = f"{path}." if path else ""
    return (graph.get_attr(f"{prefix}weight"), graph.get_attr(f"{prefix}weight_scale"),
            graph.get_attr(f"{prefix}bias") if has_bias else None)


SOURCE_META = ("nn_module_stack", "stack_trace")  # where a node came from in the user's code


def keep_meta(new: fx.Node, old: fx.Node, keys: Sequence[str] = ("val", "tensor_meta", *SOURCE_META)) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k in keys})


def quantize_linears(gm: fx.GraphModule, store, linears: Sequence[fx.Node], activation: str, anchor: fx.Node,
                     pattern: str, path: Optional[str] = None) -> fx.Node:
    """Replace ``anchor`` (the Linear, the activation after it, or SwiGLU's product) with one
    ``fxquant.int8_linear`` computing ``linears`` (all reading the same input) as one GEMM.

    The int8 weights come from ``store`` (``fxquant.weights.store.WeightStore.gemm``): each weight quantized
    per output channel once per program (or taken as stored from a checkpoint), several Linears' rows stacked
    in order (SwiGLU: gate then up), exact since every row keeps its own scale. They sit at ``path`` (default:
    the first Linear's :func:`params_path`); further calls of the same module, and other graphs of the same
    program, reference the same tensors.
    """
    decisions = [decision_of(lin) for lin in linears]
    assert all(d is not None and d.quantize for d in decisions), "quantize_linears called on a Linear kept float"
    d0 = decisions[0]
    path = params_path(d0) if path is None else path
    views = [AtenLinear.of(lin) for lin in linears]
    params = store.gemm(gm, path, [(d.name, v.weight.target, v.bias.target if v.bias is not None else None)
                                   for d, v in zip(decisions, views)], d0.weight_qmax)
    install_params(gm, path, params)
    g = gm.graph
    with g.inserting_before(anchor):
        w_q, w_scale, b = get_params(g, path, hasattr(params, "bias"))
        new = ops.FusedLinear(views[0].input, None, None, w_q, w_scale, b, activation, "auto", d0.weight_qmax,
                              d0.out_dtype).call(g)
    keep_meta(new, anchor)
    set_members(new, [d.replace(activation=activation).with_pattern(pattern) for d in decisions])
    anchor.replace_all_uses_with(new)
    return new


def read_quantized_input(g: fx.Graph, lin: fx.Node, x_q: fx.Node, x_scale: fx.Node, input_quant: InputQuant,
                         pattern: str) -> fx.Node:
    """Turn ``fxquant.int8_linear(x, ...)`` into ``fxquant.int8_linear_q(x_q, x_scale, ...)`` reading an
    input quantized once elsewhere (by a norm fusion, or shared by sibling Linears); returns the new node,
    which carries the old one's meta with its decisions updated."""
    with g.inserting_before(lin):
        new = ops.FusedLinear.of(lin)._replace(x=None, x_q=x_q, x_scale=x_scale).call(g)
    new.meta.update(lin.meta)
    set_members(new, [d.replace(input_quant=input_quant).with_pattern(pattern) for d in members_of(lin)])
    lin.replace_all_uses_with(new)
    g.erase_node(lin)
    return new


@dataclass
class PatternStats:
    """What one pattern (or pass) did to a graph: matches rewritten, matches rejected, and how many
    rejections each reason caused."""

    matched: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return {"matched": self.matched, "rejected": self.rejected, "reasons": dict(self.reasons)}


def run_patterns(gm: fx.GraphModule, patterns: Sequence[Pattern], store) -> dict[str, PatternStats]:
    """Apply each pattern in order (``replace(gm, match, store)``); returns each pattern's :class:`PatternStats`."""
    stats: dict[str, PatternStats] = {}
    for pat in patterns:
        s = stats.setdefault(pat.name, PatternStats())
        for match in pat.matches(gm):
            v = pat.check(match)
            if v:
                pat.replace(gm, match, store)
                s.matched += 1
            else:
                s.reject(v.reason)
        gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return stats


# ------------------------------------------------------------------ norm → quantized input of int8 Linears
def int8_consumers(node: fx.Node, source: InputQuant) -> list[fx.Node]:
    """The int8 Linears that read ``node`` as their input and were planned to take it quantized by
    ``source`` (the norm producing it)."""
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
        keep_meta(node, anchor, SOURCE_META)
    for lin in consumers:
        read_quantized_input(g, lin, y_q, y_scale, source, pattern)
    anchor.replace_all_uses_with(y)
    return fused
