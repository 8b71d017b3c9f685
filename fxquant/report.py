"""Reading a fused graph: the decision table, pattern counts, a networkx view and the golden text form."""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate

from . import ops
from ._attrs import fetch_attr
from .rewrite import META_KEY, LinearDecision, members_of

__all__ = ["Report", "golden_text", "to_networkx", "op_name"]


def op_name(target: Any) -> str:
    """Short, version-stable name of a call target: ``aten.linear``, ``fxquant.int8_linear``, ``getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.name().split("::")
        return f"{ns}.{name.split('.')[0]}"
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


@dataclass
class Report:
    """What ``fxquant.compile`` decided, for people and for tests.

    Attributes:
        decisions: one :class:`LinearDecision` per Linear of the model, in graph order.
        pattern_stats: ``{pattern: {"matched": n, "rejected": n, <reason>: n}}``.
        node_counts: fused-graph ``op_name`` → count, for call_function nodes.
        target, front_end, weight_qmax: the compile settings that shaped the graph.
    """

    decisions: list[LinearDecision]
    pattern_stats: dict[str, dict[str, int]]
    node_counts: dict[str, int]
    target: str
    front_end: str
    weight_qmax: int
    notes: list[str] = field(default_factory=list)

    @property
    def num_int8(self) -> int:
        return sum(d.quantize for d in self.decisions)

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
            reasons = "; ".join(f"{r} ({c})" for r, c in s.items() if r not in ("matched", "rejected"))
            rows.append([name, s["matched"], s["rejected"], reasons])
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


def _fmt_arg(a: Any, ids: dict[fx.Node, str]) -> str:
    if isinstance(a, fx.Node):
        return ids[a]
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x, ids) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    if isinstance(a, float):
        return repr(a)
    return repr(a) if isinstance(a, str) else str(a)


# Fused-op arguments that depend on the machine (kernel backend, CPU-dependent weight range), not on the graph.
_MACHINE_FIELDS = ("backend", "w_qmax")
# Bookkeeping nodes whose presence varies across torch versions.
_BOOKKEEPING = {"aten.sym_size", "aten._assert_tensor_metadata", "aten._assert_scalar", "_assert_scalar", "sym_constrain_range_for_size"}


def golden_text(gm: fx.GraphModule, only_fused: bool = False) -> str:
    """Compact, deterministic text of a fused graph, for snapshot tests.

    One line per node: ``%3 = fxquant.int8_linear(%0, @fc1.weight:int8[64,32], ...)``. Nodes are numbered
    in order; attributes print as ``@path:dtype[shape]``; the kernel backend and weight range are left out
    (they depend on the machine, not the graph); torch-version-specific bookkeeping nodes are dropped.
    ``only_fused`` keeps just fxquant nodes and remaining Linears / LayerNorms (for big models).
    """
    ids: dict[fx.Node, str] = {}
    lines = []
    counter = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ids[node] = f"%{node.target}"
            if not only_fused:
                lines.append(f"input {ids[node]}")
            continue
        if node.op == "get_attr":
            t = fetch_attr(gm, node.target)
            desc = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            ids[node] = f"@{node.target}:{desc}"
            continue
        if node.op == "output":
            if not only_fused:
                lines.append(f"return {_fmt_arg(node.args[0], ids)}")
            continue
        name = op_name(node.target) if node.op == "call_function" else f"{node.op}:{node.target}"
        if name in _BOOKKEEPING or name.startswith("call_module:_guards"):
            ids[node] = "%_"
            continue
        keep = not only_fused or name.startswith("fxquant.") or name in ("aten.linear", "aten.layer_norm") or (
            name == "getitem" and op_name(node.args[0].target).startswith("fxquant.")
        )
        if not keep:
            ids[node] = "%_"  # hidden in the only_fused form; unnumbered so hidden nodes never shift ids
            continue
        args = list(node.args)
        contract = ops.contract_of(node)
        if contract is not None:
            args = ["*" if f in _MACHINE_FIELDS else a for f, a in zip(contract.fields, args)]
        ids[node] = f"%{counter}"
        counter += 1
        kw = "".join(f", {k}={_fmt_arg(v, ids)}" for k, v in node.kwargs.items())
        lines.append(f"{ids[node]} = {name}({', '.join(_fmt_arg(a, ids) for a in args)}{kw})")
    return "\n".join(lines) + "\n"


def node_counts(gm: fx.GraphModule) -> dict[str, int]:
    return dict(collections.Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"))


def to_networkx(gm: fx.GraphModule):
    """The graph as a ``networkx.DiGraph``: one node per FX node (keyed by node name) with attributes
    ``op``, ``target`` (``op_name``) and, for Linears, ``decision`` (the :class:`LinearDecision`; for a
    fused GEMM computing several Linears, the first) and ``members`` (every Linear's decision);
    an edge for every use-def edge."""
    import networkx as nx

    g = nx.DiGraph()
    for node in gm.graph.nodes:
        members = members_of(node)
        g.add_node(node.name, op=node.op, target=op_name(node.target),
                   decision=node.meta.get(META_KEY) or (members[0] if members else None), members=members)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g
