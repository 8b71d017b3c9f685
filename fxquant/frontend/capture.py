"""Capture a model into the canonical ATen FX graph that every pattern is written against.

Front ends:

* with example inputs: ``torch.export.export(strict=False)`` (all tensor dims ``Dim.AUTO``, so batch and
  sequence length stay dynamic; retried with static shapes if that fails), then ``ExportedProgram.module()``.
* without: ``torch.fx.symbolic_trace``.

Canonical form (both front ends): Linear = ``aten.linear.default(x, w, b?)``, LayerNorm =
``aten.layer_norm.default(x, shape, w?, b?, eps)``, activations ``aten.relu/gelu/silu.default``, parameters
as ``get_attr`` nodes, inference-mode dropout removed. The GraphModule owns a fresh module tree: the user's
modules are never reached through it by ``setattr``, so rewriting it cannot change the user's model.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import TraceError
from ..ir.attrs import fetch_attr, parent_for
from ..ir.notes import Note, NoteKind
from .attention import simplify_attention_masks

__all__ = ["capture", "canonicalize", "CapturedGraph"]

aten = torch.ops.aten


class CapturedGraph:
    """The canonical GraphModule plus how to call it the way the user calls their model.

    Attributes:
        graph_module: canonical ATen-level FX graph.
        front_end: ``"torch.export"`` or ``"torch.fx.symbolic_trace"``.
        fixed_kwargs: keyword arguments captured as constants (``use_cache=False`` for decoders); they
            are passed on every call.
        dynamic: whether the export kept input dims dynamic.
        attention_masks: shape-only SDPA masks removed (``fxquant.attention``): ``{"all-true": n, "causal": n}``.
    """

    def __init__(self, graph_module: fx.GraphModule, front_end: str, fixed_kwargs: dict[str, Any], dynamic: bool,
                 attention_masks: Optional[dict[str, int]] = None, was_training: bool = False):
        self.graph_module = graph_module
        self.attention_masks = attention_masks or {}
        self.front_end = front_end
        self.fixed_kwargs = fixed_kwargs
        self.dynamic = dynamic
        self.was_training = was_training

    def notes(self) -> list[Note]:
        """What the capture learned that the report should say, as typed notes."""
        out = []
        if self.was_training:
            out.append(Note(NoteKind.TRAINING_MODE, "the model was in training mode: captured in eval semantics (dropout "
                            "off); its flags are unchanged", "capture"))
        if self.fixed_kwargs:
            out.append(Note(NoteKind.FIXED_KWARGS, f"forward captured with {self.fixed_kwargs} (no KV cache in that graph)", "capture"))
        masks = self.attention_masks
        if any(masks.values()):
            out.append(Note(NoteKind.ATTENTION_MASKS, f"attention: {masks['all-true']} all-true mask(s) removed and "
                            f"{masks['causal']} causal mask(s) replaced by is_causal=True, so SDPA keeps its "
                            "FlashAttention kernels (fxquant.frontend.attention)", "capture"))
        if not self.dynamic:
            out.append(Note(NoteKind.STATIC_SHAPES, "torch.export could not keep input dims dynamic: call with the "
                            "example inputs' shapes", "capture"))
        return out


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Capture an inference graph: put every submodule in eval mode, restore each one's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in flags:
            m.training = t


def _accepts_kwarg(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _fixed_kwargs(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Decoders that return a KV cache (Hugging Face ``config.use_cache``) are captured with use_cache=False."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False) and "use_cache" not in kwargs and _accepts_kwarg(model, "use_cache"):
        return {"use_cache": False}
    return {}


def _auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]):
    """Every tensor dim ``Dim.AUTO``, keyed by the forward's parameter names (torch.export's format)."""
    from torch.export import Dim

    def spec(v):
        if isinstance(v, torch.Tensor):
            return {i: Dim.AUTO for i in range(v.dim())}
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, Mapping):
            return {k: spec(x) for k, x in v.items()}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def capture(model: torch.nn.Module, example_inputs: Optional[tuple | Mapping[str, Any]],
            dynamic_shapes: Optional[Mapping[str, Any]] = None) -> CapturedGraph:
    """Trace ``model`` into the canonical form (see the module docstring).

    Args:
        model: an ``nn.Module``; left unchanged (its training flags are restored after capture).
        example_inputs: tuple of positional args, dict of keyword args (Hugging Face style), or None.
        dynamic_shapes: torch.export's ``dynamic_shapes`` to use instead of every dim ``Dim.AUTO`` (no static
            retry): the generation methods fix their batch and keep only the prompt length dynamic.

    Raises:
        TraceError: the front end failed; names the model class, the front end, the cause (chained).
    """
    args: tuple = ()
    kwargs: dict[str, Any] = {}
    if isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    fixed = _fixed_kwargs(model, kwargs) if example_inputs is not None else {}
    was_training = any(m.training for m in model.modules())

    with _eval_mode(model):
        if example_inputs is None:
            front_end = "torch.fx.symbolic_trace"
            try:
                gm = fx.symbolic_trace(model)
            except Exception as e:
                raise TraceError(model, front_end, e, hint="pass example_inputs to capture with torch.export instead") from e
            dynamic = True
        else:
            front_end = "torch.export"
            all_kwargs = {**kwargs, **fixed}
            dynamic = True
            try:
                if dynamic_shapes is not None:
                    ep = torch.export.export(model, args, kwargs=all_kwargs, strict=False, dynamic_shapes=dynamic_shapes)
                    dynamic = any(v is not None for v in dynamic_shapes.values())
                else:
                    try:
                        ep = torch.export.export(model, args, kwargs=all_kwargs, strict=False,
                                                 dynamic_shapes=_auto_dynamic_shapes(model, args, all_kwargs))
                    except Exception:
                        dynamic = False
                        ep = torch.export.export(model, args, kwargs=all_kwargs, strict=False)
            except Exception as e:
                raise TraceError(model, front_end, e,
                                 hint="check that model(*example_inputs) (or model(**example_inputs)) runs eagerly") from e
            gm = ep.module()
    gm = _own_module_tree(gm)
    canonicalize(gm)
    masks = simplify_attention_masks(gm) if front_end == "torch.export" else {}
    return CapturedGraph(gm, front_end, fixed, dynamic, masks, was_training)


def _own_module_tree(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a fresh module tree holding the same tensors and leaf modules.

    Rewrites replace attributes of this tree; since none of its container modules is the user's, the
    user's model is never modified. Tensors are shared (never written in place), not copied.
    """
    root = torch.nn.Module()

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            parent, leaf = parent_for(root, node.target)
            if isinstance(value, torch.nn.Parameter):
                parent.register_parameter(leaf, value)
            elif isinstance(value, torch.Tensor):
                parent.register_buffer(leaf, value)
            elif isinstance(value, torch.nn.Module):
                parent.add_module(leaf, _eval_copy(value))
            else:
                setattr(parent, leaf, value)
        elif node.op == "call_module":
            parent, leaf = parent_for(root, node.target)
            parent.add_module(leaf, _eval_copy(gm.get_submodule(node.target)))
    new = fx.GraphModule(root, gm.graph, class_name=type(gm).__name__)
    # torch.export's module() keeps the pytree specs that rebuild the user's input and output structure.
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.recompile()
    return new


