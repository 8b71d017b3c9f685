"""``FXQUANT_CPU_ISA`` (fxquant.targets.backends): forcing the choices fxquant makes per x86 CPU kind (int8 weight range,
oneDNN's src form, oneDNN's bf16 epilogue), and the key numerics run once more with the 7-bit range forced, so
that a run on a VNNI / AMX CPU also covers what a CPU without VNNI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.plan import planner as passes
from fxquant.targets import backends

NATIVE_BF16 = {"amx_bf16", "avx512_bf16"}


@pytest.fixture
def isa(monkeypatch):
    """``isa(value)`` sets FXQUANT_CPU_ISA (None: unset) and clears the cached choices; the test's monkeypatches are
    undone and the caches cleared again afterwards, so no forced choice leaks into the next test."""

    def set_isa(value):
        if value is None:
            monkeypatch.delenv(backends.CPU_ISA_ENV, raising=False)
        else:
            monkeypatch.setenv(backends.CPU_ISA_ENV, value)
        backends.clear_cpu_isa_caches()

    yield set_isa
    monkeypatch.undo()
    backends.clear_cpu_isa_caches()


def _model():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()


@pytest.mark.parametrize("value", ["avx2", " AVX2 "])
def test_avx2_forces_the_choices_of_a_cpu_without_vnni(isa, value):
    """avx2 on any CPU: weights in [-63, 63] on the cpu target, uint8 src with zero point 128 below the row
    threshold, no bf16 from oneDNN's epilogue; other targets and an explicit weight_qmax are untouched."""
    isa(value)
    assert backends.forced_cpu_isa() == "avx2"
    assert passes.resolve_weight_qmax(fxquant.QuantConfig()) == 63
    assert passes.resolve_weight_qmax(fxquant.QuantConfig(weight_qmax=127)) == 127
    assert passes.resolve_weight_qmax(fxquant.QuantConfig(target="cuda")) == 127
    assert backends.cpu_int8_full_range_exact() is False
    assert backends.cpu_native_bf16() is False
    assert not backends._onednn_out_ok(torch.bfloat16) and backends._onednn_out_ok(torch.float32)
    if backends.onednn_available():
        x_q = torch.randint(-127, 128, (5, 32), dtype=torch.int8)
        src, zp = backends._src(x_q)
        assert (src.dtype, zp) == (torch.uint8, 128) and torch.equal(src.to(torch.int16) - 128, x_q.to(torch.int16))
        big = torch.zeros(backends._U8_SRC_MAX_M, 32, dtype=torch.int8)
        assert backends._src(big)[0].dtype == torch.int8
        assert backends.cpu_backend(63) == "onednn"
        assert backends.cpu_backend(127) == "aten"  # full range is not "exact" here: torch._int_mm
    x = torch.randn(2, 8, 64)
    model = _model()
    qm = fxquant.compile(model, (x,), config=fxquant.QuantConfig(min_ratio=0), progress=False)
    assert qm.report().weight_qmax == 63
    assert any(n.startswith("FXQUANT_CPU_ISA=avx2") and "[-63, 63]" in n for n in qm.report().notes)
    w_q = [b for n, b in qm.named_buffers() if b.dtype == torch.int8]
    assert w_q and max(int(b.abs().max()) for b in w_q) == 63
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0) > 0.999


@pytest.mark.parametrize("value", [None, "", "  "])
def test_unset_or_empty_probes_the_cpu(isa, value):
    isa(value)
    assert backends.forced_cpu_isa() is None
    exact = backends._probe_int8_full_range_exact()
    assert backends.cpu_int8_full_range_exact() is exact
    assert passes.resolve_weight_qmax(fxquant.QuantConfig()) == (127 if exact else 63)
    assert backends.cpu_native_bf16() is bool(backends.cpu_flags() & NATIVE_BF16)


@pytest.mark.parametrize("value", ["vnni", "amx", "AMX"])
def test_vnni_and_amx_on_this_cpu(isa, value):
    """Full range where the CPU really is exact at full range (else refused); amx adds oneDNN's bf16 epilogue where
    the CPU has native bf16 (else refused), vnni never uses it."""
    isa(value)
    if not backends._probe_int8_full_range_exact():
        with pytest.raises(RuntimeError, match=f"FXQUANT_CPU_ISA={value.lower()}.*not exact at full range"):
            passes.resolve_weight_qmax(fxquant.QuantConfig())
        return
    assert passes.resolve_weight_qmax(fxquant.QuantConfig()) == 127
    if backends.onednn_available():
        assert backends._src(torch.zeros(5, 32, dtype=torch.int8))[1] == 0
    if value.lower() == "vnni":
        assert backends.cpu_native_bf16() is False
    elif backends.cpu_flags() & NATIVE_BF16:
        assert backends.cpu_native_bf16() is True
    else:
        with pytest.raises(RuntimeError, match="no native bf16"):
            backends.cpu_native_bf16()


