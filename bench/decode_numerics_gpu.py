"""Per-step logits cosine of fxquant's decode against its bf16 control, with the decode Linears weight-only
(W8A16, the default at decode) and with them W8A8 as in prefill: which path costs the accuracy. Random weights of
Llama-3-8B shapes. Two measures, both fed the same greedy tokens:

* own cache: each program prefills and decodes into its own cache (prefill's W8A8 error stays in fxquant's cache);
* same cache: before every decode step fxquant's cache is overwritten with the control's, so the step's error is
  the decode graph's alone (issue 23's "logits cosine per decode step against the float model with the same
  cache").

* ``--fp32``: the same model in fp32 as the reference (same cache, its cache copied into the other program's,
  cast): the bf16 control against it is the floor that bf16 arithmetic alone sets, and fxquant compiled from the
  fp32 model against it is what int8 weights alone cost.

    python bench/decode_numerics_gpu.py --layers 32 --steps 16 [--fp32]
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

from fxquant.generation import _decoder, _prefill  # noqa: E402


def same_cache_cosine(qm, ctrl, ids, steps: int) -> list[float]:
    """Per decode step, logits cosine of ``qm`` against ``ctrl`` with ``qm``'s cache set to ``ctrl``'s before the
    step (the control's greedy tokens)."""
    spec = ctrl.program.generation
    b, p = ids.shape
    mask = torch.zeros(spec.max_batch_size, spec.max_cache_len, dtype=torch.long, device=ids.device)
    mask[:, :p] = 1
    pos = torch.arange(p, device=ids.device).expand(b, p)
    lb = _prefill(ctrl, ids, pos, mask).clone()
    mine = dict(qm.program.methods["decode"].graph_module.kv_cache.named_buffers())
    theirs = dict(ctrl.program.methods["decode"].graph_module.kv_cache.named_buffers())
    da, db = _decoder(qm, qm.program.generation, ids.device), _decoder(ctrl, spec, ids.device)
    out = []
    for t in range(steps):
        tok = lb[:, -1].argmax(-1, keepdim=True)
        mask[:, p + t] = 1
        npos = torch.full((b, 1), p + t, device=ids.device)
        for name, buf in mine.items():
            buf.copy_(theirs[name])
        la = da(tok, npos, p + t, mask).clone()
        lb = db(tok, npos, p + t, mask).clone()
        out.append(float(torch.nn.functional.cosine_similarity(la[:, -1].float(), lb[:, -1].float()).min()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--fp32", action="store_true", help="also compare with the model in fp32 (module docstring)")
    args = ap.parse_args()
    model = build("llama3-8b", args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(max_cache_len=args.prompt + args.steps + 1, progress=False, compile_generation=False)  # eager: quicker
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
        print(f"{name:>18}, own cache: step 0 (prefill) {cos[0]:.5f}; decode min {min(cos[1:]):.5f} mean "
              f"{sum(cos[1:]) / len(cos[1:]):.5f}; {[round(c, 4) for c in cos]}", flush=True)
        cos = same_cache_cosine(qm, ctrl, ids, args.steps)
        print(f"{name:>18}, same cache: decode min {min(cos):.5f} mean {sum(cos) / len(cos):.5f}; "
              f"{[round(c, 4) for c in cos]}", flush=True)
    if args.fp32:
        del w8a8
        model32 = build("llama3-8b", args.layers).float()  # the same values (built in bf16 from the same seed)
        ctrl32 = fxquant.compile(model32, {"input_ids": ids[:, :8]},
                                 config=fxquant.QuantConfig(target="cuda", skip=["re:.*"]), **kw)
        w32 = fxquant.compile(model32, {"input_ids": ids[:, :8]}, config=fxquant.QuantConfig(target="cuda"), **kw)
        for name, qm in (("bf16 control", ctrl), ("fxquant bf16", w8a16), ("fxquant fp32", w32)):
            cos = same_cache_cosine(qm, ctrl32, ids, args.steps)
            print(f"{name:>18} against fp32, same cache: decode min {min(cos):.5f} mean {sum(cos) / len(cos):.5f}; "
                  f"{[round(c, 4) for c in cos]}", flush=True)


if __name__ == "__main__":
    main()
