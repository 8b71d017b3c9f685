"""Pure, named predicates deciding whether a Linear goes int8. Each returns a :class:`Verdict` with a reason.

The reason is what lands in ``node.meta["fxquant"]`` and in the report, so that no Linear is ever kept
float (or quantized) silently.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from ..ir.meta import Rule, Verdict

__all__ = [
    "Rule", "Verdict", "beneficial_ratio", "int8_pays_off", "quantize_pass_pays_off", "gated_output_int8", "is_aligned", "is_skipped",
    "dtype_supported",
]


def beneficial_ratio(k: int, n: int) -> float:
    """K·N/(K+N): GEMM work (∝ M·K·N) over quantize/dequantize traffic (∝ M·(K+N)), per token.

    Source: the "beneficial ratio" rule of embedl-deploy's TensorRT backend (INT8 only where the GEMM is
    large enough to amortize the Q/DQ around it). Returns 0.0 for K + N = 0.
    """
    return (k * n) / (k + n) if k + n > 0 else 0.0


def int8_pays_off(k: int, n: int, min_ratio: float) -> Verdict:
    """True when ``beneficial_ratio(k, n) >= min_ratio`` (the target's threshold, see ``config.TARGETS``)."""
    r = beneficial_ratio(k, n)
    if r >= min_ratio:
        return Verdict(True, f"ratio {r:.1f} >= {min_ratio:g}", Rule.RATIO)
    return Verdict(False, f"ratio K*N/(K+N) = {r:.1f} < min_ratio {min_ratio:g}: quantize/dequantize would cost more "
                          "than the int8 GEMM saves", Rule.RATIO)


def quantize_pass_pays_off(n_total: int, min_n: int) -> Verdict:
    """A Linear whose input needs a quantization pass of its own (not fused into a LayerNorm) pays only
    when the int8 GEMMs reading that pass produce enough columns: True when ``n_total >= min_n``.

    Why N: the pass moves ~3·M·K bytes (read bf16, write int8), the int8 GEMM saves time ∝ M·N·K, so the
    break-even is a number of output columns, independent of M and K to first order. ``n_total`` sums N
    over the sibling Linears that share the pass (q, k, v after an RMSNorm). ``min_n = 0`` disables the rule.
    """
    if n_total >= min_n:
        return Verdict(True, f"N {n_total} >= {min_n} for its own quantization pass", Rule.QUANTIZE_PASS)
    return Verdict(False, f"input needs its own quantization pass and the int8 GEMMs reading it have N = {n_total} "
                          f"< min_n_unfused {min_n}: the pass would cost more than int8 saves (kept float)",
                   Rule.QUANTIZE_PASS)


def gated_output_int8(enabled: bool) -> Verdict:
    """Whether a Linear reading a gated MLP's product (``down_proj`` of SwiGLU / GeGLU) goes int8.

    That product's tokens are heavy-tailed (a product of two Gaussian-like projections), so one per-token
    scale spends most of the int8 range on a few values. Measured with ``bench/llm_accuracy.py`` (CPU, fp32,
    full-range int8 weights, random Hugging Face init, 2 × 128 tokens; logits cosine against the float
    model): Qwen2-1.5B shapes 0.9902 with ``down_proj`` int8 vs 0.9952 without, Llama-1B shapes 0.9922 vs
    0.9959, a 4-layer Mistral-7B 0.9947 vs 0.9966; on an H200 in bf16 Qwen2-1.5B fell to 0.986 (issue
    record). SmoothQuant's channel smoothing (α 0.5 / 0.8, folded into ``up_proj``) made it worse (0.9949 /
    0.9922 vs 0.9960 on 8 Qwen2 layers): the outliers are per token, not per channel. So: float by default,
    ``QuantConfig(gated_output_int8=True)`` for speed.
    """
    if enabled:
        return Verdict(True, "gated-MLP output quantized (gated_output_int8=True)", Rule.GATED_OUTPUT)
    return Verdict(False, "reads a gated MLP's product (SwiGLU/GeGLU), whose heavy-tailed tokens cost accuracy as "
                          "per-token int8 (Qwen2-1.5B logits cosine 0.995 -> 0.990): kept float; "
                          "QuantConfig(gated_output_int8=True) quantizes it", Rule.GATED_OUTPUT)


def is_aligned(k: int, n: int, alignment: int) -> Verdict:
    """True when K and N are multiples of ``alignment`` (the target's int8 kernels' requirement)."""
    bad = [f"{name}={v}" for name, v in (("K", k), ("N", n)) if v % alignment]
    if not bad:
        return Verdict(True, f"K, N % {alignment} == 0", Rule.ALIGNMENT)
    return Verdict(False, f"{', '.join(bad)} not a multiple of {alignment} required by the target's int8 kernels",
                   Rule.ALIGNMENT)


def is_skipped(name: str, skip: Sequence[str]) -> Verdict:
    """True (= keep float) when ``name`` equals a ``skip`` entry or fully matches a ``re:`` entry."""
    for s in skip:
        if s.startswith("re:") and re.fullmatch(s[3:], name):
            return Verdict(True, f"skipped by pattern {s!r}", Rule.SKIP)
        if s == name:
            return Verdict(True, "skipped by name", Rule.SKIP)
    return Verdict(False, "not in skip list", Rule.SKIP)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def dtype_supported(dtype: Optional[torch.dtype]) -> Verdict:
    """Only fp32 / fp16 / bf16 Linears are quantized; float64 keeps its precision, integer Linears stay."""
    if dtype in _SUPPORTED:
        return Verdict(True, f"dtype {dtype}", Rule.DTYPE)
    return Verdict(False, f"weight dtype {dtype} is not fp32/fp16/bf16: kept as is", Rule.DTYPE)
