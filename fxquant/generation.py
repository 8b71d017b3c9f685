"""Token generation over a program's ``"prefill"`` and ``"decode"`` methods (:mod:`fxquant.frontend.kv_cache`).

:func:`generate` follows transformers' ``GenerationMixin.generate`` for decoder-only models: greedy or
multinomial sampling (``temperature``, ``top_k``, ``top_p``, ``min_p`` through transformers' own logits warpers;
the draw is ``torch.multinomial`` on the default generator, so ``torch.manual_seed`` reproduces a run, and with
transformers' order of processors and draws the same seed gives transformers' tokens), ``num_return_sequences``
samples per prompt, ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_length`` and ``min_new_tokens``
(transformers' logits processors, in its order), per-row EOS with finished rows padded with ``pad_token_id``,
left-padded batches with an attention mask (positions ``cumsum(mask) - 1``, as transformers computes them), a
streamer (``put`` of the prompt, then of each new token, then ``end``), and the result ``[batch, prompt + new]``
int64. Every other transformers generation feature (beam search, assisted decoding, ...) is refused by name, from
keyword arguments and from ``generation_config`` alike, rather than ignored.

One prefill call writes the prompt's keys and values into the cache and returns the last position's logits;
then one decode call per token. On CUDA the decode step is captured once as a CUDA graph per program (static
input buffers, replayed per token: no host work per token beyond the replay and the sampling step); greedy
decoding without a streamer captures the token choice and the next step's inputs with it (:func:`_greedy_loop`),
so a token costs one replay and nothing between replays (sampling and streamers keep the per-token loop, whose
argmax / multinomial, EOS bookkeeping and input copies run as a dozen small eager launches between replays). The
graphs are captured again after the program's tensors move (``.to()``); prefill likewise, one graph per prompt-block length,
the block left-padded to a multiple of :data:`PREFILL_BUCKET` slots (masked out). Both graphs run through ``torch.compile`` where
``fxquant.compile(..., compile_generation=...)`` says so (default: on CUDA and x86 CPUs with a C++ compiler), see :func:`fxquant.compiled.compiled_graph`; the first
``generate`` pays the compile (seconds to a minute; a CPU needs a C++ compiler).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import InputError
from .ir.notes import NoteKind

__all__ = ["generate", "GenerationState", "GENERATION_METHODS"]


@dataclass
class GenerationState:
    """Per program: the captured decode CUDA graph and its static buffers (None until first needed)."""

    graph: Any = None
    key: Any = None
    inputs: tuple = ()
    logits: Optional[torch.Tensor] = None
    prefill: dict = field(default_factory=dict)  # (prompt block length, ...) -> (graph, static inputs, logits), LRU order
    pool: Any = None  # the prefill graphs' shared memory pool
    greedy: Any = None  # (key, _GreedyStep) of the greedy decode loop's body (:func:`_greedy_step`)
    graphs: bool = True  # CUDA graphs on CUDA (False: every call runs the graph module, for measurements)
    # method -> torch.compile of its graph (compile(..., compile_generation=..., compile_forward=...)), made on first use
    compiled: dict = field(default_factory=dict)


GENERATION_METHODS = ("prefill", "decode")
PREFILL_BUCKET = 64  # on CUDA, prompt blocks are left-padded to a multiple of this many slots (one graph each)
PREFILL_GRAPHS = 8  # captured prefill graphs kept per program
GREEDY_MAX_EOS = 16  # EOS ids the greedy step's static buffer holds (more: the per-token loop serves the call)


# the settings generate implements (keyword arguments override generation_config's fields)
_SETTINGS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "no_repeat_ngram_size", "min_length", "min_new_tokens", "num_return_sequences",
             "eos_token_id", "pad_token_id", "return_dict_in_generate", "output_scores", "output_logits", "stop_strings",
             "max_time")
# transformers' generation features it does not, each with the value that leaves it off (None is off too); from
# generation_config as from keyword arguments, any other value is refused rather than ignored
_UNSUPPORTED = {"num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None,
                "assistant_model": None, "prompt_lookup_num_tokens": None, "dola_layers": None, "typical_p": 1.0,
                "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None, "guidance_scale": 1.0, "sequence_bias": None,
                "bad_words_ids": None, "force_words_ids": None, "constraints": None, "forced_bos_token_id": None,
                "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                "exponential_decay_length_penalty": None, "renormalize_logits": False, "remove_invalid_values": False,
                "watermarking_config": None, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
                "output_attentions": False, "output_hidden_states": False}


def _settings(generation_config, kwargs: dict, spec) -> dict:
    """Merge ``generation_config`` and the keyword arguments; refuse what is not implemented rather than ignore
    it. Without a ``generation_config``, EOS and pad ids are the model's (``spec``, read at compile time) and the
    rest transformers' defaults: the model's sampling settings apply when its config is passed explicitly."""
    import transformers

    if generation_config is None:
        generation_config = transformers.GenerationConfig(eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id)
    elif not isinstance(generation_config, transformers.GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got {type(generation_config).__name__}")
    out = {k: getattr(generation_config, k, None) for k in _SETTINGS}
    for k, v in kwargs.items():
        if v is not None:
            out[k] = v
    for k, neutral in _UNSUPPORTED.items():
        v = kwargs.get(k, getattr(generation_config, k, neutral))
        if v is not None and v != neutral:
            where = "" if k in kwargs else " (from generation_config)"
            raise ValueError(f"fxquant's generate does not implement {k}={v!r}{where}: it implements greedy decoding "
                             "and sampling (temperature, top_k, top_p, min_p, num_return_sequences) with "
                             f"repetition_penalty, no_repeat_ngram_size, min_length and min_new_tokens; leave {k} at "
                             f"{neutral!r}")
    return out


def _processors(s: dict, prompt: int, mask: torch.Tensor, eos_ids: Optional[torch.Tensor], custom=None):
    """transformers' logits processors for ``s``, in the order of its ``GenerationMixin._get_logits_processor``
    (repetition penalty, n-gram ban, minimum lengths; the caller's ``custom`` processors, each replacing a built one
    of its type and the rest appended, as ``_merge_criteria_processor_list`` does; then, when sampling, the warpers
    temperature, top-k, top-p, min-p), each called as transformers calls it: ``(ids so far [B, t] int64, scores
    [B, V] fp32) -> scores``. The minimum lengths act only where there is an EOS id, as there. ``mask``: the
    attention mask [B, prompt] int64; the repetition penalty skips each row's left padding, as transformers ≥ 5.2x
    computes it from the mask (earlier it penalises the pad id, as transformers did).

    Raises:
        ValueError: a setting out of its range (transformers' own messages)."""
    from transformers.generation import logits_process as lp

    out = lp.LogitsProcessorList()
    penalty = s["repetition_penalty"]
    if penalty is not None and penalty != 1.0:
        try:  # each row's left padding, skipped as transformers >= 5.2x skips it (a [B] tensor of pad counts)
            proc = lp.RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=(mask != 0).int().argmax(1))
        except (TypeError, ValueError):  # earlier: no such argument, or an int only (5.17); their generate passes none
            proc = lp.RepetitionPenaltyLogitsProcessor(float(penalty))
        out.append(proc)
    if s["no_repeat_ngram_size"]:
        out.append(lp.NoRepeatNGramLogitsProcessor(int(s["no_repeat_ngram_size"])))
    if eos_ids is not None and s["min_length"]:
        out.append(lp.MinLengthLogitsProcessor(int(s["min_length"]), eos_ids, device=str(eos_ids.device)))
    if eos_ids is not None and s["min_new_tokens"]:
        out.append(lp.MinNewTokensLengthLogitsProcessor(prompt, int(s["min_new_tokens"]), eos_ids,
                                                        device=str(eos_ids.device)))
    out = _merged(out, custom or [])
    if not s["do_sample"]:
        return out
    if s["temperature"] is not None and s["temperature"] != 1.0:
        out.append(lp.TemperatureLogitsWarper(float(s["temperature"])))
    if s["top_k"] is not None and s["top_k"] != 0:
        out.append(lp.TopKLogitsWarper(int(s["top_k"])))
    if s["top_p"] is not None and s["top_p"] < 1.0:
        out.append(lp.TopPLogitsWarper(float(s["top_p"])))
    if s["min_p"] is not None:
        out.append(lp.MinPLogitsWarper(float(s["min_p"])))
    return out


