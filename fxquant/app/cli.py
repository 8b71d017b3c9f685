"""Command line: ``fxquant demo [--model DIR]`` and ``fxquant inspect [MODEL_DIR]`` (also ``python -m fxquant ...``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _positive(v: str) -> int:
    i = int(v)
    if i < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return i


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
    return p


class _UsageError(ValueError):
    """A bad command line, found before any work."""


def _check_inspect_args(args: argparse.Namespace) -> None:
    from ..config import TARGETS
    from ..tools.draw import format_for

    if args.target not in TARGETS:
        raise _UsageError(f"--target must be one of {', '.join(TARGETS)}, got {args.target!r}")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise _UsageError(f"model directory {args.model_dir!r} does not exist")
    if args.model_dir is not None and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise _UsageError(f"{args.model_dir!r} holds no config.json: not a Hugging Face model directory")
    if args.block is not None and args.draw is None:
        raise _UsageError("--block selects what --draw draws: give --draw OUT.svg too")
    if args.draw is not None:
        format_for(args.draw, None)
        folder = os.path.dirname(os.path.abspath(args.draw))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise _UsageError(f"cannot write --draw {args.draw!r}: folder {folder!r} is missing or not writable")


def load_for_inspect(model_dir: str):
    """``(model, example_inputs)`` of a Hugging Face directory: a causal LM (``AutoModelForCausalLM``) when its
    config's ``architectures`` end in ``ForCausalLM``, else an encoder (``AutoModel``); inputs from its
    tokenizer (one short sentence), else ``input_ids`` of shape (1, 16). Offline (``HF_HUB_OFFLINE``).
    Raises ModuleNotFoundError without transformers, OSError / ValueError for a directory it cannot load."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("fxquant inspect needs transformers: install with `pip install 'fxquant[demo]'`") from e
    config = transformers.AutoConfig.from_pretrained(model_dir)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(model_dir).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    if tokenizer is not None:
        return model, dict(tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt"))
    vocab = int(getattr(config, "vocab_size", None) or 2)
    return model, {"input_ids": (torch.arange(16) % vocab).unsqueeze(0)}


def run_inspect(args: argparse.Namespace) -> None:
    """``fxquant inspect``: load, compile (capture only, the model never runs on data), print, draw."""
    from . import evaluation
    from ..api import compile
    from ..config import QuantConfig

    _check_inspect_args(args)
    model_dir = args.model_dir or evaluation.default_model_dir()
    model, example = load_for_inspect(model_dir)
    qmodel = compile(model, example, config=QuantConfig(target=args.target))
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        try:
            run_inspect(args)
        except (ValueError, TypeError, OSError, ModuleNotFoundError) as e:
            print(f"fxquant: error: {e}", file=sys.stderr)
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
