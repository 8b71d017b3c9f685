"""Filters shared by the Linear-based patterns."""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from fxquant.ir.meta import Verdict
from fxquant.ir.meta import decision_of
from fxquant.ir.rewrite import Match


def linears_are_int8(linears: Sequence[fx.Node]) -> Verdict:
    """Accept when the planning pass decided int8 for every Linear of one GEMM (the first float one's
    reason otherwise)."""
    for lin in linears:
        d = decision_of(lin)
        if d is None:
            return Verdict(False, "Linear was not annotated (weight is not a constant parameter)")
        if not d.quantize:
            return Verdict(False, d.reason, d.rule)
    return Verdict(True, "int8 per heuristics")


def linear_is_int8(match: Match) -> Verdict:
    """Accept when the heuristics annotated the matched Linear for int8 (the decision's reason otherwise)."""
    return linears_are_int8([match["linear"]])
