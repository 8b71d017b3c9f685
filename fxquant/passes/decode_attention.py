"""Pass ``decode_attention``: grouped-query attention over the KV cache without repeating the cache.

Hugging Face's ``repeat_kv`` gives SDPA keys and values with one copy per query head::

    %k = aten.reshape(aten.expand(aten.unsqueeze(%k_cache, 2), [B, kv, rep, L, D]), [B, kv·rep, L, D])
    %o = aten.scaled_dot_product_attention(%q, %k, %v, %mask, scale=s)

With a mask, SDPA's fused kernels take no grouped keys (``enable_gqa`` serves the flash and math kernels only), so
each decode step would write and read ``rep`` copies of the whole cache per layer: at Llama-3-8B shapes
(rep = 4, L = 768) 0.8 GB a token at batch 1 and 25 GB at batch 32, beside 7.5 GB of int8 weights. For a short
static query block (S ≤ ``MAX_QUERY``, the decode method) this pass replaces that with one
``fxquant::decode_attention`` node, which computes the same attention with the query heads of a group stacked as
rows, reading K and V once::

    q_g = reshape(q, [B, kv, rep·S, D])                      (heads h = j·rep + r of kv head j, as repeat_kv)
    P   = softmax_fp32(q_g · Kᵀ · s + mask_g)                mask_g[b, 0, r·S + i, :] = mask[b, 0, i, :]
    o   = reshape(P · V, [B, kv·rep, S, D])

(SDPA's math, Vaswani et al. 2017, eq. 1, per head; ``fxquant.kernels.decode_attention.decode_attention_reference``
is Hugging Face's eager form of it). The decode method is rewritten (``CompileContext.decode_methods``) on every
target; the prefill method (a block of S tokens, S dynamic) on CPU targets, where the op is one SDPA call with
grouped heads (``enable_gqa``) over the filled slots. The op runs a Triton kernel on CUDA (online softmax split
along the cache, flash-decoding) and one SDPA call elsewhere (ATen's flash attention on CPUs).

CUDA prefill keeps Hugging Face's SDPA (a bound read from ``cache_position`` would be a host read inside the
prefill's CUDA graph), but over the block's own slots only (:func:`prefill_block_only`): ``fxquant.generation``
prefills a prompt block of S tokens into slots [0, S) of an empty cache, so ``repeat_kv`` copies and SDPA reads
``k_cache[:, :, :S]`` (and the mask's first S columns) instead of all ``max_cache_len`` slots, with S the query's
own (symbolic) length, no host read.

The op also takes the decode graph's ``cache_position`` input (the placeholder of ``CausalLMWithCache.forward``'s
argument of that name, :data:`CACHE_POSITION`), so it reads only the slots filled so far instead of all
``max_cache_len`` of them: the wrapper's mask already excludes every slot past ``cache_position``, so the
result is the same. The Triton kernel reads it on the device; the SDPA form on the host, so on CUDA, where that
would synchronize inside a CUDA graph, the SDPA form (shapes the kernel does not take) reads every slot.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir import ops
from ..ir.notes import NoteKind
from ..ir.views import sizes, static_shape
from ..kernels.decode_attention import fits as kernel_fits
from .base import FxquantPass

aten = torch.ops.aten
MAX_QUERY = 8  # query rows per row of the batch up to which the grouped form is used (decode: 1)
CACHE_POSITION = "cache_position"  # the decode graph's input of that name (fxquant.frontend.kv_cache.CausalLMWithCache)


def _cache_position(g: fx.Graph) -> Optional[fx.Node]:
    """The graph's ``cache_position`` input (int [S]), or None (a graph not captured by the KV-cache wrapper)."""
    for node in g.nodes:
        if node.op == "placeholder" and node.target == CACHE_POSITION:
            val = node.meta.get("val")
            if val is None or (val.dim() == 1 and val.dtype in (torch.int32, torch.int64)):
                return node
    return None