def _criteria(s: dict, tokenizer, custom):
    """transformers' stopping criteria for ``s`` beside EOS and the length limit, which ``generate`` checks itself:
    ``MaxTimeCriteria`` (its clock starts here, before prefill, as in transformers), ``StopStringCriteria`` (needs
    the tokenizer), merged with the caller's as :func:`_merged` does; None where there are none.

    Raises:
        ValueError: stop_strings without a tokenizer."""
    from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList, StopStringCriteria

    built = StoppingCriteriaList()
    if s["max_time"] is not None:
        built.append(MaxTimeCriteria(float(s["max_time"])))
    if s["stop_strings"] is not None:
        if tokenizer is None:
            raise ValueError(f"stop_strings={s['stop_strings']!r} needs the model's tokenizer to find them in the "
                             "tokens: pass tokenizer= to generate")
        built.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=s["stop_strings"]))
    out = _merged(built, list(custom or []))
    return out if len(out) else None


def _merged(built, custom):
    """``built`` with each element replaced by the ``custom`` one of its type, then the other ``custom`` ones
    appended (transformers' ``_merge_criteria_processor_list``, which also lets the caller's win)."""
    out = type(built)()
    for b in built:
        out.append(next((c for c in custom if type(c) is type(b)), b))
    out.extend(c for c in custom if c not in out)
    return out


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(v) for v in eos.flatten().tolist()]
    return [int(eos)] if isinstance(eos, int) else [int(v) for v in eos]


