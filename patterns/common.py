"""Filters shared by the Linear-based patterns."""

from __future__ import annotations

from fxquant.heuristics import Verdict
from fxquant.rewrite import Match, decision_of


def linear_is_int8(match: Match) -> Verdict:
    """Accept when the heuristics annotated the matched Linear for int8 (the decision's reason otherwise)."""
    d = decision_of(match["linear"])
    if d is None:
        return Verdict(False, "Linear was not annotated (weight is not a constant parameter)")
    return Verdict(d.quantize, d.reason if not d.quantize else "int8 per heuristics")