def _repeated(node) -> Optional[tuple[fx.Node, int]]:
    """``(x, rep)`` when ``node`` is ``reshape(expand(unsqueeze(x, 2), [B, kv, rep, L, D]), [B, kv·rep, L, D])``."""
    if not (isinstance(node, fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    exp = node.args[0]
    if not (isinstance(exp, fx.Node) and exp.target is aten.expand.default and len(exp.users) == 1):
        return None
    uns = exp.args[0]
    if not (isinstance(uns, fx.Node) and uns.target is aten.unsqueeze.default and uns.args[1] == 2 and len(uns.users) == 1):
        return None
    sizes = exp.args[1]
    if len(sizes) != 5 or not isinstance(sizes[2], int) or len(node.args[1]) != 4:
        return None
    return uns.args[0], sizes[2]


def _sdpa_over_repeat_kv(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node, fx.Node, int]]:
    """``(q, k_cache, v_cache, mask, rep)`` when ``node`` is Hugging Face's attention over the cache: SDPA of q over
    ``repeat_kv`` copies of K and V (:func:`_repeated`, one ``rep``) with an additive mask and no option beyond
    ``scale`` (no dropout, ``is_causal`` or ``enable_gqa``); else None."""
    if node.target is not aten.scaled_dot_product_attention.default or len(node.args) > 4:
        return None
    if set(node.kwargs) - {"scale", "attn_mask"}:
        return None
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 and node.args[3] is not None else node.kwargs.get("attn_mask")
    rk, rv = _repeated(k), _repeated(v)
    if not isinstance(mask, fx.Node) or rk is None or rv is None or rk[1] != rv[1]:
        return None
    return q, rk[0], rv[0], mask, rk[1]


def decode_attention(gm: fx.GraphModule, position: Optional[fx.Node], on_cuda: bool = False,
                     blocks: bool = False) -> tuple[int, int]:
    """Rewrite every eligible SDPA of ``gm`` into ``fxquant::decode_attention`` (module docstring); returns how many,
    and how many of them read only up to ``cache_position``. ``position``: the graph's ``cache_position`` input
    (:func:`_cache_position`) or None; ``on_cuda``: the graph runs on a CUDA target (the op reads
    ``cache_position`` only where its kernel runs); ``blocks``: also query blocks longer than :data:`MAX_QUERY` or
    dynamic (prefill), bounded by ``position`` (None: nothing to rewrite there)."""
    g = gm.graph
    done = bounded_done = 0
    for node in list(g.nodes):
        match = _sdpa_over_repeat_kv(node)
        if match is None:
            continue
        q, k_cache, v_cache, mask, rep = match
        shape, mshape = sizes(q), sizes(mask)  # None for a dynamic dimension (a prefill block's S)
        if shape is None or mshape is None or len(shape) != 4:
            continue
        b, h, s, d = shape
        if None in (b, h, d) or h % rep or len(mshape) != 4 or mshape[1] != 1:
            continue
        step = s is not None and s <= MAX_QUERY  # a decode step: a static block of a few queries
        if not step and not (blocks and position is not None):
            continue
        kv = h // rep
        scale = node.kwargs.get("scale")
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        dtypes = {a.meta["val"].dtype for a in (q, k_cache, v_cache) if "val" in a.meta}
        # the filled slots only, where the op reads cache_position without a host synchronization
        bounded = position is not None and (not step or static_shape(position) == (s,)) and (
            not on_cuda or len(dtypes) == 1 and step and kernel_fits(h, kv, s, d))
        with g.inserting_before(node):
            out = ops.DECODE_ATTENTION_C.call(g, ops.DECODE_ATTENTION_C.record(
                q, k_cache, v_cache, mask, scale, position if bounded else None))
        out.meta.update({key: val for key, val in node.meta.items() if key in ("val", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(out)
        g.erase_node(node)
        done += 1
        bounded_done += bounded
    if done:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    return done, bounded_done


def prefill_block_only(gm: fx.GraphModule) -> int:
    """CUDA prefill: every SDPA over ``repeat_kv`` of the cache reads the first S slots (S = the query block's
    length, ``q.size(2)``) of K, V and the mask (module docstring); returns how many. The prefill method's contract
    (``fxquant.generation._prefill``): its block of S tokens fills slots [0, S), so the mask already excludes every
    later slot."""
    g = gm.graph
    done = 0
    for node in list(g.nodes):
        match = _sdpa_over_repeat_kv(node)
        if match is None:
            continue
        q, k_cache, v_cache, mask, _ = match
        shape, mshape = sizes(q), sizes(mask)
        if shape is None or mshape is None or len(shape) != 4 or len(mshape) != 4 or shape[2] is not None:
            continue  # a static block (the decode method's form) or not [B, H, S, D]
        with g.inserting_before(node):  # repeat_kv again, over the first S slots, just before the SDPA
            length = g.call_function(aten.sym_size.int, (q, 2))
            for old, cache in ((node.args[1], k_cache), (node.args[2], v_cache)):
                big, flat = old.args[0].args[1], old.args[1]  # repeat_kv's expand and reshape sizes
                cut = g.call_function(aten.slice.Tensor, (cache, 2, 0, length))
                grown = g.call_function(aten.expand.default, (g.call_function(aten.unsqueeze.default, (cut, 2)),
                                                              [*big[:3], length, big[4]]))
                node.replace_input_with(old, g.call_function(old.target, (grown, [*flat[:2], length, flat[3]])))
            node.replace_input_with(mask, g.call_function(aten.slice.Tensor, (mask, 3, 0, length)))
        done += 1
    if done:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    return done


class DecodeAttention(FxquantPass):
    name = "decode_attention"

    def call(self, gm: fx.GraphModule) -> PassResult:
        on_cuda = self.ctx.spec.device == "cuda"
        decode = self.ctx.method in self.ctx.decode_methods
        position = _cache_position(gm.graph)
        if not decode and position is None:
            return PassResult(gm, False)  # forward: no KV cache
        if not decode and on_cuda:
            n = prefill_block_only(gm)
            if n:
                self.ctx.note(NoteKind.GENERATION, f"{self.ctx.method}: {n} attention(s) over the prompt block's own "
                              "cache slots, not all max_cache_len of them (Hugging Face's SDPA otherwise)", self.name)
            return PassResult(gm, n > 0)
        n, bounded = decode_attention(gm, position, on_cuda=on_cuda, blocks=not decode)
        if n:
            how = ("a Triton kernel on CUDA (online softmax, split along the cache), one SDPA call elsewhere" if on_cuda
                   else "one SDPA call each (ATen's flash attention)")
            self.ctx.note(NoteKind.GENERATION, f"{self.ctx.method}: {n} attention(s) as fxquant::decode_attention, "
                          "reading the KV cache once per kv head (grouped queries), not once per query head "
                          f"(Hugging Face's repeat_kv), {bounded} of them only up to cache_position: {how}", self.name)
        return PassResult(gm, n > 0)
