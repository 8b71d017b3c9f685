"""Pieces shared by fxquant's Triton kernels: the activation epilogue, exact round-half-to-even, and the
question of where the kernels can run.

Every ``@triton.jit`` helper here is target-agnostic: it uses only ``triton.language`` core ops (no
``libdevice``), so the same code compiles for CUDA, for a Triton CPU backend (triton-cpu: x86, ARM
SVE2/i8mm) and runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: without it fxquant keeps its torch backends.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

__all__ = [
    "HAS_TRITON", "interpreting", "triton_device_ok", "cpu_backend_available", "launch_options", "ACTIVATIONS",
    "LaunchCache", "row_block_params", "cdiv", "next_pow2",
]

HAS_TRITON = triton is not None
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton runs kernels in its NumPy interpreter (``TRITON_INTERPRET=1``): tests only. Read
    once, like Triton itself, which decides it when a kernel is decorated (at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cpu_backend_available() -> bool:
    """True when the active Triton driver is a CPU backend (the triton-cpu fork), so the kernels can serve
    CPU tensors natively. Stock Triton has only GPU drivers and answers False (its ``driver.active`` raises
    on a machine without a GPU)."""
    if not HAS_TRITON or interpreting():
        return False
    try:
        return triton.runtime.driver.active.get_current_target().backend == "cpu"
    except Exception:  # noqa: BLE001 - no driver at all: no CPU backend either
        return False


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ in plain integers. Launchers use this and :func:`next_pow2` instead of ``triton.cdiv`` /
    ``triton.next_power_of_2``, which are ``constexpr_function`` wrappers costing ~1 µs of host time each."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def row_block_params(block_k: int, elems_per_program: int, max_rows: int, elems_per_thread: int) -> dict:
    """Launch shape of a memory-bound row kernel (quantize, LayerNorm+quantize) whose program holds ROWS
    rows of ``block_k`` elements: enough rows for ``elems_per_program`` elements in flight, warps so that
    each thread holds ``elems_per_thread`` of them (one program, one warp under the interpreter). Cached:
    launchers ask on every call; callers must not modify the returned dict."""
    if interpreting():
        return {"ROWS": 1, "num_warps": 1}
    rows = max(1, min(max_rows, elems_per_program // block_k))
    return {"ROWS": rows, "num_warps": max(1, min(16, rows * block_k // (32 * elems_per_thread)))}


def launch_options() -> dict:
    """Compile options for the quantization kernels: no FMA contraction (see ``quantize_with``). The
    interpreter has no compiler options, and never contracts."""
    return {} if interpreting() else {"enable_fp_fusion": False}


class LaunchCache:
    """Relaunch an already compiled kernel without Triton's Python launch path.

    Triton's ``kernel[grid](...)`` goes through the autotuner, the heuristics and the JIT binder on every
    call: 28-49 µs of host time per launch measured on an H200 host (Triton 3.6; ``F.linear`` costs 9 µs),
    which makes small and medium GEMMs host-bound. After the first launch of a specialization, this keeps
    the ``CompiledKernel`` Triton returned with the config the autotuner chose, and later calls go straight
    to the C launcher Triton built for it (``CompiledKernel.run.launch``), with pointer arguments passed as
    integers (a tensor argument costs the launcher a Python method call and a ``cuPointerGetAttribute``).
    Where Triton's internals differ from what this expects (a kernel that needs scratch memory, a launch
    hook such as a profiler's, another Triton version), it falls back to ``CompiledKernel[grid](...)``.

    The key must hold everything Triton specializes a compiled kernel on, or a wrong binary would run:
    the caller's constexprs and autotune key, each tensor's dtype and 16-byte alignment, and each integer
    argument's "== 1" and "% 16 == 0" (Triton's integer specialization). CUDA only; never under the
    interpreter.
    """

    def __init__(self) -> None:
        self._entries: dict = {}

    @staticmethod
    def enabled(device: torch.device) -> bool:
        return HAS_TRITON and device.type == "cuda" and not interpreting()

    @staticmethod
    def key(parts: tuple, tensors: tuple, ints: tuple) -> tuple:
        return (
            parts,
            tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors),
            tuple((i == 1, i % 16 == 0) for i in ints),
        )

    def lookup(self, device: torch.device, parts: tuple, tensors: tuple, ints: tuple):
        """``(key, entry)``: key None when the cache does not serve ``device``; entry None on a miss."""
        if not self.enabled(device):
            return None, None
        key = self.key((parts, device.index), tensors, ints)
        return key, self._entries.get(key)

    def put(self, key, compiled, config=None) -> None:
        """Remember what the first launch compiled (``config``: the autotuner's choice, if any)."""
        if key is None or compiled is None or not hasattr(compiled, "run"):
            return
        self._entries[key] = _Launch(compiled, config)


def _current_stream(device: torch.device) -> int:
    """The raw handle of ``device``'s current CUDA stream (what Triton's own launch path asks torch for)."""
    return torch._C._cuda_getCurrentRawStream(device.index)


def _no_launch_hooks() -> bool:
    """True when no launch hook (a profiler's, say) is installed: Triton >= 3.5 keeps them in a
    ``HookChain`` (empty ``calls`` when none), older versions in a plain attribute (None when none)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return False
    hook = knobs.runtime.launch_enter_hook
    return hook is None or not getattr(hook, "calls", True)


class _Launch:
    """One compiled specialization and how to relaunch it (see :class:`LaunchCache`)."""

    __slots__ = ("compiled", "config", "_direct")

    def __init__(self, compiled, config) -> None:
        self.compiled = compiled
        self.config = config
        run = getattr(compiled, "run", None)
        self._direct = None
        if (getattr(run, "launch", None) is not None and getattr(run, "global_scratch_size", 1) == 0
                and getattr(run, "profile_scratch_size", 1) == 0 and hasattr(compiled, "packed_metadata")):
            self._direct = (run.launch, compiled.function, run.launch_cooperative_grid, run.launch_pdl,
                            compiled.packed_metadata)

    def __call__(self, grid: tuple, device: torch.device, args: tuple) -> None:
        """Launch a ``grid`` = (x, y) of programs on the current stream of ``device`` with the kernel's
        full argument list (constexprs included, in signature order)."""
        stream = _current_stream(device)
        direct = self._direct
        if direct is None or not _no_launch_hooks():
            self.compiled[(grid[0], grid[1], 1)](*args, stream=stream)
            return
        launch, function, coop, pdl, packed = direct
        launch(grid[0], grid[1], 1, stream, function, coop, pdl, None, None, packed, None, None, None,
               *[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])


def triton_device_ok(device: torch.device) -> bool:
    """Can the Triton kernels run on tensors of ``device``? CUDA with Triton installed; CPU under a Triton
    CPU backend; any CPU tensor under the interpreter (how CI runs them)."""
    if not HAS_TRITON:
        return False
    if interpreting():
        return device.type == "cpu"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_backend_available()


if HAS_TRITON:

    @triton.jit
    def apply_activation(y, ACTIVATION: tl.constexpr):
        """The epilogue activation on an fp32 tile (formulas as in ``torch.nn.functional``):

        * ``relu``: max(y, 0)
        * ``gelu``: y · Φ(y) = ½ y (1 + erf(y / √2))       (Hendrycks & Gimpel, 2016, eq. 1)
        * ``gelu_tanh``: ½ y (1 + tanh(√(2/π) (y + 0.044715 y³))) written as y · σ(2u), since
          ½ (1 + tanh u) = σ(2u); σ(t) = 1 / (1 + e^(−t))   (same paper, §2 approximation)
        * ``silu``: y · σ(y)                                 (Elfwing et al., 2018; Ramachandran et al., 2017)
        """
        if ACTIVATION == "relu":
            y = tl.maximum(y, 0.0)
        elif ACTIVATION == "gelu":
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACTIVATION == "gelu_tanh":
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y / (1.0 + tl.exp(-2.0 * u))
        elif ACTIVATION == "silu":
            y = y / (1.0 + tl.exp(-y))
        return y

    @triton.jit
    def row_scales(amax):
        """Per-token scale and its reciprocal from each row's amax [R]: s = max(amax / 127, eps) and
        inv = 1 / s, both IEEE round-to-nearest divisions (``div_rn``); a NaN amax stays NaN."""
        scale = tl.math.div_rn(amax, 127.0)
        scale = tl.where(scale < 1.1920928955078125e-07, 1.1920928955078125e-07, scale)
        return scale, tl.math.div_rn(1.0, scale)

    @triton.jit
    def quantize_with(x, inv, OUT_TY: tl.constexpr):
        """q = clamp(round_half_even(x · inv), ±127) of an fp32 tile [R, C] with inv [R].

        Rounding adds 1.5·2^23: the fp32 sum's own round-half-to-even leaves round(v) in the low mantissa
        bits (exact for |v| < 2^22; |v| ≤ 127 here), read back through the int32 bit pattern. The launch
        must disable FMA contraction (``enable_fp_fusion=False``), or ``x·inv + 1.5·2^23`` would round once
        instead of twice and differ from the reference at exact ties.
        """
        v = x * inv[:, None]
        r = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
        r = tl.minimum(tl.maximum(r, -127), 127)
        return r.to(OUT_TY)

    @triton.jit
    def quantize_rows(x, amax, OUT_TY: tl.constexpr):
        """Per-token int8 of an fp32 tile ``x`` [R, C] given each row's amax [R]: returns (q, scale)."""
        scale, inv = row_scales(amax)
        return quantize_with(x, inv, OUT_TY), scale

    @triton.jit
    def row_amax(x):
        """max |x| of each row of an fp32 tile [R, C]; a row holding NaN or ±Inf gets NaN (``x·0`` is NaN
        exactly there), so non-finite input propagates to the scale as in the reference."""
        return tl.max(tl.abs(x), axis=1) + tl.sum(x * 0.0, axis=1)
