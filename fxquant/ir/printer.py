"""The golden text of a graph: one deterministic line per node, for snapshot tests, for the debug dumps
written after every pass (``compile(..., debug_dir=)``, ``FXQUANT_DEBUG_DIR``) and for reading."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from . import ops
from .attrs import fetch_attr

__all__ = ["golden_text", "op_name"]


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
