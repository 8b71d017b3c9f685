"""The planner: which Linears go int8 and why, which share one quantized input and which run as one GEMM.

:func:`annotate` analyses one captured graph (rules per Linear, then :func:`plan_input_groups` per input
group) and records each Linear call's :class:`~fxquant.ir.meta.LinearDecision` on its node;
:class:`QuantPlan` merges what every method of a program decided into one immutable mapping keyed by the
Linear's FQN, which :meth:`QuantPlan.apply` writes back into each method's graph, so every graph of the
program executes the same decisions."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.fx as fx

from ..ir.attrs import fetch_attr
from ..ir.meta import InputQuant, LinearDecision, Rule, Verdict, decision_of, set_decision
from ..ir.views import AtenEmbedding, AtenLinear, attr_target
from ..kernels.common import GATED_ACTIVATIONS
from ..targets import backends
from ..patterns import REGISTRY
from . import rules as heuristics

__all__ = ["annotate", "plan_input_groups", "resolve_weight_qmax", "linear_name", "linear_nodes", "QuantPlan"]

aten = torch.ops.aten


def resolve_weight_qmax(config) -> int:
    """The int8 weight range: the config's or the target's value; for ``cpu`` with neither, 127 when the
    CPU's oneDNN int8 GEMM is exact at full range (VNNI/AMX), else 63 (see ``fxquant.targets.backends``;
    ``FXQUANT_CPU_ISA=avx2`` forces 63)."""
    qmax = config.spec.weight_qmax
    if qmax is not None:
        return qmax
    return 127 if backends.cpu_int8_full_range_exact() else 63


def linear_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """Module path of a Linear node: the ``nn.Linear`` (or subclass) that made the call, from the module stack
    torch.export records; else its weight's path without ``.weight``; else the innermost module. The call's
    module comes first because export keeps one path for a weight that two Linears share (``b.weight = a.weight``
    reads as ``b.weight`` in both calls)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if stack:
        path, kind = stack[-1][0], stack[-1][1]
        kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        if kind.endswith("Linear"):
            return path  # "" when the model itself is the Linear
    w = attr_target(AtenLinear.of(node).weight)
    if w is not None and (w == "weight" or w.endswith(".weight")):
        return w[: -len("weight")].rstrip(".")
    if stack:
        return stack[-1][0]
    return node.name


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.Tensor]:
    w = attr_target(AtenLinear.of(node).weight)
    if w is None:
        return None
    try:
        obj = fetch_attr(gm, w)
    except AttributeError:
        return None
    return obj if isinstance(obj, torch.Tensor) else None


def _owned_by(target: str, name: str) -> bool:
    """Is the attribute path ``target`` part of the module at ``name`` ("" = the root Linear itself)?"""
    if not name:
        return target in ("weight", "bias")
    return target == name or target.startswith(name + ".")


def _tied(gm: fx.GraphModule, attrs: list[fx.Node], node: fx.Node, name: str) -> Optional[str]:
    """How the Linear's parameters (the attributes it reads and those of its module) are shared: None when only
    Linear calls of that same module read them (a module called several times, as ALBERT's shared layers, is
    not tied: each call is quantized against the one set of int8 weights); ``"embedding"`` when the only other
    readers are embedding lookups of the weight (a tied LM head); ``"other"`` when any other op reads them,
    another Linear module too (``b.weight = a.weight``: one float weight, two modules)."""
    lin = AtenLinear.of(node)
    read = {t for t in (attr_target(lin.weight), attr_target(lin.bias)) if t is not None}
    weight = attr_target(lin.weight)

    def same_linear(user: fx.Node, attr: fx.Node) -> bool:  # a call of this Linear (or of its module again)
        if not AtenLinear.matches(user) or linear_name(gm, user) != name:
            return False
        u = AtenLinear.of(user)
        return attr in (u.weight, u.bias) and attr is not u.input

    def embedding_lookup(user: fx.Node, attr: fx.Node) -> bool:
        return AtenEmbedding.matches(user) and AtenEmbedding.of(user).weight is attr and attr.target == weight

    kind = None
    for n in attrs:
        if not (n.target in read or _owned_by(n.target, name)):
            continue
        for u in n.users:
            if same_linear(u, n):
                continue
            if not embedding_lookup(u, n):
                return "other"
            kind = "embedding"
    return kind