def generate(qmodel, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: Optional[int] = None, do_sample: Optional[bool] = None,
             temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id=None, pad_token_id: Optional[int] = None, generation_config=None, streamer=None,
             logits_processor=None, stopping_criteria=None, use_cache: Optional[bool] = None, tokenizer=None,
             **unsupported: Any) -> torch.Tensor:
    """See :meth:`fxquant.QuantizedModel.generate`."""
    del use_cache  # accepted as transformers' callers pass it: the tokens are the same, and the cache is always used
    program = qmodel.program
    spec = program.generation
    if spec is None:
        raise InputError("this QuantizedModel has no KV cache: it was compiled without the generation methods. "
                         "Compile a Hugging Face causal LM with example inputs (or generation=True) to generate")
    qmodel.check_calibrated("generate")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InputError(f"input_ids must be an int64 tensor [batch, prompt_length], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    unknown = set(unsupported) - set(_UNSUPPORTED) - set(_SETTINGS)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {sorted(unknown)}")
    s = _settings(generation_config, {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                                      "top_k": top_k, "top_p": top_p, "eos_token_id": eos_token_id,
                                      "pad_token_id": pad_token_id, **unsupported}, spec)
    copies = s["num_return_sequences"] or 1
    if not isinstance(copies, int) or copies < 1:
        raise ValueError(f"num_return_sequences must be an int ≥ 1, got {copies!r}")
    if copies > 1:
        if not s["do_sample"]:  # transformers refuses it too: every copy would be the same greedy tokens
            raise ValueError(f"num_return_sequences={copies} needs do_sample=True (greedy decoding would return "
                             f"{copies} equal rows per prompt)")
        # as transformers: each prompt repeated in place, its samples in consecutive rows of the result
        input_ids = input_ids.repeat_interleave(copies, 0)
        if isinstance(attention_mask, torch.Tensor):
            attention_mask = attention_mask.repeat_interleave(copies, 0)
    batch, prompt = input_ids.shape
    new = s["max_new_tokens"]
    if new is None:
        new = (s["max_length"] or 20) - prompt  # transformers' default max_length is 20
    if not isinstance(new, int) or new < 0:
        raise ValueError(f"max_new_tokens must be an int ≥ 0, got {new!r}")
    if batch < 1 or prompt < 1:
        raise InputError(f"input_ids {tuple(input_ids.shape)}: give at least one prompt of at least one token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= spec.vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {spec.vocab_size}): "
                         "tokenize with the model's own tokenizer")
    if batch > spec.max_batch_size:
        rows = f"{batch // copies} prompts × num_return_sequences={copies} = {batch} rows" if copies > 1 else \
            f"{batch} prompts"
        raise InputError(f"{rows}, but the KV cache holds max_batch_size={spec.max_batch_size} rows: "
                         f"compile with max_batch_size={batch} or generate in smaller batches")
    if prompt + new > spec.max_cache_len:
        raise InputError(f"prompt length {prompt} + max_new_tokens {new} = {prompt + new} tokens per row exceeds the KV "
                         f"cache's max_cache_len={spec.max_cache_len}: compile with max_cache_len ≥ {prompt + new}, or "
                         "shorten the prompt or max_new_tokens")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, prompt):
            raise InputError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(getattr(attention_mask, 'shape', ()))}")
        if not bool((attention_mask[:, -1] != 0).all()):
            raise InputError("attention_mask: every row's last prompt token must be a real token (pad on the left, as "
                             "decoder-only generation requires: tokenizer.padding_side = 'left')")
    eos = _eos_list(s["eos_token_id"])
    pad = s["pad_token_id"]
    if pad is None:
        pad = eos[0] if eos else 0
    device = _device_of(program)
    ids = input_ids.to(device)
    eos_ids = torch.tensor(eos, device=device) if eos else None
    mask = attention_mask.to(device=device, dtype=torch.long) if attention_mask is not None else torch.ones_like(ids)
    processors = _processors(s, prompt, mask, eos_ids, logits_processor)
    criteria = _criteria(s, tokenizer, stopping_criteria)
    # the prompt block, left-padded to `padded` slots where prefill replays CUDA graphs (padding is masked out)
    padded = _padded_length(qmodel, prompt, new, spec, device)
    lead = padded - prompt
    mask_full = torch.zeros(spec.max_batch_size, spec.max_cache_len, dtype=torch.long, device=device)
    mask_full[:batch, lead:padded] = mask != 0
    mask_full[batch:, :padded] = 1  # rows beyond the batch: discarded filler
    positions = (mask_full[:, :padded].cumsum(-1) - 1).clamp_min(0)
    rows = torch.zeros(spec.max_batch_size, padded, dtype=torch.long, device=device)
    rows[:batch, lead:] = ids
    if streamer is not None:
        streamer.put(input_ids.cpu())

    out = [ids]
    as_dict = bool(s["return_dict_in_generate"])
    kept = {k: [] for k in ("scores", "logits") if as_dict and s[f"output_{k}"]}  # per step, [B, V] fp32 each
    if new == 0:
        return _as_output(ids, kept, prompt) if as_dict else ids
    logits = _prefill(qmodel, rows, positions, mask_full)
    next_pos = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # Where the device runs ahead of the host (CUDA), "has every row finished?" is read one step late, so that the
    # host never waits for the GPU between tokens; a step past the end is trimmed below (_trim_after_eos)
    lagged = bool(eos) and streamer is None and criteria is None and _lag_eos_check(device)
    if (not s["do_sample"] and not len(processors) and criteria is None and streamer is None and not kept
            and len(eos) <= GREEDY_MAX_EOS and _fused_greedy(device)):
        result = _greedy_loop(qmodel, spec, device, logits, ids, new, padded, next_pos, mask_full, eos_ids, pad, lagged)
        if result is not None:
            result = _trim_after_eos(result, prompt, eos_ids) if lagged else result
            return _as_output(result, kept, prompt) if as_dict else result
    decode = _decoder(qmodel, spec, device)  # here, not before: the greedy step captures its own graph
    done_prev = None
    for step in range(new):
        # kept steps need a copy: the decode graph rewrites its logits buffer at the next replay
        scores = logits[:batch, -1].to(torch.float32, copy=bool(kept))
        if "logits" in kept:
            kept["logits"].append(scores)
        if len(processors):  # they read the ids so far; greedy and plain sampling need none (no concatenation)
            scores = processors(torch.cat(out, 1), scores)
        if "scores" in kept:
            kept["scores"].append(scores)
        if s["do_sample"]:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        if eos:  # as transformers: finished rows are padded only where an EOS id is set
            token = torch.where(finished, torch.full_like(token, pad), token)
        out.append(token[:, None])
        if streamer is not None:
            streamer.put(token.cpu())
        if eos:
            finished |= torch.isin(token, eos_ids)
        if criteria is not None:  # called as transformers calls them: (ids so far, scores=None) -> [B] bool
            finished |= criteria(torch.cat(out, 1), None).to(device)
        if (eos or criteria is not None) and not lagged and bool(finished.all()):
            break
        if step == new - 1:
            break
        if lagged:  # the previous step's flag, queued before the decode step the GPU is running: no stall
            if done_prev is not None and _host_flag(done_prev):
                break
            done_prev = _flag_to_host(finished.all())
        slot = padded + step
        mask_full[:, slot] = 1
        step_ids = torch.zeros(spec.max_batch_size, 1, dtype=torch.long, device=device)
        step_ids[:batch, 0] = token
        logits = decode(step_ids, next_pos, slot, mask_full)
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    result = torch.cat(out, 1)
    result = _trim_after_eos(result, prompt, eos_ids) if lagged else result
    return _as_output(result, kept, prompt) if as_dict else result


