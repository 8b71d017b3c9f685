"""Op-level GPU benchmark: bf16 ``F.linear`` vs ``torch._int_mm`` + eager quantization vs fxquant's int8
Linear as the fused graph runs it (bf16 in → per-token quantize kernel → W8A8 GEMM with the epilogue
fused → bf16 out), all columns of a row measured in one run, random data, ``triton.testing.do_bench``
medians (each call after an L2 flush).

Columns:
* ``bf16``: ``F.linear(x, w, b)``, cuBLAS.
* ``_int_mm+eager``: ``fxquant.ir.reference.quantize_per_token`` (eager torch ops) + ``torch._int_mm`` +
  an eager epilogue; cuBLAS int8 refuses M ≤ 16.
* ``fxquant``: ``torch.ops.fxquant.int8_linear`` (custom-op dispatch included); ``fxquant graph``: the same
  replayed from a CUDA graph (no launch gaps), as under ``torch.compile(mode="reduce-overhead")``.
* ``quant``, ``gemm`` (TMA kernel), ``gemm ptr`` (pointer kernel): the kernels alone; TOPS of the TMA GEMM.

The second table sweeps square K = N at fixed M: the beneficial ratio K·N/(K+N) where int8 starts to
win is the ``cuda`` target's ``min_ratio`` (``fxquant/config.py``).

    python bench/gpu_ops.py [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from tabulate import tabulate  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import fxquant  # noqa: E402,F401
from fxquant.ir import reference
from fxquant.plan import rules as heuristics  # noqa: E402
from fxquant.config import TARGETS  # noqa: E402
from fxquant.kernels import quantize as kq  # noqa: E402
from fxquant.kernels import w8a8_gemm as kg  # noqa: E402

SHAPES = [
    (16, 4096, 4096), (128, 4096, 4096), (2048, 4096, 4096), (8192, 4096, 4096), (2048, 4096, 14336),
    (2048, 14336, 4096), (4096, 384, 1536), (12608, 768, 3072), (12608, 3072, 768), (2048, 2048, 6144),
]
SWEEP_M = (2048, 8192)
SWEEP_KN = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def device_line() -> str:
    """GPU, driver, torch, Triton and CUDA versions, for the results' header."""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        driver = "?"
    return (f"{torch.cuda.get_device_name()}, driver {driver}, torch {torch.__version__}, Triton {triton.__version__}, "
            f"CUDA {torch.version.cuda}")


