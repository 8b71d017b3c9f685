"""Drawing a fused graph: matplotlib (a pure-Python wheel, no Graphviz) with a layered top-to-bottom layout.

``QuantizedModel.draw()`` calls :func:`draw_graph`. Install the dependency with ``pip install 'fxquant[draw]'``.
"""

from __future__ import annotations

import io
import operator
import os
import tempfile
from typing import Optional

import torch.fx as fx

from ..ir import ops
from ..ir.meta import META_KEY, LinearDecision, members_of
from .report import node_module, node_pattern, op_name

__all__ = ["Drawing", "draw_graph", "FORMATS"]

FORMATS = ("svg", "png")
NODE_GID = "fxnode-"  # SVG id prefix of each drawn node's group: one per node
_BOOKKEEPING = {"aten.sym_size", "aten._assert_tensor_metadata", "aten._assert_scalar", "_assert_scalar",
                "sym_constrain_range_for_size"}
_NORMS = {"aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten.group_norm", "aten.batch_norm",
          "aten._native_batch_norm_legit_no_training"}
_ATTENTION = {"aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention",
              "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention_for_cpu"}
# Colours of the patterns' nodes (the legend names them); others cycle through _PALETTE in name order.
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f", "#e15759", "#bab0ac")
_FLOAT_EDGE = "#d62728"
_INT8_EDGE = "#1f5fa8"


class Drawing:
    """A rendered graph. Jupyter shows it inline (``_repr_svg_``; ``_repr_png_`` too when drawn as PNG).

    Attributes:
        svg: the SVG text (always rendered); data: the bytes of ``format``; format: ``"svg"`` or ``"png"``;
        path: where it was written, or None; nodes: the FX node names drawn, top to bottom;
        patterns: the pattern names in the legend.
    """

    def __init__(self, svg: str, data: bytes, fmt: str, nodes: list[str], patterns: list[str], path: Optional[str]):
        self.svg, self.data, self.format, self.nodes, self.patterns, self.path = svg, data, fmt, nodes, patterns, path

    def _repr_svg_(self) -> str:
        return self.svg

    def _repr_png_(self) -> Optional[bytes]:
        return self.data if self.format == "png" else None

    def save(self, path: str | os.PathLike) -> str:
        """Write the drawing to ``path`` (a temp file in the same folder, then renamed); returns the path.
        Raises OSError when the folder is missing or unwritable."""
        return _write_atomic(os.fspath(path), self.data)

    def __repr__(self) -> str:
        where = f", written to {self.path}" if self.path else ""
        return f"<fxquant Drawing: {len(self.nodes)} nodes, {self.format}{where}>"


def format_for(path: Optional[str | os.PathLike], fmt: Optional[str]) -> str:
    """The drawing format: ``fmt`` when given, else the path's suffix, else ``"svg"``. Raises ValueError for
    any other format (or a suffix that is neither .svg nor .png when ``fmt`` is not given)."""
    if fmt is None:
        suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".") if path is not None else ""
        fmt = suffix or "svg"
        if fmt not in FORMATS:
            raise ValueError(f"cannot draw to {os.fspath(path)!r}: give a .svg or .png path, or format='svg' / 'png'")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return fmt


def _write_atomic(path: str, data: bytes) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fxquant-draw-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _import_matplotlib():
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("drawing needs matplotlib: install it with `pip install 'fxquant[draw]'`",
                                  name="matplotlib") from e
    return matplotlib


# ------------------------------------------------------------------------------------------- selection
def _name(node: fx.Node) -> str:
    return op_name(node.target) if node.op == "call_function" else f"{node.op}:{node.target}"


def _hidden(node: fx.Node) -> bool:
    """Never a box of its own: attributes, bookkeeping, guards, and getitems (drawn as their producer)."""
    return (node.op == "get_attr" or _name(node) in _BOOKKEEPING or node.op == "call_module"
            or (node.op == "call_function" and node.target is operator.getitem))


