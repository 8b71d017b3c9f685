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
from .base import FxquantPass


class Annotate(FxquantPass):
    name = "annotate"

    def call(self, gm: fx.GraphModule) -> PassResult:
        annotate(gm, self.ctx.config, self.ctx.weight_qmax, self.ctx.model)
        return PassResult(gm, False)


class ApplyPlan(FxquantPass):
    name = "apply_plan"

    def call(self, gm: fx.GraphModule) -> PassResult:
        plan = self.ctx.plan
        changed = plan.apply(gm)
        for method, name, own in plan.overrides:
            if method == self.ctx.method:
                self.ctx.note(NoteKind.PLAN, f"{name}: method {method!r} follows the plan ({plan.decisions[name].reason}); "
                                             f"its own analysis said: {own}", self.name)
        return PassResult(gm, changed > 0)
