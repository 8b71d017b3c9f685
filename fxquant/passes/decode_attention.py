"""Pass ``decode_attention``: grouped-query attention over the KV cache without repeating the cache.

Hugging Face's ``repeat_kv`` gives SDPA keys and values with one copy per query head::

    %k = aten.reshape(aten.expand(aten.unsqueeze(%k_cache, 2), [B, kv, rep, L, D]), [B, kv·rep, L, D])
    %o = aten.scaled_dot_product_attention(%q, %k, %v, %mask, scale=s)

With a mask, SDPA's fused kernels take no grouped keys (``enable_gqa`` serves the flash and math kernels only), so
each decode step would write and read ``rep`` copies of the whole cache per layer: at Llama-3-8B shapes
(rep = 4, L = 768) 0.8 GB a token at batch 1 and 25 GB at batch 32, beside 7.5 GB of int8 weights. For a short
static query block (S ≤ ``MAX_QUERY``, the decode method) this pass computes the same attention with the query
heads of a group stacked as rows, reading K and V once (a batched GEMM per (batch, kv head))::

    q_g = reshape(q, [B, kv, rep·S, D])                      (heads h = j·rep + r of kv head j, as repeat_kv)
    P   = softmax_fp32(q_g · Kᵀ · s + mask_g)                mask_g[b, 0, r·S + i, :] = mask[b, 0, i, :]
    o   = reshape(P.to(dtype) · V, [B, kv·rep, S, D])

which is the eager attention of Hugging Face (``eager_attention_forward``: matmul in the model's dtype, softmax
in fp32) and SDPA's math (Vaswani et al. 2017, eq. 1) per head. Only the decode method is rewritten
(``CompileContext.decode_methods``); prefill keeps SDPA.

On CUDA targets the step becomes one ``fxquant::decode_attention`` node instead: a Triton kernel that computes the
same grouped attention reading K and V once, with an online softmax split along the cache (flash-decoding; see
``fxquant.kernels.decode_attention``), where the form above is two batched GEMMs and Inductor's softmax between
them. CPU targets keep the form above, which Inductor fuses on CPUs.

The op also takes the decode graph's ``cache_position`` input (the placeholder of ``CausalLMWithCache.forward``'s
argument of that name, :data:`CACHE_POSITION`), so the kernel reads only the slots filled so far instead of all
``max_cache_len`` of them: the wrapper's mask already excludes every slot past ``cache_position``, so the
result is the same. The matmul form has static shapes and reads every slot.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir import ops
from ..ir.notes import NoteKind
from ..ir.views import static_shape
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
    if len(sizes) != 5 or not isinstance(sizes[2], int):
        return None
    return uns.args[0], sizes[2]


def decode_attention(gm: fx.GraphModule, fused: bool = False) -> int:
    """Rewrite every eligible SDPA of ``gm`` (module docstring); returns how many. ``fused``: as one
    ``fxquant::decode_attention`` node where its kernel takes the shapes and dtypes (CUDA targets)."""
    g = gm.graph
    done = 0
    position = _cache_position(g) if fused else None
    for node in list(g.nodes):
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        args = list(node.args) + [None] * (4 - len(node.args))
        q, k, v, mask = args[:4]
        kw = dict(node.kwargs)
        if len(node.args) > 4 or set(kw) - {"scale", "attn_mask"} or mask is None and kw.get("attn_mask") is None:
            continue  # dropout, is_causal, enable_gqa: not this pass's form
        mask = mask if mask is not None else kw["attn_mask"]
        rk, rv = _repeated(k), _repeated(v)
        shape, mshape = static_shape(q), static_shape(mask)
        if rk is None or rv is None or rk[1] != rv[1] or shape is None or mshape is None or len(shape) != 4:
            continue
        b, h, s, d = shape
        (k_cache, rep), (v_cache, _) = rk, rv
        if s > MAX_QUERY or h % rep or len(mshape) != 4 or mshape[1] != 1:
            continue
        kv = h // rep
        scale = kw.get("scale")
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        dtypes = {a.meta["val"].dtype for a in (q, k_cache, v_cache) if "val" in a.meta}
        if fused and len(dtypes) == 1 and kernel_fits(h, kv, s, d):
            with g.inserting_before(node):
                out = ops.DECODE_ATTENTION_C.call(g, ops.DECODE_ATTENTION_C.record(
                    q, k_cache, v_cache, mask, scale, position if position is not None and static_shape(position) == (s,)
                    else None))
        else:
            out = _grouped_matmuls(g, node, q, k_cache, v_cache, mask, (b, h, s, d), mshape, kv, rep, scale)
        out.meta.update({key: val for key, val in node.meta.items() if key in ("val", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(out)
        g.erase_node(node)
        done += 1
    if done:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    return done


def _grouped_matmuls(g: fx.Graph, node: fx.Node, q, k_cache, v_cache, mask, shape, mshape, kv, rep, scale) -> fx.Node:
    """The module docstring's form, inserted before ``node``: two batched GEMMs over K and V read once per kv head."""
    b, h, s, d = shape
    with g.inserting_before(node):
        qg = g.call_function(aten.reshape.default, (q, [b, kv, rep * s, d]))
        kt = g.call_function(aten.transpose.int, (k_cache, -1, -2))
        scores = g.call_function(aten.matmul.default, (qg, kt))
        scores = g.call_function(aten._to_copy.default, (scores,), {"dtype": torch.float32})
        scores = g.call_function(aten.mul.Tensor, (scores, scale))
        m = g.call_function(aten.unsqueeze.default, (mask, 2))
        m = g.call_function(aten.expand.default, (m, [mshape[0], 1, rep, s, mshape[3]]))
        m = g.call_function(aten.reshape.default, (m, [mshape[0], 1, rep * s, mshape[3]]))
        scores = g.call_function(aten.add.Tensor, (scores, m))
        p = g.call_function(aten._softmax.default, (scores, -1, False))
        p = g.call_function(aten._to_copy.default, (p,), {"dtype": q.meta["val"].dtype})
        o = g.call_function(aten.matmul.default, (p, v_cache))
        return g.call_function(aten.reshape.default, (o, [b, h, s, d]))


class DecodeAttention(FxquantPass):
    name = "decode_attention"

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.ctx.method not in self.ctx.decode_methods:
            return PassResult(gm, False)
        n = decode_attention(gm, fused=self.ctx.spec.device == "cuda")
        if n:
            k = sum(1 for node in gm.graph.nodes if node.target is ops.DECODE_ATTENTION)
            how = (f"{k} as one Triton kernel each (fxquant::decode_attention: online softmax, split along the cache)"
                   if k else "two batched GEMMs each")
            self.ctx.note(NoteKind.GENERATION, f"decode: {n} attention(s) read the KV cache once per kv head (grouped "
                          f"queries), not once per query head (Hugging Face's repeat_kv): {how}", self.name)
        return PassResult(gm, n > 0)
