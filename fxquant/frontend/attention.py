"""Give ``scaled_dot_product_attention`` back the fast kernels that tracing took away.

Under ``torch.export`` Hugging Face models build their attention mask as a tensor even when it carries
no information: an all-true mask for encoders called without ``attention_mask`` (ViT), a lower-triangular
one for decoders captured without KV cache (Llama, with ``use_cache=False``). In eager mode they pass
``attn_mask=None`` (and ``is_causal=True``) instead. A materialized mask costs far more than the mask
itself: SDPA cannot use FlashAttention with an arbitrary mask, so ViT-B/16 fell to the fp32 math path
and Llama's attention ran 2.8x slower (NVIDIA H200, batch 64 and 4x2048, bench/profile_gpu.py).

The pass rewrites an ``aten.scaled_dot_product_attention`` whose boolean mask is a function of shapes
alone (its subgraph reads no tensor data of the inputs: only sizes, ``arange`` and comparisons) and
whose comparisons use no constant beyond ±1 (a sliding window needs one, so it is left alone):

* the mask subgraph is evaluated at the captured sizes and at two other sizes of every dynamic dimension
  (one more, and about a third: no larger than the captured mask, so memory stays bounded);
* all true at every size → ``attn_mask=None``; exactly causal (``k ≤ q``, square) at every size →
  ``attn_mask=None, is_causal=True``; anything else stays as it is.

Both rewrites are exact: SDPA with an all-true boolean mask equals SDPA without one, and a square causal
mask is what ``is_causal=True`` applies (PyTorch docs, ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ..ir.views import AtenSDPA

__all__ = ["simplify_attention_masks"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_SHAPE_READERS = {aten.sym_size.int, aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default,
                  aten.new_full.default}
_ARITH = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.ge.Scalar, aten.gt.Scalar, aten.le.Scalar,
          aten.lt.Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor,
          aten.lt.Tensor, aten.eq.Tensor, aten.ne.Tensor, aten.remainder.Scalar, aten.floor_divide.default,
          aten.rsub.Scalar, aten.add.Scalar, aten.sub.Scalar, operator.add, operator.sub, operator.mul}
_MAX_ELEMENTS = 1 << 28  # largest mask evaluated (a bool each); larger masks are left alone


def _mask_arg(node: fx.Node) -> Optional[fx.Node]:
    mask = AtenSDPA.of(node).attn_mask
    return mask if isinstance(mask, fx.Node) else None


def _is_causal(node: fx.Node) -> bool:
    return bool(AtenSDPA.of(node).is_causal)


def _subgraph(mask: fx.Node) -> Optional[list[fx.Node]]:
    """The mask's ancestors in graph order, or None when the mask reads tensor data of a graph input, has
    no shape information, or compares against a constant beyond ±1."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            continue
        if n.op != "call_function":
            return None  # call_module / get_attr / output: not a pure shape computation
        if n.target is aten.sym_size.int:
            continue  # a leaf: its value is substituted
        if n.target in _ARITH and any(isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > 1 for a in n.args):
            return None
        stack.extend(a for a in n.all_input_nodes)
    for n in seen:
        if n.op == "placeholder" and any(u in seen and u.target not in _SHAPE_READERS for u in n.users):
            return None  # the mask reads an input's values (a padding mask, say)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _symbols(nodes: list[fx.Node]) -> Optional[dict]:
    """{sym_size node or placeholder: (example value, symbol expression per dim)}, None when meta is missing."""
    out = {}
    for n in nodes:
        val = n.meta.get("val")
        if n.op == "call_function" and n.target is aten.sym_size.int:
            if not isinstance(val, (int, torch.SymInt)):
                return None
            out[n] = val
        elif n.op == "placeholder":
            if not isinstance(val, torch.Tensor):
                return None
            out[n] = val
    return out


def _hint(s) -> int:
    return int(s.node.hint) if isinstance(s, torch.SymInt) else int(s)


def _evaluate(nodes: list[fx.Node], mask: fx.Node, leaves: dict, sizes: dict) -> torch.Tensor:
    """Run the mask subgraph with every symbol replaced by ``sizes[symbol]``."""

    def size_of(s) -> int:
        return sizes.get(str(s.node.expr), _hint(s)) if isinstance(s, torch.SymInt) else int(s)

    env: dict[fx.Node, object] = {}
    for n in nodes:
        if n in leaves:
            v = leaves[n]
            if n.op == "placeholder":
                env[n] = torch.zeros([size_of(d) for d in v.shape], dtype=v.dtype, device=v.device)
            else:
                env[n] = size_of(v)
            continue
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        env[n] = n.target(*args, **kwargs)
    return env[mask]


def _classify(mask: torch.Tensor) -> str:
    if mask.dtype != torch.bool or mask.dim() < 2:
        return "other"
    if bool(mask.all()):
        return "all-true"
    q, k = mask.shape[-2:]
    if q == k and torch.equal(mask, torch.ones(q, k, dtype=torch.bool, device=mask.device).tril().expand_as(mask)):
        return "causal"
    return "other"


def simplify_attention_masks(gm: fx.GraphModule) -> dict[str, int]:
    """Drop shape-only SDPA masks (see the module docstring). Returns ``{"all-true": n, "causal": n}``."""
    counts = {"all-true": 0, "causal": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA or _is_causal(node):
            continue
        mask = _mask_arg(node)
        if mask is None:
            continue
        nodes = _subgraph(mask)
        leaves = _symbols(nodes) if nodes else None
        if not leaves:
            continue
        symbols = {str(v.node.expr): _hint(v) for leaf in leaves.values()
                   for v in ([leaf] if not isinstance(leaf, torch.Tensor) else leaf.shape) if isinstance(v, torch.SymInt)}
        trials = [{}, {s: h + 1 for s, h in symbols.items()}, {s: h // 3 + 2 for s, h in symbols.items()}]
        kinds = set()
        try:
            with torch.no_grad():
                for sizes in trials:
                    m = _evaluate(nodes, mask, leaves, sizes)
                    if m.numel() > _MAX_ELEMENTS:
                        kinds.add("too-large")
                        break
                    kinds.add(_classify(m))
        except Exception:  # noqa: BLE001 - an op we cannot replay on concrete sizes: leave the mask alone
            continue
        if len(kinds) != 1 or kinds & {"other", "too-large"}:
            continue
        kind = kinds.pop()
        AtenSDPA.update(node, attn_mask=None, **({"is_causal": True} if kind == "causal" else {}))
        counts[kind] += 1
    if any(counts.values()):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return counts
