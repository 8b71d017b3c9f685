"""The pass lists of ``fxquant.compile``: what runs on every method's graph, in order, for a target."""

from __future__ import annotations

from typing import Optional

from .annotate import Annotate, ApplyPlan
from .base import CompileContext, FxquantPass
from .checkpoint import InstallCheckpoint
from .decode_attention import DecodeAttention
from .fuse_patterns import FusePatterns
from .lower import Lower
from .share_input import ShareInputQuantization
from .siblings import FuseSiblings
from .smoothquant import InstallSmoothing, SmoothQuant
from .verify import Verify
from .weight_only import WeightOnly

__all__ = ["analysis_passes", "transform_passes"]


def analysis_passes(ctx: CompileContext, stored=None, source=None) -> list[FxquantPass]:
    """Per method, before the plan: install a checkpoint's tensors (when one is given), then annotate."""
    passes: list[FxquantPass] = [InstallCheckpoint(ctx, stored, source)] if stored is not None else []
    return [*passes, Annotate(ctx)]


def transform_passes(ctx: CompileContext) -> list[FxquantPass]:
    """Per method, after the plan: the target's pipeline (sibling fusion where its spec asks for it)."""
    passes: list[Optional[FxquantPass]] = [
        ApplyPlan(ctx),
        SmoothQuant(ctx) if ctx.config.smoothquant is not None else None,
        FusePatterns(ctx),
        ShareInputQuantization(ctx),
        FuseSiblings(ctx) if ctx.spec.fuse_siblings else None,
        Lower(ctx),
        InstallSmoothing(ctx) if ctx.config.smoothquant is not None else None,
        WeightOnly(ctx),
        DecodeAttention(ctx),
        Verify(ctx),
    ]
    return [p for p in passes if p is not None]
