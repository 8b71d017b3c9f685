"""Calibration: static per-tensor activation scales, and SmoothQuant.

**Static scales** (``QuantConfig(activation_scheme="static-per-tensor")``). Every quantizing node of the fused
graph (a norm that quantizes its output, a shared ``quantize_per_token``, an ``int8_linear`` that quantizes its
own input) is observed over the calibration batches while the graph runs in its dynamic form; then each gets
one fp32 scale (compressed-tensors ``QuantizationArgs(strategy="tensor", dynamic=False, symmetric=True)``;
the form of TensorRT's explicit quantization)::

    minmax:      s = max(max over batches of max|x|, ε) / 127
    percentile:  s = max(mean over batches of the p-th percentile of |x|, ε) / 127      (ε = 2⁻²³·127)

and the node quantizes with it: x_q = clamp(round(x / s), ±127) (``fxquant.ir.reference.quantize_per_token``).
``x`` is the value the node quantizes: the norm's output, or the Linear's input, times the SmoothQuant factor
where one is installed.

**SmoothQuant** (Xiao et al. 2023, "SmoothQuant", arXiv 2211.10438, §4, eq. 3-4). For each group of int8
Linears reading one tensor X (q/k/v after a norm, say), from the float model's per-channel activation maxima
over the calibration batches::

    s_j = max|X_j|^α / max|W_j|^(1-α)        (max over tokens; over the rows of every Linear of the group)
    X̂ = X · diag(s)⁻¹,   Ŵ = W · diag(s)     so X̂ Ŵᵀ = X Wᵀ

Ŵ is quantized instead of W (the user's model is untouched: the graph gets new tensors). The factor diag(s)⁻¹
is applied by the quantizing node itself, in the same pass (``act_smooth``), rather than folded into the
preceding norm's γ and β as the paper does: in post-norm encoders (BERT, MiniLM) the norm's output also feeds
the residual, which must see X, not X̂; the fused kernel multiplies once per element either way, and the
float model's outputs are unchanged up to rounding in every case (the Linears' and the residual's).
Channels where max|X_j| or max|W_j| is 0 keep s_j = 1. A group is left alone when one of its weights is read
by anything but the group's Linears (a weight tied to an embedding, a module called on several inputs).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ..errors import CalibrationError, InputError
from ..ir import ops, reference
from ..ir.attrs import fetch_attr, parent_for
from ..ir.meta import decision_of, members_of, set_decision
from ..ir.views import AtenLinear

__all__ = ["calibrate_graphs", "batches_of", "quantizing_nodes", "smoothquant", "install_smoothing", "static_scale"]

aten = torch.ops.aten
_SCALE_FLOOR = reference.EPS  # the per-token scale's floor, for a tensor that is zero on every batch


def _as_call(batch: Any, index: int) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, tuple):
        return batch, {}
    if isinstance(batch, list):
        return tuple(batch), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    raise CalibrationError(f"calibration batch {index} is a {type(batch).__name__}; give each batch as the model is "
                           "called: a tensor, a tuple of positional args or a dict of keyword args (e.g. a tokenizer's "
                           "output as dict)")


def batches_of(batches: Iterable[Any]) -> list[tuple[tuple, dict]]:
    """The calibration batches as ``(args, kwargs)``, read once (an iterator is consumed here).

    Raises:
        CalibrationError: ``batches`` is not iterable or holds no batch, or a batch is not a tensor, tuple or dict.
    """
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise CalibrationError(f"calibration data must be an iterable of batches (a list of dicts or tuples, a "
                               f"DataLoader), got {type(batches).__name__}; wrap a single batch as [batch]")
    calls = [_as_call(b, i) for i, b in enumerate(batches)]
    if not calls:
        raise CalibrationError("calibration data is empty: give at least one batch (the SmoothQuant paper uses 512 "
                               "sentences; 100 are typical for encoders)")
    return calls


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False)


# ------------------------------------------------------------------------------------------ observing
class _Observers:
    """What the observer nodes of an instrumented graph report to, per key."""

    active: Optional["_Observers"] = None

    def __init__(self, method: str, percentile: float):
        self.method, self.q = method, percentile / 100.0
        self.amax: dict[Any, torch.Tensor] = {}
        self.pcts: dict[Any, list[torch.Tensor]] = {}
        self.channels: dict[Any, torch.Tensor] = {}

    def tensor(self, key, x: torch.Tensor) -> None:
        a = x.detach().abs().to(torch.float32)
        m = a.amax() if a.numel() else a.new_zeros(())
        if torch.isfinite(m):
            self.amax[key] = torch.maximum(self.amax[key], m) if key in self.amax else m
        if self.method == "percentile" and a.numel():
            flat = a.reshape(-1)
            k = min(flat.numel(), max(1, math.ceil(self.q * flat.numel())))
            self.pcts.setdefault(key, []).append(flat.kthvalue(k).values)

    def per_channel(self, key, x: torch.Tensor) -> None:
        a = x.detach().abs().to(torch.float32).reshape(-1, x.shape[-1]).amax(dim=0)
        self.channels[key] = torch.maximum(self.channels[key], a) if key in self.channels else a

    def value(self, key) -> Optional[torch.Tensor]:
        if self.method == "percentile" and key in self.pcts:
            return torch.stack(self.pcts[key]).mean()
        return self.amax.get(key)


def _observe_channels(key, x):
    _Observers.active.per_channel(key, x)


def _observe_quantized(key, target, *args):
    """Observe what a quantizing node quantizes: its input, or the float output of its norm, times its
    SmoothQuant factor."""
    y = ops.quantized_value(target, *args)
    smooth = ops.CONTRACTS[target].record(*args).act_smooth
    _Observers.active.tensor(key, y if smooth is None else y.to(torch.float32) * smooth)


_QUANTIZING = (ops.QUANTIZE_PER_TOKEN, ops.INT8_LINEAR, ops.LAYER_NORM_QUANT, ops.RMS_NORM_QUANT)


def quantizing_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of a fused graph that quantize an activation, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _QUANTIZING]


def _run_instrumented(gm: fx.GraphModule, probes: list[tuple[fx.Node, Callable, tuple]], observers: _Observers,
                      run: Callable[[tuple, dict], Any], calls: list[tuple[tuple, dict]], desc: str, progress: bool) -> None:
    """Insert one observer node before each probe's node (its arguments are defined there), run every batch,
    and take the observers out again (also on error), so the graph is as before."""
    g = gm.graph
    added = []
    for node, fn, args in probes:
        with g.inserting_before(node):
            added.append(g.call_function(fn, args))
    gm.recompile()
    _Observers.active = observers
    try:
        for i, (args, kwargs) in enumerate(_progress(calls, desc, progress)):
            try:
                run(args, kwargs)
            except (InputError, TypeError) as e:
                raise CalibrationError(f"calibration batch {i} cannot be run by the model: {e}") from None
    finally:
        _Observers.active = None
        for n in added:
            g.erase_node(n)
        gm.recompile()


# ------------------------------------------------------------------------------------------ static scales
def static_scale(value: torch.Tensor) -> torch.Tensor:
    """fp32 [1] static scale of an observed |x| statistic: max(value, ε·127) / 127."""
    v = value.to(torch.float32).reshape(1)
    return (v / v.new_full((), 127.0)).clamp_min(_SCALE_FLOOR)


def _scale_owner(node: fx.Node) -> str:
    """Module path under which a quantizing node's tensors live: its first int8 Linear's."""
    if ops.FusedLinear.is_fused_linear(node):
        return members_of(node)[0].name
    for item in node.users:
        for lin in item.users:
            if ops.FusedLinear.is_fused_linear(lin):
                return members_of(lin)[0].name
    return node.name


def _buffer_path(node: fx.Node, leaf: str) -> str:
    """FQN of a quantizing node's ``leaf`` tensor (``input_scale``, ``input_smooth``): under its first int8
    Linear's module path, the same in every graph of the program."""
    owner = _scale_owner(node)
    return f"{owner}.{leaf}" if owner else leaf


