"""Where the LLM accuracy goes: logits cosine of fxquant W8A8 against the float model, with every Linear int8
(``gated_output_int8=True``) and with one family of Linears kept float (``down_proj``: the default; the tied
``lm_head``), on LLM-shaped models with
random weights (Hugging Face init). Runs on the CPU (fp32, exact ``reference`` backend, full-range int8
weights: the numerics of the GPU path without its kernels) or on CUDA (bf16, the ``cuda`` target).

Models (the shapes of the published configs; ``--layers`` cuts the depth to fit a CPU run):

* ``qwen2``: Qwen2-1.5B (hidden 1536, intermediate 8960, 28 layers, 12 heads, 2 KV heads, vocab 151936, tied);
* ``llama``: the Llama-1B-shaped model of ``bench/gpu_models.py`` (2048 / 8192, 16 layers, 16 / 8 heads);
* ``mistral``: Mistral-7B (4096 / 14336, 32 / 8 heads, vocab 32000), 4 layers.

    python bench/llm_accuracy.py --model qwen2 llama mistral [--tokens 2x128] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tabulate import tabulate  # noqa: E402

import fxquant  # noqa: E402

# variant -> QuantConfig overrides. "all int8" also lifts the cuda target's min_n_unfused speed rule (Qwen2's
# o_proj and down_proj, N = 1536, would stay float by it), so that every Linear is int8 on either device.
VARIANTS = {"all int8": dict(gated_output_int8=True, min_n_unfused=0),
            "down_proj float (default)": {},
            "lm_head float": dict(skip=["lm_head"], gated_output_int8=True, min_n_unfused=0)}


def build(name: str, layers: int | None):
    import transformers

    if name == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers or 28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True, attn_implementation="sdpa")
        return transformers.Qwen2ForCausalLM(cfg)
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers or 16,
                                       num_attention_heads=16, num_key_value_heads=8, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(cfg)
    if name == "mistral":
        cfg = transformers.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 4,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                         attn_implementation="sdpa")
        return transformers.MistralForCausalLM(cfg)
    raise ValueError(f"unknown model {name!r}: choose qwen2, llama or mistral")


def cosine(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(ref.reshape(-1, ref.shape[-1]).double(),
                                              out.reshape(-1, out.shape[-1]).double(), dim=-1)
    return c.mean().item(), c.min().item()


def measure(name: str, layers: int | None, batch: int, seq: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    model = build(name, layers).eval()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
        for label, overrides in VARIANTS.items():
            if device == "cuda":
                config = fxquant.QuantConfig(target="cuda", **overrides)
            else:
                config = fxquant.QuantConfig(target="cpu", weight_qmax=127, backend="reference", **overrides)
            qm = fxquant.compile(model, {"input_ids": ids}, config=config)
            mean, low = cosine(ref, qm(input_ids=ids).logits.float())
            rep = qm.report()
            rows.append({"model": name, "variant": label, "int8": rep.num_int8, "linears": len(rep.decisions),
                         "cos_mean": mean, "cos_min": low})
            print(f"{name} {label}: {rep.num_int8}/{len(rep.decisions)} int8, logits cosine {mean:.5f} (min {low:.5f})",
                  flush=True)
            del qm
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["qwen2", "llama", "mistral"])
    ap.add_argument("--layers", type=int, default=None, help="cut every model to this many layers")
    ap.add_argument("--tokens", default="2x128", help="batch x sequence, e.g. 2x128")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batch, seq = (int(v) for v in args.tokens.split("x"))
    head = (f"# {args.device}: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today()}")
    print(head, flush=True)
    rows = [r for m in args.model for r in measure(m, args.layers, batch, seq, args.device)]
    print(head)
    print(tabulate([[r["model"], r["variant"], f"{r['int8']}/{r['linears']}", f"{r['cos_mean']:.5f}", f"{r['cos_min']:.5f}"]
                    for r in rows], headers=["model", "variant", "int8 Linears", "cos mean", "cos min"], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
