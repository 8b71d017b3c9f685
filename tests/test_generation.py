"""Generation with the program's KV cache (issue 23): ``qmodel.generate`` computes what the model computes without
the cache, row by row, with transformers' semantics; the decode method runs weight-only int8 where a kernel for it
pays (per ISA, stated below)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import fxquant
from fxquant import generation
from fxquant.frontend import kv_cache
from fxquant.ir import ops
from fxquant.targets import backends

transformers = pytest.importorskip("transformers")

QUANT_ALL = fxquant.QuantConfig(min_ratio=0)  # every Linear int8 on these tiny models (the shapes would keep them float)
# decode keeps the plan's W8A8 (no weight-only kernels), so it computes what forward computes: the recompute checks
QUANT_EXACT = fxquant.QuantConfig(min_ratio=0, decode_weight_only=False)
# A logit margin below this is a tie for the test: top-1 and the generated token differ by float rounding only (the
# cached and the recomputed attention sum in different orders; a 1e-7 difference can move one per-token int8 value
# by a step, which moves the O(1) fp32 logits here by up to ~1e-4 — seen: 2.4e-4 once, Phi-3 shapes).
TIE = 1e-3


def _model(kind: str, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=256, max_position_embeddings=128, attn_implementation="sdpa")
    common.update(extra)
    if kind == "phi3":  # its special token ids default beyond this vocabulary
        common.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "phi3": transformers.Phi3Config}[kind](**common)
    model = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}[kind])(cfg).eval().to(dtype)
    model.generation_config.eos_token_id = None  # random weights: run every test to its max_new_tokens
    return model


def _prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def _float_program(kind: str, length: int, seed: int, lead: tuple[int, int], max_batch_size: int = 2):
    """``(model, ids [2, length], mask, program)``: ``_model(kind)`` compiled with nothing quantized (the program
    computes the float model, so its tokens are transformers' own) and two prompts, row r left-padded by
    ``lead[r]`` tokens."""
    model = _model(kind)
    ids = _prompts(2, length, seed=seed)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lead):
        mask[row, :n] = 0
    qm = fxquant.compile(model, {"input_ids": ids}, config=fxquant.QuantConfig(skip=["re:.*"]),
                         max_batch_size=max_batch_size, max_cache_len=64, progress=False)
    return model, ids, mask, qm


def _check_against(out: torch.Tensor, prompt_len: int, logits_of) -> int:
    """Teacher-forced check: at every step the generated token is the argmax of ``logits_of(prefix)`` [B, V],
    or within TIE of it (counted and returned). Fails on any other difference."""
    ties = 0
    for t in range(prompt_len, out.shape[1]):
        ref = logits_of(out[:, :t]).double()
        best = ref.max(-1).values
        got = ref.gather(-1, out[:, t:t + 1]).squeeze(-1)
        margin = best - got
        assert bool((margin < TIE).all()), (
            f"step {t - prompt_len}: generated {out[:, t].tolist()}, recomputed argmax {ref.argmax(-1).tolist()}, "
            f"logit margin {margin.tolist()}")
        ties += int((margin > 0).sum())
    return ties


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "phi3"])
def test_generate_equals_recompute(kind):
    """fp32, 64 new tokens, two prompts: generate (prefill + cached decode) = the greedy loop over the full forward
    (decode in the plan's W8A8, ``decode_weight_only=False``, so both compute the same function)."""
    extra = {"sliding_window": 24} if kind == "mistral" else {}  # prompt + 64 tokens cross Mistral's window
    model = _model(kind, **extra)
    ids = _prompts(2, 9)
    qm = fxquant.compile(model, {"input_ids": ids}, config=QUANT_EXACT, max_batch_size=2, max_cache_len=80, progress=False)
    assert qm.methods == ("forward", "prefill", "decode")
    assert qm.program.generation.sliding_window == (24 if kind == "mistral" else None)
    out = qm.generate(ids, max_new_tokens=64)
    assert out.shape == (2, 9 + 64) and out.dtype == torch.long and torch.equal(out[:, :9], ids)
    with torch.no_grad():
        ties = _check_against(out, 9, lambda prefix: qm(input_ids=prefix).logits[:, -1])
    assert ties <= 2, f"{ties} near-tie steps: the cached path drifts from the recompute path"
    # every int8 Linear of the decode graph is the store's: the three methods share one plan and one store
    counts = _fused_counts(qm, "decode")
    assert counts["int8"] + counts["weight_only"] > 0
    if kind == "phi3":  # gate_up_proj + chunk is a gated MLP: one GEMM with the SwiGLU epilogue
        assert qm.report().pattern_stats["fused_gate_up"].matched == 2


def _fused_counts(qm, method):
    gm = qm.program.methods[method].graph_module
    fused = sum(1 for n in gm.graph.nodes if ops.FusedLinear.is_fused_linear(n))
    wo = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.INT8_WEIGHT_LINEAR)
    return {"int8": fused, "weight_only": wo}


@pytest.mark.parametrize("fused", [False, True], ids=["per-token-loop", "greedy-step"])
def test_left_padded_rows_equal_rows_alone(fused, monkeypatch):
    """Each row of a left-padded batch generates what it generates alone (fp32, greedy), through the per-token loop
    (CPUs, sampling) and the greedy step (CUDA's, captured as a CUDA graph there; eager here), whose buffers hold
    max_batch_size rows: filler rows past the batch."""
    monkeypatch.setattr(generation, "_fused_greedy", lambda device: fused)
    model = _model("llama")
    long, short = _prompts(1, 10, seed=2), _prompts(1, 6, seed=3)
    qm = fxquant.compile(model, {"input_ids": long}, config=QUANT_ALL, max_batch_size=3, max_cache_len=48, progress=False)
    pad = 0
    batch = torch.full((2, 10), pad)
    batch[0] = long[0]
    batch[1, 4:] = short[0]
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    together = qm.generate(batch, attention_mask=mask, max_new_tokens=24, pad_token_id=pad)
    alone_long = qm.generate(long, max_new_tokens=24)
    alone_short = qm.generate(short, max_new_tokens=24)
    assert torch.equal(together[0], alone_long[0])
    assert torch.equal(together[1, 4:], alone_short[0])


def test_prefill_block_padded_to_a_bucket_generates_the_same(monkeypatch):
    """On CUDA the prompt block is left-padded to a multiple of PREFILL_BUCKET slots (one prefill CUDA graph per
    bucket). Forced on the CPU here with a bucket of 16: the same tokens as unpadded (fp32, greedy, a left-padded
    batch), and no padding where the padded block plus the new tokens would not fit the cache."""

    model = _model("llama")
    long, short = _prompts(1, 10, seed=2), _prompts(1, 6, seed=3)
    qm = fxquant.compile(model, {"input_ids": long}, config=QUANT_ALL, max_batch_size=2, max_cache_len=48, progress=False)
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0], batch[1, 4:] = long[0], short[0]
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    plain = qm.generate(batch, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    monkeypatch.setattr(generation, "_prefill_bucket", lambda qmodel, device: 16)
    spec = qm.program.generation
    assert generation._padded_length(qm, 10, 24, spec, torch.device("cpu")) == 16
    assert generation._padded_length(qm, 10, 36, spec, torch.device("cpu")) == 10  # 16 + 36 > 48
    assert generation._padded_length(qm, 1, 24, spec, torch.device("cpu")) == 1
    padded = qm.generate(batch, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    assert padded.shape == plain.shape == (2, 34)
    assert torch.equal(padded, plain)
    assert torch.equal(qm.generate(batch, attention_mask=mask, max_new_tokens=36, pad_token_id=0)[:, :34], plain)


def test_same_as_transformers_generate_unquantized_with_eos():
    """With nothing quantized the program is the float model: generate gives transformers' tokens, EOS handling
    and padding of finished rows included (fp32, greedy, left-padded batch)."""
    model, ids, mask, qm = _float_program("qwen2", 7, seed=4, lead=(0, 3))
    free = qm.generate(ids, attention_mask=mask, max_new_tokens=20)
    eos = int(free[0, 7 + 5])  # a token row 0 emits at step 5: it must stop there and be padded after
    ours = qm.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=255)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=255,
                            do_sample=False)
    assert torch.equal(ours, theirs)
    # the model's own EOS is the default, as in transformers
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, 255
    default = fxquant.compile(model, {"input_ids": ids}, config=fxquant.QuantConfig(skip=["re:.*"]), max_batch_size=2,
                              max_cache_len=64, progress=False)
    assert torch.equal(default.generate(ids, attention_mask=mask, max_new_tokens=20), theirs)
    row0 = ours[0, 7:].tolist()
    assert row0[:6] == free[0, 7:13].tolist() and all(t == 255 for t in row0[6:])
    # every row stops early: generate stops where transformers does, whether it reads the all-finished flag at once
    # (CPUs) or one step late (CUDA, no host wait per token; the pad-only step after is trimmed)
    both = [eos, int(free[1, 7 + 8])]
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=both, pad_token_id=255,
                            do_sample=False)
    assert theirs.shape[1] < 7 + 20
    real_call, steps = qm._call_graph, []

    def counting_call(method, *args):
        steps.append(method)
        return real_call(method, *args)

    # both loops: the greedy step (token choice and next inputs on the device) and the per-token one (sampling's)
    for lagged, fused in ((False, True), (True, True), (False, False), (True, False)):
        steps.clear()
        with mock.patch.object(generation, "_lag_eos_check", lambda device: lagged), \
                mock.patch.object(generation, "_fused_greedy", lambda device: fused), \
                mock.patch.object(qm, "_call_graph", counting_call):
            got = qm.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=both, pad_token_id=255)
        assert torch.equal(got, theirs), (lagged, fused)
        # decode steps: one per token after the first, up to the last row's EOS; one more when read late
        assert steps.count("decode") == theirs.shape[1] - 7 - 1 + lagged, (lagged, fused, steps)


