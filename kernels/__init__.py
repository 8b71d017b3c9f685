"""Triton kernels for fxquant's fused int8 nodes (installed as ``fxquant.kernels``).

=========================  ===========================================================================
module                     kernel (each file: math + source, configs, ``@triton.jit``, launcher, reference)
=========================  ===========================================================================
``w8a8_gemm``              int8 [M, K] × int8 [N, K] → int32 acc → (·s_w·s_x + b, activation) → bf16/fp16/fp32;
                           ``swiglu``: a dual GEMM over W = [gate; up] [2I, K] → silu(g)·u [M, I]
``w8a16_gemm``             float [M, K] × int8 [N, K] (int8 → x's dtype in registers, fp32 acc) → (·s_w + b,
                           activation, swiglu) for decode (M ≤ 64): split-K with an in-kernel last-arriver reduction
``quantize``               one-pass dynamic per-token quantization: float [M, K] → int8 [M, K] + fp32 [M, 1]
``decode_attention``       grouped-query attention over the filled KV cache (up to ``cache_position``): online
                           softmax split along the cache (flash-decoding), K and V read once per kv head; its SDPA
                           form (``decode_attention_sdpa``) where the kernel does not run
``layer_norm_quant``       LayerNorm or RMSNorm (``rms_norm_quant``; HF Llama or torch/Gemma weight order) +
                           per-token quantization in one read of x (float output optional)
``common``                 activation epilogue (Triton, and ``activation_torch``), exact rounding, device detection
``launch``                 ``LaunchCache``: relaunch through Triton's private C launcher, only on checked Triton
                           versions (``CHECKED_TRITON``); else Triton's ``kernel[grid](...)``
=========================  ===========================================================================

The kernels know nothing of graphs; ``fxquant.targets.backends`` runs them as the ``triton`` backend on CUDA (and on
CPU where a Triton CPU backend is installed). Without Triton the modules import and their pure-torch
references work; the launchers raise ``RuntimeError``.
"""
