"""Reading a fused graph: the decision table, pattern counts, a networkx view and the golden text form."""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from tabulate import tabulate

from ..ir import ops
from ..ir.meta import META_KEY, LinearDecision, members_of
from ..ir.printer import golden_text, op_name
from ..ir.views import AtenLinear
from ..ir.rewrite import PatternStats
from ..plan.rules import beneficial_ratio

__all__ = ["Report", "LinearRow", "golden_text", "to_networkx", "op_name", "node_module", "node_pattern", "gemm_rows",
           "concrete_shape"]


@dataclass(frozen=True)
class LinearRow:
    """One candidate Linear in :meth:`Report.rows`: its GEMM shape, the decision and what it costs.

    Attributes:
        name: module path of the Linear; k, n: GEMM K and N; ratio: K·N/(K+N).
        m: GEMM rows at the captured example (product of the input's leading dims; a dynamic dim counts at
            the example's size), None when the capture recorded no shapes (``torch.fx.symbolic_trace``).
        flops: 2·M·K·N (M = 1 when ``m`` is None).
        pattern: the patterns that rewrote it (``+``-joined), None for a float Linear.
        decision: ``"int8"`` or ``"float"``; reason: why, in words; backend: the int8 GEMM backend or None.
    """

    name: str
    k: int
    n: int
    ratio: float
    m: Optional[int]
    flops: int
    pattern: Optional[str]
    decision: str
    reason: str
    backend: Optional[str]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FLOAT_PATTERN = "(float)"  # the pattern key of float Linears in Report.totals()