def test_processors_and_seeded_samples_equal_transformers():
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens (transformers' own logits processors, in its
    order) give transformers' greedy tokens on a left-padded batch, from keyword arguments or a generation_config;
    seeded sampling with temperature, top_k, top_p, min_p and num_return_sequences draws transformers' tokens (the
    same scores, the same multinomial draws on the default generator); what is not implemented is refused by name
    (fp32, nothing quantized: the program is the float model)."""
    model, ids, mask, qm = _float_program("qwen2", 7, seed=8, lead=(0, 3), max_batch_size=6)
    free = qm.generate(ids, attention_mask=mask, max_new_tokens=16)
    eos = int(free[0, 7 + 2])  # row 0 emits it at step 2 without min_new_tokens
    kw = dict(attention_mask=mask, max_new_tokens=16, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=6,
              eos_token_id=eos, pad_token_id=255)
    theirs = model.generate(ids, do_sample=False, **kw)
    assert eos not in theirs[0, 7:7 + 6].tolist() and not torch.equal(theirs, free[:, :theirs.shape[1]])
    for fused in (True, False):  # with processors the per-token loop serves greedy decoding on every device
        with mock.patch.object(generation, "_fused_greedy", lambda device: fused):
            assert torch.equal(qm.generate(ids, **kw), theirs), fused
    config = transformers.GenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=6,
                                           eos_token_id=eos, pad_token_id=255)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=16, generation_config=config), theirs)

    sampling = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.5, top_k=40, top_p=0.9,
                    min_p=0.7, repetition_penalty=1.2, num_return_sequences=3, pad_token_id=255)
    torch.manual_seed(11)
    ours = qm.generate(ids, **sampling)
    torch.manual_seed(11)
    theirs = model.generate(ids, **sampling)
    assert ours.shape == (6, 7 + 12) and torch.equal(ours, theirs)
    assert torch.equal(ours[:3, :7], ids[:1].expand(3, 7)) and not torch.equal(ours[0], ours[1])

    with pytest.raises(ValueError, match=r"typical_p=0\.5 \(from generation_config\)"):
        qm.generate(ids, max_new_tokens=2, generation_config=transformers.GenerationConfig(do_sample=True, typical_p=0.5))
    with pytest.raises(ValueError, match=r"num_return_sequences=2 needs do_sample=True"):
        qm.generate(ids, max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(fxquant.InputError, match=r"2 prompts × num_return_sequences=4 = 8 rows, but the KV cache holds "
                                                 r"max_batch_size=6"):
        qm.generate(ids, max_new_tokens=2, do_sample=True, num_return_sequences=4)
    with pytest.raises(ValueError, match=r"penalty"):  # transformers' own range check, before any work
        qm.generate(ids, max_new_tokens=2, repetition_penalty=-1.0)


def test_caller_processors_and_stopping_criteria_equal_transformers():
    """A caller's logits processors (after the built ones; one of a built type replaces it) and stopping criteria (a
    row stops where one fires, and is padded after only where an EOS id is set) give transformers' tokens, called as
    code written for transformers' generate calls it (keyword input_ids, use_cache=True)."""
    from transformers.generation import (LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                         StoppingCriteria, StoppingCriteriaList)

    class BanOdd(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, 1::2] = -float("inf")
            return scores

    class StopAtHighId(StoppingCriteria):  # a row stops once one of its new tokens is ≥ 200
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, 7:] >= 200).any(-1)

    model, ids, mask, qm = _float_program("qwen2", 7, seed=9, lead=(2, 0))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=254,
              repetition_penalty=5.0, logits_processor=LogitsProcessorList([BanOdd(), RepetitionPenaltyLogitsProcessor(1.2)]),
              stopping_criteria=StoppingCriteriaList([StopAtHighId()]))
    theirs = model.generate(**kw)
    new = theirs[:, 7:]
    assert theirs.shape[1] < 7 + 24 and bool((new % 2 == 0).all())  # stopped early; only even ids
    stops = [int((row >= 200).int().argmax()) for row in new]
    assert stops[0] != stops[1]  # the rows stop at different steps; the earlier one generates on, unpadded
    assert torch.equal(qm.generate(**kw), theirs)
    # the merge, as transformers': the caller's penalty replaces the built one in its place, the rest come after
    settings = dict.fromkeys(generation._SETTINGS) | {"repetition_penalty": 5.0, "no_repeat_ngram_size": 2}
    merged = generation._processors(settings, 7, torch.ones(1, 7, dtype=torch.long), None, [BanOdd(), RepetitionPenaltyLogitsProcessor(1.2)])
    assert [type(p).__name__ for p in merged] == ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor",
                                                  "BanOdd"] and merged[0].penalty == 1.2
    with mock.patch.object(generation, "_lag_eos_check", lambda device: True):  # CUDA's late flag: same tokens
        eos = int(new[1, 1]) if stops[1] > 1 else int(new[0, 1])
        theirs = model.generate(**{**kw, "eos_token_id": eos})
        assert torch.equal(qm.generate(**{**kw, "eos_token_id": eos}), theirs)
        assert bool((theirs == 254).any())  # rows finished early are padded where an EOS id is set