def _as_output(sequences: torch.Tensor, kept: dict, prompt: int):
    """transformers' ``GenerateDecoderOnlyOutput``: ``sequences`` [B, prompt + n], and where asked for, ``scores``
    (after the processors and warpers) and ``logits`` (raw), tuples of n tensors [B, V] fp32 (steps past a late
    EOS check's trim dropped), as ``generate(..., return_dict_in_generate=True, output_scores=True,
    output_logits=True)`` returns them; ``compute_transition_scores`` reads them as it reads transformers'."""
    from transformers.generation import GenerateDecoderOnlyOutput

    steps = {k: tuple(v[:sequences.shape[1] - prompt]) for k, v in kept.items()}
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=steps.get("scores"), logits=steps.get("logits"))


def _fused_greedy(device: torch.device) -> bool:
    """Whether greedy generation without a streamer runs :func:`_greedy_loop` (the token choice and the next step's
    inputs computed on the device, captured with the decode step as one CUDA graph) rather than the per-token loop
    of :func:`generate` (sampling's and streamers'): on CUDA. A CPU has no graph to capture, and the same step run
    eagerly there was slower or level (Qwen2-0.5B shapes, 2 cores of an AVX2 EPYC: 66.1 against 58.8 ms/token at
    batch 1 in ``bench/generate_cpu.py``, mixed when alternated in one process; docs/benchmarks.md), so CPUs keep the
    per-token loop; the tests run both loops on the CPU."""
    return device.type == "cuda"


