"""Passes ``smoothquant`` (before fusion: measure per-channel activation maxima on the calibration batches
and fold diag(s) into the weights) and ``install_smoothing`` (after lowering: each smoothed quantizer
multiplies by diag(s)⁻¹, the ``act_smooth`` argument). Source: Xiao et al., "SmoothQuant" (ICML 2023),
s_j = max|X_j|^α / max|W_j|^(1-α). Factors and smoothed weights live in the program's store, keyed by FQN,
so every method of a program uses the same ones (measured once, on the first method).
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir.meta import collect_decisions
from ..ir.notes import NoteKind
from ..weights import calibration
from .base import FxquantPass


class SmoothQuant(FxquantPass):
    name = "smoothquant"

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = self.ctx
        alpha = ctx.config.smoothquant
        if alpha is None:
            return PassResult(gm, False)
        ctx.smoothquant_factors = calibration.smoothquant(gm, float(alpha), ctx.calibration, ctx.runner(gm), ctx.store,
                                                          ctx.progress)
        return PassResult(gm, bool(ctx.smoothquant_factors))


class InstallSmoothing(FxquantPass):
    name = "install_smoothing"

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = self.ctx
        if ctx.config.smoothquant is None:
            return PassResult(gm, False)
        smoothed = calibration.install_smoothing(gm, ctx.smoothquant_factors, ctx.store)
        if not ctx.notes.of(NoteKind.SMOOTHQUANT):
            n_lin = sum(1 for d in collect_decisions(gm) if any(p.startswith("smoothquant") for p in d.patterns))
            ctx.note(NoteKind.SMOOTHQUANT,
                     f"SmoothQuant (alpha={ctx.config.smoothquant:g}) on {smoothed} quantized input(s), {n_lin} Linear(s): "
                     "weights W*diag(s), the quantizer multiplies by 1/s (pattern column: smoothquant)", self.name)
        return PassResult(gm, smoothed > 0)