def test_repetition_penalty_skips_left_padding_where_transformers_can(monkeypatch):
    """The repetition penalty skips each row's left padding where transformers' processor takes per-row pad counts
    (>= 5.2x, as its generate does); where it takes an int only (5.17) or nothing, fxquant builds it as that
    version's generate does, penalising the pad id too, instead of failing."""
    from transformers import GenerationConfig
    from transformers.generation import logits_process as lp

    s = {**{k: getattr(GenerationConfig(), k, None) for k in generation._SETTINGS}, "repetition_penalty": 2.0}
    pad, word = 0, 5
    ids = torch.tensor([[pad, pad, word], [7, 8, word]])
    mask = (ids != pad).long()

    def penalised(processors):
        scores = processors(ids, torch.ones(2, 10))
        return scores[0, pad].item() != 1.0, scores[0, word].item() != 1.0, scores[1, pad].item() != 1.0

    try:  # the installed transformers: per-row pad counts (CI's 5.24) or not (5.17)
        lp.RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=torch.zeros(2, dtype=torch.long))
        per_row = True
    except (TypeError, ValueError):
        per_row = False
    assert penalised(generation._processors(s, 3, mask, None)) == (not per_row, True, False)

    class IntOnly(lp.RepetitionPenaltyLogitsProcessor):  # transformers 5.17's check of the argument
        def __init__(self, penalty, prompt_ignore_length=None):
            if prompt_ignore_length is not None and not isinstance(prompt_ignore_length, int):
                raise ValueError(f"`prompt_ignore_length` has to be a positive integer, but is {prompt_ignore_length}")
            super().__init__(penalty)

    monkeypatch.setattr(lp, "RepetitionPenaltyLogitsProcessor", IntOnly)
    assert penalised(generation._processors(s, 3, mask, None)) == (True, True, False)
    with pytest.raises(ValueError, match="penalty"):  # a bad setting still fails, with transformers' message
        generation._processors({**s, "repetition_penalty": -1.0}, 3, mask, None)


