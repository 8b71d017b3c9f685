"""Pure-torch definitions of fxquant's W8A8 numerics. Every fast backend is tested against these.

Scheme: compressed-tensors "int-quantized" W8A8 (``QuantizationArgs(num_bits=8, type="int",
symmetric=True)``; weights ``strategy="channel"``, activations ``strategy="token", dynamic=True``), the
same scheme as SmoothQuant's W8A8 baseline (Xiao et al., 2023, §2) and LLM.int8's vector-wise
quantization (Dettmers et al., 2022, §3.2):

* weight, per output channel n:   s_w[n] = max_k |W[n, k]| / qmax_w,   W_q = clamp(round(W / s_w), ±qmax_w)
* activation, per token m:        s_x[m] = max_k |X[m, k]| / 127,      X_q = clamp(round(X · (1/s_x)), ±127)
* GEMM:                           acc[m, n] = Σ_k X_q[m, k] · W_q[n, k]           (exact int32)
* epilogue:                       Y = act(acc · s_w[n] · s_x[m] + b[n]) → output dtype

``round`` is round-half-to-even (``torch.round``, IEEE 754 roundTiesToEven). Scales are fp32 and
floored at ``EPS`` (fp32 machine epsilon) so all-zero rows quantize to 0 instead of dividing by 0.
Non-finite activations propagate: a row holding NaN/Inf gets a NaN/Inf scale, hence a non-finite output
row, as the float Linear would give.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import common as _kc
from ..kernels import layer_norm_quant as _kln
from ..kernels import quantize as _kq
from ..kernels import w8a8_gemm as _kg

__all__ = [
    "EPS",
    "ACTIVATIONS",
    "quantize_weight_per_channel",
    "quantize_per_token",
    "int8_gemm",
    "apply_epilogue",
    "int8_linear",
    "gelu_sigmoid_form",
    "int8_weight_linear",
    "layer_norm_quant",
    "rms_norm",
    "rms_norm_quant",
]

EPS = _kc.SCALE_EPS
ACTIVATIONS = _kc.ACTIVATIONS  # the epilogue activations, defined once beside the kernels


def quantize_weight_per_channel(weight: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of an ``nn.Linear`` weight.

    Args:
        weight: float [N, K].
        qmax: largest |W_q| (127: narrow int8 range [-127, 127]; 63: 7-bit, see ``config.TargetSpec``).

    Returns:
        ``(w_q, scale)``: int8 [N, K] (contiguous, row-major) and fp32 [N, 1], ``weight ≈ w_q * scale``.
    """
    w = weight.detach().to(torch.float32).contiguous()  # elementwise ops keep a view's strides: pin row-major
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(EPS)
    w_q = torch.round(w / scale).clamp_(-qmax, qmax).to(torch.int8)
    return w_q, scale