@dataclass
class Report:
    """What ``fxquant.compile`` decided, for people and for tests.

    Attributes:
        decisions: one :class:`LinearDecision` per Linear of the model, in graph order.
        pattern_stats: ``{pattern or pass: PatternStats}`` (matched, rejected, count per rejection reason).
        node_counts: fused-graph ``op_name`` → count, for call_function nodes.
        target, front_end, weight_qmax: the compile settings that shaped the graph.
        notes: what compile wants the reader to know (one line each).
        gemm_m: ``{decision.index: M}``, the GEMM rows of each Linear call at the captured example
            (:func:`gemm_rows`); empty or None entries where the capture recorded no shapes.
    """

    decisions: list[LinearDecision]
    pattern_stats: dict[str, PatternStats]
    node_counts: dict[str, int]
    target: str
    front_end: str
    weight_qmax: int
    notes: list[str] = field(default_factory=list)
    gemm_m: dict[int, Optional[int]] = field(default_factory=dict)

    @property
    def num_int8(self) -> int:
        return sum(d.quantize for d in self.decisions)

    def rows(self) -> list[LinearRow]:
        """One :class:`LinearRow` per candidate Linear (every Linear call of the model), in graph order.

        FLOPs are 2·M·K·N with M from the captured example (a dynamic dimension counts at the example's
        size, so the shares describe that input, not every input). When any Linear's M is unknown (a
        ``torch.fx.symbolic_trace`` capture records no shapes) every row uses M = 1: FLOPs per token.
        """
        ms = [self.gemm_m.get(d.index) for d in self.decisions]
        per_token = any(m is None for m in ms)
        return [
            LinearRow(d.name, d.k, d.n, d.ratio, m, 2 * (1 if per_token else m) * d.k * d.n, d.pattern if d.quantize else None,
                      "int8" if d.quantize else "float", d.reason, d.backend if d.quantize else None)
            for d, m in zip(self.decisions, ms)
        ]

    def totals(self, rows: Optional[list[LinearRow]] = None) -> dict[str, Any]:
        """Totals over :meth:`rows` (``rows``: the caller's, when it already has them), JSON-ready.

        Returns:
            ``{"linears": n, "int8": n, "float": n, "flops": total, "int8_flops": f, "int8_flop_share": f / total
            (None without Linears), "flops_basis": what M is, "by_decision": {"int8"|"float": {"linears": n,
            "flops": f}}, "by_pattern": {pattern: {"linears": n, "flops": f}}}``; float Linears count under
            the pattern ``"(float)"``.
        """
        rows = self.rows() if rows is None else rows
        by_decision = {k: {"linears": 0, "flops": 0} for k in ("int8", "float")}
        by_pattern: dict[str, dict[str, int]] = {}
        for r in rows:
            for bucket in (by_decision[r.decision], by_pattern.setdefault(r.pattern or _FLOAT_PATTERN, {"linears": 0, "flops": 0})):
                bucket["linears"] += 1
                bucket["flops"] += r.flops
        total = sum(r.flops for r in rows)
        per_token = any(r.m is None for r in rows)
        return {
            "linears": len(rows), "int8": by_decision["int8"]["linears"], "float": by_decision["float"]["linears"],
            "flops": total, "int8_flops": by_decision["int8"]["flops"],
            "int8_flop_share": by_decision["int8"]["flops"] / total if total else None,
            "flops_basis": ("2*K*N per token (M = 1): the capture recorded no shapes" if per_token else
                            "2*M*K*N, M = tokens of the captured example (dynamic dims at the example's size)"),
            "by_decision": by_decision, "by_pattern": dict(sorted(by_pattern.items())),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"target", "front_end", "weight_qmax", "notes", "rows": [LinearRow.as_dict()], "totals":
        :meth:`totals`}``."""
        rows = self.rows()
        return {"target": self.target, "front_end": self.front_end, "weight_qmax": self.weight_qmax,
                "notes": list(self.notes), "rows": [r.as_dict() for r in rows], "totals": self.totals(rows)}

    def summary_table(self, tablefmt: str = "simple") -> str:
        """Per-Linear rows (name, K, N, ratio, M, pattern, decision, reason or backend), then totals per
        pattern and per decision with their share of the model's GEMM FLOPs, and the int8 share
        (:meth:`rows` says how FLOPs are counted). Returns the text (tabulate; ``tablefmt="github"`` for Markdown)."""
        rows = self.rows()
        t = self.totals(rows)
        body = tabulate(
            [[r.name or "(the model itself)", r.k, r.n, f"{r.ratio:.0f}", "?" if r.m is None else r.m, r.pattern or "-",
              r.decision, r.backend if r.decision == "int8" else r.reason] for r in rows],
            headers=["Linear", "K", "N", "K*N/(K+N)", "M", "pattern", "decision", "backend / why float"], tablefmt=tablefmt)

        def share(f: int) -> str:
            """One decimal; a part that would round to 0.0 % or 100.0 % shows as <0.1 % / >99.9 % (a float
            pooler leaves 99.96 % int8, which must not read as all of it)."""
            if not t["flops"]:
                return "-"
            pct = 100 * f / t["flops"]
            if 0 < f < t["flops"] and f"{pct:.1f}" in ("0.0", "100.0"):
                return "<0.1%" if pct < 50 else ">99.9%"
            return f"{pct:.1f}%"

        per_pattern = tabulate([[p, v["linears"], v["flops"], share(v["flops"])] for p, v in t["by_pattern"].items()],
                               headers=["pattern", "Linears", "GEMM FLOPs", "share"], tablefmt=tablefmt)
        per_decision = tabulate([[k, v["linears"], v["flops"], share(v["flops"])] for k, v in t["by_decision"].items()],
                                headers=["decision", "Linears", "GEMM FLOPs", "share"], tablefmt=tablefmt)
        head = (f"{t['int8']}/{t['linears']} Linears int8, {share(t['int8_flops'])} of the GEMM FLOPs "
                f"(FLOPs: {t['flops_basis']})")
        return f"{head}\n\n{body}\n\n{per_pattern}\n\n{per_decision}"

    def table(self, tablefmt: str = "simple") -> str:
        """Per-Linear decision table (tabulate; ``tablefmt="github"`` for Markdown)."""
        rows = [
            [
                d.name or "(the model itself)", d.k, d.n, f"{d.ratio:.0f}", "yes" if d.aligned else "no",
                "int8" if d.quantize else "float",
                d.pattern or "-", d.activation if d.quantize else "-",
                d.input_quant or "-", d.backend or "-",
                d.reason if not d.quantize else "",
            ]
            for d in self.decisions
        ]
        headers = ["Linear", "K", "N", "K*N/(K+N)", "aligned", "decision", "pattern", "epilogue", "input quant", "backend", "why float"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt)

    def summary(self, tablefmt: str = "simple") -> str:
        """Pattern match/reject counts and the fused node counts."""
        rows = []
        for name, s in self.pattern_stats.items():
            reasons = "; ".join(f"{r} ({c})" for r, c in s.reasons.items())
            rows.append([name, s.matched, s.rejected, reasons])
        pat = tabulate(rows, headers=["pattern", "matched", "rejected", "rejection reasons"], tablefmt=tablefmt)
        fused = {k: v for k, v in sorted(self.node_counts.items()) if k.startswith("fxquant.") or k in ("aten.linear", "aten.layer_norm")}
        nodes = tabulate(list(fused.items()), headers=["node", "count"], tablefmt=tablefmt)
        return f"{pat}\n\n{nodes}"

    def __str__(self) -> str:
        head = (
            f"fxquant: {self.num_int8}/{len(self.decisions)} Linears int8 (W8A8, target {self.target}, "
            f"captured with {self.front_end}, int8 weights in [-{self.weight_qmax}, {self.weight_qmax}])"
        )
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        return f"{head}{notes}\n\n{self.table()}\n\n{self.summary()}"


def node_counts(gm: fx.GraphModule) -> dict[str, int]:
    return dict(collections.Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"))


def concrete_shape(val: Any) -> Optional[tuple[int, ...]]:
    """A tensor's shape as ints, a dynamic (symbolic) dimension at the captured example's size; None for a
    non-tensor."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(_concrete(d) for d in val.shape)


