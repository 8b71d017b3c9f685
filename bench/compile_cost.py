"""What ``fxquant.compile`` costs: wall time and peak memory (max RSS) of compiling a random-weight decoder of
a Hugging Face config's shapes, in a fresh process per measurement.

    python bench/compile_cost.py --shapes qwen2-1.5b --layers 28 --repeat 3

Each run is its own process (``--child`` below), so peak RSS is that compile's; the parent prints each run
and the medians. Compare two trees by running it with each on ``PYTHONPATH`` (before/after a change).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    # Qwen2-1.5B (config.json of Qwen/Qwen2-1.5B)
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True),
}


def child(shapes: str, layers: int, tokens: int) -> dict:
    import torch
    import transformers

    import fxquant

    cfg = transformers.AutoConfig.for_model(**{**SHAPES[shapes], "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = {"input_ids": torch.randint(0, cfg.vocab_size, (1, tokens))}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    qm = fxquant.compile(model, ids, compile_forward=False)  # the pipeline's cost, not Inductor's
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"fxquant": fxquant.__file__, "torch": torch.__version__, "seconds": seconds,
            "peak_rss_mib": peak / 1024, "model_rss_mib": before / 1024, "int8": qm.report().num_int8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.shapes, args.layers, args.tokens)))
        return
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, __file__, "--child", "--shapes", args.shapes, "--layers", str(args.layers),
                              "--tokens", str(args.tokens)], check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    print(json.dumps({"shapes": args.shapes, "layers": args.layers, "median_seconds": statistics.median(r["seconds"] for r in runs),
                      "median_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                      "median_model_rss_mib": statistics.median(r["model_rss_mib"] for r in runs)}))


if __name__ == "__main__":
    main()
