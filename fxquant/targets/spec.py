"""The targets fxquant compiles for: each one's kernel-driven defaults (:class:`TargetSpec`), every number
with the measurement behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["TargetSpec", "TARGETS"]


@dataclass(frozen=True)
class TargetSpec:
    """Kernel-driven defaults of one target.

    Attributes:
        min_ratio: smallest beneficial ratio K·N/(K+N) at which int8 pays off (see ``heuristics``).
        alignment: K and N must be multiples of this for the target's int8 kernels.
        weight_qmax: largest |int8 weight| (127 = full narrow range; 63 = 7-bit, for x86 CPUs without VNNI
            whose u8·s8 int16 pair sums would otherwise saturate). ``None``: decided at compile time by
            probing the CPU backend (:func:`fxquant.targets.backends.cpu_int8_full_range_exact`; the environment
            variable ``FXQUANT_CPU_ISA`` forces it, see :mod:`fxquant.targets.backends`).
        min_n_unfused: a Linear whose input is not a LayerNorm output (so it needs a quantization pass of
            its own) goes int8 only when the int8 Linears reading that input have N >= this in total
            (``heuristics.quantize_pass_pays_off``); 0 disables the rule.
        fuse_siblings: int8 Linears reading one quantized input run as one GEMM over their concatenated
            weights (``rewrite.fuse_sibling_linears``), and the ratio rule is judged on that GEMM.
        gated_output_int8: Linears reading a gated MLP's product (``down_proj`` after SwiGLU / GeGLU) go
            int8 too; off by default, for accuracy (``heuristics.gated_output_int8``).
        device: the device type its kernels run on (``"cpu"`` or ``"cuda"``).
        backends: the GEMM backends it lowers to, in order of preference; the lowering pass takes the first
            that can run on this machine (``fxquant.targets.backends.backend_for_target``).
    """

    min_ratio: float
    alignment: int
    weight_qmax: Optional[int]
    min_n_unfused: int = 0
    fuse_siblings: bool = False
    gated_output_int8: bool = False
    device: str = "cpu"
    backends: tuple[str, ...] = ("triton", "aten")


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
    "cpu": TargetSpec(min_ratio=96.0, alignment=1, weight_qmax=None, fuse_siblings=True,
                      backends=("triton", "onednn", "aten")),
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
    "cuda": TargetSpec(min_ratio=512.0, alignment=8, weight_qmax=127, min_n_unfused=2048, fuse_siblings=True,
                       device="cuda"),
}
