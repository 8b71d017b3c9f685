"""Compile and check every Triton kernel of fxquant on a real GPU (the interpreter accepts code that the
compiler rejects, so CI's interpreter runs are not enough).

1. Runs ``tests/test_kernels.py``, ``tests/test_lowering.py`` and the CPU <-> CUDA move test of
   ``tests/test_module_behaviour.py`` with the kernels compiled (no interpreter).
2. Checks the kernels at the benchmark shapes (decode to prefill, odd M and K) against float64 / pure-torch
   references: exact int32 accumulation, epilogue within the dtype tolerance, quantization bit-exact;
   the swiglu dual GEMM at LLM MLP shapes (M x K x 2I); LayerNorm / RMSNorm + quantize (y close to the
   fp32 norm, y_q and scale bit-exact against quantizing y).
3. Reads the compiled code: the GEMMs' PTX must hold ``wgmma`` on sm_90 for the large-M configs
   (``mma`` for small M), plain and gated (swiglu) variants each, and register spills are reported.

    python bench/check_kernels_gpu.py            # exit code 0 only when every check passed
    python bench/check_kernels_gpu.py --sections swiglu quant code
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxquant  # noqa: E402,F401
from fxquant.kernels import layer_norm_quant as kln  # noqa: E402
from fxquant.kernels import quantize as kq  # noqa: E402
from fxquant.kernels import w8a8_gemm as kg  # noqa: E402

FAILS: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILS.append(what)


def gemm_checks() -> None:
    shapes = [(1, 4096, 4096), (7, 4096, 4096), (16, 4096, 4096), (33, 768, 3072), (128, 4096, 4096),
              (2048, 4096, 4096), (4096, 384, 1536), (12608, 3072, 768), (1000, 4100, 1000), (300, 2048, 6144)]
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, k, n in shapes:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
        sa = torch.rand(m, device="cuda", generator=g) * 1e-3 + 1e-5
        sw = torch.rand(n, device="cuda", generator=g) * 1e-3 + 1e-5
        bias = torch.randn(n, device="cuda", generator=g).bfloat16()
        for tma in ([False, True] if kg.tma_ok(a, w) else [False]):
            # int32 exactness through an fp32 output with unit scales: exact while |acc| < 2^24
            small = a.clamp(-3, 3), w.clamp(-3, 3)
            got = kg.w8a8_linear(small[0], torch.ones(m, device="cuda"), small[1], torch.ones(n, device="cuda"),
                                 None, "none", torch.float32, use_tma=tma)
            check(torch.equal(got.double(), small[0].double() @ small[1].double().T), f"gemm exact acc {m}x{k}x{n} tma={tma}")
            for act, dt in (("none", torch.bfloat16), ("gelu", torch.bfloat16), ("silu", torch.float16), ("gelu_tanh", torch.float32), ("relu", torch.bfloat16)):
                out = kg.w8a8_linear(a, sa, w, sw, bias, act, dt, use_tma=tma)
                ref = kg.w8a8_linear_reference(a, sa, w, sw, bias, act, torch.float64)
                refd = ref.double()
                err = ((out.double() - refd).norm() / refd.norm().clamp_min(1e-30)).item()
                tol = {torch.bfloat16: 4e-3, torch.float16: 6e-4, torch.float32: 1e-6}[dt]
                check(bool(torch.isfinite(out).all()) and err < tol, f"gemm {m}x{k}x{n} {act} {dt} tma={tma}: rel err {err:.2e} < {tol}")


def swiglu_checks() -> None:
    """The dual GEMM at LLM MLP shapes M x K x 2I (Qwen2-1.5B: 1536 -> 2·8960; Llama-3.2-1B: 2048 -> 2·8192)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    for m, k, n2 in ((8192, 1536, 2 * 8960), (8192, 2048, 2 * 8192), (16, 2048, 2 * 8192), (300, 1536, 2 * 8960)):
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        w = torch.randint(-127, 128, (n2, k), dtype=torch.int8, device="cuda", generator=g)
        sa = torch.rand(m, device="cuda", generator=g) * 1e-3 + 1e-5
        sw = torch.rand(n2, device="cuda", generator=g) * 1e-3 + 1e-5
        for bias in (None, torch.randn(n2, device="cuda", generator=g).bfloat16()):
            ref = kg.w8a8_linear_reference(a, sa, w, sw, bias, "swiglu", torch.float64).double()
            for tma in ([False, True] if kg.tma_ok(a, w) else [False]):
                for dt in (torch.bfloat16, torch.float32):
                    out = kg.w8a8_linear(a, sa, w, sw, bias, "swiglu", dt, use_tma=tma)
                    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    tol = {torch.bfloat16: 4e-3, torch.float32: 1e-6}[dt]
                    check(out.shape == (m, n2 // 2) and bool(torch.isfinite(out).all()) and err < tol,
                          f"swiglu gemm {m}x{k}x{n2} bias={bias is not None} {dt} tma={tma}: rel err {err:.2e} < {tol}")
            del ref


def quant_checks() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for m, k in ((1, 4096), (7, 768), (12608, 3072), (2048, 14336), (33, 20000), (8192, 2048), (5, 1)):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(dt)
            q, s = kq.quantize_per_token(x)
            rq, rs = kq.quantize_per_token_reference(x)
            check(torch.equal(q, rq) and torch.equal(s, rs), f"quantize {m}x{k} {dt} bit-exact")
    for m, k in ((1, 768), (12608, 768), (8192, 2048), (33, 4100)):
        for dt in (torch.bfloat16, torch.float32):
            x = (torch.randn(m, k, device="cuda", generator=g) * 2 + 1).to(dt)
            w = torch.randn(k, device="cuda", generator=g).to(dt)
            b = torch.randn(k, device="cuda", generator=g).to(dt)
            y, q, s = kln.layer_norm_quant(x, [k], w, b, 1e-6, True)
            ry = torch.nn.functional.layer_norm(x.float(), [k], w.float(), b.float(), 1e-6)
            err = ((y.float() - ry).norm() / ry.norm()).item()
            sq, ss = kq.quantize_per_token_reference(y)
            tol = 4e-3 if dt == torch.bfloat16 else 1e-5
            check(err < tol and torch.equal(q, sq) and torch.equal(s, ss),
                  f"layer_norm_quant {m}x{k} {dt}: y rel err {err:.1e}, y_q/scale = quantize(y) exactly")
    for m, k in ((1, 1536), (8192, 1536), (8192, 2048), (33, 4100)):
        for dt in (torch.bfloat16, torch.float32):
            x = (torch.randn(m, k, device="cuda", generator=g) * 2 + 0.3).to(dt)
            wf = torch.randn(k, device="cuda", generator=g) * 0.5 + 1
            for cast in (True, False):
                w = wf.to(dt) if cast else wf  # F.rms_norm / Gemma style: an fp32 weight
                y, q, s = kln.rms_norm_quant(x, w, 1e-6, cast, True)
                ry = kln.rms_norm_quant_reference(x, w, 1e-6, cast)[0]
                ulps = ((y.double() - ry.double()).abs() / (ry.double().abs() * torch.finfo(dt).eps).clamp_min(1e-300)).max().item()
                sq, ss = kq.quantize_per_token_reference(y)
                y2, q2, s2 = kln.rms_norm_quant(x, w, 1e-6, cast, False)
                # bf16, cast_before_weight: n is rounded to bf16 before the weight product, and our fp32 mean
                # square (another summation order, a correctly rounded 1/sqrt) may round n to its other bf16
                # neighbour than torch's; γ · n carries that one-ulp step into y: ≤ 2 ulp (1 ulp otherwise)
                bound = 32 if dt == torch.float32 else 2 if cast else 1
                ok = ulps <= bound and torch.equal(q, sq) and torch.equal(s, ss)
                check(ok and y2.numel() == 0 and torch.equal(q2, q) and torch.equal(s2, s),
                      f"rms_norm_quant {m}x{k} {dt} cast_before_weight={cast}: y within {ulps:.1f} ≤ {bound} ulp of the reference, "
                      f"y_q/scale = quantize(y) exactly, return_float=False the same")
                if not cast:
                    ty = torch.nn.functional.rms_norm(x, [k], w, 1e-6)
                    tu = ((ty.double() - ry.double()).abs() / (ry.double().abs() * torch.finfo(dt).eps).clamp_min(1e-300)).max().item()
                    print(f"     F.rms_norm (CUDA) vs reference {m}x{k} {dt}: {tu:.1f} ulp", flush=True)


def compiled_code_checks(plain: bool = True, gated: bool = True) -> None:
    """Inspect the binaries Triton cached for the GEMM kernels, plain and gated (swiglu) apart; ``plain`` /
    ``gated``: the checks that ran compiled such variants, so each must hold int8 wgmma."""
    for name, kernel in (("pointer", kg._w8a8_gemm_kernel), ("tma", kg._w8a8_gemm_tma_kernel)):
        jit = kernel
        while not hasattr(jit, "device_caches"):
            jit = jit.fn
        counts = {}  # gated -> [variants, with int8 wgmma]
        for cache in jit.device_caches.values():
            for compiled in cache[0].values():
                ptx = compiled.asm.get("ptx", "")
                kind = _gated(jit, compiled)
                c = counts.setdefault(kind, [0, 0])
                c[0] += 1
                c[1] += "wgmma.mma_async" in ptx and ".s8" in ptx
                spills = getattr(compiled, "n_spills", 0)
                md = compiled.metadata
                print(f"     {name}: gated={kind} warps={md.num_warps} stages={md.num_stages} shared={md.shared} B "
                      f"regs={getattr(compiled, 'n_regs', '?')} spills={spills} wgmma={'wgmma.mma_async' in ptx}")
        for kind, (total, wgmma) in sorted(counts.items(), key=str):
            check(total > 0 and wgmma > 0, f"{name} GEMM gated={kind}: {wgmma}/{total} compiled variants use int8 wgmma")
        if None not in counts:
            want = {kind for kind, ran in ((False, plain), (True, gated)) if ran}
            check(want <= set(counts), f"{name} GEMM: variants compiled for {sorted(want)} (gated?), got {sorted(counts)}")


def _gated(jit, compiled):
    """The GATED constexpr a compiled GEMM variant was built with (None when this Triton hides it)."""
    try:
        index = jit.arg_names.index("GATED")
        constants = compiled.src.constants
        for k, v in constants.items():
            if k == index or k == (index,) or k == "GATED":
                return bool(v)
    except Exception:  # noqa: BLE001 - a Triton whose CompiledKernel keeps no ASTSource
        pass
    return None


SECTIONS = ("pytest", "gemm", "swiglu", "quant", "code")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                    help="run only these checks (default: all); 'code' reads the variants the others compiled")
    sections = set(ap.parse_args().sections)
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    if "pytest" in sections:
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        env.pop("TRITON_INTERPRET", None)
        t = time.time()
        tests = ["tests/test_kernels.py", "tests/test_lowering.py", "tests/test_module_behaviour.py::test_cpu_to_cuda_and_back"]
        xdist = ["-n", "8"] if importlib.util.find_spec("xdist") else []  # Triton compiles on the CPU: spread them
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, *tests], env=env)
        check(r.returncode == 0, f"pytest {' '.join(tests)} on the GPU ({time.time() - t:.0f} s)")
    for name, run in (("gemm", gemm_checks), ("swiglu", swiglu_checks), ("quant", quant_checks)):
        if name in sections:
            run()
    if "code" in sections:
        compiled_code_checks(plain="gemm" in sections, gated="swiglu" in sections)
    print(f"{len(FAILS)} failed checks" if FAILS else "all kernel checks passed")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