def _set_tensor_arg(gm: fx.GraphModule, node: fx.Node, field: str, path: str, value: torch.Tensor) -> None:
    """Make ``value`` the buffer at ``path`` of ``gm`` and the node's ``field`` argument."""
    c = ops.CONTRACTS[node.target]
    record = c.record_of(node)
    current = getattr(record, field)
    if isinstance(current, fx.Node) and current.op == "get_attr":
        owner, name = parent_for(gm, current.target)
        owner._buffers[name] = value
        return
    owner, name = parent_for(gm, path)
    owner.register_buffer(name, value)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(path)
    c.set(node, record._replace(**{field: attr}))


def calibrate_graphs(graphs: list[fx.GraphModule], run: Callable[[tuple, dict], Any], calls: list[tuple[tuple, dict]],
                     method: str, percentile: float, store, progress: bool = True) -> int:
    """Static scales of every quantizing node, observed while ``run`` (which runs ``graphs[0]``, the first
    method) computes each batch; installed in every graph of ``graphs`` (the program's methods) as the store's
    ``<owner FQN>.input_scale`` tensors, one per quantizer, shared. Scales are installed only after the last
    batch ran, so on any error every graph is as before. Returns the number of quantizing nodes calibrated.

    Raises:
        CalibrationError: a batch does not fit the model (named), or a quantizing node saw no finite value.
    """
    gm = graphs[0]
    nodes = quantizing_nodes(gm)
    probes = [(n, _observe_quantized, (n.name, n.target, *n.args)) for n in nodes]
    observers = _Observers(method, percentile)
    _run_instrumented(gm, probes, observers, run, calls, "calibration", progress)
    scales = {}
    for n in nodes:
        v = observers.value(n.name)
        if v is None:
            raise CalibrationError(f"calibration: the quantizing node {n.name} ({_scale_owner(n)}) saw no finite value "
                                   "in any batch; check the batches for NaN / Inf")
        scales[_buffer_path(n, "input_scale")] = static_scale(v)
    for path, s in scales.items():
        store.set_derived(path, s)
    for g in graphs:
        for n in quantizing_nodes(g):
            path = _buffer_path(n, "input_scale")
            if path in scales:
                _set_tensor_arg(g, n, "act_scale", path, scales[path])
        g.graph.lint()
        g.recompile()
    return len(scales)