@pytest.mark.parametrize("value", ["vnni", "amx"])
def test_full_range_is_refused_on_a_cpu_without_vnni(isa, monkeypatch, value):
    """On a CPU whose oneDNN int8 GEMM saturates at full range (the probe says False), forcing 127 would give wrong
    results: refused with a RuntimeError naming the variable, at the first probe (compile, or the bf16 check)."""
    monkeypatch.setattr(backends, "_probe_int8_full_range_exact", lambda: False)
    isa(value)
    with pytest.raises(RuntimeError, match=f"FXQUANT_CPU_ISA={value} forces full-range int8 weights"):
        passes.resolve_weight_qmax(fxquant.QuantConfig())
    with pytest.raises(RuntimeError, match=f"FXQUANT_CPU_ISA={value}"):
        fxquant.compile(_model(), (torch.randn(2, 64),), config=fxquant.QuantConfig(min_ratio=0), progress=False)
    if value == "amx":
        with pytest.raises(RuntimeError, match="not exact at full range"):
            backends.cpu_native_bf16()
    else:
        assert backends.cpu_native_bf16() is False
    isa("avx2")  # the 7-bit range is honoured on any CPU
    assert passes.resolve_weight_qmax(fxquant.QuantConfig()) == 63


def test_amx_is_refused_without_native_bf16(isa, monkeypatch):
    monkeypatch.setattr(backends, "_probe_int8_full_range_exact", lambda: True)
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    isa("amx")
    assert passes.resolve_weight_qmax(fxquant.QuantConfig()) == 127
    with pytest.raises(RuntimeError, match="FXQUANT_CPU_ISA=amx forces oneDNN's bf16 epilogue.*no native bf16"):
        backends.cpu_native_bf16()
    isa("vnni")
    assert backends.cpu_native_bf16() is False


@pytest.mark.parametrize("value", ["sse", "avx512", "1", "avx2,amx", "avx-2"])
def test_invalid_value_raises(isa, value):
    isa(value)
    with pytest.raises(ValueError, match=re.escape(f"FXQUANT_CPU_ISA={value!r} is not one of avx2, vnni, amx")):
        backends.forced_cpu_isa()
    with pytest.raises(ValueError, match="FXQUANT_CPU_ISA"):
        passes.resolve_weight_qmax(fxquant.QuantConfig())
    with pytest.raises(ValueError, match="FXQUANT_CPU_ISA"):
        backends.cpu_native_bf16()
    with pytest.raises(ValueError, match="FXQUANT_CPU_ISA"):
        fxquant.compile(_model(), (torch.randn(2, 64),), config=fxquant.QuantConfig(min_ratio=0), progress=False)


# The key numerics (exact GEMMs per backend and weight range, the ops against the reference, the CPU paths, oneDNN's
# static-scale epilogue) once more in a fresh process with the choices of another CPU kind forced, where this run makes
# other choices: ``avx2`` (7-bit range, uint8 src) where this run uses the full range (a VNNI / AMX CPU, unforced), and
# ``vnni`` (full range, no bf16 epilogue) where this run also uses oneDNN's bf16 epilogue (AMX, AVX512-BF16). Each
# took ~25 s of one core on the AMX Xeon. Left out: the three torch.compile tests of test_cpu_paths.py (~37 s;
# Inductor's fusion of the quantizers does not depend on these choices). A CPU without VNNI cannot force the full
# range, so a run there covers the 7-bit range only (as before).
KEY_NUMERICS = ["tests/test_numerics.py", "tests/test_cpu_paths.py", "tests/test_calibration.py"]


def _why_not(value: str):
    """Why this run need not (or cannot) run the key numerics under ``value``, or None."""
    if not backends.cpu_int8_full_range_exact():
        return ("this run already uses the 7-bit range" if value == "avx2" else
                "this run uses the 7-bit range (a CPU without VNNI cannot force the full range; on one with VNNI the "
                "unforced run covers it)")
    if value == "vnni" and not backends.cpu_native_bf16():
        return "this run already makes FXQUANT_CPU_ISA=vnni's choices (full range, no bf16 epilogue)"
    return None


@pytest.mark.parametrize("value", ["avx2", "vnni"])
def test_key_numerics_with_another_cpu_kinds_choices(value):
    why = _why_not(value)
    if why:
        pytest.skip(why)
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not an xdist worker's settings
    env[backends.CPU_ISA_ENV] = value
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:logging",
           "-k", "not torch_compile_of_a_cpu_model", *KEY_NUMERICS]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    last = done.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, tail
