"""``QuantConfig``: the one validated, frozen description of what ``fxquant.compile`` should do.

Per-target defaults live in :data:`TARGETS`; every number there carries the measurement behind it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch

__all__ = ["QuantConfig", "TargetSpec", "TARGETS"]


@dataclass(frozen=True)
class TargetSpec:
    """Kernel-driven defaults of one target.

    Attributes:
        min_ratio: smallest beneficial ratio K·N/(K+N) at which int8 pays off (see ``heuristics``).
        alignment: K and N must be multiples of this for the target's int8 kernels.
        weight_qmax: largest |int8 weight| (127 = full narrow range; 63 = 7-bit, for x86 CPUs without VNNI
            whose u8·s8 int16 pair sums would otherwise saturate). ``None``: decided at compile time by
            probing the CPU backend (:func:`fxquant.backends.cpu_int8_full_range_exact`).
        min_n_unfused: a Linear whose input is not a LayerNorm output (so it needs a quantization pass of
            its own) goes int8 only when the int8 Linears reading that input have N >= this in total
            (``heuristics.quantize_pass_pays_off``); 0 disables the rule.
        fuse_siblings: int8 Linears reading one quantized input run as one GEMM over their concatenated
            weights (``rewrite.fuse_sibling_linears``), and the ratio rule is judged on that GEMM.
        gated_output_int8: Linears reading a gated MLP's product (``down_proj`` after SwiGLU / GeGLU) go
            int8 too; off by default, for accuracy (``heuristics.gated_output_int8``).
    """

    min_ratio: float
    alignment: int
    weight_qmax: Optional[int]
    min_n_unfused: int = 0
    fuse_siblings: bool = False
    gated_output_int8: bool = False


TARGETS: dict[str, TargetSpec] = {
    # x86 / generic CPU through oneDNN. Measured with bench/heuristics_cpu.py on a 2-core AMD EPYC (Zen 3,
    # AVX2, no VNNI), torch 2.13, M = 4096 tokens, whole int8 Linear (quantize + GEMM + epilogue) vs fp32
    # F.linear: ratio 64 (128x128) 0.82x, ratio 96 (192x192) 1.12x, 192 (384x384) 1.32x, 307 (MiniLM FFN)
    # 1.36-1.50x. So int8 from ratio 96. (At M = 128 int8 lost at every shape tried, 0.15-0.76x: see
    # docs/benchmarks.md; the ratio rule cannot see M, which is dynamic.)
    # fuse_siblings: MiniLM's q/k/v as one GEMM (N = 1152). bench/cpu_control.py (one process, interleaved rounds,
    # speed-up over torch fp32 eager as the median of per-round ratios) on the AVX2 EPYC, torch 2.13, 2026-11-30:
    # eager 1.10x / 1.26x / 1.58x at batch 1 / 8 / 32 x 128 with it against 1.03x / 1.23x / 1.49x without;
    # under torch.compile 1.45x / 1.39x / 1.70x against 1.31x / 1.37x / 1.67x; ONNX Runtime on the dynamic export
    # (one MatMulInteger per GEMM) 1.42x against 1.08x at batch 1, 1.02x and 1.01x at batch 32. On the AMX Xeon
    # of the H200 host (2 cores, bf16 compute + torch.compile, torch 2.11) batch 1 6.46 vs 7.46 ms, batch 32
    # 108.2 vs 107.7: oneDNN's own time for three N = 384 GEMMs equals one N = 1152 GEMM's (2.45 vs 2.49 ms at
    # M = 4096), so what goes is two calls' host time. The static QDQ export splits the GEMM into its Linears.
    "cpu": TargetSpec(min_ratio=96.0, alignment=1, weight_qmax=None, fuse_siblings=True),
    # ARM SDOT / i8mm kernels consume K in groups of 4 and N in tiles of 4 (Arm ARM, SDOT/SMMLA). Ratio:
    # the x86 CPU figure, not yet measured on ARM.
    "arm-sve2": TargetSpec(min_ratio=96.0, alignment=4, weight_qmax=127),
    # CUDA through fxquant's Triton kernels (bench/gpu_ops.py, NVIDIA H200, torch 2.11, Triton 3.6; tables in
    # docs/benchmarks.md). min_ratio: the int8 GEMM alone only ties cuBLAS bf16 at ratio 307 (4096x384x1536:
    # 15 vs 15 us), the whole Linear loses at ratio 384 (8192x768x768: 0.73x) and wins from 614
    # (12608x768x3072: 1.22x; 2048x2048x6144 1.38x). min_n_unfused: a separate per-token quantization pass
    # costs ~3 bytes per input element; at N = 768 it eats the gain (12608x3072x768: 0.91-0.94x of bf16),
    # square sweeps win from N = 2048 (>= 1.03x eager, >= 1.27x in a CUDA graph) and are mixed at N = 1024-1536
    # (0.77-1.08x eager).
    # Alignment 8: 16-byte rows for the TMA kernel need K % 16, and the pointer kernel takes any K, so 8
    # only keeps fp16/bf16 outputs 16-byte aligned.
    "cuda": TargetSpec(min_ratio=512.0, alignment=8, weight_qmax=127, min_n_unfused=2048, fuse_siblings=True),
}

_ACTIVATION_SCHEMES = ("dynamic-per-token", "static-per-tensor")
_CALIBRATION_METHODS = ("minmax", "percentile")
_OUT_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = (None, "triton", "onednn", "aten", "reference")  # fxquant.backends.BACKEND_NAMES


def check_calibration(method, percentile, where: str) -> None:
    """Raise ValueError naming ``where`` for an unknown calibration method or a percentile outside (0, 100]."""
    if method not in _CALIBRATION_METHODS:
        raise ValueError(f"{where}calibration_method={method!r} is unknown; choose one of {_CALIBRATION_METHODS}")
    if isinstance(percentile, bool) or not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise ValueError(f"{where}percentile={percentile!r} must be a number in (0, 100]")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        target: ``"cpu"``, ``"cuda"`` or ``"arm-sve2"``; picks the defaults of :data:`TARGETS`.
        min_ratio: override of the target's beneficial-ratio threshold K·N/(K+N) (≥ 0).
        alignment: override of the target's K/N alignment (≥ 1).
        weight_qmax: override of the largest |int8 weight|, in [7, 127]; ``None`` = target default.
        skip: module names to keep float: exact names (``"pooler.dense"``) or ``"re:"``-prefixed regular
            expressions matched with ``re.fullmatch`` (``"re:.*attention\\.output.*"``), the convention of
            compressed-tensors' ``ignore`` list.
        filter_fn: ``filter_fn(name, module) -> bool``; False keeps that Linear float. ``module`` is the
            original ``nn.Linear`` when it can be found in the user's model, else ``None``.
        activation_scheme: ``"dynamic-per-token"`` (symmetric int8, one fp32 scale per row, computed at run
            time) or ``"static-per-tensor"`` (symmetric int8, zero point 0, one fp32 scale per quantized tensor
            from calibration: ``fxquant.compile(..., calibration=batches)`` or :func:`fxquant.calibrate`; the
            form of TensorRT's explicit quantization and OpenVINO's int8 path).
        smoothquant: SmoothQuant's migration strength α in [0, 1] (Xiao et al. 2023, arXiv 2211.10438, eq. 4:
            s_j = max|X_j|^α / max|W_j|^(1-α) per input channel j of each group of int8 Linears reading one
            tensor); ``None`` = off. Needs calibration data at compile time (``calibration=``).
        calibration_method: how calibration turns observed activations into static scales: ``"minmax"``
            (s = max|x| / 127 over every batch) or ``"percentile"`` (s = the mean over batches of each
            batch's ``percentile``-th percentile of |x|, / 127).
        percentile: the percentile of ``"percentile"`` calibration, in (0, 100].
        out_dtype: dtype of the fused nodes' outputs; ``None`` = the dtype of their input (the model's).
        min_n_unfused: override of the target's threshold on the output columns that must share a separate
            quantization pass (see ``TargetSpec``); 0 turns the rule off.
        fuse_siblings: override of the target's horizontal fusion of sibling int8 Linears (``TargetSpec``).
        gated_output_int8: quantize the Linears that read a gated MLP's product (``down_proj``), which stay
            float by default (``TargetSpec``; measurements in ``heuristics.gated_output_int8``).
        backend: int8 GEMM backend for every fused Linear: ``"triton"``, ``"onednn"``, ``"aten"`` or
            ``"reference"`` (see ``fxquant.backends``); ``None`` = the target's best available. Re-checked
            per call: a backend that cannot run a call (cuBLAS with M <= 16, say) yields to the next best.
        compute_dtype: dtype of the float (non-int8) work: norms, attention, residual adds, activations
            outside a fused epilogue, and the fused Linears' outputs. ``None`` = the model's own dtype. With
            ``torch.bfloat16`` for an fp32 model, the model's float parameters are held in bf16 (the user's
            model is untouched) and the QuantizedModel casts float inputs of the model's dtype to bf16 and
            float outputs back, so callers see fp32 in and out. Meant for CPUs with native bf16 (AMX-BF16,
            AVX512-BF16: :func:`fxquant.backends.cpu_native_bf16`), where it is the fast float form
            (docs/benchmarks.md); elsewhere bf16 is emulated and slow. Not the default: it rounds the float
            parameters, so ``export_onnx`` and ``save_pretrained`` refuse such a model.

    Raises:
        ValueError: on an unknown target, a negative ratio, an alignment < 1, a weight_qmax outside
            [7, 127], a malformed regex in ``skip``, an unsupported activation scheme, out dtype, compute dtype or backend, a
            ``smoothquant`` outside [0, 1], an unknown calibration method or a percentile outside (0, 100].
        TypeError: ``filter_fn`` not callable, ``skip`` not a sequence of strings.
    """

    target: Literal["cpu", "cuda", "arm-sve2"] = "cpu"
    min_ratio: Optional[float] = None
    alignment: Optional[int] = None
    weight_qmax: Optional[int] = None
    skip: Sequence[str] = field(default_factory=tuple)
    filter_fn: Optional[Callable[[str, Optional[torch.nn.Module]], bool]] = None
    activation_scheme: str = "dynamic-per-token"
    out_dtype: Optional[torch.dtype] = None
    backend: Optional[str] = None
    min_n_unfused: Optional[int] = None
    fuse_siblings: Optional[bool] = None
    gated_output_int8: Optional[bool] = None
    smoothquant: Optional[float] = None
    calibration_method: str = "minmax"
    percentile: float = 99.99
    compute_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"QuantConfig.target={self.target!r} is unknown; choose one of {sorted(TARGETS)}")
        if self.min_ratio is not None and (isinstance(self.min_ratio, bool) or not (isinstance(self.min_ratio, (int, float)) and self.min_ratio >= 0)):
            raise ValueError(f"QuantConfig.min_ratio={self.min_ratio!r} must be a number >= 0 (K*N/(K+N) threshold)")
        if self.alignment is not None and (isinstance(self.alignment, bool) or not (isinstance(self.alignment, int) and self.alignment >= 1)):
            raise ValueError(f"QuantConfig.alignment={self.alignment!r} must be an int >= 1")
        if self.min_n_unfused is not None and (isinstance(self.min_n_unfused, bool) or not (isinstance(self.min_n_unfused, int) and self.min_n_unfused >= 0)):
            raise ValueError(f"QuantConfig.min_n_unfused={self.min_n_unfused!r} must be an int >= 0")
        for flag in ("fuse_siblings", "gated_output_int8"):
            value = getattr(self, flag)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"QuantConfig.{flag}={value!r} must be True, False or None")
        if self.weight_qmax is not None and (isinstance(self.weight_qmax, bool) or not (isinstance(self.weight_qmax, int) and 7 <= self.weight_qmax <= 127)):
            raise ValueError(f"QuantConfig.weight_qmax={self.weight_qmax!r} must be an int in [7, 127]")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise TypeError(f"QuantConfig.skip must be a list of module names or 're:' patterns, got {self.skip!r}")
        for s in self.skip:
            if s.startswith("re:"):
                try:
                    re.compile(s[3:])
                except re.error as e:
                    raise ValueError(f"QuantConfig.skip entry {s!r} is not a valid regular expression: {e}") from e
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"QuantConfig.filter_fn must be callable as filter_fn(name, module) -> bool, got {self.filter_fn!r}")
        if self.activation_scheme not in _ACTIVATION_SCHEMES:
            raise ValueError(
                f"QuantConfig.activation_scheme={self.activation_scheme!r} is not supported; choose one of {_ACTIVATION_SCHEMES}"
            )
        if self.smoothquant is not None and (isinstance(self.smoothquant, bool) or not (
                isinstance(self.smoothquant, (int, float)) and 0.0 <= self.smoothquant <= 1.0)):
            raise ValueError(f"QuantConfig.smoothquant={self.smoothquant!r} must be None or SmoothQuant's alpha in [0, 1] "
                             "(0.5 is the paper's default)")
        check_calibration(self.calibration_method, self.percentile, "QuantConfig.")
        if self.out_dtype not in _OUT_DTYPES:
            raise ValueError(f"QuantConfig.out_dtype={self.out_dtype!r} must be one of {_OUT_DTYPES}")
        if self.compute_dtype not in _OUT_DTYPES:
            raise ValueError(f"QuantConfig.compute_dtype={self.compute_dtype!r} must be one of {_OUT_DTYPES}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"QuantConfig.backend={self.backend!r} is unknown; choose one of {_BACKENDS}")

    @property
    def spec(self) -> TargetSpec:
        """The target's defaults with this config's overrides applied (``weight_qmax`` may stay None)."""
        base = TARGETS[self.target]
        return TargetSpec(
            min_ratio=base.min_ratio if self.min_ratio is None else float(self.min_ratio),
            alignment=base.alignment if self.alignment is None else self.alignment,
            weight_qmax=base.weight_qmax if self.weight_qmax is None else self.weight_qmax,
            min_n_unfused=base.min_n_unfused if self.min_n_unfused is None else self.min_n_unfused,
            fuse_siblings=base.fuse_siblings if self.fuse_siblings is None else self.fuse_siblings,
            gated_output_int8=base.gated_output_int8 if self.gated_output_int8 is None else self.gated_output_int8,
        )