# ------------------------------------------------------------------------------------------ SmoothQuant
def smoothquant(gm: fx.GraphModule, alpha: float, calls: list[tuple[tuple, dict]], run: Callable[[tuple, dict], Any],
                store, progress: bool = True) -> dict[int, torch.Tensor]:
    """SmoothQuant on an annotated float graph (after the planner's ``annotate``, before fusion): measure each int8
    group's per-channel max|X| over ``calls`` (``run`` runs ``gm``), replace its Linears' weights by W · diag(s)
    in the graph's own module tree, and mark their decisions. The factors and smoothed weights are kept in
    ``store`` by FQN (``<first Linear>.input_smooth``, the weight's own FQN), so a second graph of the same
    program reuses them without measuring. Returns ``{group id: diag(s)⁻¹ as fp32 [K]}`` for
    :func:`install_smoothing`."""
    groups: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        d = decision_of(node) if AtenLinear.matches(node) else None
        if d is not None and d.quantize and d.group is not None:
            groups.setdefault(d.group, []).append(node)
    groups = {g: lins for g, lins in groups.items() if _smoothable(gm, lins)}
    if not groups:
        return {}
    key = {g: f"{decision_of(lins[0]).name}.input_smooth" for g, lins in groups.items()}
    measure = {g: lins for g, lins in groups.items() if store.get_derived(key[g]) is None}
    observers = _Observers("minmax", 100.0)
    if measure:
        probes = [(lins[0], _observe_channels, (g, AtenLinear.of(lins[0]).input)) for g, lins in measure.items()]
        _run_instrumented(gm, probes, observers, run, calls, "SmoothQuant statistics", progress)
    factors = {}
    for g, lins in groups.items():
        targets = [AtenLinear.of(lin).weight.target for lin in lins]
        inverse = store.get_derived(key[g])
        if inverse is None:
            x_max = observers.channels.get(g)
            if x_max is None:
                continue
            weights = [fetch_attr(gm, target) for target in targets]
            w_max = torch.stack([w.detach().abs().to(torch.float32).amax(dim=0) for w in weights]).amax(dim=0)
            x_max = x_max.to(w_max.device)
            s = (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(1e-5)
            s = torch.where((x_max > 0) & (w_max > 0) & torch.isfinite(s), s, torch.ones_like(s))
            for target, w in zip(targets, weights):
                store.set_derived(target, (w.detach().to(torch.float32) * s).to(w.dtype))
            inverse = s.reciprocal()
            store.set_derived(key[g], inverse)
        for lin, target in zip(lins, targets):
            owner, leaf = parent_for(gm, target)
            scaled = store.get_derived(target)
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(scaled, requires_grad=False)
            else:
                owner._buffers[leaf] = scaled
            d = decision_of(lin)
            set_decision(lin, d.replace(patterns=(*d.patterns, f"smoothquant(α={alpha:g})")))
        factors[g] = inverse
    return factors


def _smoothable(gm: fx.GraphModule, lins: list[fx.Node]) -> bool:
    """Every Linear reads one input and a get_attr weight that only this group's Linears read."""
    views = [AtenLinear.of(lin) for lin in lins]
    x = views[0].input
    if any(v.input is not x for v in views):
        return False
    targets = set()
    for v in views:
        w = v.weight
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return False
        targets.add(w.target)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in targets and any(u not in lins for u in n.users):
            return False
    return True


def install_smoothing(gm: fx.GraphModule, factors: dict[int, torch.Tensor], store=None) -> int:
    """After fusion: give each smoothed group's quantizing node its factor (``act_smooth``, the buffer
    ``<first Linear>.input_smooth``). Returns the number of quantizing nodes smoothed."""
    done = set()
    for node in list(gm.graph.nodes):
        if not ops.FusedLinear.is_fused_linear(node):
            continue
        groups = {d.group for d in members_of(node)}
        group = next(iter(groups))
        if len(groups) != 1 or group not in factors:
            continue
        args = ops.FusedLinear.of(node)
        quant = node if args.x is not None else args.x_q.args[0]
        assert args.x is not None or args.x_q.target is operator.getitem
        if quant in done:
            continue
        _set_tensor_arg(gm, quant, "act_smooth", _buffer_path(quant, "input_smooth"), factors[group])
        done.add(quant)
    if done:
        gm.graph.lint()
        gm.recompile()
    return len(done)
