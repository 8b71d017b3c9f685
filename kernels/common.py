"""Pieces shared by fxquant's Triton kernels: the activation epilogue (in Triton and, once, in torch),
exact round-half-to-even, and the question of where the kernels can run. The fast relaunch path lives in
``launch.py``.

Every ``@triton.jit`` helper here is target-agnostic: it uses only ``triton.language`` core ops (no
``libdevice``), so the same code compiles for CUDA, for a Triton CPU backend (triton-cpu: x86, ARM
SVE2/i8mm) and runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it fxquant keeps its torch backends.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

__all__ = [
    "HAS_TRITON", "interpreting", "INTERPRETER_MIN_TRITON", "why_kernels_cannot_run", "triton_device_ok",
    "cpu_backend_available", "launch_options", "ACTIVATIONS", "GATED_ACTIVATIONS", "SCALE_EPS", "ROUND_MAGIC",
    "activation_torch", "row_block_params", "cdiv", "next_pow2", "num_sms", "use_pdl", "pdl_launch", "pdl_early_signal",
]

HAS_TRITON = triton is not None
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu_tanh")
SCALE_EPS = 1.1920928955078125e-07  # 2^-23 (fp32 machine epsilon): the smallest per-token scale
ROUND_MAGIC = 12582912.0  # 1.5·2^23: x + ROUND_MAGIC leaves round_half_even(x) in the low mantissa bits (|x| < 2^22)
ROUND_MAGIC_BITS = 0x4B400000  # ROUND_MAGIC's fp32 bit pattern: (x + ROUND_MAGIC) as int32 minus this is round(x)
# Gated epilogues, act(g) · u with g = y[:, :N/2], u = y[:, N/2:]: the GEMM's N rows hold two projections.
# Each maps to the activation of its gate: SwiGLU (Llama, Qwen, Mistral) and GeGLU with tanh GELU (Gemma).
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu_tanh": "gelu_tanh"}


def activation_torch(y: torch.Tensor, activation: str, inplace: bool = True) -> torch.Tensor:
    """The epilogue activation in torch, on the fp32 pre-activation ``y`` [..., N]: the one definition the
    Triton epilogue (:func:`apply_activation`, ``w8a8_gemm._epilogue``) is checked against. May work in
    place on ``y`` (``inplace=False``: never, for traced graphs). Formulas as in ``torch.nn.functional``:

    * ``relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu``: elementwise, [..., N] → [..., N];
    * ``swiglu``: Y = silu(g) · u with g = y[..., :N/2] (gate_proj) and u = y[..., N/2:] (up_proj),
      [..., N] → [..., N/2] (Shazeer 2020, "GLU Variants Improve Transformer", §2, FFN_SwiGLU; silu as
      Elfwing et al. 2018); ``geglu_tanh``: the same with gelu_tanh(g) (FFN_GEGLU, with the tanh GELU).

    Raises:
        ValueError: ``activation`` is not one of :data:`ACTIVATIONS` (or N is odd for ``swiglu``).
    """
    if activation == "none":
        return y
    if activation == "relu":
        return y.relu_() if inplace else y.relu()
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return (torch.ops.aten.gelu_ if inplace else torch.ops.aten.gelu)(y, approximate=approximate)
    if activation == "silu":
        return F.silu(y, inplace=inplace)
    if activation in GATED_ACTIVATIONS:
        n = y.shape[-1]
        if n % 2:
            raise ValueError(f"activation {activation!r} needs an even last dimension (gate and up halves), got {n}")
        gate = activation_torch(y[..., : n // 2], GATED_ACTIVATIONS[activation], inplace)
        return gate * y[..., n // 2:]  # a new dense [..., N/2] tensor
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton runs kernels in its NumPy interpreter (``TRITON_INTERPRET=1``): tests only. Read
    once, like Triton itself, which decides it when a kernel is decorated (at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton's interpreter runs fxquant's kernels from Triton 3.8 on. On 3.6 the autotuner benchmarks even the one config
# left after pruning, which asks for a GPU driver ("0 active drivers"), and the interpreter rejects a loop bound
# computed from tensors (the W8A16 K loop: "only 0-dimensional arrays can be converted to Python scalars"); 3.7
# fixed the second only. Measured with torch 2.13 on a CPU: the kernel tests fail on Triton 3.6.0 and 3.7.1 and
# pass on 3.8.0 and 3.9.0. Compiled for a GPU, the kernels run on 3.6 too (its version on the lent H100 / H200).
INTERPRETER_MIN_TRITON = (3, 8)


@functools.lru_cache(maxsize=None)
def why_kernels_cannot_run() -> Optional[str]:
    """None where fxquant's Triton kernels can run in this process (a CUDA GPU, or Triton's interpreter from
    :data:`INTERPRETER_MIN_TRITON` on), else why not, in words (the tests' skip reason)."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install 'fxquant[triton]')"
    if not interpreting():
        return None if torch.cuda.is_available() else "needs a GPU or TRITON_INTERPRET=1"
    version = tuple(int(p) for p in re.findall(r"\d+", str(getattr(triton, "__version__", "0")))[:2])
    if version < INTERPRETER_MIN_TRITON:
        want = ".".join(map(str, INTERPRETER_MIN_TRITON))
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels (needs >= {want}: "
                f"pip install 'triton>={want}', as constraints/test.txt pins)")
    return None


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
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device`` (the current device for a bare ``"cuda"``): the key of the per-device caches."""
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (how many programs fill it; cached per device); 1 off CUDA."""
    if device.type != "cuda":
        return 1
    return _num_sms_cached(_cuda_index(device))


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether fxquant's decode kernels (W8A16, decode attention) launch with programmatic dependent launch (PDL:
    CUDA Programming Guide, "Programmatic Dependent Launch and Synchronization"; sm_90+): launched with the PDL
    attribute, each waits (``griddepcontrol.wait``) before its first global read, so its launch overlaps the
    previous kernel's tail, and it signals no dependent early. On by default on sm_90+ GPUs (a decode step of
    Llama-3-8B shapes cut to 8 layers, H100: 2.1-2.3 % faster, docs/benchmarks.md); ``FXQUANT_PDL=0`` turns it
    off. Off under the interpreter and without a Triton that has ``gdc_wait``.

    Raises:
        ValueError: ``FXQUANT_PDL`` is set to something other than 0 or 1."""
    raw = os.environ.get("FXQUANT_PDL", "1").strip() or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"FXQUANT_PDL={raw!r}: expected 1 (on, the default on sm_90+ GPUs) or 0 (off)")
    if raw == "0" or device.type != "cuda" or interpreting() or not HAS_TRITON or not _has_gdc():
        return False
    return _pdl_capable(_cuda_index(device))


def pdl_launch(device: torch.device) -> tuple[bool, dict]:
    """``(use_pdl(device), the Triton launch keywords that go with it)``: the kernel's ``PDL`` constexpr and
    ``{"launch_pdl": True}``, or ``(False, {})``. Raises as :func:`use_pdl`."""
    pdl = use_pdl(device)
    return pdl, ({"launch_pdl": True} if pdl else {})


def pdl_early_signal() -> bool:
    """Whether PDL-launched decode kernels (:func:`use_pdl`) also signal ``griddepcontrol.launch_dependents`` early:
    the W8A16 GEMMs once their K loop has read W, decode attention and its combine right after their wait. The
    next kernel's programs then launch (and reach their own wait) while this one finishes, instead of after its
    last program exits; nothing changes in what is computed, since the dependent's ``griddepcontrol.wait`` still
    waits for this whole grid to complete and its writes to be visible. Every kernel signals only after its own
    wait, as Inductor's do, so a dependent that reads an older grid's output without waiting (Inductor waits only
    before loads of its predecessor's buffers) still finds that grid complete. On by default (Llama-3-8B shapes
    cut to 8 layers, batch 1, H100: 1.5-2.3 % faster a token in four pairs, docs/benchmarks.md);
    ``FXQUANT_PDL_TRIGGER=0`` signals at exit instead (the A/B).

    Raises:
        ValueError: ``FXQUANT_PDL_TRIGGER`` is set to something other than 0 or 1."""
    raw = os.environ.get("FXQUANT_PDL_TRIGGER", "1").strip() or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"FXQUANT_PDL_TRIGGER={raw!r}: expected 1 (signal early, the default) or 0 (at exit)")
    return raw == "1"


@functools.lru_cache(maxsize=None)
def _has_gdc() -> bool:
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait")


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


def triton_device_ok(device: torch.device) -> bool:
    """Can the Triton kernels run on tensors of ``device``? CUDA with Triton installed; CPU under a Triton
    CPU backend; any CPU tensor under the interpreter (how CI runs them) of a Triton that runs them there
    (:data:`INTERPRETER_MIN_TRITON`)."""
    if not HAS_TRITON:
        return False
    if interpreting():
        return device.type == "cpu" and why_kernels_cannot_run() is None
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_backend_available()


if HAS_TRITON:
    # the constants above, as Triton reads module globals inside @triton.jit code (constexpr only)
    _SCALE_EPS = tl.constexpr(SCALE_EPS)
    _ROUND_MAGIC = tl.constexpr(ROUND_MAGIC)
    _ROUND_MAGIC_BITS = tl.constexpr(ROUND_MAGIC_BITS)

    @triton.jit
    def apply_activation(y, ACTIVATION: tl.constexpr):
        """The elementwise epilogue activation on an fp32 tile (formulas as in ``torch.nn.functional``;
        the gated ones apply their gate's activation, :func:`gate_activation`):

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
            y = silu(y)
        return y

    @triton.jit
    def gate_activation(y, ACTIVATION: tl.constexpr):
        """The gate's activation of a gated epilogue (``GATED_ACTIVATIONS``): silu for ``swiglu``, the tanh
        GELU for ``geglu_tanh``."""
        if ACTIVATION == "swiglu":
            y = silu(y)
        elif ACTIVATION == "geglu_tanh":
            y = apply_activation(y, "gelu_tanh")
        return y

    @triton.jit
    def silu(y):
        """silu(y) = y · σ(y) = y / (1 + e^(−y)) on an fp32 tile (Elfwing et al., 2018)."""
        return y / (1.0 + tl.exp(-y))

    @triton.jit
    def round_to(y, DTYPE: tl.constexpr):
        """An fp32 tile rounded to DTYPE (round-half-to-even, as torch's ``.to(dtype)``), as DTYPE.

        bf16 is rounded in integers: adding 0x7FFF plus the lowest kept bit to the fp32 bit pattern and
        clearing the low 16 bits is round-half-to-even (±Inf stays; a NaN from arithmetic stays NaN), and
        the final cast then drops only zero bits. Compiled Triton rounds fp32 → bf16 to nearest even too,
        but Triton's interpreter truncates (3.9: ``_convert_float`` without a rounding mode), so this keeps
        every target on the same numbers. fp16 and fp32 casts round to nearest even everywhere."""
        if DTYPE == tl.bfloat16:
            b = y.to(tl.uint32, bitcast=True)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            return y.to(DTYPE)

    @triton.jit
    def row_scales(amax):
        """Per-token scale and its reciprocal from each row's amax [R]: s = max(amax / 127, eps) and
        inv = 1 / s, both IEEE round-to-nearest divisions (``div_rn``); a NaN amax stays NaN."""
        scale = tl.math.div_rn(amax, 127.0)
        scale = tl.where(scale < _SCALE_EPS, _SCALE_EPS, scale)
        return scale, tl.math.div_rn(1.0, scale)

    @triton.jit
    def quantize_with(x, inv, OUT_TY: tl.constexpr):
        """q = clamp(round_half_even(x · inv), ±127) of an fp32 tile [R, C] with inv [R].

        Rounding adds 1.5·2^23: the fp32 sum's own round-half-to-even leaves round(v) in the low mantissa
        bits (exact for |v| < 2^22), read back through the int32 bit pattern. A per-token scale keeps
        |v| ≤ 127, a static one does not (v = -2^24 read back as +127), so v is clamped to ±127 first:
        the same q, as rounding is monotone and ±127 are integers. The launch must disable FMA contraction
        (``enable_fp_fusion=False``), or ``x·inv + 1.5·2^23`` would round once instead of twice and differ
        from the reference at exact ties.
        """
        v = tl.minimum(tl.maximum(x * inv[:, None], -127.0), 127.0)
        r = (v + _ROUND_MAGIC).to(tl.int32, bitcast=True) - _ROUND_MAGIC_BITS
        r = tl.minimum(tl.maximum(r, -127), 127)  # a NaN passes the float clamp: q stays in ±127 anyway
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
