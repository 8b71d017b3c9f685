"""Capture a causal LM with a static KV cache inside the graph: the prefill and decode methods of generation.

A :class:`CausalLMWithCache` wraps a Hugging Face causal LM (``GenerationMixin`` with ``can_generate()``)
so that one call runs the model on a block of new tokens and writes their keys and values into
preallocated per-layer buffers::

    logits = wrapper(input_ids [B, S] int64, position_ids [B, S] int64, cache_position [S] int64,
                     attention_mask [B, L] int64)        # -> [B, 1, vocab] (the last position's logits)

    k_i, v_i : [B, kv_heads, L, head_dim]  (model dtype)  written at cache_position (``index_copy_``)

``L`` is ``max_cache_len``; ``attention_mask[b, j]`` is 1 where cache slot j holds a real token of row b (0 for
left padding). The wrapper builds the 4-D additive mask itself — query i of row b sees slot j when
``attention_mask[b, j] == 1`` and ``j <= cache_position[i]`` (and ``cache_position[i] - j < sliding_window``
for a model whose every layer slides, Mistral's form) — and passes it to the model, which Hugging Face uses
as given (``masking_utils``: "If the mask is already 4D, simply return as-is"). The cache object handed to
the model is duck-typed on the one call every attention layer makes, ``cache.update(k, v, layer_idx, ...)``
(transformers 5.x; the keyword is ``cache=`` from 5.2x, ``past_key_values=`` before), so no private
transformers API is relied on.

The wrapper shares the model's children, so every parameter has the model's own FQN
(``model.layers.0.self_attn.q_proj.weight``): the plan and the weight store, keyed by FQN, serve the
prefill and decode graphs exactly as they serve ``forward``. torch.export (pre-dispatch IR) keeps the cache
writes as in-place ``aten.index_copy_`` on the buffers, and ``ExportedProgram.module()`` keeps the buffer
objects, so both graphs write and read the same cache tensors.

The cache layout and the mask follow transformers' ``StaticCache`` and ``generate`` (positions of a
left-padded row: ``cumsum(attention_mask) - 1``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["GenerationSpec", "generation_spec", "CausalLMWithCache", "capture_specs", "DEFAULT_MAX_CACHE_LEN"]

# Default max_cache_len when neither the caller nor the model's generation_config names one: the model's
# max_position_embeddings, capped here (a 128k-context model would otherwise preallocate gigabytes).
DEFAULT_MAX_CACHE_LEN = 4096


@dataclass(frozen=True)
class GenerationSpec:
    """The shape of a program's KV cache and what generation needs to know of the model.

    Attributes:
        max_batch_size: rows of the cache (B); ``generate`` pads smaller batches up to it.
        max_cache_len: slots per row (L): prompt + new tokens must fit.
        num_layers, kv_heads, head_dim: per layer, K and V are [B, kv_heads, L, head_dim].
        vocab_size: logits width.
        sliding_window: the window every layer applies (Mistral), or None.
        cache_kwarg: the model's keyword for the cache (``"cache"`` or ``"past_key_values"``).
        keeps_last_logits: the model accepts ``logits_to_keep`` (the LM head runs on the last position only).
        eos_token_id, pad_token_id: the model's ``generation_config`` values at compile time, ``generate``'s
            defaults (as transformers' ``generate`` takes them from the model).
    """

    max_batch_size: int
    max_cache_len: int
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: Optional[int]
    cache_kwarg: str
    keeps_last_logits: bool
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None


def _is_causal_lm(model: torch.nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    try:
        return callable(can) and bool(can()) and config is not None and not getattr(config, "is_encoder_decoder", False)
    except Exception:  # can_generate of a custom class may raise: then it is not a model fxquant can drive
        return False


def generation_spec(model: torch.nn.Module, max_batch_size: int = 1, max_cache_len: Optional[int] = None,
                    required: bool = False) -> Optional[GenerationSpec]:
    """The :class:`GenerationSpec` of a Hugging Face causal LM, or None for any other model.

    Args:
        model: the float model.
        max_batch_size: rows of the cache (≥ 1).
        max_cache_len: slots per row; default the model's ``generation_config.cache_config["max_cache_len"]``,
            else ``min(config.max_position_embeddings, DEFAULT_MAX_CACHE_LEN)``.
        required: raise instead of returning None when the model is not a causal LM fxquant can drive.

    Raises:
        ValueError: bad sizes; ``max_cache_len`` beyond ``max_position_embeddings``; a model whose layers mix
            sliding-window and full attention (Gemma 2/3) with ``max_cache_len`` above its window (each layer
            type needs its own mask; not supported yet: use ``max_cache_len <= sliding_window``).
        TypeError: ``required`` and the model is not a Hugging Face causal LM.
    """
    if not _is_causal_lm(model):
        if required:
            raise TypeError(f"generation needs a Hugging Face causal LM (a GenerationMixin whose can_generate() is "
                            f"True); {type(model).__name__} is not one")
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    limit = getattr(config, "max_position_embeddings", None)
    if max_cache_len is None:
        cache_config = getattr(getattr(model, "generation_config", None), "cache_config", None) or {}
        max_cache_len = cache_config.get("max_cache_len") if isinstance(cache_config, dict) else None
        if max_cache_len is None:
            max_cache_len = min(limit or DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_CACHE_LEN)
    if not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise ValueError(f"max_cache_len must be an int ≥ 2 (prompt + new tokens per row), got {max_cache_len!r}")
    if limit is not None and max_cache_len > limit:
        raise ValueError(f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings={limit}: "
                         f"positions beyond it were never trained; use max_cache_len <= {limit}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = _sliding_window(config, max_cache_len)
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    gen_config = getattr(model, "generation_config", None)
    return GenerationSpec(max_batch_size, max_cache_len, config.num_hidden_layers, kv_heads, head_dim,
                          config.vocab_size, window, cache_kwarg, "logits_to_keep" in params,
                          getattr(gen_config, "eos_token_id", None), getattr(gen_config, "pad_token_id", None))


def _sliding_window(config, max_cache_len: int) -> Optional[int]:
    """The window to apply to every layer, None when no window binds; raises for mixed layer types."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False or max_cache_len <= window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        raise ValueError(f"{type(config).__name__}: its layers mix sliding-window ({window} tokens) and full attention "
                         f"({sorted(set(types))}), and max_cache_len={max_cache_len} exceeds the window; fxquant's cache "
                         f"passes one mask to every layer, so compile with max_cache_len <= {window}")
    if types is not None and set(types) == {"full_attention"}:
        return None
    return int(window)