def quantize_per_token(x: torch.Tensor, act_scale: Optional[torch.Tensor] = None,
                       act_smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token (per-row) int8 quantization, or its static / smoothed form.

    Args:
        x: fp32 / fp16 / bf16 [..., K].
        act_scale: fp32 [1], a static per-tensor scale s from calibration (None: per token).
        act_smooth: fp32 [K], SmoothQuant's diag(s)⁻¹ (Xiao et al. 2023, eq. 3), applied to x first.

    Returns:
        ``(x_q, scale)``: int8 [..., K] and fp32 [..., 1], ``x · act_smooth ≈ x_q * scale``.
    """
    return _kq.quantize_per_token_reference(x, act_scale, act_smooth)


def int8_gemm(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """acc = X_q · W_qᵀ, exact: int8 [M, K] × int8 [N, K] → int32 [M, N] (via float64, exact for K < 2^38)."""
    return (x_q.to(torch.float64) @ w_q.to(torch.float64).T).to(torch.int32)


def apply_epilogue(
    y: torch.Tensor,
    x_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
    out_dtype: torch.dtype,
    inplace: bool = True,
) -> torch.Tensor:
    """Finish a Linear whose fp32 ``y = acc · s_w`` is computed: ``act(y · s_x + b)`` → ``out_dtype``.

    Works in place on ``y`` (fp32 [M, N]) unless ``inplace=False`` (traced graphs: Inductor's decompositions);
    ``x_scale`` fp32 [M, 1]; ``bias`` [N] or None. The activation is ``kernels.common.activation_torch``, the one
    torch definition of the epilogue beside the kernels' (a gated ``swiglu`` returns [M, N/2]).
    """
    out = {"out": y} if inplace else {}
    if bias is not None:
        y = torch.addcmul(bias.to(torch.float32), y, x_scale, **out)
    else:
        y = y.mul_(x_scale) if inplace else y * x_scale
    y = _kc.activation_torch(y, activation, inplace)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


# 2·√(2/π) and 2·√(2/π)·0.044715: GELU-tanh as a sigmoid (below)
GELU_SIGMOID_C1 = 1.5957691216057308
GELU_SIGMOID_C3 = 1.5957691216057308 * 0.044715


def gelu_sigmoid_form(y: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written as a sigmoid: ``y · σ(2·√(2/π)·(y + 0.044715·y³))``, same shape and dtype
    as ``y``.

    Hendrycks & Gimpel 2016 ("Gaussian Error Linear Units", §2) give GELU(y) ≈ ½y(1 + tanh(√(2/π)(y + 0.044715y³)));
    since ½(1 + tanh z) = σ(2z), this is that approximation exactly (to fp32 rounding), and it differs from the
    exact (erf) GELU by at most 4.7e-4 absolutely (near |y| = 2). fxquant's CPU compiled form uses it for the GELU
    epilogue of per-token int8 Linears (see ``fxquant.ir.ops``' Inductor decompositions), where it costs an exp
    and a division against Inductor's vectorized erf's long polynomial."""
    return y * torch.sigmoid(y * (GELU_SIGMOID_C1 + GELU_SIGMOID_C3 * (y * y)))


def int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The reference W8A8 Linear on 2-D operands.

    Args:
        x_q: int8 [M, K]; x_scale: fp32 [M, 1]; w_q: int8 [N, K]; w_scale: fp32 [N, 1];
        bias: [N] or None; activation: one of :data:`ACTIVATIONS`; out_dtype: output dtype.

    Returns:
        ``out_dtype`` [M, N] = act(acc · s_w[n] · s_x[m] + b[n]), acc the exact int32 product.
    """
    return _kg.w8a8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype)


def int8_weight_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str, out_dtype: torch.dtype, act_smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference W8A16 (weight-only int8) Linear on 2-D operands: the activation stays float.

    Args:
        x: float [M, K]; w_q: int8 [N, K]; w_scale: fp32 [N, 1]; bias: [N] or None; activation: one of
            :data:`ACTIVATIONS`; out_dtype: output dtype; act_smooth: fp32 [K], SmoothQuant's diag(s)⁻¹ for a
            smoothed weight (x · act_smooth is what the smoothed weight expects), or None.

    Returns:
        ``out_dtype`` [M, N] = act((x · act_smooth) · W_qᵀ · s_w[n] + b[n]), in fp32 (the weight W_q · s_w is
        the same per-channel dequantization as the W8A8 scheme's; GPTQ/AWQ-style weight-only inference).
    """
    xf = x.to(torch.float32)
    if act_smooth is not None:
        xf = xf * act_smooth.to(torch.float32)
    y = (xf @ w_q.to(torch.float32).T).mul_(w_scale.reshape(1, -1).to(torch.float32))
    return apply_epilogue(y, torch.ones(1, 1, dtype=torch.float32, device=y.device), bias, activation, out_dtype)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, cast_before_weight: bool) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich, 2019, eq. 4) in x's dtype, computed in fp32: n = x · rsqrt(mean(x²) + eps).

    ``cast_before_weight`` (Hugging Face ``LlamaRMSNorm``: ``weight * n.to(dtype)``): n is rounded to x's
    dtype, then multiplied by the weight in that dtype; else (``torch.nn.RMSNorm``, Gemma with the fp32
    weight ``1 + w``) y = (n · weight) in fp32, rounded once. Returns y [..., K] in x's dtype.
    """
    return _kln.rms_norm_reference(x, weight, eps, cast_before_weight)


def rms_norm_quant(x, weight, eps, cast_before_weight, return_float=True, act_scale=None, act_smooth=None):
    """RMSNorm then quantization of its output (per token, or static / smoothed as :func:`quantize_per_token`):
    ``(y or empty, y_q int8, scale fp32)``."""
    return _kln.rms_norm_quant_reference(x, weight, eps, cast_before_weight, return_float, act_scale, act_smooth)


def layer_norm_quant(
    x: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    return_float: bool = True,
    act_scale: Optional[torch.Tensor] = None,
    act_smooth: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm (Ba et al., 2016) followed by quantization of its output (per token, or static / smoothed as
    :func:`quantize_per_token`).

    Returns:
        ``(y, y_q, scale)``: y in x's dtype [..., K] (the float LayerNorm output, as ``F.layer_norm``; an empty
        tensor unless ``return_float``), y_q int8 [..., K] and scale fp32 [..., 1] from
        :func:`quantize_per_token` of y.
    """
    return _kln.layer_norm_quant_reference(x, normalized_shape, weight, bias, eps, return_float, act_scale, act_smooth)
