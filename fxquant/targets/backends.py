"""Kernel backends for the fused nodes: ``triton``, ``onednn`` (CPU), ``aten`` and ``reference``.

Every backend computes the same function as :func:`fxquant.ir.reference.int8_linear`; they differ in speed
and in what they need:

=============  ===========  ==================================================================
backend        device       needs
=============  ===========  ==================================================================
``triton``     CUDA, CPU    the Triton kernels of ``fxquant.kernels`` (GEMM with the whole
                            epilogue fused); on CPU only under a Triton CPU backend (triton-cpu)
``onednn``     CPU          ``torch.ops.onednn.qlinear_pointwise``; |W_q| <= 63 unless the CPU
                            has VNNI/AMX (probed: :func:`cpu_int8_full_range_exact`)
``aten``       CPU, CUDA    ``torch._int_mm``; on CUDA M > 16 and K, N % 8 (cuBLAS)
``reference``  any          nothing (float64 matmul of the integer values; slow, exact)
=============  ===========  ==================================================================

Per-token quantization and LayerNorm+quantize run the Triton kernels wherever Triton serves the device
(:func:`triton_serves`), else the torch code below.

Why |W_q| <= 63 on CPUs without VNNI: oneDNN's AVX2 int8 kernels multiply u8 × s8 pairs with
``vpmaddubsw``, whose int16 pair sums saturate (Intel SDM, PMADDUBSW; oneDNN docs, "Nuances of int8
computations"). With s8 activations shifted to u8 (≤ 255) and |W_q| ≤ 63 the worst pair is
2·255·63 = 32130 < 32767, so the int32 accumulation is exact. Measured on AMD EPYC (Zen 3, AVX2):
full-range weights give 2.6 % relative error on Gaussian data; 7-bit weights give bit-exact results.

What fxquant decides per CPU kind (x86): the int8 weight range (:func:`fxquant.passes.resolve_weight_qmax`: 127
where :func:`cpu_int8_full_range_exact`, else 63), oneDNN's src form below ``_U8_SRC_MAX_M`` rows (uint8 with zero
point 128 without VNNI, :func:`_src`) and whether oneDNN's epilogue writes bf16 (:func:`cpu_native_bf16`). They
are probed once per process; the environment variable ``FXQUANT_CPU_ISA`` (read at the first probe; clear the
caches with :func:`clear_cpu_isa_caches` after changing it) forces them, so one machine can run the choices of
another (the test suite runs its key numerics both ways, tests/test_cpu_isa.py):

* ``avx2``: a CPU without VNNI and without native bf16: weights in [-63, 63], uint8 src below the row threshold,
  no bf16 epilogue (exact and correct on every x86 CPU);
* ``vnni``: an AVX-512 VNNI CPU without native bf16: full-range weights, int8 src, no bf16 epilogue;
* ``amx``: an AMX (or AVX512-BF16 + VNNI) CPU: full-range weights, int8 src, oneDNN's bf16 epilogue;
* unset or empty: probe the CPU.

``vnni`` and ``amx`` are refused (RuntimeError at the first probe) on a CPU whose oneDNN int8 GEMM is not exact at
full range (no VNNI: forcing 127 would give wrong results), and ``amx`` on a CPU without native bf16 (oneDNN's
bf16 epilogue is a reference kernel there, seconds per GEMM). Any other value raises ValueError. The variable
changes fxquant's choices only; :func:`cpu_flags` and oneDNN's own kernel choice still follow the real CPU
(``ONEDNN_MAX_CPU_ISA`` caps oneDNN, see :func:`warn_if_isa_capped`).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
import weakref
from typing import Callable, NamedTuple, Optional

import torch

from ..ir import ops, reference
from .spec import TARGETS, TargetSpec  # noqa: F401 (TargetSpec: annotations)
from ..kernels import common as _kc
from ..kernels import decode_attention as _kda
from ..kernels import w8a16_gemm as _kw16
from ..kernels.layer_norm_quant import MAX_K as _LN_MAX_K
from ..kernels.layer_norm_quant import layer_norm_quant as _triton_layer_norm_quant
from ..kernels.layer_norm_quant import norm_outputs as _norm_outputs
from ..kernels.layer_norm_quant import rms_norm_quant as _triton_rms_norm_quant
from ..kernels.quantize import quantize_per_token as _triton_quantize
from ..kernels.w8a8_gemm import w8a8_linear as _triton_w8a8_linear

__all__ = [
    "BACKENDS", "BACKEND_NAMES", "GATED", "quantize_per_token", "layer_norm_quant", "rms_norm_quant",
    "cpu_int8_full_range_exact", "onednn_available", "cpu_backend", "triton_serves", "backend_for_target", "available",
    "pick_backend", "run_linear", "Backend", "REGISTRY", "PREFERENCE", "cpu_flags", "cpu_native_bf16", "CPU_ISA_ENV", "CPU_ISA_CHOICES", "forced_cpu_isa",
    "clear_cpu_isa_caches",
]

GATED = _kc.GATED_ACTIVATIONS  # epilogues whose weight stacks two projections ([2I, K] -> output [..., I])


def triton_serves(device: torch.device) -> bool:
    """True when fxquant's Triton kernels are the fast path for tensors on ``device``: CUDA with Triton
    installed, or CPU with a Triton CPU backend (triton-cpu). Never under ``TRITON_INTERPRET=1``, which
    only tests kernels (decided when an op first runs on the device, cached by Triton's driver lookup)."""
    return not _kc.interpreting() and _kc.triton_device_ok(device)


# --------------------------------------------------------------------------------------------- oneDNN
@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """True when this torch build has oneDNN's int8 Linear (``torch.ops.onednn.qlinear_pointwise``)."""
    try:
        _onednn_gemm(torch.ones(2, 8, dtype=torch.int8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1), shift=False)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    warn_if_isa_capped()
    return True


_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN's ISA cap, by its current and its former name


def warn_if_isa_capped() -> None:
    """Warn when oneDNN's ISA is capped below an AMX CPU's (``ONEDNN_MAX_CPU_ISA``, say ``AVX512_CORE_VNNI``): torch's
    int8 weight prepacking (``onednn::qlinear_prepack``) still picks AMX's blocked layout there, and oneDNN then runs
    that layout with its reference kernel (``ref_int8``). Measured on 2 cores of the H200 host's AMX Xeon, torch 2.11:
    1.3 s for one 128 x 384 x 1152 GEMM, and ~30 s for one MiniLM forward at batch 1."""
    for name in _ISA_CAPS:
        cap = os.environ.get(name, "").strip().upper()
        if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap and "amx_int8" in cpu_flags():
            warnings.warn(
                f"{name}={os.environ[name]} caps oneDNN below this CPU's AMX, but torch's int8 weight prepacking still "
                "picks AMX's layout, so oneDNN runs fxquant's int8 GEMMs with its reference kernel (about 1000x "
                f"slower). Unset {name} to run fxquant's int8 Linears on this CPU.", RuntimeWarning, stacklevel=2)
            return


CPU_ISA_ENV = "FXQUANT_CPU_ISA"
CPU_ISA_CHOICES = ("avx2", "vnni", "amx")  # the CPU kinds fxquant's choices can be forced to (module docstring)


def forced_cpu_isa() -> Optional[str]:
    """The CPU kind ``FXQUANT_CPU_ISA`` forces (``avx2``, ``vnni`` or ``amx``; case and surrounding blanks
    ignored), or None when it is unset or empty (probe the CPU). Raises ValueError on any other value."""
    raw = os.environ.get(CPU_ISA_ENV, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in CPU_ISA_CHOICES:
        raise ValueError(f"{CPU_ISA_ENV}={raw!r} is not one of {', '.join(CPU_ISA_CHOICES)} (or unset / empty: probe "
                         "the CPU)")
    return value


@functools.lru_cache(maxsize=None)
def _probe_int8_full_range_exact() -> bool:
    """The CPU's own answer to :func:`cpu_int8_full_range_exact`, whatever ``FXQUANT_CPU_ISA`` says."""
    if not onednn_available():
        return False
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(64, 128, (64, 256), dtype=torch.int8, generator=g)
    w_q = torch.randint(100, 128, (64, 256), dtype=torch.int8, generator=g)
    got = _onednn_gemm(x_q, w_q, torch.ones(64, 1), shift=False)
    return bool(torch.equal(got.to(torch.float64), reference.int8_gemm(x_q, w_q).to(torch.float64)))


@functools.lru_cache(maxsize=None)
def cpu_int8_full_range_exact() -> bool:
    """Probe: does oneDNN's CPU int8 GEMM stay exact with full-range [-127, 127] weights on this CPU?

    True on CPUs with VNNI / AMX (int32 accumulation in one instruction); False on AVX2-only CPUs, where
    int16 pair sums saturate (see the module docstring). Runs one 64×256×64 GEMM with worst-case values.
    ``FXQUANT_CPU_ISA=avx2`` makes it False on any CPU; ``vnni`` / ``amx`` raise RuntimeError where the probe
    says False (full-range weights would be inexact there), else it is True.
    """
    isa = forced_cpu_isa()
    if isa == "avx2":
        return False
    exact = _probe_int8_full_range_exact()
    if isa is not None and not exact:
        raise RuntimeError(
            f"{CPU_ISA_ENV}={isa} forces full-range int8 weights (|W_q| <= 127), but oneDNN's int8 GEMM is not exact at "
            "full range on this CPU (no VNNI: u8*s8 int16 pair sums saturate)" + ("" if onednn_available() else
            ", or this torch has no oneDNN int8 Linear") + f"; refusing. Use {CPU_ISA_ENV}=avx2 or unset it.")
    return exact


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as Linux reports them (``/proc/cpuinfo``), empty elsewhere (the real CPU's, whatever
    ``FXQUANT_CPU_ISA`` says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic of its own (AMX-BF16 tiles or AVX512-BF16 dot products), so
    oneDNN's bf16 kernels do not emulate it. ``FXQUANT_CPU_ISA=avx2`` / ``vnni`` make it False on any CPU; ``amx``
    raises RuntimeError on a CPU without native bf16 (or without exact full-range int8), else it is True."""
    isa = forced_cpu_isa()
    if isa in ("avx2", "vnni"):
        return False
    native = bool(cpu_flags() & _NATIVE_BF16_FLAGS)
    if isa == "amx":
        cpu_int8_full_range_exact()  # refuses a CPU without VNNI
        if not native:
            raise RuntimeError(
                f"{CPU_ISA_ENV}=amx forces oneDNN's bf16 epilogue, but this CPU has no native bf16 (amx_bf16 or "
                "avx512_bf16): oneDNN would run it with a reference kernel (seconds per GEMM); refusing. Use "
                f"{CPU_ISA_ENV}=vnni or avx2, or unset it.")
    return native


@functools.lru_cache(maxsize=None)
def cpp_compiler() -> Optional[str]:
    """The C++ compiler Inductor would use on a CPU (``$CXX``, else ``g++``, ``c++``, ``clang++`` on the PATH), or
    None: without one, ``torch.compile`` cannot build CPU kernels."""
    import shutil

    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def clear_cpu_isa_caches() -> None:
    """Forget the cached per-CPU choices (:func:`cpu_int8_full_range_exact`, :func:`cpu_native_bf16`) so that the
    next call reads ``FXQUANT_CPU_ISA`` again (the hardware probe itself stays cached). Models compiled before keep
    the weight range they were compiled with."""
    cpu_int8_full_range_exact.cache_clear()
    cpu_native_bf16.cache_clear()


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors have no version (nor in-place writes)


class _Epilogue(NamedTuple):
    """oneDNN's forms of a Linear's epilogue tensors (fp32 [N] weight scale and bias), and the (tensor, version)
    pairs they were made from (holding the tensors, so an identity test cannot match a new tensor that reuses a
    freed one's id)."""

    w_scale: torch.Tensor
    bias: Optional[torch.Tensor]
    made_from: tuple

    def made_of(self, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
        return all((t is None and src is None) or (src is not None and src[0] is t and src[1] == _version(t))
                   for src, t in zip(self.made_from, (w_scale, bias)))


class _OnednnWeight:
    """What oneDNN needs of one int8 weight tensor, made once and freed with the tensor: its blocked layout and
    (all-zero, symmetric) zero points for the weight's values at ``version`` (an in-place write such as
    ``load_state_dict`` bumps the version and repacks), and the epilogue tensors of the last call
    (:func:`_epilogue_args`)."""

    __slots__ = ("ref", "version", "packed", "zero_points", "epilogue")

    def __init__(self, w_q: torch.Tensor, key: int):
        self.ref = weakref.ref(w_q, lambda _r: _PACKED.pop(key, None))
        self.version = _version(w_q)
        self.packed = torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None)  # prepack assumes row-major
        self.zero_points = torch.zeros(w_q.shape[0], dtype=torch.long)
        self.epilogue: Optional[_Epilogue] = None


_PACKED: dict[int, _OnednnWeight] = {}


def _packed_weight(w_q: torch.Tensor) -> _OnednnWeight:
    """The :class:`_OnednnWeight` of ``w_q``, made on first use and after an in-place write."""
    key = id(w_q)
    hit = _PACKED.get(key)
    if hit is not None and hit.ref() is w_q and hit.version == _version(w_q):
        return hit
    made = _PACKED[key] = _OnednnWeight(w_q, key)
    return made


def _epilogue_args(weight: _OnednnWeight, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> _Epilogue:
    """The weight scale flattened and the bias in fp32, made once per Linear rather than on every call: the
    bias's cast alone cost ~10 µs a call on the AVX2 EPYC, and a whole call at M = 1 takes ~40 µs on the AMX
    host. Remade when another scale or bias tensor comes (a dtype move makes new ones) or one was written in
    place (``load_state_dict``: its version changes)."""
    e = weight.epilogue
    if e is None or not e.made_of(w_scale, bias):
        e = weight.epilogue = _Epilogue(w_scale.reshape(-1), None if bias is None else bias.to(torch.float32),
                                        tuple(None if t is None else (t, _version(t)) for t in (w_scale, bias)))
    return e


# Below this many rows, CPUs without VNNI get oneDNN's src as uint8 with zero point 128 (x_q + 128, the
# same integers): measured on the 2-core AVX2 EPYC (torch 2.13), the six GEMMs of a MiniLM layer took
# 3.08 ms with u8 src against 5.32 ms with s8 at M = 128, 14.07 vs 14.46 at M = 1024 and 54.2 vs 50.3 at
# M = 4096; bit-identical (oneDNN shifts s8 to u8 itself on these CPUs; the zero point is compensated
# exactly, and |W_q| <= 63 keeps the u8 * s8 pair sums exact, module docstring).
_U8_SRC_MAX_M = 1024


def _src(x_q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """oneDNN's src and its zero point for int8 ``x_q`` [M, K]: as is, or shifted to uint8 (see above)."""
    if x_q.shape[0] < _U8_SRC_MAX_M and not cpu_int8_full_range_exact():
        return x_q.view(torch.uint8) ^ 128, 128
    return x_q, 0


def _onednn_gemm(x_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """fp32 [M, N] = acc · s_w (oneDNN applies the per-channel weight scale in its own epilogue). ``shift``:
    pick the src form by :func:`_src` (the CPU probes pass False: they run before it can decide)."""
    weight = _packed_weight(w_q)
    src, src_zp = _src(x_q) if shift else (x_q, 0)
    return torch.ops.onednn.qlinear_pointwise(
        src, 1.0, src_zp, weight.packed, w_scale.reshape(-1), weight.zero_points, None, 1.0, 0, torch.float32, "none",
        [], "",
    )


# One activation scale for every row (a static per-tensor scale, or a single token) goes into oneDNN's own
# epilogue as its src scale, with the bias and the activation: one call instead of GEMM + addcmul + act.
# Measured on the 2-core AVX2 EPYC, 4096x384x1536 with GELU: 54 ms against 66 ms; within 1 ulp of the
# reference epilogue (oneDNN multiplies acc by s_x·s_w in another order).
_ONEDNN_POST_OPS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _onednn_out_ok(out_dtype: torch.dtype) -> bool:
    """Can oneDNN's epilogue write ``out_dtype`` fast? fp32 always; bf16 only where the CPU has bf16 of its own:
    elsewhere oneDNN falls back to a reference kernel (measured on the AVX2 EPYC: 33 s for one 4096x384x1152
    GEMM with bf16 output, 12 ms with fp32 output), so fp32 out plus a cast is used instead."""
    return out_dtype == torch.float32 or (out_dtype == torch.bfloat16 and cpu_native_bf16())


def _one_scale(x_scale: torch.Tensor) -> Optional[float]:
    """The activation scale when all rows share one (a static per-tensor scale, or a single token), else None.
    Per-token scales of two rows almost never match, so the first two rows decide cheaply (one read) for the
    dynamic scheme; a static scale then takes one min/max reduction (~4 µs at M = 128 on the AVX2 EPYC, against
    ~9 µs for comparing every row with the first)."""
    s = x_scale.reshape(-1)
    if s.numel() < 2:
        return s.item() if s.numel() == 1 else None
    first, second = s[:2].tolist()
    if first != second:
        return None
    lo, hi = torch.aminmax(s)
    return first if lo.item() == first == hi.item() else None


def _onednn_static_linear(x_q, scale: float, w_q, w_scale, bias, activation, out_dtype):
    weight = _packed_weight(w_q)
    post_op, algorithm = _ONEDNN_POST_OPS[activation]
    src, src_zp = _src(x_q)
    e = _epilogue_args(weight, w_scale, bias)
    return torch.ops.onednn.qlinear_pointwise(
        src, scale, src_zp, weight.packed, e.w_scale, weight.zero_points, e.bias, 1.0, 0, out_dtype, post_op, [],
        algorithm,
    )


# ------------------------------------------------------------------------------ per-token quantize
_ROUND_MAGIC = _kc.ROUND_MAGIC  # 1.5 * 2**23


def quantize_per_token(x: torch.Tensor, act_scale: Optional[torch.Tensor] = None,
                       act_smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization, bit-identical to :func:`fxquant.ir.reference.quantize_per_token`, in fewer
    passes over x on the CPU (fp32 [..., K] → int8 [..., K], fp32 scale [..., 1]); with ``act_scale`` (fp32
    [1]) the static per-tensor form, with ``act_smooth`` (fp32 [K]) SmoothQuant's per-channel factor first.

    * amax = max |x|, with |x| written into the per-thread workspace (one write and one reduction: 65 against
      79 µs for ``max(max x, -min x)``'s two reductions at 128 x 384, 4.0 against 4.8 ms at 4096 x 1536, on the
      2-core AVX2 EPYC; ``linalg.vector_norm(x, inf)`` and ``aminmax(dim=-1)`` are 2-3x slower there);
    * round-half-to-even by adding 1.5·2^23: for |v| < 2^22 the fp32 sum's rounding (IEEE 754
      roundTiesToEven) leaves round(v) in the low mantissa bits (the classic "magic number" rounding);
    * the int32 view's low byte is then round(v) in two's complement, so ``.to(int8)`` (which keeps the
      low 8 bits) yields the int8 value; |v| <= 127 by construction of a per-token scale, so no clamp is
      needed (a static scale needs one: clamping to the integers ±127 before rounding is the same as after).
    """
    if triton_serves(x.device):
        return _triton_quantize(x, act_scale, act_smooth)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return reference.quantize_per_token(x, act_scale, act_smooth)
    # bf16 / fp16 x: the first op below reads it and writes fp32 (type promotion upcasts exactly), as the
    # reference's x.to(float32) does; the max of bf16 values is exact in bf16.
    work = _workspace(x.shape)
    if act_smooth is not None:
        x = torch.mul(x, act_smooth, out=work)
    if act_scale is not None:
        v = torch.mul(x, act_scale.reciprocal(), out=work).clamp_(-127.0, 127.0).add_(_ROUND_MAGIC)
        # s in every row, as a new contiguous tensor (the op's declared output; a view of act_scale would alias
        # an input, which torch.compile's fallback rejects)
        return v.view(torch.int32).to(torch.int8), act_scale.reshape(1).expand(*x.shape[:-1], 1).contiguous()
    # |x| into the workspace when x is an fp32 tensor of the caller's; a temporary when x lives there already
    # (smoothed) or is bf16 / fp16 (|x| and its max are exact in that dtype, the cast to fp32 too)
    absx = torch.abs(x, out=work) if act_smooth is None and x.dtype == torch.float32 else x.abs()
    amax = absx.amax(dim=-1, keepdim=True).to(torch.float32)
    scale = amax.div_(127.0).clamp_min_(_kc.SCALE_EPS)  # CPU fp32 division by a scalar: IEEE, as the reference
    v = torch.mul(x, scale.reciprocal(), out=work).add_(_ROUND_MAGIC)
    return v.view(torch.int32).to(torch.int8), scale


_LOCAL = threading.local()


def _workspace(shape: torch.Size) -> torch.Tensor:
    """A per-thread fp32 scratch tensor of ``shape``, reused across calls.

    Measured on MiniLM (batch 32 x 128, AVX2 CPU, glibc malloc): a fresh multi-MB temporary per call comes
    from new mmap pages and pays their page faults; reusing one buffer took fxquant eager from ~560 ms
    toward the ~420 ms it runs at when malloc never returns memory to the OS (docs/benchmarks.md).
    """
    n = math.prod(shape)
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.numel() < n:
        # a normal tensor even when first needed under inference_mode: later calls outside it write to it
        with torch.inference_mode(False):
            buf = _LOCAL.buf = torch.empty(max(n, 1), dtype=torch.float32)
    return buf[:n].view(shape)


def layer_norm_quant(x, normalized_shape, weight, bias, eps, return_float, act_scale=None, act_smooth=None):
    """LayerNorm + quantization (per token, or static / smoothed as :func:`quantize_per_token`): one Triton
    kernel where Triton serves the device and the row fits (K <= ``kernels.layer_norm_quant.MAX_K``), else
    ``F.layer_norm`` then :func:`quantize_per_token`. Returns ``(y or empty, y_q, scale)`` as
    ``fxquant::layer_norm_quant``."""
    if triton_serves(x.device) and len(normalized_shape) == 1 and x.shape[-1] <= _LN_MAX_K:
        return _triton_layer_norm_quant(x, normalized_shape, weight, bias, eps, return_float, act_scale, act_smooth)
    return _norm_outputs(torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps), return_float,
                         quantize_per_token, act_scale, act_smooth)


def rms_norm_quant(x, weight, eps, cast_before_weight, return_float, act_scale=None, act_smooth=None):
    """RMSNorm + quantization (per token, or static / smoothed): one Triton kernel where Triton serves the
    device and the row fits, else the float RMSNorm of :func:`fxquant.ir.reference.rms_norm` then
    :func:`quantize_per_token`. Returns ``(y or empty, y_q, scale)`` as ``fxquant::rms_norm_quant``."""
    if triton_serves(x.device) and x.shape[-1] <= _LN_MAX_K:
        return _triton_rms_norm_quant(x, weight, eps, cast_before_weight, return_float, act_scale, act_smooth)
    return _norm_outputs(reference.rms_norm(x, weight, eps, cast_before_weight), return_float, quantize_per_token,
                         act_scale, act_smooth)


# --------------------------------------------------------------------------------------------- aten
def _aten_gemm(x_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    # w_q.t() of the [N, K] tensor: a row-major [K, N] right operand falls onto a 6-7x slower cuBLAS kernel.
    # K = 1: w_q.t() is [1, N] with strides (1, 1), and torch 2.13's CPU _int_mm on a VNNI / AMX CPU (oneDNN's
    # s8s8s32 gemm) returned uninitialized memory for it (every call, measured on the AMX Xeon; reached there under
    # FXQUANT_CPU_ISA=avx2, which sends full-range weights here); the [1, N] row-major view has strides (N, 1).
    w_t = w_q.reshape(1, -1).contiguous() if w_q.shape[1] == 1 else w_q.t()
    return torch._int_mm(x_q, w_t).to(torch.float32).mul_(w_scale.reshape(1, -1))


def _reference_gemm(x_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return reference.int8_gemm(x_q, w_q).to(torch.float32).mul_(w_scale.reshape(1, -1))


GemmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cpu_backend(w_qmax: int) -> str:
    """``onednn`` where it is exact for this weight range (|W_q| <= 63, or a VNNI/AMX CPU), else ``aten``."""
    if onednn_available() and (w_qmax <= 63 or cpu_int8_full_range_exact()):
        return "onednn"
    return "aten"


class Backend(NamedTuple):
    """One int8 GEMM backend: its name, its GEMM (fp32 acc·s_w out, the epilogue in torch; None for ``triton``,
    which fuses the epilogue) and ``supports(device, m, k, n, w_qmax)``: can it run such a call on this machine
    (``m = k = n = 0``: whatever the shape, as the lowering pass asks before any call)."""

    name: str
    gemm: Optional[GemmFn]
    supports: Callable[[torch.device, int, int, int, int], bool]


def _cublas_shape(m: int, k: int, n: int) -> bool:
    return (m == 0 or m > 16) and k % 8 == 0 and n % 8 == 0  # cuBLAS int8: M > 16, K and N multiples of 8


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("triton", None, lambda device, m, k, n, q: triton_serves(device)),
    Backend("onednn", _onednn_gemm, lambda device, m, k, n, q: device.type == "cpu" and cpu_backend(q) == "onednn"),
    Backend("aten", _aten_gemm, lambda device, m, k, n, q: device.type == "cpu" or (device.type == "cuda" and _cublas_shape(m, k, n))),
    Backend("reference", _reference_gemm, lambda device, m, k, n, q: True),
)}
BACKEND_NAMES = tuple(REGISTRY)
# GEMM-only backends (fp32 acc·s_w out; the epilogue runs in torch), by name. ``triton`` fuses the epilogue itself.
BACKENDS: dict[str, GemmFn] = {b.name: b.gemm for b in REGISTRY.values() if b.gemm is not None}
# Per device type, the backends in order of preference (measured: docs/benchmarks.md).
PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("triton", "aten", "reference"), "cpu": ("triton", "onednn", "aten", "reference")}


def available(backend: str, device: torch.device, weight_qmax: int) -> bool:
    """Can ``backend`` run int8 GEMMs of this weight range on ``device`` on this machine, whatever the shape?"""
    return REGISTRY[backend].supports(device, 0, 0, 0, weight_qmax)


def backend_for_target(spec: "TargetSpec | str", weight_qmax: int, requested: Optional[str] = None) -> str:
    """The one choice of the int8 GEMM backend a target's fused Linears are lowered to: ``requested``
    (``QuantConfig.backend``) when given, else the first of the target's ``spec.backends`` that is
    :func:`available` on its ``spec.device`` (cuda: ``triton``, else cuBLAS through ``aten``; cpu: ``triton``
    under a Triton CPU backend, else oneDNN, else ``aten``). :func:`pick_backend` re-checks it per call
    (device moves, cuBLAS's M > 16)."""
    if requested is not None:
        return requested
    if isinstance(spec, str):
        spec = TARGETS[spec]
    device = torch.device(spec.device)
    return next((b for b in spec.backends if available(b, device, weight_qmax)), "reference")


def pick_backend(requested: str, device: torch.device, m: int, k: int, n: int, w_qmax: int) -> str:
    """The backend that runs one call: ``requested`` when it can run this call, else the next of the device's
    :data:`PREFERENCE` whose :class:`Backend` ``supports`` it.

    ``requested`` is what the lowering pass chose for the target; it is re-checked here because a
    QuantizedModel can be moved to another device, and cuBLAS int8 rejects M <= 16. On CPU ``onednn`` and
    ``aten`` both mean "a CPU int8 library": oneDNN where it is exact for the weight range, else ``aten``
    (:func:`cpu_backend`); ``triton`` asked for explicitly also runs under the interpreter.
    """
    if requested == "reference":
        return "reference"
    kind = device.type
    if kind == "cpu":
        if requested in ("onednn", "aten"):
            return cpu_backend(w_qmax)
        if requested == "triton" and _kc.triton_device_ok(device):
            return "triton"
    order = PREFERENCE.get(kind, ("reference",))
    if requested in REGISTRY and requested != order[0]:
        order = (requested, *order)
    for name in order:
        if REGISTRY[name].supports(device, m, k, n, w_qmax):
            return name
    return "reference"


def run_linear(x_q: torch.Tensor, x_scale: torch.Tensor, linear, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 Linear on 2-D operands through the chosen backend (see :func:`fxquant.ir.reference.int8_linear`).

    Args:
        x_q: int8 [M, K]; x_scale: fp32 [M, 1] (per token) or one shared value broadcast per row.
        linear: the Linear op's argument record (``fxquant.ir.ops.INT8_LINEAR_Q_C.record(...)`` or
            ``INT8_LINEAR_C``'s): ``w_q`` int8 [N, K], ``w_scale`` fp32 [N, 1], ``bias``, ``activation``,
            ``backend`` (re-checked by :func:`pick_backend`) and ``w_qmax``, as the op's schema names them.
        out_dtype: the output dtype.

    Returns:
        [M, N] (gated epilogues: [M, N / 2]) in ``out_dtype``.
    """
    w_q, w_scale, bias, activation = linear.w_q, linear.w_scale, linear.bias, linear.activation
    m, k = x_q.shape
    n = w_q.shape[0]
    if m == 0:
        return torch.empty(0, n // 2 if activation in GATED else n, dtype=out_dtype, device=x_q.device)
    name = pick_backend(linear.backend, x_q.device, m, k, n, linear.w_qmax)
    if name == "triton":
        return _triton_w8a8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype)
    if name == "onednn" and activation in _ONEDNN_POST_OPS and _onednn_out_ok(out_dtype):
        scale = _one_scale(x_scale)
        if scale is not None:
            return _onednn_static_linear(x_q, scale, w_q, w_scale, bias, activation, out_dtype)
    y = BACKENDS[name](x_q, w_q, w_scale)
    return reference.apply_epilogue(y, x_scale, bias, activation, out_dtype)


# ------------------------------------------------------------------ the kernels behind fxquant's ops
# ``fxquant.ir.ops`` defines each op's schema and fake implementation; its CPU/CUDA implementation is this
# module's dispatch (registered for every dispatch key through CompositeExplicitAutograd).
def _impl(name):
    """Register ``fn`` as the op's kernel for every backend. Inference ops: run without autograd recording
    (a caller's tensors may require grad; the fused ops have no backward)."""

    def register(fn):
        @functools.wraps(fn)
        def no_grad_fn(*args, **kwargs):
            if not torch.is_grad_enabled():  # the usual inference case; entering no_grad costs ~1 µs
                return fn(*args, **kwargs)
            with torch.no_grad():
                return fn(*args, **kwargs)

        ops.LIBRARY.impl(name, no_grad_fn, "CompositeExplicitAutograd")
        return fn

    return register


# quantize_per_token and the norm-quant ops take their schema's arguments as they are
_impl("quantize_per_token")(quantize_per_token)
_impl("layer_norm_quant")(layer_norm_quant)
_impl("rms_norm_quant")(rms_norm_quant)


def _linear_2d(x_q, x_scale, r, out_dtype):
    """``run_linear`` of a Linear op's record ``r`` on the quantized input, flattened to [M, K] and back."""
    if x_q.dim() == 2 and x_scale.dim() == 2:  # decode and flattened inputs: no reshapes (each is host time on a host-bound call)
        return run_linear(x_q, x_scale, r, out_dtype)
    lead = x_q.shape[:-1]
    y = run_linear(x_q.reshape(-1, x_q.shape[-1]), x_scale.reshape(-1, 1), r, out_dtype)
    return y.reshape(*lead, y.shape[-1])


@_impl("int8_linear_q")
def _op_int8_linear_q(*args, **kwargs) -> torch.Tensor:
    r = ops.INT8_LINEAR_Q_C.record(*args, **kwargs)  # the signature is the op's schema (fxquant.ir.ops)
    return _linear_2d(r.x_q, r.x_scale, r, r.out_dtype)


@_impl("int8_linear")
def _op_int8_linear(*args, **kwargs) -> torch.Tensor:
    r = ops.INT8_LINEAR_C.record(*args, **kwargs)
    x = r.x
    # flatten once: quantization and GEMM both work on [M, K] (every reshape is host time on a host-bound call)
    x_q, x_scale = quantize_per_token(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), r.act_scale, r.act_smooth)
    y = _linear_2d(x_q, x_scale, r, r.out_dtype or x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------ weight-only int8 (W8A16) at decode
# Below these row counts (M) an int8-weight kernel that reads the activations in their float dtype beats both
# quantize + W8A8 and the float GEMM: the Linear is memory-bound there (it streams int8 weights, half of bf16's
# bytes) and skips the activation quantization pass. Measured:
# * cpu (2 threads of an AMX Xeon, torch 2.13, bf16, Qwen2-0.5B shapes N×K 1152×896, 9728×896, 896×4864):
#   aten._weight_int8pack_mm against bf16 F.linear: M=1 2.0–2.9× faster, M=2 1.4–1.8×, M=4 1.1–1.3×, M=8
#   0.54–0.69× (oneDNN's AMX bf16 GEMM wins from there). Its fp32 path is 0.12× at M=1, so fp32 activations are
#   rounded to bf16 for it; used where the kernel is vectorized (_cpu_int8pack_vectorized: AVX-512 / AMX, and AVX2
#   dispatch with torch >= 2.13).
# * cuda: 64 is the ridge argument (an H200's int8 ridge is ~400 ops/byte, so a GEMM with M <= 64 is memory-bound),
#   NOT yet a measured crossover against the W8A8 kernel. Measured so far (H200, bench/w8a16_gpu.py): the Triton
#   W8A16 kernel against bf16 F.linear is 1.06-1.89x faster at M <= 8 and 0.79-1.41x at M = 32 (Llama-3-8B and
#   Qwen2-1.5B shapes); Llama-3-8B decode at batch 32 ran 1.11x the bf16 control. W8A8 at M = 32 measured against it
#   on an H100 (2026-12-06, Llama-3-8B shapes, 32 layers, compiled, CUDA graph): 5.82 ms/token with this cap at 16
#   against 5.69 with 64 (W8A16), one run each: no gain from W8A8 at M = 32, and W8A16 is the more accurate.
# * cpu without exact full-range int8 (AVX2 only: no VNNI, see cpu_int8_full_range_exact), fp32 the float baseline:
#   oneDNN's int8 GEMM (7-bit weights) is slow at small M, and _weight_int8pack_mm at AVX2 dispatch stays level with
#   fp32 F.linear up to M = 8 (2 threads of the AMX Xeon, ATen / MKL / oneDNN capped to AVX2, torch 2.13, Qwen2-0.5B
#   q/k/v, o, gate/up, down, µs, fp32 F.linear against int8pack: M=4 94/73/1057/440 against 70/63/616/301; M=8
#   130/99/1320/595 against 140/109/1239/585; M=16 0.72-0.78x). Decode at batch 8 (fp32 model): 128-129 ms/token
#   with weight-only against 173 with W8A8 and transformers' 145-149, alternating runs (docs/benchmarks.md).
WEIGHT_ONLY_MAX_M = {"cpu": 4, "cpu-avx2": 8, "cuda": 64}
_WEIGHT_ONLY_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _cpu_int8pack_vectorized() -> bool:
    """ATen's ``_weight_int8pack_mm`` CPU kernel runs vectorized here: AVX-512 (AMX) dispatch, or AVX2 dispatch in
    torch ≥ 2.13. Measured with torch 2.13 on 2 cores of an AMX Xeon with ATen's dispatch forced to AVX2
    (``ATEN_CPU_CAPABILITY=avx2``): bf16 x, M = 1, Qwen2-0.5B shapes, 41 / 34 / 380 / 160 µs for q/k/v, o,
    gate/up and down against 35 / 27 / 329 / 124 at AVX-512 (and 43 / 23 / 643 / 475 for fp32 ``F.linear`` under
    MKL at AVX2): a vectorized kernel at both levels. Older releases are taken at AVX-512 only (not measured)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX512", "AMX"):
        return True
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return cap == "AVX2" and version >= (2, 13)


def _w8a16_triton():
    """The W8A16 kernel module where Triton is installed, else None (its launcher needs Triton)."""
    return _kw16 if _kw16.HAS_TRITON else None


def _int8pack_ok(x_dtype: torch.dtype, k: int) -> bool:
    """ATen's CPU ``_weight_int8pack_mm`` serves this call: bf16 / fp16 x (fp32 x is rounded to bf16 first, see
    :func:`weight_only_linear`), a vectorized kernel (:func:`_cpu_int8pack_vectorized`), and K a multiple of 16
    (its kernel reads K in blocks of 16 without a tail: other K give garbage or a segfault, torch 2.13)."""
    return x_dtype in (*_WEIGHT_ONLY_DTYPES, torch.float32) and k % 16 == 0 and _cpu_int8pack_vectorized()


def weight_only_max_m(device: str, dtype: Optional[torch.dtype], k: int = 16) -> int:
    """The largest M at which a Linear with ``k`` input features reading ``dtype`` activations on ``device``
    (``"cpu"`` / ``"cuda"``) runs weight-only (``fxquant::int8_weight_linear``): :data:`WEIGHT_ONLY_MAX_M`, on a CPU
    without exact full-range int8 (AVX2 only) its ``"cpu-avx2"`` entry; 0 where no weight-only kernel beats the W8A8
    path (a CPU whose ATen kernel is not vectorized, K % 16 on a CPU, CUDA without Triton)."""
    if device == "cpu":
        if not _int8pack_ok(dtype, k):
            return 0
        return WEIGHT_ONLY_MAX_M["cpu" if cpu_int8_full_range_exact() else "cpu-avx2"]
    if device == "cuda" and dtype in (*_WEIGHT_ONLY_DTYPES, torch.float32) and _w8a16_triton() is not None:
        return WEIGHT_ONLY_MAX_M["cuda"]
    return 0


def weight_only_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A16 Linear on x [M, K] (see :func:`fxquant.ir.reference.int8_weight_linear`): the Triton kernel on CUDA,
    ATen's ``_weight_int8pack_mm`` on a CPU (:func:`_int8pack_ok`), else the reference. On a CPU an fp32 x is
    rounded to bf16 first (ATen's fp32 path is 5-8x slower than its bf16 one at M = 1, slower than fp32
    ``F.linear``): relative error ≤ 2⁻⁹ per activation (bf16's 8-bit significand), below the int8 weight's
    own rounding (up to 2⁻⁸ of a channel's max) and far below per-token int8 activations' (W8A8)."""
    if x.device.type == "cuda" and x.dtype in (*_WEIGHT_ONLY_DTYPES, torch.float32):
        kernel = _w8a16_triton()
        if kernel is not None:
            return kernel.w8a16_gemm(x, w_q, w_scale, bias, activation, out_dtype)
    if x.device.type == "cpu" and x.shape[0] > 0 and _int8pack_ok(x.dtype, x.shape[1]):
        if x.dtype == torch.float32:
            x = x.to(torch.bfloat16)
        y = _int8pack(x.contiguous(), w_q, _scale_as(w_scale, x.dtype))
        if bias is None and activation == "none":
            return y if y.dtype == out_dtype else y.to(out_dtype)
        y = y.to(torch.float32)
        if bias is not None:
            y = y.add_(bias.to(torch.float32))
        y = _kc.activation_torch(y, activation)
        return y if out_dtype == torch.float32 else y.to(out_dtype)
    return reference.int8_weight_linear(x, w_q, w_scale, bias, activation, out_dtype)


# Rows per _weight_int8pack_mm call for very tall weights: 2 threads of an AMX Xeon (torch 2.13) read a
# 151936 x 896 LM head in 9.0 ms in one call and 5.5 ms in chunks of 32768 rows (8192: 6.0, 65536: 5.8); weights
# of up to 32000 rows gain nothing from chunking.
_INT8PACK_CHUNK, _INT8PACK_CHUNK_ABOVE = 32768, 65536


def _int8pack(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = w_q.shape[0]
    if n <= _INT8PACK_CHUNK_ABOVE:
        return torch.ops.aten._weight_int8pack_mm(x, w_q, scale)
    c = _INT8PACK_CHUNK
    return torch.cat([torch.ops.aten._weight_int8pack_mm(x, w_q[i:i + c], scale[i:i + c]) for i in range(0, n, c)], 1)


_SCALES: dict = {}  # id(fp32 scale) -> (weakref, version, dtype, converted): each decode step reuses them


def _scale_as(w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ATen's int8pack contract: the per-channel scale [N] in x's dtype (bf16 rounding of s_w, relative 2^-9, below
    the output's own bf16 rounding). Converted once per scale tensor and version, not per call."""
    key = (id(w_scale), dtype)
    found = _SCALES.get(key)
    if found is not None and found[0]() is w_scale and found[1] == _version(w_scale):
        return found[2]
    converted = w_scale.reshape(-1).to(dtype)
    _SCALES[key] = (weakref.ref(w_scale, lambda _, k=key: _SCALES.pop(k, None)), _version(w_scale), converted)
    return converted


@_impl("decode_attention")
def _op_decode_attention(q, k_cache, v_cache, mask, scale, cache_position=None):
    """``fxquant::decode_attention``: the Triton kernel on CUDA where it takes the shapes
    (``fxquant.kernels.decode_attention``), else one SDPA call with the grouped queries stacked
    (``decode_attention_sdpa``: ATen's flash attention on CPUs); both read the cache only up to
    ``cache_position[-1]`` when it is given (the SDPA form reads that on the host)."""
    _, h, s, d = q.shape
    if (q.is_cuda and _kda.HAS_TRITON and q.dtype == k_cache.dtype == v_cache.dtype
            and _kda.fits(h, k_cache.shape[1], s, d)):
        return _kda.decode_attention(q, k_cache, v_cache, mask, scale, cache_position)
    return _kda.decode_attention_sdpa(q, k_cache, v_cache, mask, scale, cache_position)


@_impl("int8_weight_linear")
def _op_int8_weight_linear(*args, **kwargs) -> torch.Tensor:
    r = ops.INT8_WEIGHT_LINEAR_C.record(*args, **kwargs)
    x = r.x
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if r.act_smooth is not None:
        x2 = x2 * r.act_smooth.to(x2.dtype)
    y = weight_only_linear(x2, r.w_q, r.w_scale, r.bias, r.activation, r.out_dtype or x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