class _StaticKVCache:
    """What an attention layer calls on its cache: ``update`` writes the new keys/values at ``position`` and
    returns the whole [B, kv_heads, L, head_dim] buffers. Duck-typed on transformers' ``Cache``."""

    is_compileable = True

    def __init__(self, owner: "CausalLMWithCache", position: torch.Tensor):
        self.owner = owner
        self.position = position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        k, v = self.owner.cache(layer_idx)
        k.index_copy_(2, self.position, key_states.to(k.dtype))
        v.index_copy_(2, self.position, value_states.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def __len__(self) -> int:
        return self.owner.spec.num_layers


class CausalLMWithCache(torch.nn.Module):
    """The model plus its static KV cache, called as described in the module docstring.

    The wrapper shares the model's children (same FQNs, same tensors); the cache buffers ``kv_cache.k_<i>`` /
    ``kv_cache.v_<i>`` are its own, in the model's dtype on the model's device.
    """

    def __init__(self, model: torch.nn.Module, spec: GenerationSpec):
        super().__init__()
        object.__setattr__(self, "_lm", model)  # not a child: FQNs stay the model's
        for name, child in model.named_children():
            self._modules[name] = child
        self.spec = spec
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        shape = (spec.max_batch_size, spec.kv_heads, spec.max_cache_len, spec.head_dim)
        self.kv_cache = torch.nn.Module()
        for i in range(spec.num_layers):
            self.kv_cache.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype, device=p.device), persistent=False)
            self.kv_cache.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype, device=p.device), persistent=False)

    def cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self.kv_cache, f"k_{layer}"), getattr(self.kv_cache, f"v_{layer}")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        k0 = self.kv_cache.k_0
        slots = torch.arange(self.spec.max_cache_len, device=input_ids.device)
        q = cache_position[None, None, :, None]
        allowed = (attention_mask[:, None, None, :] != 0) & (slots[None, None, None, :] <= q)
        if self.spec.sliding_window is not None:
            allowed = allowed & (q - slots[None, None, None, :] < self.spec.sliding_window)
        mask = torch.zeros(allowed.shape, dtype=k0.dtype, device=k0.device).masked_fill(~allowed, torch.finfo(k0.dtype).min)
        kwargs = {self.spec.cache_kwarg: _StaticKVCache(self, cache_position), "use_cache": True}
        if self.spec.keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        out = self._lm(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:]


def capture_specs(spec: GenerationSpec, device: torch.device) -> dict[str, tuple[tuple, dict]]:
    """Example inputs and ``torch.export`` dynamic shapes of the two generation methods.

    ``prefill``: a block of 2 ≤ S ≤ L - 1 new tokens per row (S dynamic; a 1-token prompt runs ``decode``);
    ``decode``: one token per row, every shape static (the decode step can be replayed as a CUDA graph).
    """
    from torch.export import Dim

    b, length = spec.max_batch_size, spec.max_cache_len
    s = min(8, length - 1) if length > 2 else 2
    seq = Dim("prompt", min=2, max=max(length - 1, 3))

    def inputs(n):
        return (torch.zeros(b, n, dtype=torch.long, device=device),
                torch.arange(n, device=device).expand(b, n).contiguous(),
                torch.arange(n, device=device),
                torch.ones(b, length, dtype=torch.long, device=device))

    prefill_dyn = {"input_ids": {1: seq}, "position_ids": {1: seq}, "cache_position": {0: seq}, "attention_mask": None}
    decode_dyn = {"input_ids": None, "position_ids": None, "cache_position": None, "attention_mask": None}
    return {"prefill": (inputs(s), prefill_dyn), "decode": (inputs(1), decode_dyn)}
