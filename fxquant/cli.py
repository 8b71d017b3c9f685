"""Command line: ``fxquant demo [--model DIR]`` (also ``python -m fxquant demo``)."""

from __future__ import annotations

import argparse
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
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import QuantConfig
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
