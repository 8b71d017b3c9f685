"""Filters shared by the Linear-based patterns."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.fx as fx

from fxquant.ir.meta import Rule, Verdict
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


# ------------------------------------------------------------------ gated MLPs (swiglu.py, fused_gate_up.py)
_aten = torch.ops.aten

# epilogue -> the gate's activation as the canonical graph spells it
GATES: dict[str, Callable] = {
    "swiglu": lambda g: _aten.silu.default(g),
    "geglu_tanh": lambda g: _aten.gelu.default(g, approximate="tanh"),
}


def named_variants(make: Callable[[str, Callable], Sequence[Callable]]) -> tuple:
    """Every pattern function ``make(epilogue, act)`` returns, for every gate of :data:`GATES`, named
    ``<epilogue>_<function>`` (the names the pattern statistics show)."""
    out = []
    for epilogue, act in GATES.items():
        for f in make(epilogue, act):
            f.__name__ = f"{epilogue}_{f.__name__}"
            out.append(f)
    return tuple(out)


def gate_activation(match: Match) -> fx.Node:
    """The activation node under a gated product (the match's anchor is the product)."""
    return next(a for a in match.anchor.args if a.target in (_aten.silu.default, _aten.gelu.default))


def gated_epilogue(match: Match) -> str:
    # the only gates the variants match: silu, and gelu(approximate="tanh")
    return "swiglu" if gate_activation(match).target is _aten.silu.default else "geglu_tanh"


def has_gated_epilogue(match: Match) -> Verdict:
    """The gate's activation is SiLU or the tanh GELU (exact GELU, FFN_GEGLU proper, has no epilogue yet)."""
    act = gate_activation(match)
    if act.target is _aten.gelu.default and act.kwargs.get("approximate", "none") != "tanh":
        return Verdict(False, "GeGLU with the exact GELU has no gated epilogue (only tanh): Linears fused one by one",
                       Rule.PATTERN)
    return Verdict(True, "gated activation")
