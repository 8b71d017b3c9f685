"""The pass infrastructure of ``fxquant.compile``: one :class:`CompileContext` (config, target spec, plan,
weight store, notes) and passes that take a GraphModule and return a ``PassResult`` (torch.fx's
``PassBase``/``PassResult``), run in order by :func:`run_pipeline`.

A pass is one file in this package: a :class:`FxquantPass` subclass with a ``name`` and ``call(gm)``. Each
can run on its own (construct it with a context and call it on a graph); ``tests/test_passes.py`` holds an
IR-in / IR-out golden test per pass.

Debugging: ``fxquant.compile(..., debug_dir=DIR)`` or the environment variable ``FXQUANT_DEBUG_DIR=DIR``
writes the golden text (:func:`fxquant.ir.printer.golden_text`) of every method's graph after every pass,
as ``DIR/<method>/<NN>-<pass>.txt`` (``00-captured.txt`` first), the way ``TORCH_COMPILE_DEBUG`` does for
Inductor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..ir.notes import NoteKind, Notes
from ..ir.printer import golden_text
from ..ir.rewrite import PatternStats
from ..weights.store import WeightStore

__all__ = ["CompileContext", "FxquantPass", "run_pipeline", "debug_dir_from_env", "DEBUG_ENV"]

DEBUG_ENV = "FXQUANT_DEBUG_DIR"


@dataclass
class CompileContext:
    """What every pass of one compile reads and writes besides the graph.

    Attributes:
        config: the :class:`fxquant.QuantConfig` (after a checkpoint's adjustments).
        weight_qmax: the int8 weight range every int8 Linear uses (127, or 63 on CPUs without VNNI).
        store: the program's :class:`~fxquant.weights.store.WeightStore` (int8 weights, scales, factors).
        plan: the program's :class:`~fxquant.plan.planner.QuantPlan`, set once every method was analysed.
        notes: the typed notes passes emit (:class:`~fxquant.ir.notes.Notes`).
        stats: per pattern or pass, :class:`~fxquant.ir.rewrite.PatternStats` (of the first method).
        model: the float model (read by ``QuantConfig.filter_fn``), never modified.
        calibration: calibration batches as ``(args, kwargs)`` calls, or None.
        runner: ``runner(gm)`` returns a function that calls ``gm`` as the user calls the model
            (``fn(args, kwargs)``); used by passes that run the graph (SmoothQuant statistics).
        progress: show progress bars.
        smoothquant_factors: SmoothQuant's diag(s)⁻¹ per input group of the graph being compiled.
        method: the method whose graph the pipeline is running on.
        decode_methods: the methods that run one token per row (generation's ``"decode"``): the passes
            ``weight_only`` and ``decode_attention`` rewrite these only.
    """

    config: Any
    weight_qmax: int
    store: WeightStore = field(default_factory=WeightStore)
    plan: Any = None
    notes: Notes = field(default_factory=Notes)
    stats: dict[str, PatternStats] = field(default_factory=dict)
    model: Optional[torch.nn.Module] = None
    calibration: Optional[list] = None
    runner: Optional[Callable[[fx.GraphModule], Callable[[tuple, dict], Any]]] = None
    progress: bool = True
    smoothquant_factors: dict = field(default_factory=dict)
    method: str = "forward"
    decode_methods: frozenset = frozenset()

    @property
    def spec(self):
        return self.config.spec

    def note(self, kind: NoteKind, text: str, source: str = "") -> None:
        self.notes.add(kind, text, source)

    def record(self, name: str, stats: PatternStats) -> None:
        """Keep a pass's statistics (the first method's: every method runs the same plan)."""
        self.stats.setdefault(name, stats)


class FxquantPass(PassBase):
    """One named pass over a GraphModule, with the compile's context."""

    name: str = ""

    def __init__(self, ctx: CompileContext):
        super().__init__()
        self.ctx = ctx

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - every pass defines it
        raise NotImplementedError


def debug_dir_from_env(debug_dir: Optional[str | os.PathLike]) -> Optional[Path]:
    """``debug_dir``, else ``$FXQUANT_DEBUG_DIR``, else None."""
    value = debug_dir if debug_dir is not None else os.environ.get(DEBUG_ENV) or None
    return Path(value) if value is not None else None


def _dump(debug_dir: Optional[Path], method: str, index: int, name: str, gm: fx.GraphModule) -> None:
    if debug_dir is None:
        return
    folder = debug_dir / method
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index:02d}-{name}.txt"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(golden_text(gm))
    os.replace(tmp, path)


def run_pipeline(gm: fx.GraphModule, passes: Sequence[FxquantPass], debug_dir: Optional[Path] = None,
                 method: str = "forward", first_index: int = 1) -> fx.GraphModule:
    """Run ``passes`` in order on ``gm`` and return the result; with ``debug_dir``, write the golden text after
    each one (``<method>/<NN>-<pass>.txt``, numbered from ``first_index``). A pass's exception propagates as
    raised (fxquant's errors name what the user can fix)."""
    for i, p in enumerate(passes, start=first_index):
        result = p(gm)
        if result is not None:
            gm = result.graph_module
        _dump(debug_dir, method, i, p.name, gm)
    return gm


def dump_captured(debug_dir: Optional[Path], method: str, gm: fx.GraphModule) -> None:
    """Write the captured graph as ``<method>/00-captured.txt`` (before any pass)."""
    _dump(debug_dir, method, 0, "captured", gm)