def _landmark(node: fx.Node) -> bool:
    """Kept in a whole-model drawing: inputs, outputs, fused nodes, Linears, norms and attention."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op != "call_function" or _hidden(node):
        return False
    name = _name(node)
    return ops.contract_of(node) is not None or name == "aten.linear" or name in _NORMS or name in _ATTENTION


def _in_block(node: fx.Node, block: str) -> bool:
    m = node_module(node)
    return m is not None and (m == block or m.startswith(block + "."))


def select(gm: fx.GraphModule, block: Optional[str] = None) -> tuple[list[fx.Node], list[tuple[fx.Node, fx.Node]], set[fx.Node]]:
    """The nodes a drawing shows, in graph order, its edges, and the boundary nodes (outside ``block``,
    feeding it). Collapsed nodes pass their edges through: an edge A → B means B reads A through nodes not
    drawn. Raises ValueError when ``block`` matches no node."""
    nodes = list(gm.graph.nodes)
    if block is None:
        kept = {n for n in nodes if _landmark(n)}
        inner = kept
    else:
        inner = {n for n in nodes if n.op == "call_function" and not _hidden(n) and _in_block(n, block)}
        if not inner:
            tops = sorted({".".join(m.split(".")[:3]) for m in (node_module(n) for n in nodes) if m and not m.startswith("_")})
            raise ValueError(f"block {block!r} matches no node of the graph; module prefixes there: "
                             f"{', '.join(tops[:12])}{' ...' if len(tops) > 12 else ''}")
        kept = inner | {n for n in nodes if _landmark(n)}
    frontier: dict[fx.Node, frozenset] = {}
    preds: dict[fx.Node, set[fx.Node]] = {}
    for n in nodes:
        if n.op == "get_attr" or _name(n) in _BOOKKEEPING:  # attributes and sizes are no dataflow worth an edge
            frontier[n] = frozenset()
            continue
        reach: set[fx.Node] = set()
        for i in n.all_input_nodes:
            reach |= frontier.get(i, frozenset())
        if n in kept:
            preds[n] = reach
            frontier[n] = frozenset((n,))
        else:
            frontier[n] = frozenset(reach)
    boundary: set[fx.Node] = set()
    if block is not None:
        for n in inner:
            boundary |= {p for p in preds[n] if p not in inner}
    drawn = [n for n in nodes if n in inner or n in boundary]
    shown = set(drawn)
    edges = [(p, n) for n in drawn if n in inner for p in sorted(preds[n], key=nodes.index) if p in shown]
    return drawn, edges, boundary


# --------------------------------------------------------------------------------------------- layout
def layered_layout(drawn: list[fx.Node], edges: list[tuple[fx.Node, fx.Node]]) -> dict[fx.Node, tuple[float, int]]:
    """Sugiyama-style positions ``{node: (x, layer)}``: longest-path layers from the sources (layer 0 on top),
    order in a layer by the barycentre of the predecessors (two sweeps), then x at that barycentre, pushed
    apart to one unit between neighbours, so a chain of single nodes stays one straight column."""
    preds: dict[fx.Node, list[fx.Node]] = {n: [] for n in drawn}
    for a, b in edges:
        preds[b].append(a)
    succs: dict[fx.Node, list[fx.Node]] = {n: [] for n in drawn}
    for a, b in edges:
        succs[a].append(b)
    layer: dict[fx.Node, int] = {}
    for n in drawn:  # graph order is topological
        layer[n] = 1 + max((layer[p] for p in preds[n]), default=-1)
    for n in drawn:  # a source (an input) sits just above its first reader, not at the top
        if not preds[n] and succs[n]:
            layer[n] = max(0, min(layer[s] for s in succs[n]) - 1)
    layers: dict[int, list[fx.Node]] = {}
    for n in drawn:
        layers.setdefault(layer[n], []).append(n)
    x: dict[fx.Node, float] = {}
    for depth in sorted(layers):
        row = layers[depth]
        want = {n: (sum(x[p] for p in preds[n]) / len(preds[n]) if preds[n] else float(i)) for i, n in enumerate(row)}
        row.sort(key=lambda n: want[n])
        placed: list[float] = []
        for n in row:
            placed.append(max(want[n], placed[-1] + 1.0) if placed else want[n])
        shift = sum(want[n] - p for n, p in zip(row, placed)) / len(row)  # keep the row centred on its wishes
        for n, p in zip(row, placed):
            x[n] = p + shift
    return {n: (x[n], layer[n]) for n in drawn}


# --------------------------------------------------------------------------------------------- labels
def _short(name: str, parts: int = 2) -> str:
    return ".".join(name.split(".")[-parts:]) if name else "(root)"


def _short_reason(d: LinearDecision) -> str:
    if d.rule is None:
        return d.reason[:28]
    if d.rule.value == "ratio":
        return f"ratio {d.ratio:.0f} too small"
    return d.rule.value.replace("_", " ")


def _module_label(name: str, block: Optional[str], width: int = 34) -> str:
    """A module path as a box shows it: relative to the drawn block, else its tail within ``width``."""
    if block and name.startswith(block + "."):
        return name[len(block) + 1:]
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _label(node: fx.Node, block: Optional[str] = None) -> str:
    if node.op == "placeholder":
        return f"input {node.target}"
    if node.op == "output":
        return "output"
    name = _name(node).removeprefix("aten.").removeprefix("fxquant.")
    members = members_of(node)
    if members and ops.FusedLinear.is_fused_linear(node):
        act = ops.FusedLinear.of(node).activation
        names = ", ".join(_short(d.name, 1) for d in members) if len(members) > 1 else _module_label(members[0].name, block)
        n = sum(d.n for d in members)
        return f"{name}{'' if act == 'none' else ' + ' + act}\n{names}\nK{members[0].k} N{n}"
    d = node.meta.get(META_KEY)
    if isinstance(d, LinearDecision):
        return f"linear (float)\n{_module_label(d.name, block)}\nK{d.k} N{d.n}: {_short_reason(d)}"
    module = node_module(node)
    return f"{name}\n{_module_label(module, block)}" if module else name


def _int8_edge(a: fx.Node, b: fx.Node) -> bool:
    """An edge that carries the int8 copy of a tensor: a norm-quant or shared quantization into an int8 Linear
    that reads it already quantized."""
    return b.target is ops.INT8_LINEAR_Q and ops.contract_of(a) is not None and not ops.FusedLinear.is_fused_linear(a)


# -------------------------------------------------------------------------------------------- drawing
def draw_graph(gm: fx.GraphModule, path: Optional[str | os.PathLike] = None, *, block: Optional[str] = None,
               format: Optional[str] = None, title: Optional[str] = None) -> Drawing:  # noqa: A002 - the user-facing name
    """Render a fused graph as SVG or PNG, top to bottom (see :meth:`fxquant.QuantizedModel.draw`).

    Whole model (``block=None``): only inputs, outputs, fused nodes (``fxquant.*``), Linears (float
    ``aten.linear``), norms and attention are drawn; everything else (reshapes, views, transposes,
    elementwise ops, embeddings, masks, getitems, attributes) is collapsed, its edges passed through.
    With ``block`` (a module prefix, ``"encoder.layer.0"``): every op whose module is ``block`` or below it
    (getitems, attributes and bookkeeping still collapsed), plus the nodes outside that feed it, drawn grey.

    Returns:
        a :class:`Drawing` (written to ``path`` when given, through a temp file renamed into place).

    Raises:
        ModuleNotFoundError: matplotlib is missing (``pip install 'fxquant[draw]'``).
        ValueError: ``block`` matches no node; ``format`` (or ``path``'s suffix) is not svg or png.
        OSError: ``path`` cannot be written.
    """
    fmt = format_for(path, format)
    mpl = _import_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
    from matplotlib.lines import Line2D

    drawn, edges, boundary = select(gm, block)
    pos = layered_layout(drawn, edges)
    patterns = sorted({p for p in (node_pattern(n) for n in drawn if n not in boundary) if p})
    colours = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(patterns)}
    xs = [x for x, _ in pos.values()]
    depth = max(layer for _, layer in pos.values()) + 1
    x0, x1 = min(xs), max(xs)
    box_w, box_h, col_w, row_h = 0.86, 0.62, 2.3, 0.95  # box in units; inches per unit and per layer
    fig = Figure(figsize=(max(6.0, (x1 - x0 + 1) * col_w + 2.6), max(3.0, depth * row_h + 1.2)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(x0 - 0.6, x1 + 0.6 + 2.6 / col_w)
    ax.set_ylim(depth - 0.3, -0.9)
    ax.axis("off")
    for n in drawn:
        x, y = pos[n]
        pattern = node_pattern(n) if n not in boundary else None
        float_linear = _name(n) == "aten.linear"
        face = colours[pattern] if pattern else ("#ffffff" if float_linear else "#eeeeee")
        edge = _FLOAT_EDGE if float_linear else ("#999999" if n in boundary else "#333333")
        box = FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02,rounding_size=0.08",
                             facecolor=face, edgecolor=edge, linewidth=2.0 if float_linear else 0.8,
                             linestyle="--" if n in boundary else "-", gid=f"{NODE_GID}{n.name}")
        ax.add_patch(box)
        ax.text(x, y, _label(n, block), ha="center", va="center", fontsize=6.5, color="#222222" if not pattern else "#000000",
                gid=f"fxlabel-{n.name}", clip_on=False)
    for a, b in edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        int8 = _int8_edge(a, b)
        span = yb - ya
        # an edge over several layers (a residual, a mask) bows to the side, clear of the boxes between
        rad = 0.0 if span <= 1 else -min(0.5, 2.6 * row_h / (span * row_h + abs(xb - xa) * col_w))
        ax.add_patch(FancyArrowPatch((xa, ya + box_h / 2), (xb, yb - box_h / 2), arrowstyle="-|>", mutation_scale=7,
                                     color=_INT8_EDGE if int8 else ("#888888" if span <= 1 else "#b0b0b0"),
                                     linewidth=1.8 if int8 else 0.7, connectionstyle=f"arc3,rad={rad:.3f}",
                                     gid=f"fxedge-{a.name}-{b.name}"))
    handles = [Patch(facecolor=colours[p], edgecolor="#333333", label=p) for p in patterns]
    handles.append(Patch(facecolor="#ffffff", edgecolor=_FLOAT_EDGE, linewidth=2.0, label="float Linear (why)"))
    handles.append(Patch(facecolor="#eeeeee", edgecolor="#333333", label="other op"))
    handles.append(Line2D([], [], color=_INT8_EDGE, linewidth=1.8, label="int8 tensor (quantized once)"))
    legend = ax.legend(handles=handles, loc="upper right", fontsize=7, title="pattern", title_fontsize=7, frameon=True)
    legend.set_gid("fxlegend")
    heading = title or ("fxquant fused graph" + (f": {block}" if block else " (reshapes, views and elementwise ops collapsed)"))
    ax.text(x0 - 0.55, -0.75, heading, ha="left", va="center", fontsize=8, fontweight="bold")
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fxquant"}):
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        svg = buf.getvalue()
        data = svg
        if fmt == "png":
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
            data = buf.getvalue()
    written = _write_atomic(os.fspath(path), data) if path is not None else None
    return Drawing(svg.decode("utf-8"), data, fmt, [n.name for n in drawn], patterns, written)
