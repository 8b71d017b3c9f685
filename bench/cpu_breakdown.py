"""Where an eager CPU forward's time goes outside the GEMMs: torch fp32 against fxquant's defaults on MiniLM.

Each contender runs as is and again with parts replaced by stand-ins that return a cached result of the right
shape, so the difference is that part's time (host time included):

* ``no GEMM``: every GEMM (fp32 ``F.linear``; fxquant's oneDNN calls) returns a cached output;
* ``- quantize``: fxquant's per-token quantizer too (every standalone one and the one inside each LayerNorm+quantize);
* ``- epilogue``: the per-token scale, bias and activation after the GEMM too;
* ``- norm``: fxquant's LayerNorm+quantize too.

The outputs are garbage in the replaced runs; only their times count. One process, contenders in turn, round after
round; random-weight all-MiniLM-L6-v2 config (speed does not depend on the weights), inputs as
``bench/cpu_control.py``'s.

    python bench/cpu_breakdown.py --batch 1 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from unittest import mock

import torch

import fxquant
from fxquant.ir import reference
from fxquant.targets import backends

STAGES = ("as is", "no GEMM", "- quantize", "- epilogue", "- norm")


def _parts() -> list[list[tuple[object, str, object]]]:
    """The parts in the order of ``STAGES[1:]``: (namespace, attribute, stand-in) each."""
    cache: dict = {}

    def cached(key, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    quantize, norm = backends.quantize_per_token, backends.layer_norm_quant

    def gemm_out(m: int, n: int) -> torch.Tensor:
        return cached(("gemm", m, n), lambda: torch.zeros(m, n))

    return [
        [(torch.nn.functional, "linear", lambda x, w, b=None: cached(("linear", x.shape, w.shape[0]),
                                                                      lambda: torch.empty(*x.shape[:-1], w.shape[0]))),
         (backends, "_onednn_gemm", lambda x_q, w_q, *rest, **kw: gemm_out(x_q.shape[0], w_q.shape[0])),
         (backends, "_onednn_static_linear", lambda x_q, scale, w_q, *rest: gemm_out(x_q.shape[0], w_q.shape[0])),
         (backends.BACKENDS, "onednn", lambda x_q, w_q, *rest, **kw: gemm_out(x_q.shape[0], w_q.shape[0]))],
        [(backends, "quantize_per_token", lambda x, *a: cached(("quantize", x.shape), lambda: quantize(x, *a)))],
        [(reference, "apply_epilogue", lambda y, *a: y)],
        [(backends, "layer_norm_quant", lambda x, *a: cached(("norm", x.shape), lambda: norm(x, *a)))],
    ]


def replaced(parts: list[list[tuple[object, str, object]]], depth: int) -> contextlib.ExitStack:
    """A context in which the first ``depth`` parts are their stand-ins."""
    stack = contextlib.ExitStack()
    for where, name, stand_in in (item for part in parts[:depth] for item in part):
        patch = mock.patch.dict(where, {name: stand_in}) if isinstance(where, dict) else \
            mock.patch.object(where, name, stand_in)
        stack.enter_context(patch)
    return stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=10, help="timed calls per contender and round (their mean counts)")
    p.add_argument("--config", default=None, help="directory with a BERT config.json (default: the embedded MiniLM's)")
    args = p.parse_args(argv)
    from cpu_control import random_batch, random_minilm  # same directory
    from cpu_minilm import isa_summary

    model = random_minilm(args.config)
    x = random_batch(args.batch, args.seq, 1)
    qm = fxquant.compile(copy.deepcopy(model), x, progress=False, compile_forward=False)  # the eager steps
    runs = {("torch fp32 eager", d): (lambda: model(**x), d) for d in range(2)}
    runs.update({("fxquant W8A8 eager", d): (lambda: qm(**x), d) for d in range(len(STAGES))})
    times: dict = {k: [] for k in runs}
    parts = _parts()
    with torch.inference_mode():
        for _ in range(args.rounds):
            for key, (run, depth) in runs.items():
                with replaced(parts, depth):
                    for _ in range(2):
                        run()
                    t0 = time.perf_counter()
                    for _ in range(args.repeat):
                        run()
                    times[key].append((time.perf_counter() - t0) / args.repeat * 1e3)
    print(f"\nbatch {args.batch} x {args.seq}; ISA {isa_summary(set(backends.cpu_flags()))}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.repeat} calls\n")
    print("| contender | " + " | ".join(STAGES) + " |")
    print("|---|" + "---|" * len(STAGES))
    for name in ("torch fp32 eager", "fxquant W8A8 eager"):
        cells = [f"{statistics.median(times[(name, d)]):.2f}" if (name, d) in times else "" for d in range(len(STAGES))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
