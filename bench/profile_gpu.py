"""Where the time goes, on the GPU: per-kernel CUDA time of one forward pass (torch.profiler) for bf16 and
fxquant, and the host-side cost of one fused-Linear call (cProfile), to guide kernel and launch work.

    python bench/profile_gpu.py --model llama vit [--rows 25]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxquant  # noqa: E402
from bench.gpu_models import build  # noqa: E402
from fxquant.ir import reference  # noqa: E402


def kernel_table(fn, rows: int) -> str:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    return f"total CUDA kernel time {total:.2f} ms\n{table}"


def host_profile(rows: int) -> None:
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = reference.quantize_weight_per_channel(torch.randn(256, 256, device="cuda"), 127)
    op = torch.ops.fxquant.int8_linear
    for _ in range(20):
        op(x, w_q, w_s, None, "none", "triton", 127, torch.bfloat16)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        op(x, w_q, w_s, None, "none", "triton", 127, torch.bfloat16)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=["llama", "vit"])
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    host_profile(args.rows)
    for name in args.model:
        torch.manual_seed(0)
        model, inputs, output, _ = build(name)
        model = model.to("cuda", torch.bfloat16).eval()
        kw = {k: v for k, v in inputs.items() if k != "use_cache"}
        with torch.no_grad():
            qm = fxquant.compile(model, kw)
            print(qm.report().summary() if hasattr(qm.report(), "summary") else qm.report())
            print(f"== {name} bf16 eager")
            print(kernel_table(lambda: model(**inputs), args.rows))
            print(f"== {name} fxquant eager")
            print(kernel_table(lambda: qm(**kw), args.rows))


if __name__ == "__main__":
    main()