def med(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def med_graph(fn) -> float:
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def operands(m, k, n, gen):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
    b = torch.randn(n, device="cuda", generator=gen).bfloat16()
    w_q, w_s = reference.quantize_weight_per_channel(w, 127)
    return x, w, b, w_q, w_s


def intmm_eager(x, w_q, w_s, b):
    x_q, x_s = reference.quantize_per_token(x)
    y = torch._int_mm(x_q, w_q.t()).float() * w_s.reshape(1, -1) * x_s + b.float()
    return y.bfloat16()


def row(m, k, n, gen, with_parts=True) -> dict:
    x, w, b, w_q, w_s = operands(m, k, n, gen)
    fx_op = lambda: torch.ops.fxquant.int8_linear(x, w_q, w_s, b, "none", "triton", 127, torch.bfloat16)  # noqa: E731
    ref = F.linear(x.float(), w.float(), b.float())
    got = fx_op().float()
    r = {"M": m, "K": k, "N": n, "ratio": heuristics.beneficial_ratio(k, n),
         "rel_err_vs_fp32": ((got - ref).norm() / ref.norm()).item()}
    r["bf16"] = med(lambda: F.linear(x, w, b))
    r["intmm_eager"] = med(lambda: intmm_eager(x, w_q, w_s, b)) if m > 16 else None
    r["fxquant"] = med(fx_op)
    r["fxquant_graph"] = med_graph(fx_op)
    if with_parts:
        x_q, x_s = kq.quantize_per_token(x)
        r["quant"] = med(lambda: kq.quantize_per_token(x))
        r["gemm_tma"] = med(lambda: kg.w8a8_linear(x_q, x_s, w_q, w_s, b, "none", torch.bfloat16, use_tma=True))
        r["gemm_ptr"] = med(lambda: kg.w8a8_linear(x_q, x_s, w_q, w_s, b, "none", torch.bfloat16, use_tma=False))
        r["bf16_tflops"] = 2 * m * n * k / r["bf16"] / 1e9
        r["gemm_tops"] = 2 * m * n * k / min(r["gemm_tma"], r["gemm_ptr"]) / 1e9
    return r


def host_overhead_us() -> dict:
    """Host (CPU) time per call of each piece, on a tiny problem so the GPU never holds the CPU back:
    what a call costs before the GPU does anything (dispatch, checks, autotune lookup, launch)."""
    import time

    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = reference.quantize_weight_per_channel(w, 127)
    x_q, x_s = kq.quantize_per_token(x)
    x3 = x.reshape(2, 8, 256)
    fns = {
        "F.linear (bf16)": lambda: F.linear(x, w),
        "quantize kernel": lambda: kq.quantize_per_token(x),
        "gemm kernel (tma)": lambda: kg.w8a8_linear(x_q, x_s, w_q, w_s, None, "none", torch.bfloat16, use_tma=True),
        "gemm kernel (ptr)": lambda: kg.w8a8_linear(x_q, x_s, w_q, w_s, None, "none", torch.bfloat16, use_tma=False),
        "fxquant::int8_linear_q op": lambda: torch.ops.fxquant.int8_linear_q(x_q, x_s, w_q, w_s, None, "none", "triton", 127, torch.bfloat16),
        "fxquant::int8_linear op": lambda: torch.ops.fxquant.int8_linear(x, w_q, w_s, None, "none", "triton", 127, torch.bfloat16),
        "fxquant::int8_linear op, 3-D x": lambda: torch.ops.fxquant.int8_linear(x3, w_q, w_s, None, "none", "triton", 127, torch.bfloat16),
    }
    out = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(500):
            fn()
        out[name] = (time.perf_counter() - t) / 500 * 1e6
        torch.cuda.synchronize()
    return out


def heuristics_decision(k: int, n: int) -> str:
    """What the ``cuda`` target's heuristics decide for this Linear standing alone (its input quantized by
    a pass of its own, as in this benchmark): ratio, alignment and the separate-pass rule."""
    spec = TARGETS["cuda"]
    ok = (heuristics.int8_pays_off(k, n, spec.min_ratio) and heuristics.is_aligned(k, n, spec.alignment)
          and heuristics.quantize_pass_pays_off(n, spec.min_n_unfused))
    return "int8" if ok else "float"


def render(rows: list[dict], head: str) -> str:
    table = []
    for r in rows:
        table.append([f"{r['M']}x{r['K']}x{r['N']}", f"{r['ratio']:.0f}", heuristics_decision(r["K"], r["N"]),
                      fmt(r["bf16"]), fmt(r["intmm_eager"]), fmt(r["fxquant"]), fmt(r["fxquant_graph"]),
                      f"{r['bf16'] / r['fxquant']:.2f}x", f"{r['bf16'] / r['fxquant_graph']:.2f}x",
                      fmt(r["quant"]), fmt(r["gemm_tma"]), fmt(r["gemm_ptr"]), f"{r['bf16_tflops']:.0f}", f"{r['gemm_tops']:.0f}",
                      f"{r['rel_err_vs_fp32']:.1e}"])
    return head + "\n" + tabulate(table, headers=["M×K×N", "K·N/(K+N)", "heuristics", "bf16 ms", "_int_mm+eager ms", "fxquant ms",
                                                  "fxquant graph ms", "vs bf16", "graph vs bf16", "quant ms", "gemm tma ms",
                                                  "gemm ptr ms", "bf16 TFLOP/s", "int8 TOPS", "rel err vs fp32"], tablefmt="github")


def render_sweep(sweep: list[dict]) -> str:
    return tabulate([[r["M"], r["K"], r["N"], f"{r['ratio']:.0f}", fmt(r["bf16"]), fmt(r["fxquant"]), fmt(r["fxquant_graph"]),
                      f"{r['bf16'] / r['fxquant']:.2f}x", f"{r['bf16'] / r['fxquant_graph']:.2f}x"] for r in sweep],
                    headers=["M", "K", "N", "K·N/(K+N)", "bf16 ms", "fxquant ms", "fxquant graph ms", "vs bf16", "graph vs bf16"],
                    tablefmt="github")


def fmt(v, p=3):
    return "fails" if v is None else f"{v:.{p}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--shapes", nargs="*", default=None, metavar="MxKxN", help="only these rows of the first table")
    ap.add_argument("--render", default=None, help="print the tables of an earlier --json file and exit")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        print(render(saved["shapes"], saved["header"]))
        print(tabulate([[k, f"{v:.1f}"] for k, v in saved["host_us"].items()], headers=["call", "host µs / call"], tablefmt="github"))
        if saved["sweep"]:
            print(render_sweep(saved["sweep"]))
        return
    torch.set_grad_enabled(False)  # inference, as a deployed model runs
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    rows = [row(m, k, n, gen) for m, k, n in shapes]
    head = f"# {device_line()}, {datetime.date.today()}"
    print(head)
    print(render(rows, head))
    over = host_overhead_us()
    print(tabulate([[k, f"{v:.1f}"] for k, v in over.items()], headers=["call", "host µs / call"], tablefmt="github"))
    best = {f"{k}": str(v) for k, v in kg._w8a8_gemm_tma_kernel.cache.items()}
    for k, v in best.items():
        print("tma best config", k, v)
    sweep = []
    if not args.no_sweep:
        for m in SWEEP_M:
            for kn in SWEEP_KN:
                sweep.append(row(m, kn, kn, gen, with_parts=False))
        print(render_sweep(sweep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head, "shapes": rows, "sweep": sweep, "host_us": over, "tma_best": best}, f, indent=1)


if __name__ == "__main__":
    main()
