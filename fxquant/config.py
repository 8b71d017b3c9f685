"""``QuantConfig``: the one validated, frozen description of what ``fxquant.compile`` should do.

Per-target defaults live in :data:`fxquant.targets.spec.TARGETS`; every number there carries the measurement behind it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch

from .targets.backends import BACKEND_NAMES
from .targets.spec import TARGETS, TargetSpec

__all__ = ["QuantConfig", "TargetSpec", "TARGETS", "check_calibration"]


_ACTIVATION_SCHEMES = ("auto", "dynamic-per-token", "static-per-tensor")
# activation_scheme="auto" with calibration data (cpu target): the SmoothQuant strengths measured, and how much
# lower than dynamic per-token's the static form's mean output cosine may be and still be chosen. On MiniLM α
# 0.5 gave cosine 0.946 and 0.9 gave 0.9978 (issue 24): no fixed α serves every model.
AUTO_SMOOTHQUANT_ALPHAS = (0.5, 0.65, 0.8, 0.9)
AUTO_STATIC_TOLERANCE = 1e-3
_CALIBRATION_METHODS = ("minmax", "percentile")
_OUT_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = (None, *BACKEND_NAMES)


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
            form of TensorRT's explicit quantization and OpenVINO's int8 path). ``"auto"`` (the default):
            dynamic per-token, unless ``fxquant.compile`` gets calibration data for the ``cpu`` target — then
            it measures static per-tensor with SmoothQuant α ∈ :data:`AUTO_SMOOTHQUANT_ALPHAS` against dynamic
            per-token on those batches and keeps the most accurate static form when it is within
            :data:`AUTO_STATIC_TOLERANCE` of dynamic's accuracy (static ran 1.2-1.6x faster on AMX: README);
            ``qmodel.config`` holds the scheme chosen and the report says why.
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
            ``"reference"`` (see ``fxquant.targets.backends``); ``None`` = the target's best available. Re-checked
            per call: a backend that cannot run a call (cuBLAS with M <= 16, say) yields to the next best.
        compute_dtype: dtype of the float (non-int8) work: norms, attention, residual adds, activations
            outside a fused epilogue, and the fused Linears' outputs. ``None`` = the model's own dtype. With
            ``torch.bfloat16`` for an fp32 model, the model's float parameters are held in bf16 (the user's
            model is untouched) and the QuantizedModel casts float inputs of the model's dtype to bf16 and
            float outputs back, so callers see fp32 in and out. Meant for CPUs with native bf16 (AMX-BF16,
            AVX512-BF16: :func:`fxquant.targets.backends.cpu_native_bf16`), where it is the fast float form
            (docs/benchmarks.md); elsewhere bf16 is emulated and slow. The rounded copies are what runs; the
            model's own float tensors stay the masters (referenced, not copied: the user's model must not be
            changed in place afterwards), so ``save_pretrained``, ``export_onnx`` and ``state_dict`` write
            byte for byte what the model compiled without ``compute_dtype`` writes. Weight scales stay fp32.
            ``"auto"`` (the default): ``torch.bfloat16`` for an fp32 model on the ``cpu`` target when this CPU has
            native bf16 and the model's parameters are on the CPU (MiniLM, 2 AMX cores: the fast form,
            docs/benchmarks.md), else the model's own dtype; the report's ``compute_dtype`` note says which.
        decode_weight_only: at decode (the ``"decode"`` method of a generating program), run every Linear whose
            rows fit a weight-only kernel (:func:`fxquant.targets.backends.weight_only_max_m`) as W8A16: the same
            int8 weights, float activations (no activation quantization: more accurate than W8A8, and faster at
            small M, where the GEMM is bound by the weight bytes). False keeps the plan's W8A8 at decode, so
            decode computes exactly what ``forward`` computes (greedy tokens equal the recompute over the full
            forward).

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
    activation_scheme: str = "auto"
    out_dtype: Optional[torch.dtype] = None
    backend: Optional[str] = None
    min_n_unfused: Optional[int] = None
    fuse_siblings: Optional[bool] = None
    gated_output_int8: Optional[bool] = None
    smoothquant: Optional[float] = None
    calibration_method: str = "minmax"
    percentile: float = 99.99
    compute_dtype: Optional[torch.dtype] | str = "auto"
    decode_weight_only: bool = True

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
        if not isinstance(self.decode_weight_only, bool):
            raise ValueError(f"QuantConfig.decode_weight_only={self.decode_weight_only!r} must be True or False")
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
        if self.compute_dtype != "auto" and self.compute_dtype not in _OUT_DTYPES:
            raise ValueError(f"QuantConfig.compute_dtype={self.compute_dtype!r} must be 'auto' or one of {_OUT_DTYPES}")
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
            device=base.device, backends=base.backends,
        )
