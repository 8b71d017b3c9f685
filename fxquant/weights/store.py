"""The weight store of a program: every tensor fxquant makes from the model's weights, made once and keyed
by its fully qualified name (FQN), shared by every graph (method) of the program.

What it holds:

* **GEMM weights** (:meth:`WeightStore.gemm`, :meth:`WeightStore.stack`): per GEMM path, one
  :class:`~fxquant.ir.rewrite.QuantizedLinearParams` — int8 weight [N, K], fp32 per-channel scale [N, 1],
  bias [N] — for a Linear (path = its FQN), a tied head's own copy (``<fqn>.int8``), SwiGLU's stacked
  gate/up (the gate's FQN) or sibling Linears run as one GEMM (``<parent>.fused_q_k_v``). Graphs install
  the same module objects, so two graphs of one model hold no second copy of any tensor.
* **rows**: per Linear FQN, where its rows sit in the GEMM it runs in; :meth:`WeightStore.linear` returns
  its ``(w_q, scale, bias)`` as views, which ``save_pretrained`` and the exporters read.
* **checkpoint** int8 weights and scales (``fxquant.compile(..., weights=)``), used as stored.
* **derived** tensors by FQN: SmoothQuant factors (``<fqn>.input_smooth``), calibrated static scales
  (``<fqn>.input_scale``), Gemma's ``<norm>.weight_plus_one``.

Numerics: per-output-channel symmetric int8, scale = amax / qmax (:func:`fxquant.ir.reference.
quantize_weight_per_channel`; compressed-tensors' "int-quantized" scheme).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from ..ir import reference
from ..ir.attrs import fetch_attr
from ..ir.rewrite import QuantizedLinearParams

__all__ = ["WeightStore", "Rows"]


@dataclass(frozen=True)
class Rows:
    """Where one Linear's int8 rows sit: GEMM path, first row, end row, whether the Linear has a bias."""

    gemm: str
    start: int
    stop: int
    has_bias: bool


