"""``fxquant.compile`` — the front door — and the :class:`QuantizedModel` it returns."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.fx as fx

from . import passes, report
from .capture import capture
from .config import QuantConfig

__all__ = ["compile", "QuantizedModel"]


class QuantizedModel(torch.nn.Module):
    """An int8 model, called like the original with the same inputs and returning the same output
    structure (Hugging Face ``ModelOutput`` fields included).

    Attributes:
        graph_module: the fused ``torch.fx.GraphModule`` (canonical ATen graph with fxquant ops).
        config: the :class:`QuantConfig` it was compiled with.
    """

    def __init__(self, graph_module: fx.GraphModule, config: QuantConfig, rep: report.Report, fixed_kwargs: dict[str, Any]):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self._report = rep
        self._fixed_kwargs = dict(fixed_kwargs)
        self._signature = inspect.signature(graph_module.forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(self._fixed_kwargs)
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as e:
            names = [p for p in self._signature.parameters if p not in self._fixed_kwargs]
            raise TypeError(
                f"this QuantizedModel takes the inputs it was captured with, {names} (by name or in that order): {e}. "
                "Call it with those arguments, or compile again with example inputs that include the ones you need."
            ) from None
        return self.graph_module(*args, **kwargs)

    def report(self) -> report.Report:
        """Every Linear's decision, the pattern counts and the fused node counts (``print()`` it)."""
        return self._report

    def golden(self, only_fused: bool = False) -> str:
        """Deterministic text of the fused graph (see :func:`fxquant.report.golden_text`)."""
        return report.golden_text(self.graph_module, only_fused=only_fused)

    def to_networkx(self):
        """The fused graph as a ``networkx.DiGraph`` (see :func:`fxquant.report.to_networkx`)."""
        return report.to_networkx(self.graph_module)


def compile(  # noqa: A001 - the project's front door is named like torch.compile on purpose
    model: torch.nn.Module,
    example_inputs: Optional[tuple | Mapping[str, Any]] = None,
    *,
    config: Optional[QuantConfig] = None,
) -> QuantizedModel:
    """Quantize ``model``'s Linears to W8A8 by graph rewriting.

    Steps: capture (``torch.export`` non-strict with example inputs, ``torch.fx.symbolic_trace``
    without) → canonicalize → annotate (heuristics per Linear) → fuse (``fxquant.patterns``) → lower.

    Args:
        model: the float ``nn.Module``. It is not modified: parameters, buffers, submodules and every
            training flag are as before (a model in training mode is captured in eval semantics, since
            fxquant builds inference graphs, and its flags are restored).
        example_inputs: a tuple of positional arguments or a dict of keyword arguments, as the model is
            called. Batch and sequence dimensions stay dynamic where torch.export allows.
        config: a :class:`QuantConfig`; default ``QuantConfig(target="cuda")`` when the model's
            parameters are on a CUDA device, else ``QuantConfig()`` (target ``cpu``).

    Returns:
        A :class:`QuantizedModel`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``example_inputs`` is not a tuple, dict or None;
            ``config`` is not a QuantConfig.
        fxquant.TraceError: the model could not be captured (the cause is chained).

    Numerics: compressed-tensors W8A8 "int-quantized" (see :mod:`fxquant.reference`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxquant.compile expects a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, Mapping)):
        hint = " (wrap a single tensor as (x,))" if isinstance(example_inputs, torch.Tensor) else ""
        raise TypeError(
            f"example_inputs must be a tuple of positional args or a dict of keyword args, got {type(example_inputs).__name__}{hint}"
        )
    if config is None:
        on_cuda = any(p.device.type == "cuda" for p in model.parameters())
        config = QuantConfig(target="cuda" if on_cuda else "cpu")
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fxquant.QuantConfig, got {type(config).__name__}")

    notes = []
    if any(m.training for m in model.modules()):
        notes.append("the model was in training mode: captured in eval semantics (dropout off); its flags are unchanged")
    captured = capture(model, example_inputs)
    gm = captured.graph_module
    qmax = passes.resolve_weight_qmax(config)
    passes.annotate(gm, config, qmax, model)
    stats = passes.fuse(gm, fuse_siblings=config.spec.fuse_siblings)
    passes.lower(gm, config, qmax)
    decisions = passes.collect_decisions(gm)
    if config.target == "cpu" and qmax < 127 and config.weight_qmax is None:
        notes.append(
            f"this CPU has no VNNI: int8 weights use [-{qmax}, {qmax}] so oneDNN's u8*s8 int16 pair sums cannot saturate"
        )
    tied = [d for d in decisions if d.quantize and d.extra_bytes]
    if tied:
        notes.append(f"{len(tied)} Linear(s) tied to an embedding run int8 from their own int8 copy "
                     f"(+{sum(d.extra_bytes for d in tied) / 2**20:.1f} MiB); the embeddings stay float")
    if captured.fixed_kwargs:
        notes.append(f"captured with {captured.fixed_kwargs} (no KV cache in the graph)")
    masks = captured.attention_masks
    if any(masks.values()):
        notes.append(f"attention: {masks['all-true']} all-true mask(s) removed and {masks['causal']} causal mask(s) "
                     "replaced by is_causal=True, so SDPA keeps its FlashAttention kernels (fxquant.attention)")
    if not captured.dynamic:
        notes.append("torch.export could not keep input dims dynamic: call with the example inputs' shapes")
    rep = report.Report(decisions, stats, report.node_counts(gm), config.target, captured.front_end, qmax, notes)
    return QuantizedModel(gm, config, rep, captured.fixed_kwargs)
