"""Programmatic dependent launch (PDL) for the decode step's int8 GEMVs, on the GPU: a chain of the W8A16 kernels of
a Llama-3-8B-shaped decode step at batch 1 (per layer: q/k/v 6144×4096, o_proj 4096×4096 on the first 4096 q/k/v
outputs, the residual add, gate/up 28672×4096 with SwiGLU, down_proj 4096×14336, the residual add), every layer with
its own weights (so they come from HBM), captured in one CUDA graph and replayed, with ``FXQUANT_PDL`` 0 and 1
alternating (``kernels.common.use_pdl``): ms per replay, the int8 weight bytes' GB/s and share of the peak, and
whether the outputs equal the first setting's bit for bit. The residual adds are torch's own kernels, launched
without PDL, so this chain shows fxquant's kernels alone (in the compiled decode graph Inductor's get PDL too).

    python bench/pdl_gpu.py [--layers 32] [--reps 50] [--modes 0 1 0 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kernels import w8a16_gemm as kw  # noqa: E402

PEAK = {"H100": 3.35e12, "H200": 4.8e12}
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def layer_weights(gen: torch.Generator) -> dict:
    out = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
        out[name] = (w, torch.full((n,), 1.0 / (127 * k ** 0.5), device="cuda"))
    return out


def step(h: torch.Tensor, layers: list) -> torch.Tensor:
    for p in layers:
        qkv = kw.w8a16_gemm(h, *p["qkv"])
        h = h + kw.w8a16_gemm(qkv[:, :4096], *p["o"])
        h = h + kw.w8a16_gemm(kw.w8a16_gemm(h, *p["gate_up"], activation="swiglu"), *p["down"])
    return h


def run(mode: int, h0: torch.Tensor, layers: list, reps: int) -> tuple[float, torch.Tensor]:
    os.environ["FXQUANT_PDL"] = str(mode)
    out = step(h0, layers)  # compile and warm outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step(h0, layers)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2], out.clone()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--modes", type=int, nargs="+", choices=[0, 1], default=[0, 1, 0, 1])
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in dev), None)
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [layer_weights(gen) for _ in range(args.layers)]
    nbytes = args.layers * sum(n * k for n, k in SHAPES.values())
    h0 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    import triton
    print(f"{dev}, torch {torch.__version__}, Triton {triton.__version__}, {args.layers} layers, "
          f"{nbytes / 1e9:.2f} GB of int8 weights per step")
    ref = None
    for mode in args.modes:
        ms, out = run(mode, h0, layers, args.reps)
        ref = out if ref is None else ref
        bw = nbytes / (ms / 1e3)
        print(f"  FXQUANT_PDL={mode}: {ms:.4f} ms/step, {bw / 1e9:.0f} GB/s"
              + (f" ({bw / peak:.1%} of peak)" if peak else "") + f", equal to mode {args.modes[0]}: "
              f"{torch.equal(out, ref)}", flush=True)


if __name__ == "__main__":
    main()