def _concrete(d: Any) -> int:
    if isinstance(d, int):
        return d
    node = getattr(d, "node", None)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int(node.shape_env.size_hint(node.expr))


def _leading_dims(node: Any, depth: int = 0) -> Optional[tuple[int, ...]]:
    """The leading dims (all but the last) of a tensor node, read from ``meta["val"]``; for nodes fxquant
    created without one (a norm-quant op, its getitems, a sibling-fused GEMM), from the input they keep the
    leading dims of."""
    if not isinstance(node, fx.Node) or depth > 8:
        return None
    shape = concrete_shape(node.meta.get("val"))
    if shape:
        return shape[:-1]
    if node.op == "call_function" and node.target is operator.getitem:
        return _leading_dims(node.args[0], depth + 1)
    if ops.FusedLinear.is_fused_linear(node):
        a = ops.FusedLinear.of(node)
        return _leading_dims(a.x if a.x is not None else a.x_q, depth + 1)
    contract = ops.contract_of(node)
    if contract is not None:  # every fused op's first argument is the activation it reads
        return _leading_dims(getattr(contract.record_of(node), contract.fields[0]), depth + 1)
    return None


def gemm_rows(gm: fx.GraphModule) -> dict[int, Optional[int]]:
    """``{decision.index: M}`` for every Linear call of a fused graph: M = the product of its input's leading
    dims at the captured example (a dynamic dim at the example's size); None where the capture recorded no
    shapes."""
    rows: dict[int, Optional[int]] = {}
    for node in gm.graph.nodes:
        if ops.FusedLinear.is_fused_linear(node):
            a = ops.FusedLinear.of(node)
            lead = _leading_dims(a.x if a.x is not None else a.x_q)
            decisions = members_of(node)
        elif AtenLinear.matches(node) and node.meta.get(META_KEY):
            lead = _leading_dims(AtenLinear.of(node).input)
            decisions = (node.meta[META_KEY],)
        else:
            continue
        if lead is None:
            lead = _leading_dims(node)  # the output keeps the input's leading dims
        for d in decisions:
            rows[d.index] = math.prod(lead) if lead is not None else None
    return rows


