"""Pass ``verify``: the invariants every compiled graph must hold, checked after the last rewrite (an
fxquant bug fails here, at compile time, naming the node, instead of as wrong numbers later).

* the graph lints (torch.fx's own checks: defs before uses, targets that exist);
* every fused Linear reads int8 [N, K] weights, fp32 [N, 1] scales and a [N] bias or none, and its decisions
  (``node.meta["fxquant_members"]``) cover its N rows;
* every int8 weight the graph holds is the program's store's own tensor (no private copy: what makes the
  methods of one program share every weight).

Golden text is unchanged by this pass (it only reads).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir import ops
from ..ir.attrs import fetch_attr
from ..ir.meta import members_of
from .base import FxquantPass

__all__ = ["Verify", "verify", "VerifyError"]


class VerifyError(AssertionError):
    """A compiled graph broke one of fxquant's invariants (a bug in fxquant: please report it)."""


def verify(gm: fx.GraphModule, store) -> None:
    """Raise :class:`VerifyError` naming the node and the invariant it breaks."""
    gm.graph.lint()
    owned = {t.untyped_storage().data_ptr() for _, t in store.tensors()}
    for node in gm.graph.nodes:
        if not ops.FusedLinear.is_fused_linear(node):
            continue
        f = ops.FusedLinear.of(node)
        w, s = fetch_attr(gm, f.w_q.target), fetch_attr(gm, f.w_scale.target)
        n = w.shape[0]
        problems = []
        if w.dtype != torch.int8 or w.dim() != 2:
            problems.append(f"weight {f.w_q.target} is {w.dtype} {tuple(w.shape)}, not int8 [N, K]")
        if s.dtype != torch.float32 or tuple(s.shape) != (n, 1):
            problems.append(f"scale {f.w_scale.target} is {s.dtype} {tuple(s.shape)}, not float32 [{n}, 1]")
        if f.bias is not None and tuple(fetch_attr(gm, f.bias.target).shape) != (n,):
            problems.append(f"bias {f.bias.target} is not [{n}]")
        rows = sum(d.n for d in members_of(node))  # gate and up of a gated epilogue are two members
        if rows != n:
            problems.append(f"its Linears' decisions cover {rows} of {n} rows")
        if w.untyped_storage().data_ptr() not in owned:
            problems.append(f"weight {f.w_q.target} is not the weight store's tensor (a private copy)")
        if problems:
            raise VerifyError(f"fxquant verify: {node.format_node()}: " + "; ".join(problems))


class Verify(FxquantPass):
    name = "verify"

    def call(self, gm: fx.GraphModule) -> PassResult:
        verify(gm, self.ctx.store)
        return PassResult(gm, False)
