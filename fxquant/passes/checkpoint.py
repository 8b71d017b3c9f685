"""Pass ``install_checkpoint``: put a checkpoint's tensors into a captured graph (before annotation).

Float tensors replace the graph's attributes of the same name; each int8 Linear's float weight becomes its
dequantized value W_q · s (what it computes with where fxquant keeps it float), while the store keeps W_q
and s to use as stored (:mod:`fxquant.weights.checkpoint`). The user's model is untouched.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir.notes import NoteKind
from ..plan.planner import linear_name, linear_nodes
from ..weights import checkpoint
from .base import FxquantPass


class InstallCheckpoint(FxquantPass):
    name = "install_checkpoint"

    def __init__(self, ctx, stored: "checkpoint.StoredWeights", source: "checkpoint.SourceInfo"):
        super().__init__(ctx)
        self.stored, self.source = stored, source

    def call(self, gm: fx.GraphModule) -> PassResult:
        linears = {}
        for node in linear_nodes(gm):
            linears.setdefault(linear_name(gm, node), node)
        checkpoint.install(gm, self.stored, linears, self.source)
        if not self.ctx.notes.of(NoteKind.CHECKPOINT):
            self.ctx.note(NoteKind.CHECKPOINT, f"weights: {len(self.stored.int8)} int8 Linear(s) and "
                          f"{len(self.stored.floats)} float tensor(s) from {self.stored.origin}, used as stored", self.name)
        return PassResult(gm, True)