def _greedy_loop(qmodel, spec, device, logits, ids, new, padded, next_pos, mask_full, eos_ids, pad,
                 lagged) -> Optional[torch.Tensor]:
    """Greedy decoding after prefill, one :func:`_greedy_step` per token after the first: ``[batch, prompt + T]``
    int64, T ≤ ``new`` (fewer where every row emitted an EOS; with ``lagged``, one pad-only step may follow, which
    the caller trims); None where the step could not be captured (the caller runs the per-token loop). The first
    token comes from the prefill logits here; each step then decodes the last token, takes the argmax of its logits
    (the first of equal maxima, as ``torch.argmax`` and transformers), writes the pad id for rows already finished,
    and advances the positions, the cache slot and the mask on the device."""
    step = None
    if new > 1:
        step = _greedy_step(qmodel, spec, device)
        if step is None:
            return None
    eos = eos_ids is not None
    batch = ids.shape[0]
    token = logits[:batch, -1].float().argmax(-1)
    finished = torch.isin(token, eos_ids) if eos else torch.zeros(batch, dtype=torch.bool, device=device)
    if step is None or (eos and not lagged and bool(finished.all())):
        return torch.cat([ids, token[:, None]], 1)
    step.tok.zero_()
    step.tok[:batch, 0] = token
    step.pos.copy_(next_pos)
    step.slot.fill_(padded)
    step.mask.copy_(mask_full)
    step.finished.fill_(True)  # rows past the batch are filler: finished from the start, so all() reads the batch's
    step.finished[:batch] = finished
    step.col.zero_()
    step.pad.fill_(pad)
    step.eos.fill_(-1)  # never a token id
    if eos:
        step.eos[:len(eos_ids)] = eos_ids
    done = 0
    pending = _flag_to_host(step.finished.all()) if lagged else None
    while done < new - 1:
        step.run()
        done += 1
        if not eos:
            continue
        if lagged:  # the flag queued before this step: all finished then, so this step was pad-only (trimmed)
            if _host_flag(pending):
                break
            pending = _flag_to_host(step.finished.all())
        elif bool(step.finished.all()):
            break
    return torch.cat([ids, token[:, None], step.out[:batch, :done]], 1)


