"""Decode speed on a CUDA GPU, side by side in one run (issue 23): fxquant's generate against transformers' static-cache
generate (bf16, its own decode compilation), fxquant's bf16 control (the same program, prefill/decode graphs through
torch.compile and the CUDA graph, nothing quantized), fxquant with its graphs eager (``fxq-eager``, not run by
default), torchao int8 weight-only and torchao int8 dynamic-activation (both on transformers'
static-cache generate, the path torchao documents).

Random weights of a model's shapes (no download), greedy, no EOS (every contender generates exactly ``--new``
tokens). Per contender and batch size: time to first token (a 1-token generate: prefill + first token), decode time
per token ((generate(new) - generate(1)) / (new - 1)), decode tokens/s per row, and the bandwidth the weights are
read at (the Linear weights' bytes per decode step / time per step) as a share of the card's HBM peak (H200
4.8 TB/s, H100 SXM 3.35 TB/s, vendor datasheets). fxquant's per-step logits cosine against its bf16 control with the
same tokens and the same (its own) cache is printed too.

    python bench/generate_gpu.py --model llama3-8b --batches 1 32 --prompt 512 --new 256 --out gen.json

``--max-cache-len`` sizes fxquant's static cache (default prompt + new; fxquant's own default is
``min(max_position_embeddings, 4096)``); ``fxq-allslots`` is fxquant with its decode attention reading every slot
of that cache, as before it took ``cache_position`` (the A/B of reading only the filled slots). A ``+pdlN`` suffix
(``fxq+pdl0``, ``fxq-bf16+pdl0``) builds and runs that contender with ``FXQUANT_PDL=N`` (programmatic dependent
launch, ``kernels.common.use_pdl``; on by default on sm_90+): the A/B of PDL in one run; ``+trig0`` with
``FXQUANT_PDL_TRIGGER=0`` (the kernels signal their dependents at exit: ``kernels.common.pdl_early_signal``);
``+combo0`` compiles the decode graph without Inductor's ``combo_kernels`` (fxquant's default on CUDA up to
``fxquant.compiled.COMBO_MAX_ROWS`` rows) and ``+combo`` with them at any batch (the A/B above that threshold); ``+gemv1`` takes the GEMV kernel at
M = 1 only and the tl.dot kernel at 2-4 rows; ``+eos`` gives fxquant's generate an EOS id (the
vocabulary's last, all but never generated), so its per-step EOS check runs as with a real model (``+eossync``:
the same, the check read at once, the host waiting for every token: the form before); ``+stepwise`` runs greedy
decoding through the per-token loop (argmax and the next step's inputs as eager ops between CUDA graph replays:
the form before the greedy step was captured with the decode graph); ``x ctrl`` compares with the control of the
same suffixes.

torchao is not on the lent GPU host: carry its wheel and install it into the interpreter that runs this script,
``python3 -m pip install --no-deps .whl/torchao-*.whl`` (a bare ``pip`` there belongs to another Python, and the
torchao contenders then report "No module named 'torchao'").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from unittest import mock

import torch

SHAPES = {
    "llama3-8b": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2-1.5b": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)),
}
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}


def build(name: str, layers: int | None):
    import transformers

    cls, cfg_cls, kw = SHAPES[name]
    kw = dict(kw)
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = getattr(transformers, cfg_cls)(**kw, attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = getattr(transformers, cls)(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def linear_bytes(model, bytes_per_weight: float) -> float:
    """Bytes of every Linear weight one decode step reads (the LM head included, a tied one too), plus fp32
    per-channel scales when int8."""
    n_params, n_rows = 0, 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            n_params += mod.weight.numel()
            n_rows += mod.weight.shape[0]
    return n_params * bytes_per_weight + (n_rows * 4 if bytes_per_weight == 1 else 0)


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(gen, ids, new: int, reps: int) -> dict:
    gen(ids, new)  # warm-up: compilation, CUDA graph capture, autotuning
    gen(ids, 1)
    out = gen(ids, new)
    assert out.shape[1] == ids.shape[1] + new, f"generated {out.shape[1] - ids.shape[1]} tokens, wanted {new}"
    ttft = timed(lambda: gen(ids, 1), reps)
    total = timed(lambda: gen(ids, new), reps)
    per_token = (total - ttft) / (new - 1)
    return {"ttft_ms": ttft * 1e3, "decode_ms_per_token": per_token * 1e3, "tokens_per_s_per_row": 1.0 / per_token}


def hf_generate(model):
    def gen(ids, new):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, cache_implementation="static")
    return gen


def fxq_generate(qm, eos: int | None = None):
    """fxquant's generate; ``eos``: an EOS id (the last of the vocabulary, which random weights all but never pick
    in a few hundred greedy steps) whose check runs every step, as a real model's does."""
    def gen(ids, new):
        return qm.generate(ids, max_new_tokens=new, **({"eos_token_id": eos} if eos is not None else {}))
    return gen