def annotate(gm: fx.GraphModule, config, weight_qmax: int, model: Optional[torch.nn.Module] = None,
             patterns=None) -> list[LinearDecision]:
    """Decide int8 or float for every ``aten.linear`` node and plan its input; store the decision in
    ``node.meta``.

    Per Linear, first failing rule wins: constant weight; dtype (fp32/fp16/bf16); not tied to another op
    (a weight tied only to an embedding gets its own int8 copy); skip list; ``filter_fn``; alignment;
    beneficial ratio. Then :func:`plan_input_groups` judges each group of Linears reading one tensor.
    ``weight_qmax`` is :func:`resolve_weight_qmax` of the config (resolved once by the caller). Returns the
    decisions in graph order.
    """
    spec = config.spec
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    linears = linear_nodes(gm)
    for index, node in enumerate(linears):
        name = linear_name(gm, node)
        w = _weight_of(gm, node)
        if w is None or w.dim() != 2:
            set_decision(node, LinearDecision(name, -1, -1, None, 0.0, False, False,
                                                 "weight is not a constant 2-D parameter: kept float",
                                              rule=Rule.CONSTANT_WEIGHT, index=index))
            continue
        n, k = w.shape
        aligned = heuristics.is_aligned(k, n, spec.alignment)
        tied = _tied(gm, attrs, node, name)
        verdict = _first_failure(tied, name, w, config, spec, model, aligned, k, n)
        # a fact of the weight, not of the verdict: the planning pass may still flip the decision either way
        extra = n * k + 4 * n if tied == "embedding" else 0  # its own int8 copy + fp32 scales
        reason = verdict.reason
        if extra and verdict.ok:
            reason += f"; weight tied to an embedding: int8 copy adds {extra / 2**20:.1f} MiB, the embedding stays float"
        set_decision(node, LinearDecision(
            name, k, n, w.dtype, heuristics.beneficial_ratio(k, n), aligned.ok, verdict.ok, reason,
            rule=None if verdict.ok else verdict.rule, weight_qmax=weight_qmax, out_dtype=config.out_dtype or w.dtype,
            index=index, extra_bytes=extra,
        ))
    plan_input_groups(gm, spec, REGISTRY if patterns is None else patterns)
    return [decision_of(n) for n in linears]