class WeightStore:
    """Tensors made once per program, keyed by FQN (see the module docstring).

    Args:
        checkpoint: ``{Linear FQN: (w_q int8 [N, K], scale fp32 [N, 1])}`` read from a checkpoint; those
            Linears' int8 weights are used as stored instead of quantizing.
    """

    def __init__(self, checkpoint: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = None):
        self.checkpoint = dict(checkpoint or {})
        self._gemms: dict[str, QuantizedLinearParams] = {}
        self._rows: dict[str, Rows] = {}
        self._derived: dict[str, torch.Tensor] = {}
        self._parts: dict[str, tuple[str, int, int]] = {}  # GEMM path -> (stacked GEMM, first row, end row)
        self._weight_only: dict[str, QuantizedLinearParams] = {}  # Linear FQN -> decode's int8 copy of a float Linear

    # ------------------------------------------------------------------------------------ GEMM weights
    def gemm(self, gm: fx.GraphModule, path: str, members: Sequence[tuple[str, str, Optional[str]]],
             weight_qmax: int) -> QuantizedLinearParams:
        """The int8 GEMM at ``path`` computing ``members`` — ``(Linear FQN, weight attribute, bias attribute
        or None)`` in row order — made on first use from ``gm``'s float weights (or the checkpoint's int8
        ones), the same object afterwards (after :meth:`stack`, its buffers are views of the stacked GEMM)."""
        found = self._gemms.get(path)
        if found is not None:
            return found
        weights, scales, biases = [], [], []
        for name, w_attr, b_attr in members:
            w_q, scale = self.checkpoint.get(name) or reference.quantize_weight_per_channel(fetch_attr(gm, w_attr),
                                                                                            weight_qmax)
            weights.append(w_q)
            scales.append(scale)
            biases.append(fetch_attr(gm, b_attr) if b_attr is not None else None)
        params = _stacked(weights, scales, biases)
        start = 0
        for (name, _, b_attr), w in zip(members, weights):
            self._rows[name] = Rows(path, start, start + w.shape[0], b_attr is not None)
            start += w.shape[0]
        self._gemms[path] = params
        return params

    def stack(self, path: str, parts: Sequence[str]) -> QuantizedLinearParams:
        """One GEMM at ``path`` over the rows of the GEMMs ``parts`` (sibling Linears reading one input), made
        once. The parts' Linears now live in its rows, and each part's buffers become views of those rows: a
        call that still runs a part alone (a module called again outside the sibling group) reads the same
        memory, so nothing is held twice."""
        found = self._gemms.get(path)
        if found is not None:
            return found
        pieces = [self._gemms[p] for p in parts]
        params = _stacked([p.weight for p in pieces], [p.weight_scale for p in pieces],
                          [getattr(p, "bias", None) for p in pieces])
        offset = 0
        for part, piece in zip(parts, pieces):
            n = piece.weight.shape[0]
            for name, rows in list(self._rows.items()):
                if rows.gemm == part:
                    self._rows[name] = Rows(path, offset + rows.start, offset + rows.stop, rows.has_bias)
            self._parts[part] = (path, offset, offset + n)
            offset += n
        self._gemms[path] = params
        self._view_parts(parts)
        return params

    def _view_parts(self, parts=None) -> None:
        """Point the stacked ``parts`` (default: all) at their rows of the stacked GEMM (again, after a move)."""
        for part in self._parts if parts is None else parts:
            path, start, stop = self._parts[part]
            piece, whole = self._gemms[part], self._gemms[path]
            rows = slice(start, stop)
            piece.weight, piece.weight_scale = whole.weight[rows], whole.weight_scale[rows]
            if hasattr(piece, "bias"):
                piece.bias = whole.bias[rows]

    def linear(self, name: str) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One int8 Linear's ``(w_q int8 [N, K], scale fp32 [N, 1], bias [N] or None)``, views of the GEMM it
        runs in. Raises KeyError for a Linear that is not int8."""
        rows = self._rows[name]
        gemm = self._gemms[rows.gemm]
        sl = slice(rows.start, rows.stop)
        bias = getattr(gemm, "bias", None)
        return gemm.weight[sl], gemm.weight_scale.reshape(-1, 1)[sl], bias[sl] if rows.has_bias and bias is not None else None

    def weight_only(self, gm: fx.GraphModule, name: str, w_attr: str, b_attr: Optional[str]) -> QuantizedLinearParams:
        """The int8 copy (full range, qmax 127) that decode's weight-only kernel reads of a Linear the plan keeps
        float for W8A8 (``down_proj``, a tied head...), made once per program from ``gm``'s float weight. It is not
        one of :meth:`int8_linears` (the exporters write that Linear float, as the plan decided)."""
        found = self._weight_only.get(name)
        if found is None:
            w_q, scale = reference.quantize_weight_per_channel(fetch_attr(gm, w_attr), 127)
            found = self._weight_only[name] = QuantizedLinearParams(
                w_q, scale, fetch_attr(gm, b_attr) if b_attr is not None else None)
        return found

    def int8_linears(self) -> list[str]:
        """FQNs of the Linears that have int8 rows in the store."""
        return list(self._rows)

    # ------------------------------------------------------------------------------------ derived tensors
    def derived(self, fqn: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor at ``fqn``, made by ``make()`` on first use."""
        found = self._derived.get(fqn)
        if found is None:
            found = self._derived[fqn] = make()
        return found

    def set_derived(self, fqn: str, value: torch.Tensor) -> None:
        """Put (or replace, e.g. when recalibrating) the tensor at ``fqn``."""
        self._derived[fqn] = value

    def get_derived(self, fqn: str) -> Optional[torch.Tensor]:
        return self._derived.get(fqn)

    # ------------------------------------------------------------------------------------ inspection
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor the store owns, by FQN (GEMM buffers as ``<path>.<buffer>``)."""
        for path, params in self._gemms.items():
            for leaf, buf in params.named_buffers():
                yield (f"{path}.{leaf}" if path else leaf), buf
        for name, params in self._weight_only.items():
            for leaf, buf in params.named_buffers():
                yield f"{name}.weight_only.{leaf}", buf
        yield from self._derived.items()

    def rebind(self, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every derived tensor by ``convert(tensor)`` (after a device or dtype move of the program,
        whose GEMM modules move with the graphs that hold them)."""
        self._derived = {k: convert(v) for k, v in self._derived.items()}
        self._view_parts()  # the stacked GEMMs moved with the graphs; their parts follow as views

    def release_checkpoint(self) -> None:
        """Drop the checkpoint's tensors once every graph is compiled: the GEMMs hold what runs (a stacked GEMM
        holds its own concatenation, so keeping the checkpoint's per-Linear tensors would hold them twice)."""
        self.checkpoint = {}


def _stacked(weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
             biases: Sequence[Optional[torch.Tensor]]) -> QuantizedLinearParams:
    """The int8 rows of one or several Linears as one :class:`QuantizedLinearParams` (exact: every row keeps its
    own scale); a Linear without bias contributes zeros where the others have one."""
    def cat(ts):
        return ts[0] if len(ts) == 1 else torch.cat(list(ts))

    bias = None
    if any(b is not None for b in biases):
        dt = next(b.dtype for b in biases if b is not None)
        bias = cat([b.detach() if b is not None else torch.zeros(w.shape[0], dtype=dt, device=w.device)
                    for b, w in zip(biases, weights)])
    return QuantizedLinearParams(cat(weights), cat([s.reshape(-1, 1) for s in scales]), bias)