# Which pattern made each fused op that computes no Linear itself (its Linears' pattern names say theirs).
_OP_PATTERN = {"fxquant.layer_norm_quant": "layer_norm_linear", "fxquant.rms_norm_quant": "rms_norm_linear",
               "fxquant.quantize_per_token": "shared_input_quant"}


def node_pattern(node: fx.Node) -> Optional[str]:
    """The pattern(s) behind a fused node: a fused Linear's decisions' ``pattern`` (``+``-joined, e.g.
    ``linear_act+layer_norm_linear``), the norm pattern for a norm-quant op, ``shared_input_quant`` for a
    shared quantization; None for any other node (a float Linear included)."""
    members = members_of(node)
    if members and ops.FusedLinear.is_fused_linear(node):
        return members[0].pattern
    if ops.contract_of(node) is not None:
        return _OP_PATTERN.get(op_name(node.target))
    return None


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def node_module(node: fx.Node) -> Optional[str]:
    """Module path of the code a node comes from: for Linears (fused or float) the Linear's name (the
    common prefix when a fused GEMM computes several); else the innermost module of
    ``meta["nn_module_stack"]``; for nodes without one (a shared quantization fxquant inserted, getitems)
    the common module of its users. None for inputs, outputs and attributes."""
    if node.op in ("placeholder", "output", "get_attr"):
        return None
    members = members_of(node) or ((node.meta[META_KEY],) if isinstance(node.meta.get(META_KEY), LinearDecision) else ())
    if members:
        return _common_prefix([d.name for d in members]) if len(members) > 1 else members[0].name
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    users = [m for m in (node_module(u) for u in node.users if u.op == "call_function") if m is not None]
    return _common_prefix(users) if users else None


def _short_dtype(val: Any) -> Optional[str]:
    return str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else None


def to_networkx(gm: fx.GraphModule):
    """The graph as a ``networkx.DiGraph``: one node per FX node (keyed by node name), an edge for every
    use-def edge.

    Node attributes:
        ``op`` (FX op), ``target`` (``op_name``), ``module`` (:func:`node_module`), ``pattern``
        (:func:`node_pattern`), ``shape`` / ``dtype`` (the output's, dynamic dims at the example's size;
        None where the capture recorded none, e.g. on nodes fxquant created), ``in_shapes`` / ``in_dtypes``
        (the tensor inputs', same rule), and for Linears: ``decision`` (the :class:`LinearDecision`; for a
        fused GEMM computing several Linears, the first), ``members`` (every Linear's decision), ``precision``
        (``"int8"`` or ``"float"``; None for other nodes), ``k``, ``n`` (the GEMM's: several members' N add
        up), ``ratio`` (K·N/(K+N) of that GEMM), ``reason`` and ``backend`` (members' values, ``; ``-joined
        when they differ).
    """
    import networkx as nx

    g = nx.DiGraph()
    for node in gm.graph.nodes:
        members = members_of(node)
        decision = node.meta.get(META_KEY) or (members[0] if members else None)
        decisions = members or ((decision,) if isinstance(decision, LinearDecision) else ())
        inputs = [i.meta.get("val") for i in node.all_input_nodes if i.op != "get_attr"]
        attrs = dict(op=node.op, target=op_name(node.target), decision=decision, members=members,
                     module=node_module(node), pattern=node_pattern(node),
                     shape=concrete_shape(node.meta.get("val")), dtype=_short_dtype(node.meta.get("val")),
                     in_shapes=[concrete_shape(v) for v in inputs], in_dtypes=[_short_dtype(v) for v in inputs],
                     precision=None, k=None, n=None, ratio=None, reason=None, backend=None)
        if decisions:
            k, n = decisions[0].k, sum(d.n for d in decisions)
            attrs.update(precision="int8" if decisions[0].quantize else "float", k=k, n=n, ratio=beneficial_ratio(k, n),
                         reason="; ".join(dict.fromkeys(d.reason for d in decisions)),
                         backend="; ".join(dict.fromkeys(d.backend for d in decisions if d.backend)) or None)
        g.add_node(node.name, **attrs)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g