def plan_input_groups(gm: fx.GraphModule, spec, patterns) -> None:
    """The one analysis of how int8 Linears get their input; rewrites execute what it writes.

    1. **GEMM units**: each Linear-consuming pattern (``Pattern.linears``) claims the Linears a match turns
       into one GEMM and its epilogue (Linear→GELU: one Linear; SwiGLU: gate and up as one GEMM). A unit
       with several Linears is claimed only when none of them fails a rule other than the ratio.
    2. **Input groups**: units reading the same tensor. Their source is a norm whose pattern
       (``Pattern.quantized_output``) matches the producer, else one shared per-token pass (two or more
       int8 units), else the Linear's own pass.
    3. **Judging groups, not Linears**: where the target fuses siblings, the units with a plain epilogue run
       as one GEMM and the ratio rule is judged on it (K, ΣN), as on a multi-Linear unit (K, N of the
       stacked weight); only Linears that failed on the ratio alone flip. A group reading a gated MLP's
       product stays float unless ``gated_output_int8`` (:func:`fxquant.plan.rules.gated_output_int8`). A
       group without a norm source pays a separate quantization pass, so its int8 GEMMs need
       ``min_n_unfused`` output columns in total.

    Writes each decision's ``group``, ``gemm`` and ``input_quant`` (and, where a rule flipped it,
    ``quantize``/``reason``/``rule``) back to ``node.meta``.
    """
    claims: dict[fx.Node, tuple[tuple[fx.Node, ...], str]] = {}
    norm_source: dict[fx.Node, InputQuant] = {}
    gated_products: set[fx.Node] = set()  # outputs of gated MLPs (SwiGLU / GeGLU), whatever their decision
    for pat in patterns:
        if pat.quantized_output is not None:
            for m in pat.matches(gm):
                if pat.check_structure(m):
                    norm_source[m.anchor] = pat.quantized_output
        if pat.linears is None:
            continue
        for m in pat.matches(gm):
            if not pat.check_structure(m):
                continue
            lins, epilogue = pat.linears(m)
            lins = tuple(lins)
            if epilogue in GATED_ACTIVATIONS:
                gated_products.add(m.anchor)
            if any(lin in claims for lin in lins):
                continue
            ds = [decision_of(lin) for lin in lins]
            if len(lins) > 1 and not all(d.quantize or d.rule is Rule.RATIO for d in ds):
                continue  # the multi-Linear pattern rejects it; its Linears fall to later patterns
            for lin in lins:
                claims[lin] = (lins, epilogue)
    units: dict[fx.Node, dict[tuple[fx.Node, ...], str]] = {}  # input -> {unit: epilogue}, graph order
    for lin, (unit, epilogue) in claims.items():
        if decision_of(lin).k >= 0:
            units.setdefault(AtenLinear.of(unit[0]).input, {})[unit] = epilogue
    gemm_ids = iter(range(1 << 30))
    for group_id, (x, group) in enumerate(units.items()):
        gemms = _plan_gemms(group, spec)
        for unit, gemm in gemms.items():
            _judge_ratio(unit, gemm, spec.min_ratio)
        int8_units = [u for u in group if decision_of(u[0]).quantize]
        if x in gated_products and int8_units:
            verdict = heuristics.gated_output_int8(spec.gated_output_int8)
            if not verdict:
                for u in int8_units:
                    _update(u, quantize=False, reason=verdict.reason, rule=verdict.rule)
                int8_units = []
        source = norm_source.get(x) if int8_units else None
        if source is None and int8_units and spec.min_n_unfused:
            verdict = heuristics.quantize_pass_pays_off(sum(_stacked_n(u) for u in int8_units), spec.min_n_unfused)
            if not verdict:
                for u in int8_units:
                    _update(u, quantize=False, reason=verdict.reason, rule=verdict.rule)
                int8_units = []
        if source is None:
            source = InputQuant.SHARED_PER_TOKEN if len(int8_units) > 1 else InputQuant.PER_TOKEN
        ids = {}
        for unit in group:
            gemm_key = gemms[unit]
            ids.setdefault(gemm_key, next(gemm_ids))
            q = decision_of(unit[0]).quantize
            _update(unit, group=group_id, gemm=ids[gemm_key], input_quant=source if q else None)


def _stacked_n(unit: tuple[fx.Node, ...]) -> int:
    return sum(decision_of(lin).n for lin in unit)


def _plan_gemms(group: dict[tuple[fx.Node, ...], str], spec) -> dict[tuple[fx.Node, ...], tuple]:
    """Which units of one input group run as one GEMM: with sibling fusion, every single-Linear unit with a
    plain epilogue that is (or may become) int8 joins one GEMM; any other unit is its own GEMM."""
    siblings = [u for u, epi in group.items() if spec.fuse_siblings and len(u) == 1 and epi == "none"
                and (decision_of(u[0]).quantize or decision_of(u[0]).rule is Rule.RATIO)]
    key = tuple(siblings) if len(siblings) > 1 else None
    return {u: (key if key is not None and u in siblings else u) for u in group}


def _judge_ratio(unit: tuple[fx.Node, ...], gemm: tuple, min_ratio: float) -> None:
    """Judge the ratio rule on the GEMM a unit runs in (K, ΣN of its stacked weights); flip the Linears that
    failed on the ratio alone."""
    members = list(unit) if gemm == unit else [lin for u in gemm for lin in u]
    if len(members) < 2:
        return
    k = decision_of(members[0]).k
    n = sum(decision_of(lin).n for lin in members)
    verdict = heuristics.int8_pays_off(k, n, min_ratio)
    if not verdict:
        return
    what = "with gate and up" if gemm == unit else "with its siblings"
    for lin in unit:
        d = decision_of(lin)
        if not d.quantize and d.rule is Rule.RATIO:
            _update((lin,), quantize=True, rule=None, reason=f"{verdict.reason} as one GEMM {what} (K={k}, N={n})")