def test_stop_strings_and_max_time_as_transformers():
    """stop_strings (transformers' StopStringCriteria, with the model's tokenizer) stop each row where transformers'
    generate stops it; without a tokenizer the error says to pass one; max_time stops a run early."""
    from fxquant.app.evaluation import default_model_dir

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    model = _model("llama", vocab_size=len(tok))
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(1000, len(tok), (2, 6), generator=g)
    qm = fxquant.compile(model, {"input_ids": ids}, config=fxquant.QuantConfig(skip=["re:.*"]), max_batch_size=2,
                         max_cache_len=48, progress=False)
    free = qm.generate(ids, max_new_tokens=24)
    stop = [tok.decode(free[0, 6 + 3:6 + 5]), tok.decode(free[1, 6 + 6:6 + 7])]  # text each row makes early
    kw = dict(max_new_tokens=24, stop_strings=stop, pad_token_id=0)
    theirs = model.generate(ids, do_sample=False, tokenizer=tok, **kw)
    assert theirs.shape[1] < 6 + 24
    assert torch.equal(qm.generate(ids, tokenizer=tok, **kw), theirs)
    with pytest.raises(ValueError, match=r"stop_strings=.* needs the model's tokenizer .* pass tokenizer="):
        qm.generate(ids, **kw)
    assert qm.generate(ids, max_new_tokens=24, max_time=0.0).shape[1] == 6 + 1  # ran out during the first token


