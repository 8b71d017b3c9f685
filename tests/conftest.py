"""Shared helpers of the fxquant test suite: tolerances, SQNR, and the "model untouched" check."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (tests/test_kernels.py). Triton decides this
# when a kernel is decorated, so it must be set before fxquant.kernels is first imported. On a GPU machine
# the kernels compile for real (bench/check_kernels_gpu.py runs the same tests there).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fxquant.compile runs forward through torch.compile by default where a C++ compiler is present (seconds to a
# minute per model): the suite tests the eager graphs, and the tests of the compiled default ask for it explicitly
# (compile_forward=True).
os.environ.setdefault("FXQUANT_TORCH_COMPILE", "0")
# QuantConfig's compute_dtype="auto" is bf16 on CPUs with native bf16 (the AMX Xeon) and fp32 elsewhere (the AVX2
# EPYC): the suite pins fp32 so that its golden graphs and numbers are the same on every CPU; the tests of "auto"
# unset this and state what each ISA gets (tests/test_cpu_paths.py).
os.environ.setdefault("FXQUANT_AUTO_BF16", "0")

# ------------------------------------------------------------------------------------------ tolerances
# Relative tolerance of a fused op's output against fxquant.ir.reference, keyed by the *output* dtype.
# Both sides compute the same fp32 epilogue from the same exact int32 accumulator; they may differ only
# in how the backend scales the accumulator (oneDNN applies s_w inside its kernel), i.e. by a few fp32
# ulps before the final cast. fp32: 1e-5. bf16 / fp16: that fp32 difference can move the rounding to the
# adjacent value of the narrow dtype, i.e. one ulp of it, which is at most eps * |value|.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,  # 2**-7
    torch.float16: torch.finfo(torch.float16).eps,  # 2**-10
}


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                     pre_activation_max: float = 0.0) -> None:
    """``|out - ref| <= rtol * (|ref| + max|ref| + pre_activation_max)`` elementwise, in float64, rtol from
    :data:`TOLERANCE`.

    The ``max|ref|`` term covers outputs that are a cancellation of larger terms (acc * s + bias ~ 0),
    whose error is relative to the terms, not to the tiny result. ``pre_activation_max`` (max |y| before the
    activation) is for GELU evaluated in oneDNN's epilogue: its error is a fraction of GELU's input (at most
    3.0e-7 |y| measured), and in the tail (y < -2) GELU's output is far smaller than its input. Measured on the AMX
    Xeon: 3.9e-7 at y = -2.63 (3.5e-5 of the output; uint8 src, brg_matmul:avx10_1_512) and 9.5e-7 at y = -5.5
    (ref_int8, int8 src); which kernel runs depends on the CPU's ISA, the src form and the shape.
    """
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} != {ref.dtype}"
    rtol = TOLERANCE[dtype or ref.dtype]
    if ref.numel() == 0:
        return
    o, r = out.to(torch.float64), ref.to(torch.float64)
    assert torch.isfinite(o).all() and torch.isfinite(r).all()
    bound = rtol * (r.abs() + r.abs().max() + pre_activation_max)
    err = (o - r).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert bool((err <= bound).all()), f"max err / bound = {worst:.3g} (rtol {rtol:g}, dtype {dtype or ref.dtype})"


# ---------------------------------------------------------------------------------------------- SQNR
def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - out||^2)`` in dB, in float64.

    ``inf`` when ``out == ref`` exactly.
    """
    r = ref.detach().to(torch.float64)
    o = out.detach().to(torch.float64)
    assert r.shape == o.shape, f"shape {tuple(r.shape)} != {tuple(o.shape)}"
    signal = float((r * r).sum())
    noise = float(((r - o) ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


# ---------------------------------------------------------------------------------- model untouched
def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "state_ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "modules": {name: id(m) for name, m in model.named_modules(remove_duplicate=False)},
        "training": {name: m.training for name, m in model.named_modules(remove_duplicate=False)},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "param_types": {k: type(p) for k, p in model.named_parameters()},
    }


def assert_model_untouched(model: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` and assert that ``model`` is exactly as before: every state_dict tensor (values,
    dtype, shape, and identity of the tensor object), the named modules (names and ids), every module's
    training flag, and each parameter's requires_grad. Returns ``fn()``'s result."""
    before = _snapshot(model)
    result = fn()
    after = _snapshot(model)
    assert after["modules"] == before["modules"], "named modules (names / ids) changed"
    assert after["training"] == before["training"], "training flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert after["param_types"] == before["param_types"], "parameters were replaced by other types"
    assert after["state"].keys() == before["state"].keys(), "state_dict keys changed"
    assert after["state_ids"] == before["state_ids"], "state_dict tensors were replaced"
    for k, v in before["state"].items():
        w = after["state"][k]
        assert w.dtype == v.dtype and w.shape == v.shape and w.device == v.device, f"{k}: metadata changed"
        torch.testing.assert_close(w, v, rtol=0, atol=0, equal_nan=True, msg=f"{k}: values changed")
    return result


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same global RNG state (tests also seed explicitly where it matters)."""
    torch.manual_seed(0)
    yield


# Test modules are imported with --import-mode=importlib (pyproject), so they cannot `import conftest`:
# the helpers reach them as session-scoped fixtures (session scope also keeps hypothesis' health check
# on function-scoped fixtures quiet).
@pytest.fixture(scope="session")
def sqnr():
    return sqnr_db


@pytest.fixture(scope="session")
def untouched():
    return assert_model_untouched


@pytest.fixture(scope="session")
def rel_close():
    return assert_rel_close


@pytest.fixture(scope="session")
def tolerance():
    return TOLERANCE


def build_small_bert(num_layers: int):
    """Random-weight BertModel, hidden 256 (every Linear has K*N/(K+N) >= 128, over the cpu min_ratio 96)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=256, num_hidden_layers=num_layers, num_attention_heads=4,
                                  intermediate_size=1024, vocab_size=512, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="session")
def small_bert():
    return build_small_bert