@dataclass
class _GreedyStep:
    """The static buffers of the greedy decode step (max_batch_size rows B, max_cache_len slots L) and ``run``, which
    performs one step: a CUDA graph replay on CUDA, the eager step elsewhere."""

    tok: torch.Tensor  # [B, 1] int64: the token each row decodes next
    pos: torch.Tensor  # [B, 1] int64: its position
    slot: torch.Tensor  # [1] int64: the cache slot it is written to
    mask: torch.Tensor  # [B, L] int64: the attention mask over the cache
    finished: torch.Tensor  # [B] bool: rows that emitted an EOS (filler rows: True)
    out: torch.Tensor  # [B, L] int64: the tokens chosen, column per step
    col: torch.Tensor  # [1] int64: the next column of ``out``
    pad: torch.Tensor  # [] int64: the pad id
    eos: torch.Tensor  # [GREEDY_MAX_EOS] int64: the EOS ids, -1 where unused
    run: Any = None


def _greedy_body(qmodel, st: _GreedyStep) -> None:
    """One greedy step on ``st``'s buffers, in place (the function the CUDA graph captures)."""
    st.mask.index_fill_(1, st.slot, 1)
    logits = qmodel._call_graph("decode", st.tok, st.pos, st.slot, st.mask)
    token = torch.where(st.finished, st.pad, logits[:, -1].argmax(-1))  # bf16 → fp32 is exact: the same argmax
    st.out.index_copy_(1, st.col, token[:, None])
    st.finished.logical_or_((token[:, None] == st.eos).any(-1))  # isin by broadcasting: no size-dependent path
    st.tok.copy_(token[:, None])
    st.pos.add_(1)
    st.slot.add_(1)
    st.col.add_(1)


def _greedy_step(qmodel, spec, device: torch.device) -> Optional[_GreedyStep]:
    """The program's greedy step, made once per program and device placement: on CUDA (graphs on) the body is
    captured as one CUDA graph after warm-up calls (which write cache slot L-1, as :func:`_capture_decode`'s do);
    None, for good and with a note in the report, where that capture fails."""
    state: GenerationState = qmodel._generation_state
    key = (*_graph_key(qmodel, device), _graphed(qmodel, device))
    if state.greedy is not None and state.greedy[0] == key:
        return state.greedy[1]
    b, length = spec.max_batch_size, spec.max_cache_len

    def long(*shape, fill=0):
        return torch.full(shape, fill, dtype=torch.long, device=device)

    st = _GreedyStep(tok=long(b, 1), pos=long(b, 1, fill=length - 1), slot=long(1, fill=length - 1),
                     mask=long(b, length, fill=1), finished=torch.ones(b, dtype=torch.bool, device=device),
                     out=long(b, length), col=long(1, fill=length - 1), pad=long(), eos=long(GREEDY_MAX_EOS, fill=-1))
    if not _graphed(qmodel, device):
        def run():
            with torch.no_grad():
                _greedy_body(qmodel, st)
    else:
        def warm():  # compile and warm every kernel outside the capture; slot L-1 each time
            st.pos.fill_(length - 1)
            st.slot.fill_(length - 1)
            st.col.fill_(length - 1)
            _greedy_body(qmodel, st)

        try:
            graph, _ = _cuda_graph(device, lambda: _greedy_body(qmodel, st), warm=warm, warmups=3)
        except _CaptureFailed as e:  # an op that cannot be captured: the per-token loop serves greedy decoding
            state.greedy = (key, None)
            if qmodel._report is not None:
                qmodel._report.notes.add(NoteKind.GENERATION, f"decode: the greedy step's CUDA graph capture failed; "
                                         f"greedy decoding runs the per-token loop ({e})", "generate")
            return None
        run = graph.replay
    st.run = run
    state.greedy = (key, st)
    return st


def _lag_eos_check(device: torch.device) -> bool:
    """Whether generate reads its all-rows-finished flag one step late: on CUDA, where a read at once would make the
    host wait for each token's kernels and leave the GPU idle while it prepares the next step."""
    return device.type == "cuda"


def _flag_to_host(flag: torch.Tensor):
    """Start copying a 0-d bool tensor to the host without waiting: (host tensor, CUDA event after the copy, or
    None where the device is the host)."""
    if flag.device.type != "cuda":
        return flag.clone(), None
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _host_flag(pending) -> bool:
    host, event = pending
    if event is not None:
        event.synchronize()
    return bool(host)


