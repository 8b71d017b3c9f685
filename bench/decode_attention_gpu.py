"""The decode attention kernel (``fxquant.kernels.decode_attention``) against the grouped-matmul form it replaces
(two batched GEMMs and an fp32 softmax, through ``torch.compile``), at LLM decode shapes, on the GPU: µs per call in
a replayed CUDA graph over enough distinct caches that K and V come from HBM, the share of the peak bandwidth for
the K and V bytes of the filled cache, and the SQNR of each against float64 attention. ``--filled`` slots of the
``--length`` are filled (the rest masked, as a static cache mid-generation); the kernel runs as the decode graph
calls it (``cache_position``: only the filled slots are read) and unbounded (every slot read, as the matmul form).

    python bench/decode_attention_gpu.py [--batches 1 8 32] [--length 640] [--filled 600] [--splits 0 1 2 4 8]
    python bench/decode_attention_gpu.py --length 4096 --filled 600 --splits 0   # fxquant's default max_cache_len
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P leaves the script's folder out
from w8a16_gpu import graph_time_us, sqnr_db  # noqa: E402

from fxquant.kernels import decode_attention as kd  # noqa: E402

PEAK = {"H100": 3.35e12, "H200": 4.8e12}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--kv", type=int, default=8)
    ap.add_argument("--rep", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--length", type=int, default=640)
    ap.add_argument("--filled", type=int, default=600, help="filled slots (default 600)")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="0: the kernel's own choice")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in dev), None)
    print(f"{dev}, torch {torch.__version__}, kv {args.kv} x rep {args.rep}, D {args.dim}, L {args.length}, "
          f"filled {args.filled}; GB/s and % of peak count the filled slots' K and V bytes")
    grouped = torch.compile(kd.decode_attention_reference)
    for b in args.batches:
        h, d, length = args.kv * args.rep, args.dim, args.length
        filled = min(args.filled, length)
        cache_bytes = 2 * b * args.kv * filled * d * 2
        copies = max(2, int(512e6 // (2 * b * args.kv * length * d * 2)))
        g = torch.Generator("cuda").manual_seed(b)
        ks = [torch.randn(b, args.kv, length, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
        vs = [torch.randn(b, args.kv, length, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        mask = torch.zeros(b, 1, 1, length, device="cuda", dtype=torch.bfloat16)
        mask[:, :, :, filled:] = torch.finfo(torch.bfloat16).min
        pos = torch.tensor([filled - 1], device="cuda")
        scale = d ** -0.5
        rk, rv = ks[0].double().repeat_interleave(args.rep, 1), vs[0].double().repeat_interleave(args.rep, 1)
        exact = torch.softmax(q.double() @ rk.transpose(-1, -2) * scale + mask.double(), -1) @ rv

        rows = [("grouped matmuls, torch.compile", lambda i: grouped(q, ks[i], vs[i], mask, scale))]
        for sp in args.splits:
            rows.append((f"kernel, splits {sp or 'auto (' + str(kd.pick_splits(b * args.kv, length, torch.cuda.get_device_properties(0).multi_processor_count)) + ')'}",
                         lambda i, sp=sp: kd.decode_attention(q, ks[i], vs[i], mask, scale, pos, splits=sp or None)))
            rows.append(("  the same, every slot read", lambda i, sp=sp: kd.decode_attention(q, ks[i], vs[i], mask,
                                                                                           scale, splits=sp or None)))
        for name, fn in rows:
            err = sqnr_db(exact, fn(0))
            us = graph_time_us([lambda i=i, fn=fn: fn(i) for i in range(copies)])
            bw = cache_bytes / (us * 1e-6)
            print(f"batch {b:3d}  {name:34s} {us:8.2f} µs  {bw / 1e9:6.0f} GB/s"
                  + (f" {bw / peak:5.1%}" if peak else "") + f"  SQNR {err:5.1f} dB", flush=True)


if __name__ == "__main__":
    main()
