"""``torch.compile`` of a program's methods: the Inductor options fxquant compiles with, the key that ties
Inductor's caches to fxquant's decompositions (:mod:`fxquant.ir.ops`), and :func:`compiled_graph`, which
``QuantizedModel`` calls for ``forward`` (``compile(..., compile_forward=)``) and for the generation methods
(``compile_generation=``). The compiled functions live in the program's :class:`~fxquant.generation.GenerationState`
(``compiled``), which is dropped with the graphs' tensors (``.to()``) and after calibration.
"""

from __future__ import annotations

import functools
import time

import torch

from .generation import GENERATION_METHODS, GenerationState
from .ir.notes import NoteKind

__all__ = ["CPU_INDUCTOR_OPTIONS", "compiled_graph"]


# Inductor options for the graphs fxquant compiles on a CPU: Inductor's defaults. realize_opcount_threshold 4 (default
# 30) was set while the per-token GELU epilogue used erf: it stored the GELU once instead of recomputing it in the
# next Linear's amax and quantization loops (MiniLM 32 x 128, 2 AMX cores: 89.4 -> 74.4 ms). With the sigmoid form
# of that GELU (fxquant.ir.ops, the int8_linear_q decomposition) recomputing is cheaper than the memory traffic of
# storing and re-reading the [M, N] fp32 tensor: threshold 30 75-77 ms against 81-82 with 4, alternating processes
# (docs/benchmarks.md, issue #24). CUDA keeps Inductor's defaults too (not measured there).
CPU_INDUCTOR_OPTIONS: dict = {}


# Inductor's combo kernels (independent kernels of the decode graph, such as RoPE on q and the k / v cache writes,
# launched as one) in decode graphs of at most this many rows, on CUDA: measured with Llama-3-8B shapes cut to 8 layers
# on an H100 (docs/benchmarks.md, thirteenth and fourteenth sessions), ms a token without -> with: batch 1 1.068 ->
# 1.047-1.049, batch 2 1.148 -> 1.124-1.126, batch 8 1.229-1.233 -> 1.209, batch 32 1.505 -> 1.522-1.533 (slower).
# Batches 9-31 are not measured; the line is drawn at the largest measured batch where they paid.
COMBO_MAX_ROWS = 8


def _inductor_options(on_cpu: bool, device: torch.device | None = None, rows: int | None = None) -> dict:
    """Options of the graphs fxquant compiles: :data:`CPU_INDUCTOR_OPTIONS` on a CPU; given the ``device`` of a
    decode graph whose fxquant kernels use programmatic dependent launch (``kernels.common.use_pdl``), Inductor's
    kernels too (``triton.enable_pdl``, where this torch has it; an 8-layer decode step on an H100 2.1 % faster,
    fxquant's kernels included; prefill is left without it, which lengthened its time to first token by 0.3 ms in
    that run) and, for a decode graph of at most :data:`COMBO_MAX_ROWS` ``rows``, Inductor's combo kernels; and
    everywhere a no-op post-grad pass whose ``uuid`` is a hash of fxquant's decomposition sources,
    so that Inductor's on-disk caches (FX graph, AOT autograd), which do not see decompositions, never serve a graph
    compiled by another fxquant."""
    options = dict(CPU_INDUCTOR_OPTIONS) if on_cpu else {}
    if not on_cpu and device is not None and device.type == "cuda":
        from .kernels.common import use_pdl
        import torch._inductor.config as inductor_config
        if use_pdl(device) and hasattr(inductor_config.triton, "enable_pdl"):
            options["triton.enable_pdl"] = True
        if rows is not None and rows <= COMBO_MAX_ROWS and hasattr(inductor_config, "combo_kernels"):
            options["combo_kernels"] = True
    key = _cache_key_pass()
    if key is not None:
        options["post_grad_custom_pre_pass"] = key
    return options


@functools.cache
def _cache_key_pass():
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - an Inductor without custom passes: its caches are not keyed on fxquant
        return None
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in (root / "ir" / "ops.py", root / "ir" / "reference.py", root.parent / "kernels" / "quantize.py",
                 root.parent / "kernels" / "layer_norm_quant.py", root.parent / "kernels" / "common.py"):
        if path.is_file():
            digest.update(path.read_bytes())
    fingerprint = digest.hexdigest()

    class FxquantCacheKey(CustomGraphPass):
        """No-op pass; its uuid keys Inductor's caches on fxquant's decompositions."""

        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return "fxquant-" + fingerprint

    return FxquantCacheKey()


def _compile_failure(e: BaseException) -> bool:
    """An error of torch.compile itself (Dynamo, Inductor, the C++ / Triton compile), not of the model's inputs."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TorchDynamoException", "InductorError", "BackendCompilerFailed", "CppCompileError"})


def compiled_graph(qmodel, method: str, gm):
    """``gm`` (the graph of ``method``) through ``torch.compile``: the decode graph at its static shapes, the
    prefill graph with dynamic shapes (one compile serves every prompt length), any other method (``forward``) as
    torch.compile decides (the example's shapes first, dynamic after a second shape). Inductor fuses the float work
    between fxquant's ops (norms, RoPE, residual adds, the cache writes, the per-token quantizations and the GEMM
    epilogues on a CPU), which stay opaque calls. The first call compiles; its time goes to the report. A method
    that is not a generation method falls back to its eager graph, for good and with a note, when torch.compile
    fails (no C++ compiler, say)."""
    state: GenerationState = qmodel._generation_state
    fn = state.compiled.get(method)
    if fn is not None:
        return fn
    device = qmodel._device()  # a program lives on one device
    on_cpu = device.type == "cpu"
    dynamic = {"prefill": True, "decode": False}.get(method)
    spec = qmodel.program.generation
    decode = method == "decode"
    options = _inductor_options(on_cpu, device if decode else None,
                                spec.max_batch_size if decode and spec is not None else None)
    compiled = torch.compile(gm, dynamic=dynamic, options=options)

    def first_call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:
            if method in GENERATION_METHODS or not _compile_failure(e):
                raise
            qmodel._compile_forward = False
            if qmodel._report is not None:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                qmodel._report.notes.add(NoteKind.COMPILED, f"{method}: runs eager; torch.compile failed ({first[:200]}); "
                                         "pass compile_forward=False to skip the attempt", "compile")
            return gm(*args, **kwargs)
        state.compiled[method] = compiled
        if qmodel._report is not None:
            qmodel._report.notes.add(NoteKind.GENERATION if method in GENERATION_METHODS else NoteKind.COMPILED,
                                     f"{method}: compiled by torch.compile (Inductor) on first use in "
                                     f"{time.perf_counter() - t0:.1f} s", "generate" if method in GENERATION_METHODS
                                     else "compile")
        return out

    return first_call
