"""What finer int8 weight scales would buy at decode (issue 23's per-step cosine), by simulation on the CPU: Hugging
Face's eager model of Llama-3-8B shapes (random weights, bf16), one decode step from the float model's own cache,
every Linear's weight fake-quantized (round-to-nearest, symmetric, |W_q| ≤ 127) per output channel (fxquant's
W8A16) or per group of ``--group`` input columns (scales rounded to bf16); logits cosine against the unquantized
step. No fxquant code runs: this isolates the weight format from the program.

    python -P bench/weight_scales_cpu.py --layers 32 --prompt 512    # ~16 GB of memory, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P leaves the script's folder out
from generate_gpu import SHAPES  # noqa: E402


def fake_quant(w: torch.Tensor, group: int | None) -> torch.Tensor:
    """W [N, K] → W_q · s in fp32: s per row (group None) or per (row, ``group`` columns), s = max|W| / 127."""
    w = w.float()
    if group is None:
        s = w.abs().amax(1, keepdim=True) / 127
        return torch.round(w / s).clamp(-127, 127) * s
    n, k = w.shape
    wg = w.view(n, k // group, group)
    s = (wg.abs().amax(2, keepdim=True) / 127).to(torch.bfloat16).float()
    return (torch.round(wg / s).clamp(-127, 127) * s).view(n, k)


def main():
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cls, cfg_cls, kw = SHAPES["llama3-8b"]
    cfg = getattr(transformers, cfg_cls)(**dict(kw, num_hidden_layers=args.layers), attn_implementation="sdpa")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = getattr(transformers, cls)(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.layers} layers, prompt "
          f"{args.prompt}", flush=True)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def step():
            return model(token, past_key_values=copy.deepcopy(cache), use_cache=True).logits[:, -1].float()

        ref = step()
        for name, group in (("per channel", None), (f"per group of {args.group}", args.group)):
            t = time.perf_counter()
            hooks = [m.register_forward_hook(lambda mod, a, o, g=group: F.linear(
                a[0], fake_quant(mod.weight, g).to(a[0].dtype), mod.bias)) for m in linears]
            try:
                got = step()
            finally:
                for h in hooks:
                    h.remove()
            print(f"{name:>18}: logits cosine {float(F.cosine_similarity(got, ref)):.5f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