def _trim_after_eos(result: torch.Tensor, prompt: int, eos_ids: torch.Tensor) -> torch.Tensor:
    """``result`` [B, prompt + T] cut after the step at which the last row emitted its first EOS (what stopping at
    once gives: transformers' semantics), where every row emitted one; else unchanged. The columns cut are the
    pad-only steps a one-step-late check lets through."""
    hit = torch.isin(result[:, prompt:], eos_ids)
    if not bool(hit.any(1).all()):  # also when nothing was generated (no column to hit)
        return result
    end = int(hit.int().argmax(1).max()) + 1  # argmax of a 0/1 row: its first EOS
    return result[:, :prompt + end]


def _device_of(program) -> torch.device:
    return program.methods["decode"].graph_module.kv_cache.k_0.device


def _graphed(qmodel, device: torch.device) -> bool:
    """Whether prefill and decode replay CUDA graphs on ``device``: CUDA, unless a capture failed (or a
    measurement turned them off: ``GenerationState.graphs``)."""
    return device.type == "cuda" and qmodel._generation_state.graphs


def _prefill_bucket(qmodel, device: torch.device) -> int:
    """Prompt blocks are padded to a multiple of this many slots: :data:`PREFILL_BUCKET` where prefill replays
    CUDA graphs, else 1 (no padding)."""
    return PREFILL_BUCKET if _graphed(qmodel, device) else 1


