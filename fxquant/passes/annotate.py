"""Passes ``annotate`` (the planner's analysis of one graph) and ``apply_plan`` (make a graph execute the
program's one plan).

Before ``annotate`` a Linear is ``aten.linear(%x, @fc.weight, @fc.bias)``; after it, the same node carries its
:class:`~fxquant.ir.meta.LinearDecision` (golden text is unchanged: decisions are metadata; the report and
``tests/test_passes.py`` read them).
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir.notes import NoteKind
from ..plan.planner import annotate
from ..targets import backends
from .base import FxquantPass


class Annotate(FxquantPass):
    name = "annotate"

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = self.ctx
        annotate(gm, ctx.config, ctx.weight_qmax, ctx.model)
        if ctx.spec.weight_qmax is None and ctx.weight_qmax < 127 and not ctx.notes.of(NoteKind.WEIGHT_RANGE):
            why = (f"{backends.CPU_ISA_ENV}=avx2 (as on a CPU without VNNI)" if backends.forced_cpu_isa() == "avx2"
                   else "this CPU has no VNNI")
            ctx.note(NoteKind.WEIGHT_RANGE, f"{why}: int8 weights use [-{ctx.weight_qmax}, {ctx.weight_qmax}] so oneDNN's "
                     "u8*s8 int16 pair sums cannot saturate", self.name)
        return PassResult(gm, False)


class ApplyPlan(FxquantPass):
    name = "apply_plan"

    def call(self, gm: fx.GraphModule) -> PassResult:
        plan = self.ctx.plan
        changed = plan.apply(gm)
        tied = [d for d in plan.decisions.values() if d.quantize and d.extra_bytes]
        if tied and not self.ctx.notes.of(NoteKind.TIED_HEAD):
            self.ctx.note(NoteKind.TIED_HEAD, f"{len(tied)} Linear(s) tied to an embedding run int8 from their own int8 "
                          f"copy (+{sum(d.extra_bytes for d in tied) / 2**20:.1f} MiB); the embeddings stay float", self.name)
        for method, name, own in plan.overrides:
            if method == self.ctx.method:
                self.ctx.note(NoteKind.PLAN, f"{name}: method {method!r} follows the plan ({plan.decisions[name].reason}); "
                                             f"its own analysis said: {own}", self.name)
        return PassResult(gm, changed > 0)