def _update(unit, **changes) -> None:
    for lin in unit:
        set_decision(lin, decision_of(lin).replace(**changes))


def _first_failure(tied, name, w, config, spec, model, aligned, k, n) -> Verdict:
    dt = heuristics.dtype_supported(w.dtype)
    if not dt:
        return dt
    if tied == "other":
        return Verdict(False, "weight is shared with another op (tied): kept float", Rule.TIED)
    skipped = heuristics.is_skipped(name, config.skip)
    if skipped:
        return Verdict(False, skipped.reason, Rule.SKIP)
    if config.filter_fn is not None:
        module = None
        if model is not None:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
        if not config.filter_fn(name, module):
            return Verdict(False, "rejected by filter_fn", Rule.FILTER_FN)
    if not aligned:
        return aligned
    return heuristics.int8_pays_off(k, n, spec.min_ratio)


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``aten.linear`` calls of a graph, in order."""
    return [n for n in gm.graph.nodes if AtenLinear.matches(n)]


@dataclass(frozen=True)
class QuantPlan:
    """The decisions of one program, made once from what every method captured: per Linear FQN, its
    :class:`~fxquant.ir.meta.LinearDecision` (int8 or float, the rule and the reason).

    Merging (:meth:`merge`): the first method's analysis decides; where another method's analysis of the
    same Linear came out otherwise (a different M cannot change a rule today, but a different graph shape
    can change a group), that method follows the plan and the difference is listed in ``overrides``.

    Attributes:
        decisions: read-only ``{Linear FQN: LinearDecision}``.
        weight_qmax: the int8 weight range of every int8 Linear (127, or 63 on CPUs without VNNI).
        overrides: ``(method, Linear FQN, what that method's own analysis said)`` for each override.
    """

    decisions: Mapping[str, LinearDecision]
    weight_qmax: int
    overrides: tuple[tuple[str, str, str], ...] = ()

    @staticmethod
    def merge(analyses: Mapping[str, fx.GraphModule], weight_qmax: int) -> "QuantPlan":
        """One plan from the annotated graphs of every method (``{method: graph}``, first method first)."""
        decisions: dict[str, LinearDecision] = {}
        overrides = []
        for method, gm in analyses.items():
            for node in linear_nodes(gm):
                d = decision_of(node)
                first = decisions.setdefault(d.name, d)
                if first is not d and first.quantize != d.quantize:
                    overrides.append((method, d.name, d.reason))
        return QuantPlan(types.MappingProxyType(decisions), weight_qmax, tuple(overrides))

    def apply(self, gm: fx.GraphModule) -> int:
        """Make ``gm``'s decisions follow the plan (the verdict, rule and reason per Linear FQN; the graph's own
        grouping stays). Returns the number of decisions changed."""
        changed = 0
        for node in linear_nodes(gm):
            d = decision_of(node)
            want = self.decisions.get(d.name)
            if want is None or want.quantize == d.quantize:
                continue
            source = (d.input_quant or InputQuant.PER_TOKEN) if want.quantize else None
            set_decision(node, d.replace(quantize=want.quantize, reason=want.reason, rule=want.rule, input_quant=source))
            changed += 1
        return changed

    def __len__(self) -> int:
        return len(self.decisions)

    def __reduce__(self):  # copy.deepcopy and pickle: the read-only view is rebuilt over a plain dict
        return (_plan, (dict(self.decisions), self.weight_qmax, self.overrides))

    def int8(self) -> list[str]:
        """FQNs of the Linears the plan runs in int8."""
        return [name for name, d in self.decisions.items() if d.quantize]


def _plan(decisions: dict, weight_qmax: int, overrides: tuple) -> QuantPlan:
    return QuantPlan(types.MappingProxyType(decisions), weight_qmax, overrides)