def cosine_per_step(qm, control, ids, steps: int) -> list[float]:
    """Logits cosine of ``qm`` against ``control`` per decode step, both fed ``qm``'s greedy tokens (each with its
    own cache of the same tokens)."""
    from fxquant.generation import _decoder, _prefill

    spec = qm.program.generation
    b, p = ids.shape
    out = []
    mask = torch.zeros(spec.max_batch_size, spec.max_cache_len, dtype=torch.long, device=ids.device)
    mask[:, :p] = 1
    pos = torch.arange(p, device=ids.device).expand(b, p)
    la = _prefill(qm, ids, pos, mask).clone()
    lb = _prefill(control, ids, pos, mask).clone()
    da, db = _decoder(qm, spec, ids.device), _decoder(control, control.program.generation, ids.device)
    for t in range(steps):
        out.append(float(torch.nn.functional.cosine_similarity(la[:, -1].float(), lb[:, -1].float()).min()))
        tok = la[:, -1].argmax(-1, keepdim=True)
        mask[:, p + t] = 1
        npos = torch.full((b, 1), p + t, device=ids.device)
        la = da(tok, npos, p + t, mask).clone()
        lb = db(tok, npos, p + t, mask).clone()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers (quick checks)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contenders", nargs="+",
                    default=["hf-static", "fxq-bf16", "fxq", "torchao-int8wo", "torchao-int8dq"])
    ap.add_argument("--cos-steps", type=int, default=32)
    ap.add_argument("--max-cache-len", type=int, default=None, help="fxquant's cache slots (default prompt + new)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    import fxquant
    from fxquant.passes import decode_attention as pda

    dev = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BYTES_PER_S.items() if k in dev), None)
    print(f"device {dev}, torch {torch.__version__}, transformers {transformers.__version__}, model {args.model} "
          f"({args.layers or 'all'} layers), prompt {args.prompt}, new {args.new}", flush=True)
    model = build(args.model, args.layers)
    bf16_bytes, int8_bytes = linear_bytes(model, 2), linear_bytes(model, 1)
    results = []
    length = args.max_cache_len or args.prompt + args.new
    for b in args.batches:
        ids = torch.randint(0, model.config.vocab_size, (b, args.prompt), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(b))
        programs, cosined = {}, set()
        for full_name in args.contenders:
            name, *options = full_name.split("+")
            suffix = full_name[len(name):]
            pdl = next((o[3:] for o in options if o.startswith("pdl")), "")
            env = contextlib.ExitStack()
            if pdl:
                env.enter_context(mock.patch.dict(os.environ, {"FXQUANT_PDL": pdl}))
            if "trig0" in options:  # fxquant's decode kernels signal their dependents at exit, not early (the A/B)
                env.enter_context(mock.patch.dict(os.environ, {"FXQUANT_PDL_TRIGGER": "0"}))
            if "combo0" in options:  # the decode graph without Inductor's combo kernels (the A/B)
                from fxquant import compiled as fxc
                base = fxc._inductor_options
                env.enter_context(mock.patch.object(fxc, "_inductor_options", lambda on_cpu, device=None, rows=None: {
                    k: v for k, v in base(on_cpu, device, rows).items() if k != "combo_kernels"}))
            if "combo" in options:  # combo kernels at any batch, past COMBO_MAX_ROWS (the A/B above the threshold)
                from fxquant import compiled as fxc
                env.enter_context(mock.patch.object(fxc, "COMBO_MAX_ROWS", 1 << 30))
            if "gemv1" in options:  # the GEMV kernel at M = 1 only, tl.dot at 2..4 rows (the A/B of the M = 2, 4 entries)
                from fxquant.kernels import w8a16_gemm as kw
                base_gemv = kw._gemv_config
                env.enter_context(mock.patch.object(kw, "_gemv_config", lambda m, *a: base_gemv(m, *a) if m == 1 else None))
            if "eossync" in options:  # the EOS check read at once, the host waiting for every token (the A/B)
                from fxquant import generation
                env.enter_context(mock.patch.object(generation, "_lag_eos_check", lambda device: False))
            if "stepwise" in options:  # greedy through the per-token loop (host argmax and input updates; the A/B)
                from fxquant import generation
                env.enter_context(mock.patch.object(generation, "_fused_greedy", lambda device: False))
            with env:
                t0 = time.perf_counter()
                if name == "hf-static":
                    gen, nbytes = hf_generate(model), bf16_bytes
                elif name in ("fxq", "fxq-bf16", "fxq-eager", "fxq-allslots"):
                    config = fxquant.QuantConfig(target="cuda", **({"skip": ["re:.*"]} if name == "fxq-bf16" else {}))
                    with mock.patch.object(pda, "_cache_position", (lambda g: None) if name == "fxq-allslots"
                                           else pda._cache_position):
                        qm = fxquant.compile(model, {"input_ids": ids[:, :8]}, config=config, max_batch_size=b,
                                             max_cache_len=length, progress=False,
                                             compile_generation=False if name == "fxq-eager" else None)
                    if args.cos_steps:  # kept for the cosine check only (each program holds its own KV cache)
                        programs[full_name] = qm
                    eos = model.config.vocab_size - 1 if {"eos", "eossync"} & set(options) else None
                    gen = fxq_generate(qm, eos)
                    nbytes = bf16_bytes if name == "fxq-bf16" else int8_bytes
                elif name == "torchao-int8dq" and b <= 16:
                    # torchao's int8 dynamic-activation path runs torch._int_mm, which needs M > 16 (seen on an H100:
                    # "self.size(0) needs to be greater than 16, but got 1"): no decode below batch 17
                    results.append({"contender": full_name, "batch": b, "error": "torch._int_mm needs M > 16"})
                    print(json.dumps(results[-1]), flush=True)
                    continue
                elif name.startswith("torchao"):
                    try:
                        import torchao
                        print(f"torchao {torchao.__version__}", flush=True)
                    except Exception as e:
                        print(json.dumps({"contender": name, "error": f"torchao: {type(e).__name__}: {e}"[:300]}))
                        continue
                    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                                      quantize_)
                    tmodel = build(args.model, args.layers)
                    quantize_(tmodel, Int8WeightOnlyConfig() if name == "torchao-int8wo" else
                              Int8DynamicActivationInt8WeightConfig())
                    gen, nbytes = hf_generate(tmodel), int8_bytes
                else:
                    raise SystemExit(f"unknown contender {name}")
                setup = time.perf_counter() - t0
                try:
                    r = measure(gen, ids, args.new, args.reps)
                except Exception as e:  # one contender failing must not lose the others' figures
                    print(json.dumps({"contender": full_name, "batch": b, "error": f"{type(e).__name__}: {e}"[:500]}),
                          flush=True)
                    continue
                r.update(contender=full_name, batch=b, setup_s=setup, weight_gb=nbytes / 1e9,
                         weight_gb_per_s=nbytes / (r["decode_ms_per_token"] / 1e3) / 1e9)
                if peak:
                    r["share_of_peak"] = r["weight_gb_per_s"] * 1e9 / peak
                results.append(r)
                print(json.dumps(r), flush=True)
                # before torchao, which may fail mid-graph
                pair = ("fxq" + suffix, "fxq-bf16" + suffix)  # the cosine once both are built, in either order
                if name in ("fxq", "fxq-bf16") and set(pair) <= set(programs) and args.cos_steps and pair not in cosined:
                    cosined.add(pair)
                    cos = cosine_per_step(programs[pair[0]], programs[pair[1]], ids, args.cos_steps)
                    results.append({"batch": b, "cosine_min": min(cos), "cosine_mean": sum(cos) / len(cos),
                                    "steps": len(cos)})
                    print(json.dumps(results[-1]), flush=True)
                if name.startswith("torchao"):
                    del tmodel
                gen = qm = None  # a program's KV cache goes before the next contender allocates its own
                gc.collect()
                torch.cuda.empty_cache()
        programs.clear()
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{'batch':>5} {'contender':>16} {'TTFT ms':>9} {'ms/token':>9} {'tok/s/row':>10} {'GB/s':>7} {'peak':>6} "
          f"{'x hf':>6} {'x ctrl':>7}")
    for r in results:
        if "contender" not in r:
            continue
        same = {x["contender"]: x for x in results if x.get("batch") == r["batch"] and "contender" in x}
        hf = same.get("hf-static", {}).get("decode_ms_per_token")
        ctrl = same.get("fxq-bf16" + r["contender"][len(r["contender"].split("+")[0]):], {}).get(
            "decode_ms_per_token")
        print(f"{r['batch']:>5} {r['contender']:>16} {r['ttft_ms']:>9.1f} {r['decode_ms_per_token']:>9.3f} "
              f"{r['tokens_per_s_per_row']:>10.1f} {r['weight_gb_per_s']:>7.0f} {r.get('share_of_peak', 0):>6.1%} "
              f"{(hf / r['decode_ms_per_token']) if hf else float('nan'):>6.2f} "
              f"{(ctrl / r['decode_ms_per_token']) if ctrl else float('nan'):>7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
                       "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