def _padded_length(qmodel, prompt: int, new: int, spec, device: torch.device) -> int:
    """Cache slots the prompt block takes: the prompt length rounded up to a multiple of :func:`_prefill_bucket`
    (one captured prefill graph serves every length of a bucket; the extra slots are left padding, masked out),
    unless the padded block plus the new tokens would not fit the cache; a 1-token prompt is never padded."""
    bucket = _prefill_bucket(qmodel, device)
    padded = -(-prompt // bucket) * bucket
    return padded if prompt > 1 and padded + new <= spec.max_cache_len else prompt


def _prefill(qmodel, rows, positions, mask_full):
    """One prefill call: ``rows`` [B, S] fill cache slots [0, S); returns the last position's logits [B, 1, V]
    (a tensor of the caller's own). On CUDA a CUDA graph per S (:func:`_prefill_graph`). The prefill method's
    contract: its block starts at slot 0 (CUDA prefill attends over slots [0, S) only,
    ``passes.decode_attention.prefill_block_only``)."""
    prompt = rows.shape[1]
    cache_position = torch.arange(prompt, device=rows.device)
    method = "prefill" if prompt > 1 else "decode"
    with torch.no_grad():
        if method == "prefill" and _graphed(qmodel, rows.device):
            return _prefill_graph(qmodel, rows, positions, cache_position, mask_full)
        return qmodel._call_graph(method, rows, positions, cache_position, mask_full)


def _prefill_graph(qmodel, rows, positions, cache_position, mask_full):
    """Prefill through a CUDA graph captured for this prompt-block length: a length seen for the first time runs
    as it is (compiling, autotuning and warming every kernel at these shapes) and is then captured, so later
    calls replay it without host work per kernel (prefill at batch 1 is bound by the host otherwise: H100,
    Llama-3-8B shapes cut to 8 layers, 512 tokens, fxquant's kernels 2.6 ms of a 9.3 ms call). The graphs share
    one memory pool (they are replayed one at a time and their logits copied out at once), at most
    :data:`PREFILL_GRAPHS` of them (least recently used dropped)."""
    state: GenerationState = qmodel._generation_state
    device = rows.device
    key = (rows.shape[1], *_graph_key(qmodel, device))
    entry = state.prefill.get(key)
    if entry is None:
        logits = qmodel._call_graph("prefill", rows, positions, cache_position, mask_full)
        if state.pool is None:
            state.pool = torch.cuda.graph_pool_handle()
        static = tuple(t.clone() for t in (rows, positions, cache_position, mask_full))
        try:
            # capture records the kernels without running them: the cache is untouched until a replay
            graph, out = _cuda_graph(device, lambda: qmodel._call_graph("prefill", *static), pool=state.pool)
        except _CaptureFailed as e:  # an op that cannot be captured: prefill runs without graphs from now on
            state.graphs = False
            if qmodel._report is not None:
                qmodel._report.notes.add(NoteKind.GENERATION, f"prefill: CUDA graph capture failed, prefill and decode "
                                         f"run without graphs ({e})", "generate")
            return logits
        state.prefill[key] = (graph, static, out)
        while len(state.prefill) > PREFILL_GRAPHS:
            state.prefill.pop(next(iter(state.prefill)))
        return logits
    state.prefill[key] = state.prefill.pop(key)  # most recently used last
    graph, static, out = entry
    for dst, src in zip(static, (rows, positions, cache_position, mask_full)):
        dst.copy_(src)
    graph.replay()
    return out.clone()


def _decoder(qmodel, spec, device: torch.device):
    """The decode step: ``step(ids [B, 1], positions [B, 1], slot int, mask_full [B, L]) -> logits [B, 1, V]``.
    On CUDA a replayed CUDA graph (static buffers; ``mask_full`` is the one the graph reads)."""
    if not _graphed(qmodel, device):
        def step(ids, positions, slot, mask_full):
            with torch.no_grad():
                return qmodel._call_graph("decode", ids, positions, torch.tensor([slot], device=device), mask_full)
        return step
    state: GenerationState = qmodel._generation_state
    key = _graph_key(qmodel, device)
    if state.graph is None or state.key != key:
        _capture_decode(qmodel, spec, device, state, key)
    g_ids, g_pos, g_slot, g_mask = state.inputs

    def step(ids, positions, slot, mask_full):
        g_ids.copy_(ids)
        g_pos.copy_(positions)
        g_slot.fill_(slot)
        g_mask.copy_(mask_full)
        state.graph.replay()
        return state.logits

    return step


def _graph_key(qmodel, device: torch.device) -> tuple:
    """What a captured prefill or decode graph depends on: the device, the KV cache's storage and dtype (both change
    when the program's tensors move, ``.to()``; prefill and decode share the cache buffers), and the program's
    input/output dtype."""
    kv = qmodel.program.methods["decode"].graph_module.kv_cache
    return (device, kv.k_0.data_ptr(), kv.k_0.dtype, qmodel._io_dtype)


def _capture_decode(qmodel, spec, device, state: GenerationState, key) -> None:
    """Capture one decode call as a CUDA graph (:func:`_cuda_graph`, three warm-up calls). The warm-up calls write
    cache slot L-1, which every later prefill or decode overwrites before it is read (a slot is read only at or
    before its own position).

    Raises:
        _CaptureFailed: an op of the decode graph cannot be captured."""
    b, length = spec.max_batch_size, spec.max_cache_len
    ids = torch.zeros(b, 1, dtype=torch.long, device=device)
    pos = torch.full((b, 1), length - 1, dtype=torch.long, device=device)
    slot = torch.full((1,), length - 1, dtype=torch.long, device=device)
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    graph, logits = _cuda_graph(device, lambda: qmodel._call_graph("decode", ids, pos, slot, mask), warmups=3)
    state.graph, state.key, state.inputs, state.logits = graph, key, (ids, pos, slot, mask), logits


class _CaptureFailed(RuntimeError):
    """A CUDA graph capture raised (an op that cannot be captured); ``__cause__`` holds the error."""


def _cuda_graph(device: torch.device, fn, *, warm=None, warmups: int = 0, pool=None):
    """``fn`` captured as a CUDA graph: ``(graph, what fn returned during the capture)`` (its output tensors are the
    graph's static outputs, rewritten by each replay). Under no_grad, a side stream first waits on the current one;
    ``warm`` (default ``fn``) runs ``warmups`` times on it (Triton's compilation and autotuning and lazy
    initialisation must not first happen inside a capture), the current stream waits for that, and ``fn`` is
    captured on the same side stream (kernels that keep per-stream state, the W8A16 split-K counters, find it made);
    the current stream then waits on the side stream, also when the capture fails. ``pool``: a memory pool shared
    with other graphs (``torch.cuda.graph_pool_handle()``), else the graph's own.

    Raises:
        _CaptureFailed: the capture raised RuntimeError (an op that cannot be captured); the caller falls back. An
            error of a warm-up call propagates as it is (it would fail without graphs too)."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.no_grad():
        if warmups:
            with torch.cuda.stream(stream):
                for _ in range(warmups):
                    (warm or fn)()
            current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = fn()
        except RuntimeError as e:
            raise _CaptureFailed(f"{type(e).__name__}: {str(e)[:200]}") from e
        finally:
            current.wait_stream(stream)
    return graph, out
