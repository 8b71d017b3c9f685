"""Where does int8 pay off on this CPU? fp32 ``F.linear`` vs fxquant's whole int8 Linear (per-token
quantize + int8 GEMM + epilogue, as the fused graph runs it), side by side per shape, medians.

The table justifies the ``cpu`` target's ``min_ratio`` in ``fxquant/config.py``: the beneficial ratio
K·N/(K+N) is printed next to each speed-up.

    python bench/heuristics_cpu.py [--m 4096 128] [--repeat 15]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
import torch.nn.functional as F
from tabulate import tabulate

import fxquant  # noqa: F401  (registers ops)
from fxquant.ir import reference
from fxquant.plan import planner as passes
from fxquant.plan import rules as heuristics
from fxquant.targets import backends
from fxquant.config import QuantConfig
from fxquant.app.evaluation import median_ms

SHAPES = [(32, 32), (64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[4096, 128], help="tokens per call (M)")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    qmax = passes.resolve_weight_qmax(QuantConfig())
    backend = backends.backend_for_target("cpu", qmax)
    torch.manual_seed(0)
    rows = []
    for m in args.m:
        for k, n in SHAPES:
            x = torch.randn(m, k)
            w = torch.randn(n, k) / k**0.5
            b = torch.randn(n)
            w_q, w_s = reference.quantize_weight_per_channel(w, qmax)
            t_fp32 = median_ms(lambda: F.linear(x, w, b), repeat=args.repeat)
            t_int8 = median_ms(lambda: torch.ops.fxquant.int8_linear(x, w_q, w_s, b, "none", backend, qmax, None), repeat=args.repeat)
            rows.append([m, k, n, f"{heuristics.beneficial_ratio(k, n):.0f}", f"{t_fp32:.3f}", f"{t_int8:.3f}", f"{t_fp32 / t_int8:.2f}x"])
    print(f"# {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, backend {backend}, weights +-{qmax}, "
          f"{datetime.date.today()}")
    print(tabulate(rows, headers=["M", "K", "N", "K*N/(K+N)", "fp32 ms", "fxquant int8 ms", "speed-up"], tablefmt="github"))


if __name__ == "__main__":
    main()
