"""int8's own gain on CPU at any batch size: fxquant against the same model under ``torch.compile`` without int8 (the
control: in bf16 for the AMX recipe, in fp32 for the defaults), torch bf16 eager and torch fp32, in ONE process,
interleaved rounds.

Speed only: all-MiniLM-L6-v2's config with random weights (speed does not depend on the weights; accuracy on the
real weights is ``bench/cpu_minilm.py``'s job), inputs of random tokens padded to ``--seq`` with random lengths.
fxquant runs the README's AMX recipe (``--recipe amx``: static per-tensor scales calibrated on three random batches,
SmoothQuant 0.9, ``compute_dtype=torch.bfloat16``) or the defaults (``--recipe default``: dynamic per-token, the
model's fp32), eager and under ``torch.compile``; ``--siblings`` adds the same with ``fuse_siblings=False``, ``--onnx``
ONNX Runtime running their exports.
All contenders live in one process and are timed in turn, round after round, so a change in the host's speed
hits them alike (``bench/cpu_minilm.py`` keeps each contender in its own process instead, for the peers whose
runtimes would otherwise share thread pools).

    taskset -c 0,1 env OMP_NUM_THREADS=2 python bench/cpu_control.py --batch 1 --rounds 3 --repeat 20
    python bench/cpu_control.py --recipe default --siblings --only "fp32,eager" --batch 1 --rounds 7 --repeat 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch

import fxquant
from fxquant.targets import backends

FP32, BF16, CONTROL, FXQ, FXQ_COMPILE = ("torch fp32 eager", "torch bf16 eager", "torch bf16 + torch.compile (control)",
                                         "fxquant W8A8 eager", "fxquant W8A8 + torch.compile")
FP32_CONTROL = "torch fp32 + torch.compile (control)"  # the control of the default recipe, which computes in fp32
ORT_FXQ = "ONNX Runtime running fxquant's export"


def _ort_runner(qm: fxquant.QuantizedModel, x: dict[str, torch.Tensor]) -> Callable[[], object]:
    """ONNX Runtime (CPU provider, torch's thread count) on ``fxquant.export_onnx`` of ``qm``, fed ``x``."""
    import tempfile

    import onnxruntime as ort

    path = fxquant.export_onnx(qm, tempfile.mkdtemp() + "/model.onnx", x)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x[i.name].numpy() for i in session.get_inputs()}
    return lambda: session.run(None, feeds)[0]


