"""What fxquant records on graph nodes: the immutable :class:`LinearDecision` of every Linear call, the
rule vocabulary (:class:`Rule`, :class:`Verdict`) and where an int8 Linear's input comes from
(:class:`InputQuant`).

Two metadata keys, both read and written only through this module: ``node.meta["fxquant"]`` on an
``aten.linear`` node (its decision) and ``node.meta["fxquant_members"]`` on a fused Linear node (the
decisions of the Linears it computes, in the order their rows are stacked).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.fx as fx

from .ops import FusedLinear
from .views import AtenLinear

__all__ = ["Rule", "Verdict", "LinearDecision", "InputQuant", "META_KEY", "MEMBERS_KEY", "decision_of", "members_of",
           "set_members", "set_decision", "collect_decisions"]

META_KEY = "fxquant"
MEMBERS_KEY = "fxquant_members"  # node.meta of a fused Linear: the decisions of the Linears it computes


class Rule(str, enum.Enum):
    """The rule behind a verdict: what code branches on (never the reason's words)."""

    CONSTANT_WEIGHT = "constant_weight"  # the weight is not a constant 2-D parameter
    DTYPE = "dtype"
    TIED = "tied"                        # the weight is read by another op
    SKIP = "skip"                        # QuantConfig.skip
    FILTER_FN = "filter_fn"              # QuantConfig.filter_fn
    ALIGNMENT = "alignment"
    RATIO = "ratio"                      # beneficial ratio K*N/(K+N)
    QUANTIZE_PASS = "quantize_pass"      # a separate per-token quantization pass would not pay
    GATED_OUTPUT = "gated_output"        # reads a gated MLP's product (down_proj): kept float for accuracy
    PATTERN = "pattern"                  # a pattern's own filter


@dataclass(frozen=True)
class Verdict:
    """``ok`` is the decision; ``reason`` says why in words a user can act on; ``rule`` names the rule."""

    ok: bool
    reason: str
    rule: Optional[Rule] = None

    def __bool__(self) -> bool:
        return self.ok


class InputQuant(str, enum.Enum):
    """Where a fused Linear's per-token int8 input comes from (decided once by ``passes.plan_input_groups``)."""

    PER_TOKEN = "per-token"                # quantized inside the fused node (its own pass)
    SHARED_PER_TOKEN = "shared-per-token"  # one quantize_per_token shared by the Linears reading the tensor
    LAYER_NORM = "shared-layernorm"        # the LayerNorm that produces the tensor quantizes it (layer_norm_quant)
    RMS_NORM = "shared-rmsnorm"            # the RMSNorm that produces the tensor quantizes it (rms_norm_quant)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LinearDecision:
    """Everything fxquant decided about one Linear call; shown row by row in the report. Immutable: a pass
    that learns more stores ``dataclasses.replace(d, ...)`` on the node.

    Attributes:
        name: module path of the Linear (``encoder.layer.0.attention.self.query``).
        k, n: in and out features (GEMM K and N).
        dtype: the weight's dtype.
        ratio: K·N/(K+N).
        aligned: K and N meet the target's alignment.
        quantize: the heuristics' verdict (int8 when True).
        reason: why, in words.
        rule: the rule that decided (:class:`fxquant.ir.meta.Rule`), None when every rule passed.
        weight_qmax: int8 weight range used (127 or 63).
        patterns: the patterns that rewrote it, in order (``pattern`` joins them with ``+``).
        activation: the epilogue fused with it ("none" for a plain Linear; "swiglu" for gate/up of SwiGLU).
        input_quant: where its int8 input comes from (:class:`InputQuant`).
        backend: the kernel backend chosen by the lowering pass.
        out_dtype: dtype of the fused node's output (``QuantConfig.out_dtype``, else the weight's).
        group: id of the input group (the Linears reading the same tensor), from the planning pass.
        gemm: id of the GEMM it runs in; Linears with the same id run as one GEMM (siblings, SwiGLU).
        index: position of the Linear call in the captured graph (report order).
        extra_bytes: memory its int8 weights add on top of the model when it goes int8 (nonzero for a weight
            tied to an embedding, which keeps its float copy; its int8 copy lives at ``<name>.int8``).
    """

    name: str
    k: int
    n: int
    dtype: Optional[torch.dtype]
    ratio: float
    aligned: bool
    quantize: bool
    reason: str
    rule: Optional[Rule] = None
    weight_qmax: int = 127
    patterns: tuple[str, ...] = ()
    activation: str = "none"
    input_quant: Optional[InputQuant] = None
    backend: Optional[str] = None
    out_dtype: Optional[torch.dtype] = None
    group: Optional[int] = None
    gemm: Optional[int] = None
    index: int = 0
    extra_bytes: int = 0

    @property
    def pattern(self) -> Optional[str]:
        return "+".join(self.patterns) if self.patterns else None

    def replace(self, **changes) -> "LinearDecision":
        return dataclasses.replace(self, **changes)

    def with_pattern(self, pattern: str) -> "LinearDecision":
        return self if self.patterns[-1:] == (pattern,) else self.replace(patterns=(*self.patterns, pattern))


def decision_of(node: fx.Node) -> Optional[LinearDecision]:
    return node.meta.get(META_KEY)


def members_of(node: fx.Node) -> tuple[LinearDecision, ...]:
    """The decisions of the Linears a fused Linear node computes (one, or several after fusion)."""
    return node.meta.get(MEMBERS_KEY, ())


def set_members(node: fx.Node, members: Sequence[LinearDecision]) -> None:
    node.meta[MEMBERS_KEY] = tuple(members)
    if len(members) == 1:
        node.meta[META_KEY] = members[0]




def set_decision(node: fx.Node, decision: LinearDecision) -> None:
    """Record ``decision`` on an ``aten.linear`` node (decisions are immutable: replace, never mutate)."""
    node.meta[META_KEY] = decision


def collect_decisions(gm: fx.GraphModule) -> list[LinearDecision]:
    """Every Linear call's final decision, in the order of the captured graph: from the fused Linears'
    members and the Linears left float."""
    found = []
    for node in gm.graph.nodes:
        if FusedLinear.is_fused_linear(node):
            found.extend(members_of(node))
        elif AtenLinear.matches(node) and decision_of(node) is not None:
            found.append(decision_of(node))
    return sorted(found, key=lambda d: d.index)
