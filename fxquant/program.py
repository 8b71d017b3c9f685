"""A compiled program: one graph per method, one quantization plan and one weight store shared by all.

``fxquant.compile`` builds it; :class:`fxquant.QuantizedModel` runs it; the exporters, ``save_pretrained``
and the report read it. Methods today: ``"forward"`` (the example inputs) plus any named in
``compile(..., methods={name: example_inputs})``, e.g. the same decoder at a second input signature; the
generation work adds prefill and decode.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .ir.views import static_size

__all__ = ["Method", "Program", "program_of"]


@dataclass
class Method:
    """One captured graph and how to call it.

    Attributes:
        graph_module: the fused ``torch.fx.GraphModule``.
        fixed_kwargs: keyword arguments captured as constants, passed on every call (``use_cache=False``).
        signature: the graph's call signature (the model's input names).
        input_shapes: per input, the captured shape with ``None`` for each dynamic dimension.
    """

    graph_module: fx.GraphModule
    fixed_kwargs: dict[str, Any]
    signature: inspect.Signature = None
    input_shapes: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self):
        if self.signature is None:
            self.signature = inspect.signature(self.graph_module.forward)
        if not self.input_shapes:
            self.input_shapes = _captured_shapes(self.graph_module)


@dataclass
class Program:
    """Methods + the plan + the store (+ what the report and the exporters need).

    Attributes:
        methods: ``{name: Method}``, ``"forward"`` first.
        plan: the :class:`~fxquant.plan.planner.QuantPlan` every method executes.
        store: the :class:`~fxquant.weights.store.WeightStore` every method's graph references.
        config: the :class:`fxquant.QuantConfig` (after a checkpoint's adjustments).
        source: what ``save_pretrained`` needs of the float model (:class:`fxquant.weights.checkpoint.SourceInfo`).
        generation: the KV cache's :class:`~fxquant.frontend.kv_cache.GenerationSpec` when the program has the
            ``"prefill"`` and ``"decode"`` methods, else None.
    """

    methods: dict[str, Method]
    plan: Any
    store: Any
    config: Any
    source: Any = None
    generation: Any = None

    @property
    def forward(self) -> Method:
        return self.methods["forward"]


def program_of(qmodel: Any, what: str) -> Program:
    """The :class:`Program` of a ``fxquant.QuantizedModel``; TypeError naming ``what`` for anything else."""
    program = getattr(qmodel, "program", None)
    if not isinstance(program, Program) or not isinstance(qmodel, torch.nn.Module):
        raise TypeError(f"{what} needs a fxquant.QuantizedModel, got {type(qmodel).__name__}: compile the model "
                        "with fxquant.compile(model, example_inputs) first")
    return program


def _captured_shapes(gm: fx.GraphModule) -> dict[str, tuple]:
    """Per placeholder: the captured shape, ``None`` for each dynamic dimension (torch.export's meta only)."""
    shapes = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shapes[node.target] = tuple(static_size(d) for d in val.shape)
    return shapes
