"""The fast relaunch path of fxquant's Triton kernels, kept apart because it leans on Triton internals.

Triton's ``kernel[grid](...)`` goes through the autotuner, the heuristics and the JIT binder on every call:
28-49 µs of host time per launch measured on an H200 host (Triton 3.6; ``F.linear`` costs 9 µs), which
makes small and medium GEMMs host-bound. :class:`LaunchCache` keeps, after the first launch of a
specialization, the ``CompiledKernel`` Triton returned (and the autotuner's config), and later calls go
straight to the C launcher Triton built for it.

This uses Triton's *private* launcher ABI, which changes between releases without notice:
``CompiledKernel.run`` (the backend's ``CudaLauncher``) and its ``launch`` function with its 13 leading
arguments (grid x/y/z, stream, ``CompiledKernel.function``, ``launch_cooperative_grid``, ``launch_pdl``,
global / profile scratch, ``CompiledKernel.packed_metadata``, the launch hooks' metadata and the enter /
exit hooks), ``global_scratch_size`` / ``profile_scratch_size``, and ``triton.knobs.runtime.
launch_enter_hook``. It was checked against Triton 3.6 (CUDA, NVIDIA H200: ``bench/check_kernels_gpu.py``
compares cached and uncached launches bit for bit). It is used only where ``triton.__version__`` starts
with one of :data:`CHECKED_TRITON`; on any other version :meth:`LaunchCache.enabled` is False and every
call takes Triton's public ``kernel[grid](...)`` path (slower on the host, never wrong). After checking a
new Triton release on a GPU, add its prefix.
"""

from __future__ import annotations

import torch

from .common import HAS_TRITON, interpreting, triton

__all__ = ["LaunchCache", "CHECKED_TRITON", "version_checked"]

CHECKED_TRITON: tuple = ("3.6.",)  # prefixes of triton.__version__ this launcher ABI was checked on


def version_checked() -> bool:
    """Is the installed Triton one whose launcher ABI this module was checked on (:data:`CHECKED_TRITON`)?
    Read on every call (a string prefix test), so tests can patch either side."""
    return HAS_TRITON and str(getattr(triton, "__version__", "")).startswith(CHECKED_TRITON)


class LaunchCache:
    """Relaunch an already compiled kernel without Triton's Python launch path (see the module docstring).

    Pointer arguments go to the C launcher as integers (a tensor argument costs the launcher a Python method
    call and a ``cuPointerGetAttribute``). Where Triton's internals differ from what this expects (a kernel
    that needs scratch memory, a launch hook such as a profiler's) a relaunch falls back to
    ``CompiledKernel[grid](...)``; on an unchecked Triton version the cache is off altogether.

    The key must hold everything Triton specializes a compiled kernel on, or a wrong binary would run:
    the caller's constexprs and autotune key, each tensor's dtype and 16-byte alignment, and each integer
    argument's "== 1" and "% 16 == 0" (Triton's integer specialization). CUDA only; never under the
    interpreter.
    """

    def __init__(self) -> None:
        self._entries: dict = {}

    @staticmethod
    def enabled(device: torch.device) -> bool:
        return device.type == "cuda" and not interpreting() and version_checked()

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


