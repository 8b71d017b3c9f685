"""Where a decode step's time goes on the GPU (issue 23): per variant, the replayed CUDA graph's time per step,
the sum of its kernels' CUDA time (torch.profiler over one eager call of the same graph), the kernel count, and
the top kernels; the gap between replay time and kernel time is what launches and idle cost inside the graph.
Prefill (one prompt) is timed and profiled the same way.

Variants: ``bf16`` (fxquant's control: nothing quantized), ``int8`` (the default), each as ``compile`` runs it on
CUDA (prefill and decode through ``torch.compile``), with ``+eager`` (``compile_generation=False``), and with
``+matmul`` (decode attention as two batched GEMMs and a softmax, the form before ``fxquant::decode_attention``).

    python bench/decode_profile_gpu.py --layers 32 --prompt 512 --rows 12
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P leaves the script's folder out
from generate_gpu import PEAK_BYTES_PER_S, build, linear_bytes  # noqa: E402

import fxquant  # noqa: E402
from fxquant.generation import _decoder, _prefill  # noqa: E402
from fxquant.passes import decode_attention as pda  # noqa: E402


def kernels(fn, rows: int) -> tuple[float, int, list[tuple[str, float, int]]]:
    """(total kernel ms, kernel count, [(name, ms, count)] top ``rows``) of one call of ``fn``."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in ev) / 1e3
    count = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    ev.sort(key=lambda e: -e.self_device_time_total)
    return total, count, [(e.key[:90], e.self_device_time_total / 1e3, e.count) for e in ev[:rows]]


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--host", action="store_true", help="also cProfile one prefill call (host time by function)")
    ap.add_argument("--variants", nargs="+", default=["bf16", "int8", "bf16+eager", "int8+eager"])
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BYTES_PER_S.items() if k in dev), None)
    model = build(args.model, args.layers)
    nbytes = {"bf16": linear_bytes(model, 2), "int8": linear_bytes(model, 1)}
    b, p = args.batch, args.prompt
    ids = torch.randint(0, model.config.vocab_size, (b, p), device="cuda")
    print(f"{dev}, torch {torch.__version__}, {args.model} ({args.layers or 'all'} layers), batch {b}, prompt {p}")
    for variant in args.variants:
        base, *flags = variant.split("+")
        eager_ = "eager" in flags
        plain = pda.decode_attention
        if "matmul" in flags:  # the grouped-matmul form on CUDA too (fused=False)
            pda.decode_attention = lambda gm, fused=False: plain(gm, fused=False)
        cfg = fxquant.QuantConfig(target="cuda", **({} if base == "int8" else {"skip": ["re:.*"]}))
        t0 = time.perf_counter()
        qm = fxquant.compile(model, {"input_ids": ids[:, :8]}, config=cfg, max_batch_size=b, max_cache_len=p + 64,
                             compile_generation=False if eager_ else None, progress=False)
        pda.decode_attention = plain
        spec = qm.program.generation
        mask = torch.zeros(b, spec.max_cache_len, dtype=torch.long, device="cuda")
        mask[:, :p + 1] = 1
        pos = torch.arange(p, device="cuda").expand(b, p)
        prefill = lambda: _prefill(qm, ids, pos, mask)  # noqa: E731
        t_prefill = timed(prefill, 5)
        step = _decoder(qm, spec, torch.device("cuda"))
        tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")
        npos = torch.full((b, 1), p, device="cuda")
        t_step = timed(lambda: step(tok, npos, p, mask), 50)
        setup = time.perf_counter() - t0
        slot = torch.tensor([p], device="cuda")
        eager = lambda: qm._call_graph("decode", tok, npos, slot, mask)  # noqa: E731
        with torch.no_grad():
            k_total, k_count, top = kernels(eager, args.rows)
            pk_total, pk_count, ptop = kernels(prefill, args.rows // 2)
        if args.host:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            prof.enable()
            prefill()
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        bw = nbytes[base] / (t_step / 1e3)
        print(f"\n== {variant}: decode {t_step:.3f} ms/step (graph replay), kernels {k_total:.3f} ms in {k_count} "
              f"launches (gap {t_step - k_total:+.3f} ms), weights at {bw / 1e9:.0f} GB/s"
              + (f" = {bw / peak:.1%} of peak" if peak else "") + f"; prefill {t_prefill:.2f} ms (kernels "
              f"{pk_total:.2f} ms in {pk_count}); setup {setup:.0f} s", flush=True)
        for name, ms, n in top:
            print(f"   decode {ms:8.3f} ms {n:5d}x  {name}")
        for name, ms, n in ptop:
            print(f"  prefill {ms:8.3f} ms {n:5d}x  {name}")
        qm = step = prefill = eager = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