def _eval_copy(mod: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``mod`` (and its children) in eval mode that shares its tensors: the compiled graph then
    never runs the user's module objects, so their training flags (BatchNorm batch statistics, dropout)
    and running buffers stay the user's alone."""
    new = copy.copy(mod)
    new.__dict__["_parameters"] = dict(mod._parameters)
    new.__dict__["_buffers"] = dict(mod._buffers)
    new.__dict__["_modules"] = {k: (_eval_copy(c) if c is not None else None) for k, c in mod._modules.items()}
    new.training = False
    return new


# ----------------------------------------------------------------------------------- canonicalization
_ACT_FUNCTIONS = {F.relu: aten.relu.default, torch.relu: aten.relu.default, F.silu: aten.silu.default, F.gelu: aten.gelu.default}
_ACT_MODULES = {torch.nn.ReLU: aten.relu.default, torch.nn.SiLU: aten.silu.default, torch.nn.GELU: aten.gelu.default}
_ASSERT_METADATA = getattr(aten, "_assert_tensor_metadata", None) and aten._assert_tensor_metadata.default
_IDENTITY = (aten.dropout.default, aten.alias.default, aten.detach.default, aten.clone.default)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place into the canonical ATen form (module docstring); returns ``gm``."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            _canonical_module(gm, node, mod)
        elif node.op == "call_function":
            _canonical_function(node)
            if node.target in (aten.addmm.default, torch.addmm):
                _canonical_addmm(gm, node)
    for node in list(graph.nodes):
        # torch.export's dtype/device asserts on intermediate tensors check nothing a pattern needs, and as
        # extra users they would stop the matcher from seeing through a cast (RMSNorm's .to(float32)).
        if node.op == "call_function" and node.target is _ASSERT_METADATA:
            graph.erase_node(node)
            continue
        # Inference graphs: dropout(train=False), aliases and clones of activations are identities.
        if node.op == "call_function" and node.target in _IDENTITY and not node.kwargs.get("memory_format"):
            if node.target is aten.dropout.default and (len(node.args) > 2 and node.args[2]):
                continue
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


def _attr(gm: fx.GraphModule, node: fx.Node, path: str) -> fx.Node:
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(path)


def _canonical_module(gm: fx.GraphModule, node: fx.Node, mod: torch.nn.Module) -> None:
    graph = gm.graph
    x = node.args[0] if node.args else None
    if type(mod) is torch.nn.Linear:
        w = _attr(gm, node, f"{node.target}.weight")
        b = _attr(gm, node, f"{node.target}.bias") if mod.bias is not None else None
        with graph.inserting_before(node):
            new = graph.call_function(aten.linear.default, (x, w, b) if b is not None else (x, w))
    elif type(mod) is torch.nn.LayerNorm:
        w = _attr(gm, node, f"{node.target}.weight") if mod.weight is not None else None
        b = _attr(gm, node, f"{node.target}.bias") if mod.bias is not None else None
        with graph.inserting_before(node):
            new = graph.call_function(aten.layer_norm.default, (x, list(mod.normalized_shape), w, b, mod.eps))
    elif type(mod) in _ACT_MODULES:
        kwargs = {"approximate": mod.approximate} if isinstance(mod, torch.nn.GELU) and mod.approximate != "none" else {}
        with graph.inserting_before(node):
            new = graph.call_function(_ACT_MODULES[type(mod)], (x,), kwargs)
        if getattr(mod, "inplace", False):
            _functionalize_inplace(node, x, new)
    else:
        return
    new.meta.update(node.meta)
    new.meta.setdefault("nn_module_stack", {node.target: (node.target, type(mod))})
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _functionalize_inplace(node: fx.Node, x: fx.Node, result: fx.Node) -> None:
    """``act(x, inplace=True)`` overwrote x: readers of x after ``node`` must read the result instead."""
    later, n = set(), node.next
    while n.op != "root":
        later.add(n)
        n = n.next
    for user in list(x.users):
        if user in later:
            user.replace_input_with(x, result)


def _canonical_addmm(gm: fx.GraphModule, node: fx.Node) -> None:
    """``addmm(bias, x, W)`` with a constant [K, N] weight (Hugging Face ``Conv1D``: GPT-2's projections)
    becomes ``aten.linear(x, Wᵀ, bias)``. Wᵀ (a view, no copy) takes W's place in the module tree, so the
    Linear is named after its module; skipped when W is read elsewhere or alpha/beta are not 1."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
        return
    bias, x, w = node.args
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
        return
    if any(n is not w and n.op == "get_attr" and n.target == w.target for n in gm.graph.nodes):
        return
    weight = fetch_attr(gm, w.target)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return
    owner, leaf = parent_for(gm, w.target)
    delattr(owner, leaf)
    owner.register_buffer(leaf, weight.detach().t())
    node.target, node.args, node.kwargs = aten.linear.default, (x, w, bias), {}


def _canonical_function(node: fx.Node) -> None:
    if node.target in _ACT_FUNCTIONS:
        op = _ACT_FUNCTIONS[node.target]
        kwargs = {}
        if op is aten.gelu.default and node.kwargs.get("approximate", "none") != "none":
            kwargs["approximate"] = node.kwargs["approximate"]
        inplace = node.kwargs.get("inplace", False) or (len(node.args) > 1 and node.args[1] is True)
        node.target, node.args, node.kwargs = op, node.args[:1], kwargs
        if inplace:
            _functionalize_inplace(node, node.args[0], node)
    elif node.target is F.linear:
        node.target = aten.linear.default
        node.args = tuple(node.args) + tuple(node.kwargs[k] for k in ("bias",) if k in node.kwargs)
        node.kwargs = {}
    elif node.target is F.layer_norm:
        a = list(node.args) + [None] * (5 - len(node.args))
        for i, k in enumerate(("input", "normalized_shape", "weight", "bias", "eps")):
            if k in node.kwargs:
                a[i] = node.kwargs[k]
        if a[4] is None:
            a[4] = 1e-5
        node.target, node.args, node.kwargs = aten.layer_norm.default, tuple(a), {}

