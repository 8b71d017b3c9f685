"""Model-level GPU benchmark, bf16, random weights, all columns in one run (``triton.testing.do_bench``
medians of whole forward passes):

* ``eager``: the bf16 model; ``compile``: ``torch.compile(model)``;
* ``torchao``: torchao ``Int8DynamicActivationInt8WeightConfig`` (W8A8 dynamic) + ``torch.compile``;
* ``fxquant``: ``fxquant.compile(model, inputs)`` (target ``cuda``: Triton kernels) called as it is: its default
  form (``compile_forward``: forward through torch.compile since issue 24);
* ``fxquant eager``: the same with ``compile_forward=False`` (the graph op by op);
* ``fxquant+compile``: ``torch.compile`` of the eager fxquant model;
* ``fxquant+compile all int8``: the same with every int8 candidate quantized: also where its input needs a
  separate per-token pass (``min_n_unfused=0``) and the gated MLPs' ``down_proj`` (``gated_output_int8``);
* ``bf16 capture+compile`` (a control, not a contender): fxquant's capture with nothing quantized
  (``min_ratio=inf``) + ``torch.compile``: the bf16 model with fxquant's graph cleanups (shape-only attention
  masks removed, ``fxquant.frontend.attention``), to separate their gain from int8's.

Models:
* ``bert-large``: HF ``BertModel`` with BERT-large's shapes (24 layers, hidden 1024, MLP 4096), batch 32 x 512
  tokens with a padding mask (the last 128 positions of every other row masked), ``last_hidden_state``;
* ``vit``: HF ``ViTModel(ViTConfig())`` = ViT-B/16 at 224² (12 layers, hidden 768, MLP 3072), batch 64,
  compared on the encoder's features (``last_hidden_state``, cosine per image);
* ``llama``: HF ``LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=8192,
  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8))``, prefill 4×2048 tokens,
  compared on the logits (cosine per token);
* ``qwen2``: HF ``Qwen2ForCausalLM`` with Qwen2-1.5B's shapes (hidden 1536, intermediate 8960, 28 layers, 12
  heads, 2 KV heads, vocab 151936, tied embeddings), prefill 4×2048, logits;
* ``mistral``: a Mistral-7B-shaped ``MistralForCausalLM`` cut to 4 layers (hidden 4096, intermediate 14336,
  32 heads, 8 KV heads, vocab 32000), prefill 4×2048, logits.

Per model it also prints how many Linears went int8 and why the others did not. Where the accuracy goes
(``down_proj``, the tied LM head): ``bench/llm_accuracy.py``.

    python bench/gpu_models.py --model bert-large vit llama qwen2 [--json out.json] [--skip torchao]
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tabulate import tabulate  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fxquant  # noqa: E402
from bench.gpu_ops import device_line  # noqa: E402

COLUMNS = ("eager", "compile", "torchao", "fxquant", "fxquant eager", "fxquant+compile", "fxquant+compile all int8",
           "bf16 capture+compile")


def build(name: str):
    """(model, kwargs, output getter, per-sample reshape) for a model name."""
    if name == "vit":
        from transformers import ViTConfig, ViTModel

        model = ViTModel(ViTConfig(attn_implementation="sdpa"), add_pooling_layer=False)
        inputs = {"pixel_values": torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16)}
        return model, inputs, lambda out: out.last_hidden_state, lambda t: t.reshape(t.shape[0], -1)
    if name == "bert-large":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         attn_implementation="sdpa")
        model = BertModel(cfg, add_pooling_layer=False)
        ids = torch.randint(0, cfg.vocab_size, (32, 512), device="cuda")
        mask = torch.ones_like(ids)
        mask[::2, 384:] = 0
        return (model, {"input_ids": ids, "attention_mask": mask}, lambda out: out.last_hidden_state,
                lambda t: t.reshape(t.shape[0], -1))
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                          num_key_value_heads=8, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (4, 2048), device="cuda")
        return model, {"input_ids": ids, "use_cache": False}, lambda out: out.logits, lambda t: t.reshape(-1, t.shape[-1])
    if name in ("qwen2", "mistral"):
        import transformers

        if name == "qwen2":
            cfg = transformers.Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                           num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                           tie_word_embeddings=True, max_position_embeddings=4096,
                                           attn_implementation="sdpa")
            model = transformers.Qwen2ForCausalLM(cfg)
        else:
            cfg = transformers.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                             attn_implementation="sdpa")
            model = transformers.MistralForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (4, 2048), device="cuda")
        return model, {"input_ids": ids, "use_cache": False}, lambda out: out.logits, lambda t: t.reshape(-1, t.shape[-1])
    raise ValueError(f"unknown model {name!r}: choose vit, llama, qwen2 or mistral")


def cosines(ref: torch.Tensor, out: torch.Tensor, rows) -> tuple[float, float]:
    r, o = rows(ref.float()), rows(out.float())
    c = torch.nn.functional.cosine_similarity(r, o, dim=-1)
    return c.mean().item(), c.min().item()


def bench_model(name: str, skip: set[str]) -> dict:
    torch.manual_seed(0)
    model, inputs, output, rows = build(name)
    model = model.to("cuda", torch.bfloat16).eval()
    kw = {k: v for k, v in inputs.items() if k != "use_cache"}
    res: dict = {"model": name, "ms": {}, "cos_mean": {}, "cos_min": {}, "setup_s": {}}
    with torch.no_grad():
        ref = output(model(**inputs)).clone()
        runners = {}
        t = time.time()
        runners["eager"] = lambda: model(**inputs)
        res["setup_s"]["eager"] = 0.0
        if "compile" not in skip:
            compiled = torch.compile(model)
            runners["compile"] = lambda: compiled(**inputs)
        if "torchao" not in skip:
            try:
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

                ao = copy.deepcopy(model)
                quantize_(ao, Int8DynamicActivationInt8WeightConfig())
                ao_c = torch.compile(ao)
                runners["torchao"] = lambda: ao_c(**inputs)
            except Exception as e:  # noqa: BLE001 - report and carry on with the other columns
                print(f"torchao unavailable: {type(e).__name__}: {e}")
        t = time.time()
        qm = fxquant.compile(model, kw)
        res["setup_s"]["fxquant.compile"] = time.time() - t
        rep = qm.report()
        floats = collections.Counter(f"{d.name.rpartition('.')[2]}: {d.reason}" for d in rep.decisions if not d.quantize)
        res["fxquant_summary"] = {"int8": sum(d.quantize for d in rep.decisions), "linears": len(rep.decisions),
                                  "node_counts": rep.node_counts, "backends": sorted({d.backend or "-" for d in rep.decisions}),
                                  "float_reasons": dict(floats), "patterns": {k: v.matched for k, v in rep.pattern_stats.items()},
                                  "notes": rep.notes}
        runners["fxquant"] = lambda: qm(**kw)
        qe = fxquant.compile(model, kw, compile_forward=False)
        runners["fxquant eager"] = lambda: qe(**kw)
        if "fxquant+compile" not in skip:
            qm_c = torch.compile(qe)
            runners["fxquant+compile"] = lambda: qm_c(**kw)
        if "fxquant+compile all int8" not in skip:  # also down_proj, and every separate quantization pass
            qa = fxquant.compile(model, kw, config=fxquant.QuantConfig(target="cuda", min_n_unfused=0, gated_output_int8=True),
                                 compile_forward=False)
            res["fxquant_all_int8"] = {"int8": qa.report().num_int8, "linears": len(qa.report().decisions)}
            qa_c = torch.compile(qa)
            runners["fxquant+compile all int8"] = lambda: qa_c(**kw)
        if "bf16 capture+compile" not in skip:
            fl = fxquant.compile(model, kw, config=fxquant.QuantConfig(target="cuda", min_ratio=float("inf")),
                                 compile_forward=False)
            assert not any(d.quantize for d in fl.report().decisions)
            fl_c = torch.compile(fl)
            runners["bf16 capture+compile"] = lambda: fl_c(**kw)
        for col in COLUMNS:
            if col not in runners or col in skip:
                continue
            t = time.time()
            out = output(runners[col]())  # first call compiles / autotunes
            res["setup_s"][col] = time.time() - t
            res["cos_mean"][col], res["cos_min"][col] = cosines(ref, out, rows)
            res["ms"][col] = do_bench(runners[col], warmup=100, rep=500, return_mode="median")
            print(f"{name} {col}: {res['ms'][col]:.3f} ms, cos {res['cos_mean'][col]:.5f} (min {res['cos_min'][col]:.5f}), "
                  f"first call {res['setup_s'][col]:.1f} s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["vit", "llama"])
    ap.add_argument("--skip", nargs="*", default=[], choices=COLUMNS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    head = f"# {device_line()}, {datetime.date.today()}"
    print(head, flush=True)
    results = [bench_model(m, set(args.skip)) for m in args.model]
    table = []
    for r in results:
        base = r["ms"].get("compile")
        for col in COLUMNS:
            if col in r["ms"]:
                table.append([r["model"], col, f"{r['ms'][col]:.2f}", f"{base / r['ms'][col]:.2f}x" if base else "-",
                              f"{r['cos_mean'][col]:.5f}", f"{r['cos_min'][col]:.5f}"])
    print(head)
    print(tabulate(table, headers=["model", "column", "ms", "vs bf16 compile", "cos mean", "cos min"], tablefmt="github"))
    for r in results:
        base, control = r["ms"].get("compile"), r["ms"].get("bf16 capture+compile")
        fx_c = r["ms"].get("fxquant+compile")
        if base and control and fx_c:
            print(f"{r['model']}: fxquant+compile {base / fx_c:.2f}x bf16 compile, {control / fx_c:.2f}x the bf16 control")
        print(r["model"], "fxquant:", r["fxquant_summary"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head, "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
