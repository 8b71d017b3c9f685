"""Decode speed on a CPU, side by side (issue 23): fxquant's ``generate`` against transformers' ``generate`` in the
machine's float baseline (bf16 where the CPU has native bf16 — AMX or AVX512-BF16 — else fp32), and fxquant's float
control (the same prefill/decode program, nothing quantized), ``fxquant`` (the defaults: prefill and decode through
torch.compile where the machine has a C++ compiler; the compile is spent in the warm-up, not timed),
``fxquant-compiled`` (``compile_generation=True``), ``fxquant-eager`` (``compile_generation=False``) and
``fxquant-stepwise`` (greedy through the per-token loop instead of the greedy step: its A/B). Every worker
gets the same glibc malloc thresholds unless ``--glibc-mmap``.

Every contender runs in its own process (``--threads`` threads, default 2), built once (random weights of the model's
shapes, seed 0), warmed up, then timed in round-robin rounds: in each round every process in turn runs one 1-token
generate (time to first token) and one ``--new``-token generate, greedy, no EOS. Decode time per token =
(t(new) - t(1)) / (new - 1). The table gives per contender the medians over rounds and the ratio of its decode
tokens/s to transformers'.

    python bench/generate_cpu.py --model qwen2-0.5b --batches 1 8 --prompt 128 --new 64 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    "qwen2-0.5b": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)),
    "tiny-llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=1024, max_position_embeddings=2048)),
}
CONTENDERS = ("transformers", "fxquant-float", "fxquant", "fxquant-compiled", "fxquant-eager", "fxquant-stepwise")


def _float_dtype(name: str = "auto"):
    import torch

    from fxquant.targets.backends import cpu_native_bf16

    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def worker(args) -> None:
    import torch
    import transformers

    import fxquant

    torch.set_num_threads(args.threads)
    cls, cfg_cls, kw = SHAPES[args.model]
    torch.manual_seed(0)
    dtype = _float_dtype(args.dtype)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw, attn_implementation="sdpa")).eval().to(dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    b = args.batch
    ids = torch.randint(0, kw["vocab_size"], (b, args.prompt), generator=torch.Generator().manual_seed(b))
    if args.worker == "transformers":
        def gen(n):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False)
    else:
        config = fxquant.QuantConfig(skip=["re:.*"]) if args.worker == "fxquant-float" else fxquant.QuantConfig()
        qm = fxquant.compile(model, {"input_ids": ids[:, :8]}, config=config, max_batch_size=b,
                             max_cache_len=args.max_cache_len or args.prompt + args.new, progress=False,
                             compile_generation={"fxquant-compiled": True, "fxquant-eager": False}.get(args.worker))

        if args.worker == "fxquant-stepwise":  # greedy through the per-token loop (the A/B of the greedy step)
            from fxquant import generation
            generation._fused_greedy = lambda device: False

        def gen(n):
            return qm.generate(ids, max_new_tokens=n)
    gen(args.new)
    gen(1)
    print(json.dumps({"ready": True, "dtype": str(dtype)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        gen(1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = gen(args.new)
        tn = time.perf_counter() - t
        assert out.shape[1] == args.prompt + args.new
        print(json.dumps({"ttft_s": t1, "total_s": tn, "per_token_s": (tn - t1) / (args.new - 1)}), flush=True)


def run_batch(args, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if not args.glibc_mmap:  # the same malloc for every contender (see --glibc-mmap)
        env.update({"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)})
    procs = {}
    for name in args.contenders:
        cmd = [sys.executable, "-P", __file__, "--worker", name, "--model", args.model, "--batch", str(batch),
               "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads),
               "--dtype", args.dtype] + (["--max-cache-len", str(args.max_cache_len)] if args.max_cache_len else [])
        if args.taskset:
            cmd = ["taskset", "-c", args.taskset, *cmd]
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = json.loads(procs[name].stdout.readline())  # one builds and warms up at a time
        dtype = ready["dtype"]
    times = {n: [] for n in procs}
    for _ in range(args.rounds):
        for name, p in procs.items():
            p.stdin.write("run\n")
            p.stdin.flush()
            times[name].append(json.loads(p.stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    out = {"batch": batch, "float_dtype": dtype, "contenders": {}}
    for name, ts in times.items():
        per = statistics.median(t["per_token_s"] for t in ts)
        out["contenders"][name] = {"decode_ms_per_token": per * 1e3, "tokens_per_s_per_row": 1 / per,
                                   "ttft_ms": statistics.median(t["ttft_s"] for t in ts) * 1e3}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="qwen2-0.5b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-cache-len", type=int, default=None,
                    help="fxquant's cache slots (default prompt + new; fxquant's own default is "
                         "min(max_position_embeddings, 4096))")
    ap.add_argument("--taskset", default=None, help="CPU list for taskset (e.g. 0,1 on a larger host)")
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS[:3]), choices=CONTENDERS)
    ap.add_argument("--worker", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="the model's dtype (auto: bf16 on CPUs with native bf16, else fp32)")
    ap.add_argument("--glibc-mmap", action="store_true",
                    help="leave glibc's malloc at its defaults in the workers (default: MALLOC_MMAP_THRESHOLD_ and "
                         "MALLOC_TRIM_THRESHOLD_ of 4 GiB for every contender, so no contender's large temporaries are "
                         "mmapped and page-faulted per call while another's, after a large free, are not)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import torch
    import transformers

    from fxquant.targets.backends import cpu_flags

    flags = cpu_flags()
    isa = "AMX" if "amx_bf16" in flags else "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    forced = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                                         "FXQUANT_CPU_ISA") if os.environ.get(k)}
    header = {"cpu_isa": isa, "aten_dispatch": torch.backends.cpu.get_cpu_capability(), "isa_limits": forced,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": args.threads, "model": args.model, "prompt": args.prompt, "new": args.new,
              "date": time.strftime("%Y-%m-%d"), "malloc": "glibc defaults" if args.glibc_mmap else "4 GiB thresholds"}
    print(json.dumps(header), flush=True)
    results = []
    for b in args.batches:
        r = run_batch(args, b)
        results.append(r)
        base = r["contenders"].get("transformers", {}).get("tokens_per_s_per_row")
        for name, c in r["contenders"].items():
            ratio = c["tokens_per_s_per_row"] / base if base else float("nan")
            print(f"batch {b:>3}  {name:>14} ({r['float_dtype'].replace('torch.', '')} float): "
                  f"TTFT {c['ttft_ms']:8.1f} ms  decode {c['decode_ms_per_token']:8.2f} ms/token  "
                  f"{c['tokens_per_s_per_row']:7.1f} tok/s/row  x{ratio:.2f} transformers", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**header, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
