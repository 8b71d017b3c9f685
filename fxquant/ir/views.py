"""Typed views of the ATen nodes fxquant reads: ``aten.linear``, ``aten.layer_norm``,
``aten.scaled_dot_product_attention``, ``aten.slice`` and ``aten.embedding``, the way :class:`fxquant.ir.ops.FusedLinear` views fxquant's own.

Each view is a NamedTuple whose fields are the op's argument names, taken from the op's own schema
(``OpOverload._schema``), so a pass reads ``AtenLinear.of(node).weight`` instead of ``node.args[1]`` and a
node written with keyword arguments reads the same. Nothing outside this module indexes an ATen node's
``args`` by position.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

import torch
import torch.fx as fx

__all__ = ["AtenView", "AtenLinear", "AtenLayerNorm", "AtenSDPA", "AtenSlice", "AtenEmbedding", "attr_target",
           "static_size", "sizes", "static_shape"]

aten = torch.ops.aten


class AtenView:
    """The argument record of one ATen overload, built from its schema.

    ``matches(node)`` tells whether ``node`` calls the op; ``of(node)`` reads its arguments as the record
    (defaults filled in); ``set(node, record)`` rewrites them (positional, as torch.export writes them).
    """

    def __init__(self, op: torch._ops.OpOverload):
        self.op = op
        fields, defaults = [], []
        for a in op._schema.arguments:
            if a.kwarg_only and not a.has_default_value():
                raise TypeError(f"{op}: keyword-only argument {a.name} without default")  # pragma: no cover
            fields.append(a.name)
            if a.has_default_value():
                defaults.append(a.default_value)
            elif defaults:  # pragma: no cover - schemas keep defaults trailing
                raise TypeError(f"{op}: non-default argument {a.name} after a default one")
        self.record = collections.namedtuple(op._schema.name.split("::")[-1].title().replace("_", ""), fields,
                                             defaults=defaults)
        self._positional = sum(1 for a in op._schema.arguments if not a.kwarg_only)

    def matches(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_function" and node.target is self.op

    def of(self, node: fx.Node):
        assert self.matches(node), f"{node.format_node()} is not a {self.op} node"
        return self.record(*node.args, **node.kwargs)

    def set(self, node: fx.Node, record) -> None:
        values = list(record)
        node.args = tuple(values[: self._positional])
        node.kwargs = {f: v for f, v in zip(record._fields[self._positional:], values[self._positional:])}

    def update(self, node: fx.Node, **changes: Any) -> None:
        """Change some arguments in place, each where the node holds it (positionally or by keyword); an
        argument the node leaves at its default is added by keyword, or dropped when set back to it."""
        assert self.matches(node), f"{node.format_node()} is not a {self.op} node"
        args, kwargs = list(node.args), dict(node.kwargs)
        defaults = self.record._field_defaults
        for name, value in changes.items():
            i = self.record._fields.index(name)
            if i < len(args):
                args[i] = value
            elif name in defaults and value == defaults[name] and type(value) is type(defaults[name]):
                kwargs.pop(name, None)
            else:
                kwargs[name] = value
        node.args, node.kwargs = tuple(args), kwargs


AtenLinear = AtenView(aten.linear.default)                       # (input, weight, bias=None)
AtenLayerNorm = AtenView(aten.layer_norm.default)                # (input, normalized_shape, weight, bias, eps, ...)
AtenSDPA = AtenView(aten.scaled_dot_product_attention.default)   # (query, key, value, attn_mask, ..., is_causal, ...)
AtenSlice = AtenView(aten.slice.Tensor)                          # (self, dim, start, end, step)
AtenEmbedding = AtenView(aten.embedding.default)                 # (weight, indices, padding_idx, ...)


def attr_target(value: Any) -> Optional[str]:
    """The attribute path a ``get_attr`` node reads (``model.layers.0.q_proj.weight``), else None."""
    return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None


def static_size(d: Any) -> Optional[int]:
    """A dimension's size when the capture fixed it (an int, or a SymInt torch.export specialized to a number),
    else None (dynamic)."""
    if isinstance(d, int):
        return d
    expr = getattr(getattr(d, "node", None), "expr", None)
    return int(expr) if expr is not None and getattr(expr, "is_number", False) else None


def sizes(node: Any) -> Optional[tuple[Optional[int], ...]]:
    """The shape of a tensor node's captured value (``meta["val"]``), each dimension its :func:`static_size` (None
    where dynamic), or None (no value, not a tensor)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(static_size(d) for d in val.shape) if hasattr(val, "shape") else None


def static_shape(node: Any) -> Optional[tuple[int, ...]]:
    """The shape of a tensor node's captured value (``meta["val"]``) when every dimension is fixed, else None (no
    value, not a tensor, or a dynamic dimension)."""
    shape = sizes(node)
    return None if shape is None or None in shape else shape
