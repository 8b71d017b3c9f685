"""Triton kernels for fxquant's fused int8 nodes (installed as ``fxquant.kernels``).

Empty for now: the CPU path runs through ``fxquant.backends`` (oneDNN / torch._int_mm). The Triton W8A8
GEMM, per-token quantize and LayerNorm+quantize kernels land here, each beside its pure-torch reference,
and plug in as the ``triton`` backend of ``fxquant.backends.BACKENDS``.
"""
