"""Command line (also ``python -m fxquant ...``): ``fxquant demo [--model DIR]``, ``fxquant inspect [MODEL_DIR]``,
``fxquant quantize MODEL_DIR OUT_DIR``, ``fxquant export-onnx MODEL_DIR OUT.onnx``, ``fxquant generate MODEL_DIR
--prompt TEXT`` and ``fxquant bench MODEL_DIR``. Every command loads its model through :mod:`fxquant.app.loading`; a user's mistake exits with
code 2 and one line on stderr naming the thing and what to do, and leaves nothing half-written."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .loading import UsageError as _UsageError


def _number(name: str, cast, ok, rule: str):
    """An argparse ``type``: ``cast`` of the text, refused with "must be <rule>" where ``ok`` is false (argparse names
    ``name`` when the text is not a number at all)."""
    def check(v: str):
        x = cast(v)
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {v}")
        return x
    check.__name__ = name
    return check


_positive = _number("positive int", int, lambda x: x >= 1, ">= 1")
_non_negative = _number("number", float, lambda x: x >= 0, ">= 0")
_probability = _number("probability", float, lambda x: 0 < x <= 1, "in (0, 1]")
_above_zero = _number("number", float, lambda x: x > 0, "> 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxquant", description="W8A8 graph-rewrite quantization for PyTorch inference.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compile a sentence-embedding model; print decisions, accuracy and speed")
    d.add_argument("--model", default=None, help="Hugging Face encoder directory (default: embedded all-MiniLM-L6-v2)")
    d.add_argument("--batch", type=_positive, default=32, help="sentences per timed batch (default 32)")
    d.add_argument("--seq", type=_positive, default=128, help="tokens per sentence, padded (default 128)")
    d.add_argument("--repeat", type=_positive, default=7, help="timed repetitions; the median is shown (default 7)")
    d.add_argument("--compile", action="store_true", help="also time torch.compile of the int8 model (needs a C++ compiler)")
    d.add_argument("--min-ratio", type=float, default=None, help="override the target's K*N/(K+N) threshold")
    d.add_argument("--skip", action="append", default=[], help="keep this Linear float (name or 're:' regex); repeatable")
    i = sub.add_parser("inspect", help="compile a model (no run) and print every Linear's decision, pattern and FLOP share")
    i.add_argument("model_dir", nargs="?", default=None,
                   help="Hugging Face model directory: an encoder, or a causal LM (architectures ending in ForCausalLM); "
                        "default: the embedded all-MiniLM-L6-v2")
    i.add_argument("--target", default="cpu", help="cpu, cuda or arm-sve2 (default cpu; cuda compiles on a CPU-only machine too)")
    i.add_argument("--draw", default=None, metavar="OUT", help="write the fused graph drawing there (.svg or .png; needs fxquant[draw])")
    i.add_argument("--block", default=None, metavar="PREFIX", help="with --draw: draw only this module prefix, e.g. encoder.layer.0")
    i.add_argument("--json", action="store_true", help="print JSON (rows and totals) instead of the tables")
    model_help = ("Hugging Face model directory: an encoder, a causal LM, or a compressed-tensors W8A8 checkpoint "
                  "(config.json, weights, tokenizer)")
    q = sub.add_parser("quantize", help="compile a model and write a compressed-tensors W8A8 checkpoint (+ tokenizer)")
    q.add_argument("model_dir", help=model_help)
    q.add_argument("out_dir", help="the checkpoint directory to create (must not exist, or be empty)")
    q.add_argument("--calibration", default=None, metavar="FILE",
                   help="text samples, one per line (or JSON lines with a \"text\" field), for --scheme static / --smoothquant")
    q.add_argument("--scheme", choices=("dynamic", "static"), default="dynamic",
                   help="activation scales: per token at run time (default), or static per tensor from --calibration "
                        "(the compressed-tensors checkpoint carries only dynamic; use export-onnx --static)")
    q.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant migration strength in [0, 1] (needs --calibration; the checkpoint format cannot "
                        "carry it: use the Python API's export_onnx)")
    q.add_argument("--skip", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="keep these Linears float (name or 're:' regex)")
    q.add_argument("--target", choices=("cpu", "cuda"), default="cpu", help="plan for this target (default cpu)")
    q.add_argument("--min-ratio", type=float, default=None, help="override the target's K*N/(K+N) threshold")
    q.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    q.add_argument("--json", action="store_true", help="print JSON (report rows, totals, files) instead of the tables")
    e = sub.add_parser("export-onnx", help="compile a model and write it as an ONNX graph with integer GEMMs")
    e.add_argument("model_dir", help=model_help)
    e.add_argument("out", help="the .onnx file to write (its folder must exist; written under a temporary name, then renamed)")
    e.add_argument("--static", action="store_true", help="static per-tensor scales as QuantizeLinear/DequantizeLinear "
                                                         "(needs --calibration); default: dynamic per-token MatMulInteger")
    e.add_argument("--calibration", default=None, metavar="FILE",
                   help="text samples, one per line (or JSON lines with a \"text\" field); without --static, fxquant "
                        "measures dynamic against static + SmoothQuant on them and exports the form it chose "
                        "(activation_scheme auto)")
    e.add_argument("--qdq-dtype", choices=("int8", "uint8"), default="int8",
                   help="--static: the activations' type (int8: TensorRT/OpenVINO; uint8: ONNX Runtime x86)")
    e.add_argument("--min-ratio", type=float, default=None, help="override the target's K*N/(K+N) threshold")
    g = sub.add_parser("generate", help="compile a causal LM and stream generated text")
    g.add_argument("model_dir", help="a causal LM directory: float, or a compressed-tensors W8A8 checkpoint")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=_non_negative, default=0.0,
                   help="0 (default): greedy; above 0: sample with this temperature")
    g.add_argument("--top-k", type=_positive, default=None, help="with --temperature: keep the k most likely tokens")
    g.add_argument("--top-p", type=_probability, default=None,
                   help="with --temperature: keep the most likely tokens up to this probability mass")
    g.add_argument("--repetition-penalty", type=_above_zero, default=None,
                   help="divide the logits of tokens already present by this (CTRL's penalty; 1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed torch's generator first (a sampled run repeats)")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the tokenizer's chat template (instruct models)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    b = sub.add_parser("bench", help="time the float model and fxquant side by side on one batch (medians, ratio)")
    b.add_argument("model_dir", help="a float Hugging Face model directory (encoder or causal LM)")
    b.add_argument("--batch", type=_positive, default=8, help="rows per call (default 8)")
    b.add_argument("--seq", type=_positive, default=128, help="tokens per row (default 128)")
    b.add_argument("--rounds", type=_positive, default=7, help="interleaved rounds; medians are shown (default 7)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both run (default cpu)")
    b.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


from .loading import (check_model_dir, copy_side_files, example_inputs, load_model, read_calibration,  # noqa: E402
                      tokenize_calibration)


def _compile(loaded, example, **kwargs):
    """``fxquant.compile`` of a loaded directory (a checkpoint's int8 weights as stored); a model fxquant cannot
    capture is the user's to know about, in one line."""
    from ..api import compile
    from ..errors import TraceError

    try:
        return compile(loaded.model, example, weights=loaded.weights, **kwargs)
    except TraceError as e:
        raise _UsageError(f"fxquant cannot capture the model in {loaded.model_dir!r}: {e}") from None


def _check_inspect_args(args: argparse.Namespace) -> None:
    from ..config import TARGETS
    from ..tools.draw import format_for

    if args.target not in TARGETS:
        raise _UsageError(f"--target must be one of {', '.join(TARGETS)}, got {args.target!r}")
    if args.model_dir is not None:
        check_model_dir(args.model_dir)
    if args.block is not None and args.draw is None:
        raise _UsageError("--block selects what --draw draws: give --draw OUT.svg too")
    if args.draw is not None:
        format_for(args.draw, None)
        folder = os.path.dirname(os.path.abspath(args.draw))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise _UsageError(f"cannot write --draw {args.draw!r}: folder {folder!r} is missing or not writable")


def load_for_inspect(model_dir: str):
    """``(model, example_inputs)`` of a Hugging Face directory (:func:`fxquant.app.loading.load_model`; a
    checkpoint's float skeleton: compile it with ``weights=model_dir``)."""
    loaded = load_model(model_dir)
    return loaded.model, example_inputs(loaded)


def run_inspect(args: argparse.Namespace) -> None:
    """``fxquant inspect``: load, compile (capture only, the model never runs on data), print, draw."""
    from . import evaluation
    from ..config import QuantConfig

    _check_inspect_args(args)
    model_dir = args.model_dir or evaluation.default_model_dir()
    loaded = load_model(model_dir)
    qmodel = _compile(loaded, example_inputs(loaded), config=QuantConfig(target=args.target), compile_forward=False)
    rep = qmodel.report()
    drawing = qmodel.draw(args.draw, block=args.block) if args.draw else None
    if args.json:
        out = {"model": str(model_dir), **rep.to_dict(), "drawing": drawing.path if drawing else None}
        print(json.dumps(out, indent=1, default=str))
        return
    head = str(rep).split("\n\n", 1)[0]  # the one-line verdict and the notes
    print(f"model: {model_dir}\n{head}\n\n{rep.summary_table()}")
    if drawing:
        print(f"\ndrawing: {drawing.path} ({len(drawing.nodes)} nodes)")


def _calibration_args(args: argparse.Namespace, static: bool, what: str) -> None:
    smooth = getattr(args, "smoothquant", None)
    if args.calibration is None and (static or smooth is not None):
        raise _UsageError(f"{what} needs calibration samples: give --calibration FILE (text, one sample per line)")
    if args.calibration is not None and not static and smooth is None:
        raise _UsageError("--calibration is used only by the static scheme or SmoothQuant "
                          f"({'--scheme static / --smoothquant ALPHA' if what != '--static' else '--static'}): add one, "
                          "or drop --calibration")
    if args.calibration is not None and not os.path.isfile(args.calibration):
        raise _UsageError(f"--calibration {args.calibration!r} does not exist: give a text file, one sample per line")


def _check_out_dir(out_dir: str) -> Path:
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _UsageError(f"output directory {out_dir!r} exists and is not empty: give a new or empty directory "
                          "(nothing was written)")
    if not out.parent.is_dir():
        raise _UsageError(f"the folder of the output directory {out_dir!r}, {str(out.parent)!r}, does not exist: "
                          "create it first")
    if not os.access(out.parent, os.W_OK):
        raise _UsageError(f"cannot write into {str(out.parent)!r}: choose a folder you can write to")
    return out


def _report_text(model_dir: str, qmodel) -> str:
    rep = qmodel.report()
    head = str(rep).split("\n\n", 1)[0]  # the one-line verdict and the notes
    return f"model: {model_dir}\n{head}\n\n{rep.summary_table()}"


def run_quantize(args: argparse.Namespace) -> None:
    """``fxquant quantize``: load, compile (forward only), ``save_pretrained`` into a temporary directory beside
    OUT_DIR with the tokenizer files and generation_config.json, then rename it to OUT_DIR."""
    from ..config import QuantConfig
    from ..export.compressed_tensors import _parse_size, check_savable

    check_model_dir(args.model_dir)
    out = _check_out_dir(args.out_dir)
    static = args.scheme == "static"
    _calibration_args(args, static, "--scheme static" if static else "--smoothquant")
    try:
        _parse_size(args.max_shard_size)
        config = QuantConfig(target=args.target, skip=tuple(args.skip), smoothquant=args.smoothquant, min_ratio=args.min_ratio,
                             activation_scheme="static-per-tensor" if static else "dynamic-per-token")
    except ValueError as e:
        raise _UsageError(str(e)) from None
    check_savable(config)  # the checkpoint format's limits, before any work
    texts = read_calibration(args.calibration) if args.calibration else None
    loaded = load_model(args.model_dir)
    calibration = tokenize_calibration(texts, loaded) if texts else None
    qmodel = _compile(loaded, example_inputs(loaded), config=config, calibration=calibration, generation=False,
                      compile_forward=False)  # writes files only: nothing runs forward
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        written = [p.name for p in qmodel.save_pretrained(tmp, max_shard_size=args.max_shard_size)]
        written += copy_side_files(args.model_dir, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for p in (tmp, *tmp.iterdir()):  # mkdtemp / mkstemp make them private; a checkpoint is shared like any save
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if out.is_dir():
            out.rmdir()  # empty (checked above): the rename takes its place
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.json:
        rep = qmodel.report()
        print(json.dumps({"model": str(args.model_dir), "out": str(out), "files": sorted(written), **rep.to_dict()},
                         indent=1, default=str))
        return
    print(f"{_report_text(args.model_dir, qmodel)}\n\nwrote {out}: {', '.join(sorted(written))}")


def run_export_onnx(args: argparse.Namespace) -> None:
    """``fxquant export-onnx``: load, compile (forward only; static: calibrated), ``fxquant.export_onnx`` (which
    writes under a temporary name beside OUT.onnx, checks the model, then renames)."""
    from ..config import QuantConfig
    from ..export.onnx import export_onnx

    check_model_dir(args.model_dir)
    out = Path(args.out).absolute()
    if not out.parent.is_dir():
        raise _UsageError(f"the folder of {args.out!r}, {str(out.parent)!r}, does not exist: create it first")
    if out.is_dir():
        raise _UsageError(f"{args.out!r} is a directory: give the .onnx file to write")
    auto = args.calibration is not None and not args.static  # the scheme measured and chosen on the samples
    _calibration_args(args, args.static or auto, "--static")
    try:
        config = QuantConfig(activation_scheme="static-per-tensor" if args.static else "auto" if auto else
                             "dynamic-per-token", min_ratio=args.min_ratio)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    texts = read_calibration(args.calibration) if args.calibration else None
    loaded = load_model(args.model_dir)
    calibration = tokenize_calibration(texts, loaded) if texts else None
    example = example_inputs(loaded, batch=2)  # batch and sequence stay dynamic in the ONNX graph
    qmodel = _compile(loaded, example, config=config, calibration=calibration, generation=False,
                      compile_forward=False)  # exports only: nothing runs forward
    existed = out.exists()
    export_onnx(qmodel, out, example, qdq_dtype=args.qdq_dtype)
    if not existed:  # export_onnx's temporary file is private; a new model file is shared like any other
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)
    rep = qmodel.report()
    static = qmodel.config.activation_scheme == "static-per-tensor"
    form = f"static QDQ ({args.qdq_dtype})" if static else "dynamic per-token (MatMulInteger)"
    if auto:
        form += (f", chosen from --calibration: {qmodel.config.activation_scheme}, smoothquant="
                 f"{qmodel.config.smoothquant} (output cosine mean / min on the samples: " + "; ".join(
                     f"{k} {m:.4f} / {lo:.4f}" for k, (m, lo) in (qmodel.scheme_scores or {}).items()) + ")")
    print(f"{_report_text(args.model_dir, qmodel)}\n\nwrote {out}: {rep.num_int8} int8 Linear(s), {form}")


def run_generate(args: argparse.Namespace) -> None:
    """``fxquant generate``: load a causal LM (float, or a compressed-tensors checkpoint through ``weights=``),
    compile with a KV cache of prompt + max_new_tokens slots, stream the new text to stdout, and the speed to
    stderr."""
    import torch

    from ..config import QuantConfig

    check_model_dir(args.model_dir)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    if not args.prompt.strip():
        raise _UsageError("--prompt is empty: give the text to continue")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise _UsageError("--top-k and --top-p shape sampling, which --temperature 0 (greedy) does not do: give "
                          "--temperature above 0, or drop them")
    loaded = load_model(args.model_dir, need_tokenizer=True, causal_only=True, device=args.device)
    from transformers import TextStreamer

    if args.chat:
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise _UsageError(f"--chat: the tokenizer in {args.model_dir} has no chat template (none in "
                              "tokenizer_config.json or chat_template.jinja): drop --chat to continue the raw text")
        # tokenized by the template itself: the template writes the BOS token, which a second tokenization would repeat
        enc = loaded.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True, return_tensors="pt")
        example = {k: enc[k].to(args.device) for k in ("input_ids", "attention_mask")}
    else:
        example = example_inputs(loaded, args.prompt, device=args.device)
    prompt_len = int(example["input_ids"].shape[1])
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + args.max_new_tokens > limit:
        raise _UsageError(f"prompt ({prompt_len} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                          f"max_position_embeddings={limit}: shorten the prompt or lower --max-new-tokens")
    qmodel = _compile(loaded, example, config=QuantConfig(target=args.device), generation=True,
                      max_cache_len=prompt_len + args.max_new_tokens, progress=False)
    gen = getattr(loaded.model, "generation_config", None)
    sampling = ({"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
                if args.temperature > 0 else {"do_sample": False})
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    out = qmodel.generate(example["input_ids"], example.get("attention_mask"), max_new_tokens=args.max_new_tokens,
                          eos_token_id=getattr(gen, "eos_token_id", None), pad_token_id=getattr(gen, "pad_token_id", None),
                          repetition_penalty=args.repetition_penalty, streamer=streamer, **sampling)
    seconds = time.perf_counter() - t0
    n = int(out.shape[1]) - prompt_len
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s)", file=sys.stderr)


def run_bench(args: argparse.Namespace) -> None:
    """``fxquant bench``: the float model in the machine's float baseline (bf16 on CUDA and on CPUs with native bf16 —
    AMX or AVX512-BF16 — else fp32) and fxquant's compile of it, one forward each per round, interleaved in one
    process after two warm-up calls each; medians and the ratio. Random token ids of the model's vocabulary,
    ``--batch`` × ``--seq``, all positions attended."""
    import statistics

    import torch

    from ..config import QuantConfig
    from ..targets.backends import cpu_native_bf16

    check_model_dir(args.model_dir)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    loaded = load_model(args.model_dir, device=args.device)
    if loaded.weights is not None:
        raise _UsageError(f"{args.model_dir!r} is a quantized checkpoint: bench compares a float model with fxquant's "
                          "compile of it; give the float model's directory")
    model = loaded.model
    dtype = torch.bfloat16 if args.device == "cuda" or cpu_native_bf16() else torch.float32
    model = model.to(dtype)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seq > limit:
        raise _UsageError(f"--seq {args.seq} exceeds the model's max_position_embeddings={limit}")
    keys = set(example_inputs(loaded))
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=g)}
    if "attention_mask" in keys:
        inputs["attention_mask"] = torch.ones(args.batch, args.seq, dtype=torch.long)
    if "token_type_ids" in keys:
        inputs["token_type_ids"] = torch.zeros(args.batch, args.seq, dtype=torch.long)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    qmodel = _compile(loaded, inputs, config=QuantConfig(target=args.device), generation=False, progress=False)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    runs = {"float": lambda: model(**inputs), "fxquant": lambda: qmodel(**inputs)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn(), fn()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model_dir": args.model_dir, "device": args.device, "float_dtype": str(dtype).replace("torch.", ""),
              "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "median_ms": med, "speedup": med["float"] / med["fxquant"], "int8_linears": qmodel.report().num_int8}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.model_dir}: batch {args.batch} x {args.seq} tokens, {args.device}, {result['threads']} thread(s), "
          f"{args.rounds} interleaved rounds")
    print(f"  float ({result['float_dtype']})  {med['float']:9.2f} ms")
    print(f"  fxquant ({result['int8_linears']} int8 Linears)  {med['fxquant']:9.2f} ms   x{result['speedup']:.2f}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


_COMMANDS = {"inspect": run_inspect, "quantize": run_quantize, "export-onnx": run_export_onnx, "generate": run_generate,
             "bench": run_bench}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..errors import FxquantError

    args = build_parser().parse_args(argv)
    if args.command in _COMMANDS:
        try:
            _COMMANDS[args.command](args)
        except (ValueError, TypeError, OSError, ModuleNotFoundError, FxquantError) as e:
            print(f"fxquant: error: {_one_line(e)}", file=sys.stderr)
            return 2
        return 0
    from ..config import QuantConfig
    from .demo import run_demo

    try:
        config = QuantConfig(min_ratio=args.min_ratio, skip=tuple(args.skip))
        run_demo(args.model, batch=args.batch, seq=args.seq, repeat=args.repeat, config=config, compile_too=args.compile)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"fxquant: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