def random_batch(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / token_type_ids [batch, seq] int64; the first row uses every position, the
    others a random length in [16, seq] (padding after it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    lengths = torch.randint(min(16, seq), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def random_minilm(config_dir: str | None = None) -> torch.nn.Module:
    """A BertModel of ``config_dir``'s config.json (default: the embedded MiniLM's) with seed-0 random weights."""
    from transformers import BertConfig, BertModel

    from fxquant.app.evaluation import default_model_dir

    torch.manual_seed(0)
    return BertModel(BertConfig.from_pretrained(config_dir or default_model_dir())).eval()


def build(args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    model = random_minilm(args.config)
    x = random_batch(args.batch, args.seq, 1)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    runs = {FP32: lambda: model(**x).last_hidden_state, BF16: lambda: m16(**x).last_hidden_state,
            CONTROL: (lambda c16=torch.compile(m16): c16(**x).last_hidden_state)}
    if args.recipe == "default":
        runs[FP32_CONTROL] = lambda c32=torch.compile(model): c32(**x).last_hidden_state
    calibration = [random_batch(args.batch, args.seq, 100 + i) for i in range(3)]
    for siblings in (True, False) if args.siblings else (True,):
        if args.recipe == "amx":
            config = fxquant.QuantConfig(activation_scheme="static-per-tensor", smoothquant=0.9,
                                         compute_dtype=torch.bfloat16, fuse_siblings=siblings)
            qm = fxquant.compile(copy.deepcopy(model), x, config=config, calibration=calibration, progress=False,
                                 compile_forward=False)  # eager here; torch.compile below
        else:
            qm = fxquant.compile(copy.deepcopy(model), x, config=fxquant.QuantConfig(fuse_siblings=siblings),
                                 progress=False, compile_forward=False)
        tag = "" if siblings else ", fuse_siblings=False"
        runs[FXQ + tag] = lambda qm=qm: qm(**x).last_hidden_state
        runs[FXQ_COMPILE + tag] = lambda cq=torch.compile(qm): cq(**x).last_hidden_state
        if args.onnx:
            runs[ORT_FXQ + tag] = _ort_runner(qm, x)
    wanted = [w.strip().lower() for w in args.only.split(",")] if args.only else None
    always = BF16 if args.recipe == "amx" else FP32  # the float baseline each recipe is judged against
    runs = {name: run for name, run in runs.items() if wanted is None or name == always or any(w in name.lower() for w in wanted)}
    with torch.inference_mode():
        for name, run in runs.items():  # compile and warm up before anything is timed
            t0 = time.perf_counter()
            for _ in range(3):
                run()
            print(f"built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return runs


def measure(runs: dict[str, Callable[[], torch.Tensor]], rounds: int, repeat: int) -> dict[str, list[float]]:
    """Per contender, the median ms of ``repeat`` calls in each of ``rounds`` rounds (contenders in turn)."""
    medians: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
                medians[name].append(statistics.median(times) * 1e3)
    return medians


def table(medians: dict[str, list[float]]) -> str:
    """Medians of the per-round medians, and each contender's speed-up over each baseline as the median of the
    per-round ratios (rounds are adjacent in time, so a change in the host's speed cancels in the ratio) with how
    many rounds it won."""
    ms = {name: statistics.median(v) for name, v in medians.items()}
    bases = [b for b in (FP32, BF16, CONTROL, FP32_CONTROL) if b in ms]
    lines = ["| contender | median ms | " + " | ".join(f"vs {b}: ratio, rounds won" for b in bases)
             + " | per-round medians ms |", "|---|---|" + "---|" * len(bases) + "---|"]
    for name, m in ms.items():
        rounds = ", ".join(f"{t:.1f}" for t in medians[name])
        paired = []
        for b in bases:
            ratios = [tb / t for tb, t in zip(medians[b], medians[name])]
            paired.append(f"{statistics.median(ratios):.2f}x, {sum(r > 1 for r in ratios)}/{len(ratios)}")
        lines.append(f"| {name} | {m:.2f} | " + " | ".join(paired) + f" | {rounds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="sentences per call (default 32)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sentence (default 128)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows the median of their medians and of the per-round ratios")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per contender and round")
    p.add_argument("--recipe", choices=("amx", "default"), default="amx",
                   help="fxquant's config: the README's AMX recipe (default) or QuantConfig()'s defaults")
    p.add_argument("--siblings", action="store_true",
                   help="also fxquant with fuse_siblings=False (q/k/v as three GEMMs; the default and the AMX recipe fuse them)")
    p.add_argument("--onnx", action="store_true", help="also ONNX Runtime running each fxquant model's ONNX export "
                   "(--recipe default: the bf16-compute models of the AMX recipe do not export)")
    p.add_argument("--only", default=None, help="comma-separated substrings of the contenders to run (torch bf16 eager always runs with --recipe amx, torch "
                        "fp32 eager with --recipe default)")
    p.add_argument("--config", default=None, help="directory with a BERT config.json (default: the embedded MiniLM's)")
    args = p.parse_args(argv)
    if args.onnx and args.recipe == "amx":
        p.error("--onnx needs --recipe default: the AMX recipe's compute_dtype=bfloat16 models do not export")
    medians = measure(build(args), args.rounds, args.repeat)
    from cpu_minilm import isa_summary  # same directory

    print(f"\nbatch {args.batch} x {args.seq}; ISA {isa_summary(set(backends.cpu_flags()))}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; recipe {args.recipe}; {args.rounds} rounds x {args.repeat} calls\n")
    print(table(medians))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