def test_scores_and_logits_returned_as_transformers_returns_them():
    """return_dict_in_generate with output_scores / output_logits gives transformers' GenerateDecoderOnlyOutput: the
    same sequences, one [B, V] fp32 tensor per new token (scores after the processors, logits raw), within fp32
    rounding of transformers' (the program is the float model here), which compute_transition_scores reads; under
    the late EOS check (CUDA's) the trimmed step's entries go too."""
    model, ids, mask, qm = _float_program("llama", 6, seed=10, lead=(0, 2))
    kw = dict(attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True, output_scores=True,
              output_logits=True, repetition_penalty=1.3, pad_token_id=0)
    ours, theirs = qm.generate(ids, **kw), model.generate(ids, do_sample=False, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    for field in ("scores", "logits"):
        assert len(getattr(ours, field)) == len(getattr(theirs, field)) == 8
        for a, b in zip(getattr(ours, field), getattr(theirs, field)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(ours.scores[3], ours.logits[3])  # the penalty acted on the scores, not on the logits
    torch.testing.assert_close(model.compute_transition_scores(ours.sequences, ours.scores, normalize_logits=True),
                               model.compute_transition_scores(theirs.sequences, theirs.scores, normalize_logits=True),
                               atol=1e-4, rtol=1e-4)
    both = [int(theirs.sequences[0, 6 + 2]), int(theirs.sequences[1, 6 + 4])]  # every row stops early
    with mock.patch.object(generation, "_lag_eos_check", lambda device: True):
        ours = qm.generate(ids, eos_token_id=both, **kw)
    theirs = model.generate(ids, do_sample=False, eos_token_id=both, **kw)
    assert torch.equal(ours.sequences, theirs.sequences) and theirs.sequences.shape[1] < 6 + 8
    assert len(ours.scores) == len(ours.logits) == len(theirs.scores) == theirs.sequences.shape[1] - 6
    assert torch.equal(qm.generate(ids, max_new_tokens=3, return_dict_in_generate=True).sequences,
                       qm.generate(ids, max_new_tokens=3))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    """Seeded sampling repeats; top_k=1 sampling is greedy. Decode in W8A8 (fp32 logits): the weight-only decode of
    an fp32 model gives bf16-precision logits (ATen's kernel rounds its output), whose exact ties top_k=1 keeps
    (transformers' TopKLogitsWarper) and greedy breaks by the lower id."""
    model = _model("llama")
    ids = _prompts(1, 5, seed=5)
    qm = fxquant.compile(model, {"input_ids": ids}, config=QUANT_EXACT, max_cache_len=40, progress=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(qm.generate(ids, max_new_tokens=16, do_sample=True, temperature=1.3, top_p=0.95))
    assert torch.equal(*runs)
    torch.manual_seed(7)
    other = qm.generate(ids, max_new_tokens=16, do_sample=True, temperature=1.3, top_p=0.95)
    assert not torch.equal(runs[0], other)  # 256-token vocabulary at temperature 1.3: 16 equal draws is ~impossible
    greedy = qm.generate(ids, max_new_tokens=16)
    assert torch.equal(qm.generate(ids, max_new_tokens=16, do_sample=True, top_k=1), greedy)


def test_streamer_gets_prompt_then_each_token():
    model = _model("llama")
    ids = _prompts(1, 5, seed=6)
    qm = fxquant.compile(model, {"input_ids": ids}, config=QUANT_ALL, max_cache_len=32, progress=False)

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    rec = Recorder()
    out = qm.generate(ids, max_new_tokens=6, streamer=rec)
    assert rec.calls[0] == ids.tolist() and rec.calls[-1] == "end"
    assert [c[0] for c in rec.calls[1:-1]] == out[0, 5:].tolist()


def test_errors_name_the_limit():
    model = _model("llama")
    ids = _prompts(1, 5)
    qm = fxquant.compile(model, {"input_ids": ids}, config=QUANT_ALL, max_cache_len=16, progress=False)
    with pytest.raises(fxquant.InputError, match=r"max_cache_len=16"):
        qm.generate(ids, max_new_tokens=12)
    with pytest.raises(fxquant.InputError, match=r"max_batch_size=1"):
        qm.generate(_prompts(2, 5), max_new_tokens=2)
    with pytest.raises(fxquant.InputError, match=r"token id 256, outside the model's vocabulary \[0, 256\)"):
        qm.generate(torch.tensor([[1, 2, 256]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"num_beams"):
        qm.generate(ids, max_new_tokens=2, num_beams=2)
    bad_mask = torch.ones(1, 5, dtype=torch.long)
    bad_mask[0, -1] = 0
    with pytest.raises(fxquant.InputError, match=r"pad on the left"):
        qm.generate(ids, attention_mask=bad_mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"max_position_embeddings=128"):
        fxquant.compile(model, {"input_ids": ids}, max_cache_len=1000, progress=False)
    with pytest.raises(TypeError, match=r"compile_generation must be True, False or None"):
        fxquant.compile(model, {"input_ids": ids}, compile_generation="yes", progress=False)
    plain = fxquant.compile(model, {"input_ids": ids}, config=QUANT_ALL, generation=False, progress=False)
    assert plain.methods == ("forward",)
    with pytest.raises(fxquant.InputError, match=r"no KV cache"):
        plain.generate(ids, max_new_tokens=2)
    # the model is untouched by all of this
    assert all(not b.is_inference() for b in model.buffers())


def test_mixed_sliding_layers_refused_beyond_the_window():
    cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128,
                                    sliding_window=16)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match=r"max_cache_len <= 16"):
        kv_cache.generation_spec(model, 1, 64)
    assert kv_cache.generation_spec(model, 1, 16).sliding_window is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_runs_weight_only_where_a_kernel_pays(dtype):
    """Decode: every Linear weight-only int8 where this CPU has a vectorized W8A16 kernel (ATen's
    _weight_int8pack_mm: AVX-512 / AMX dispatch, or AVX2 dispatch with torch ≥ 2.13; fp32 activations rounded to
    bf16 for it), up to M = 4 (8 on AVX2-only CPUs), else W8A8 as prefill; ``decode_weight_only=False`` keeps
    W8A8. Per decode step the logits stay close to the float model's (cosine ≥ 0.99)."""
    model = _model("llama", dtype=dtype)
    ids = _prompts(1, 8, seed=7)
    qm = fxquant.compile(model, {"input_ids": ids}, config=QUANT_ALL, max_cache_len=48, progress=False)
    cap = torch.backends.cpu.get_cpu_capability()
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    vectorized = cap in ("AVX512", "AMX") or (cap == "AVX2" and version >= (2, 13))
    # AVX-512 VNNI / AMX: up to M = 4 (oneDNN's int8 GEMM, and bf16 where native, win from M = 8); AVX2 only (no
    # exact full-range int8, fp32 the float baseline): up to M = 8 (oneDNN's AVX2 int8 GEMM is slow at small M)
    expect = (4 if backends.cpu_int8_full_range_exact() else 8) if vectorized else 0
    assert backends.weight_only_max_m("cpu", dtype) == expect
    assert backends.weight_only_max_m("cpu", dtype, k=24) == 0  # ATen's kernel reads K in blocks of 16
    counts = _fused_counts(qm, "decode")
    if expect:
        # q/k/v (one GEMM), o, gate/up (SwiGLU), down, per layer, and lm_head: all weight-only, down_proj and the
        # head included (the plan keeps down_proj float for W8A8 only)
        assert counts == {"int8": 0, "weight_only": 2 * 4 + 1}
    else:
        assert counts["weight_only"] == 0 and counts["int8"] > 0
    exact = fxquant.compile(model, {"input_ids": ids}, config=QUANT_EXACT, max_cache_len=48, progress=False)
    assert _fused_counts(exact, "decode")["weight_only"] == 0
    floats = fxquant.compile(model, {"input_ids": ids}, config=fxquant.QuantConfig(skip=["re:.*"]), max_cache_len=48,
                             progress=False)
    cos = _decode_cosines(qm, floats, ids, steps=24)
    assert min(cos) >= 0.99, [round(c, 4) for c in cos]


def _decode_cosines(qm, control, ids, steps):
    """Per step: logits cosine of ``qm``'s prefill, then decode, against ``control``'s, both fed ``qm``'s greedy
    tokens (each with its own cache)."""
    from fxquant.generation import _decoder, _prefill

    spec = qm.program.generation
    b, p = ids.shape
    mask = torch.zeros(spec.max_batch_size, spec.max_cache_len, dtype=torch.long)
    mask[:, :p] = 1
    pos = torch.arange(p).expand(b, p).contiguous()
    out = []
    with torch.no_grad():
        la, lb = _prefill(qm, ids, pos, mask), _prefill(control, ids, pos, mask)
        da, db = _decoder(qm, spec, ids.device), _decoder(control, control.program.generation, ids.device)
        for t in range(steps):
            out.append(float(torch.nn.functional.cosine_similarity(la[:, -1].float(), lb[:, -1].float()).min()))
            tok = la[:, -1].argmax(-1, keepdim=True)
            mask[:, p + t] = 1
            npos = torch.full((b, 1), p + t)
            la, lb = da(tok, npos, p + t, mask), db(tok, npos, p + t, mask)
    return out


def test_weight_only_op_matches_reference():
    torch.manual_seed(0)
    for m, k, n, act in [(1, 64, 48, "none"), (3, 96, 64, "swiglu"), (4, 40, 24, "gelu"), (2, 8, 16, "none")]:
        w = torch.randn(n, k)
        w_q, s = fxquant.ir.reference.quantize_weight_per_channel(w)
        bias = torch.randn(n if act != "swiglu" else n)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            got = ops.INT8_WEIGHT_LINEAR(x, w_q, s, bias.to(dtype), act, "auto", None)
            ref = fxquant.ir.reference.int8_weight_linear(x, w_q, s, bias.to(dtype), act, dtype)
            exact = (x.double() @ (w_q.double() * s.double()).T + bias.to(dtype).double())
            if act != "none":
                exact = torch.from_numpy(
                    fxquant.kernels.common.activation_torch(exact.float(), act).double().numpy())
            sqnr = 10 * torch.log10(exact.pow(2).mean() / (got.double() - exact).pow(2).mean())
            assert got.shape == (m, n // 2 if act == "swiglu" else n) and got.dtype == dtype
            # fp32 x through ATen's kernel is rounded to bf16 (and so are its scales and output): ~53 dB
            rounded = dtype == torch.bfloat16 or backends.weight_only_max_m("cpu", dtype, k) > 0
            assert sqnr > (35 if dtype == torch.bfloat16 else 45 if rounded else 60), (m, k, n, act, dtype, float(sqnr))
            if not (rounded and dtype == torch.float32):  # (that path's bf16 intermediates: the SQNR above)
                assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_compiled_decode_generates_what_eager_decode_generates():
    """compile_generation=True runs the prefill and decode graphs through torch.compile (Inductor; the default on
    CUDA and x86 CPUs with a C++ compiler; the suite pins it off): the same tokens (fp32, greedy, up to float-rounding ties) and the same cache writes, so
    a later eager call continues correctly; prompts of two lengths share the prefill compile; the report names
    the compile."""
    model = _model("llama")
    ids = _prompts(2, 7, seed=8)
    kw = dict(config=QUANT_EXACT, max_batch_size=2, max_cache_len=48, progress=False)
    eager = fxquant.compile(model, {"input_ids": ids}, **kw)
    compiled = fxquant.compile(model, {"input_ids": ids}, compile_generation=True, **kw)
    assert not eager.compiles_generation() and compiled.compiles_generation()
    from torch._dynamo.utils import counters
    counters.clear()
    a = eager.generate(ids, max_new_tokens=24)
    b = compiled.generate(ids, max_new_tokens=24)
    assert set(compiled._generation_state.compiled) == {"prefill", "decode"}
    assert not eager._generation_state.compiled
    notes = [n for n in compiled.report().notes if "torch.compile" in n]
    assert len(notes) == 2 and any(n.startswith("prefill: compiled") for n in notes), notes
    short = _prompts(2, 5, seed=9)
    assert torch.equal(compiled.generate(short, max_new_tokens=6)[:, :5], short)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # no recompile for the new length
    with torch.no_grad():
        ties = _check_against(b, 7, lambda prefix: eager(input_ids=prefix).logits[:, -1])
    assert ties <= 2 and (a == b).float().mean() > 0.9


def test_inductor_options_of_the_generation_graphs(monkeypatch):
    """What Inductor is given: on CUDA, combo kernels for a decode graph of at most COMBO_MAX_ROWS rows (measured
    faster at batch 1, 2 and 8, slower at 32) and Inductor's PDL where fxquant's kernels use it; neither for prefill or on a
    CPU; the cache-key pass everywhere."""
    from fxquant import compiled
    from fxquant.kernels import common

    cuda = torch.device("cuda", 0)
    for pdl in (False, True):
        monkeypatch.setattr(common, "use_pdl", lambda device, pdl=pdl: pdl)
        small = compiled._inductor_options(False, cuda, compiled.COMBO_MAX_ROWS)
        assert small.get("combo_kernels") is True
        import torch._inductor.config as inductor_config
        assert small.get("triton.enable_pdl", False) is (pdl and hasattr(inductor_config.triton, "enable_pdl"))
        assert "combo_kernels" not in compiled._inductor_options(False, cuda, compiled.COMBO_MAX_ROWS + 1)
        assert compiled.COMBO_MAX_ROWS >= 8 and "combo_kernels" not in compiled._inductor_options(False, cuda, 32)
        assert "combo_kernels" not in compiled._inductor_options(False, None, None)  # prefill
        on_cpu = compiled._inductor_options(True, torch.device("cpu"), 1)
        assert "combo_kernels" not in on_cpu and "triton.enable_pdl" not in on_cpu
        if compiled._cache_key_pass() is not None:
            assert on_cpu["post_grad_custom_pre_pass"] is compiled._cache_key_pass()


def test_compile_generation_default_follows_the_machine(monkeypatch):
    """``compile_generation=None``: as ``compile_forward``'s default: ``$FXQUANT_TORCH_COMPILE`` (0 / 1) when set (the
    suite sets 0), else on a CUDA device or an x86 CPU with a C++ compiler; a program without generation methods
    never compiles them."""
    import platform

    model = _model("llama")
    ids = _prompts(1, 5, seed=3)
    qm = fxquant.compile(model, {"input_ids": ids}, max_cache_len=16, progress=False)
    for env, want in (("0", False), ("1", True)):
        monkeypatch.setenv("FXQUANT_TORCH_COMPILE", env)
        assert qm.compiles_generation() is want
    monkeypatch.delenv("FXQUANT_TORCH_COMPILE")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert qm.compiles_generation() is (x86 and backends.cpp_compiler() is not None)
    plain = fxquant.compile(model, {"input_ids": ids}, generation=False, compile_forward=False, progress=False)
    assert not plain.compiles_generation()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the greedy step's CUDA graph needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_step_graph_generates_what_the_per_token_loop_does(dtype):
    """On CUDA the greedy step (decode, argmax, the next step's inputs) is one captured CUDA graph: the tokens equal
    the per-token loop's (host-side argmax between decode graph replays), with a left-padded batch smaller than
    max_batch_size (filler rows), with and without EOS ids (read one step late there), and when called again."""
    model = _model("llama", dtype).cuda()
    ids = _prompts(2, 9, seed=6).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    qm = fxquant.compile(model, {"input_ids": ids}, config=QUANT_ALL, max_batch_size=3, max_cache_len=64, progress=False)
    with mock.patch.object(generation, "_fused_greedy", lambda device: False):
        stepwise = qm.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    fused = qm.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    key, step = qm._generation_state.greedy
    assert step is not None and key[-1]  # the captured form ran (key[-1]: CUDA graphs on)
    assert torch.equal(fused, stepwise)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0), fused)
    both = [int(fused[0, 9 + 4]), int(fused[1, 9 + 7])]  # every row stops early
    with mock.patch.object(generation, "_fused_greedy", lambda device: False):
        stepwise = qm.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=both, pad_token_id=0)
    fused = qm.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=both, pad_token_id=0)
    assert fused.shape[1] < 9 + 24
    assert torch.equal(fused, stepwise)
