"""Per-step logits cosine of fxquant's decode against its bf16 control (same tokens, each its own cache), with the
decode Linears weight-only (W8A16, the default at decode) and with them W8A8 as in prefill: which path costs the
accuracy. Random weights of Llama-3-8B shapes.

    python bench/decode_numerics_gpu.py --layers 32 --steps 16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import fxquant
from fxquant.targets import backends

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P leaves the script's folder out
from generate_gpu import build, cosine_per_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args()
    model = build("llama3-8b", args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(max_cache_len=args.prompt + args.steps + 1, progress=False)
    ctrl = fxquant.compile(model, {"input_ids": ids[:, :8]}, config=fxquant.QuantConfig(target="cuda", skip=["re:.*"]), **kw)
    w8a16 = fxquant.compile(model, {"input_ids": ids[:, :8]}, config=fxquant.QuantConfig(target="cuda"), **kw)
    saved = dict(backends.WEIGHT_ONLY_MAX_M)
    backends.WEIGHT_ONLY_MAX_M["cuda"] = 0
    try:
        w8a8 = fxquant.compile(model, {"input_ids": ids[:, :8]}, config=fxquant.QuantConfig(target="cuda"), **kw)
    finally:
        backends.WEIGHT_ONLY_MAX_M.update(saved)
    for name, qm in (("decode W8A16", w8a16), ("decode W8A8", w8a8)):
        cos = cosine_per_step(qm, ctrl, ids, args.steps)
        print(f"{name:>18}: step 0 (prefill) {cos[0]:.5f}; decode min {min(cos[1:]):.5f} mean "
              f"{sum(cos[1:]) / len(cos[1:]):.5f}; {[round(c, 4) for c in cos]}", flush=True)


if __name__ == "__main__":
    main()
