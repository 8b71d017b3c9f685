"""``fxquant.compile`` — the front door — and the :class:`QuantizedModel` it returns."""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.utils import _pytree

from . import calibration as calib
from . import checkpoint, ops, passes, report
from ._attrs import parent_for
from .capture import capture
from .config import QuantConfig
from .errors import CalibrationError, InputError

__all__ = ["compile", "QuantizedModel", "InputError"]


# Buffers that keep fp32 whatever dtype the model moves to: per-channel weight scales (the kernels' contract)
# and Gemma's 1 + weight (Gemma computes it in fp32).
_FP32_BUFFERS = ("weight_scale", "input_scale", "input_smooth")
_FP32_SUFFIXES = ("_plus_one",)


_STATIC_NOTE = "static per-tensor activation scales"


def _keeps_fp32(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf in _FP32_BUFFERS or leaf.endswith(_FP32_SUFFIXES)


class QuantizedModel(torch.nn.Module):
    """An int8 model, called like the original with the same inputs and returning the same output
    structure (Hugging Face ``ModelOutput`` fields included).

    Behaves like the module it replaces, for inference:

    * ``.to(dtype / device)``, ``.half()``, ``.bfloat16()``, ``.float()``, ``.cuda()``, ``.cpu()``: float
      parameters and the fused nodes' output dtype follow (unless ``QuantConfig.out_dtype`` fixed it); int8
      weights and fp32 scales keep their dtypes; each call picks the kernel backend for the device it runs on.
    * **Inference only**: it runs without autograd (outputs never require grad); an input that requires grad
      while grad mode is on raises :class:`InputError`, and so does ``train()`` (train the float model, then
      compile it again).
    * Inputs are checked against the capture: a tensor with another rank, or another size in a dimension
      torch.export kept static, raises :class:`InputError` naming the input, the dimension, the captured
      value and what to do.

    Attributes:
        graph_module: the fused ``torch.fx.GraphModule`` (canonical ATen graph with fxquant ops).
        config: the :class:`QuantConfig` it was compiled with.
    """

    def __init__(self, graph_module: fx.GraphModule, config: QuantConfig, rep: report.Report, fixed_kwargs: dict[str, Any],
                 float_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self._report = rep
        self._fixed_kwargs = dict(fixed_kwargs)
        self._signature = inspect.signature(graph_module.forward)
        self._input_shapes = _captured_shapes(graph_module)
        self._float_dtype = float_dtype
        self._source: Optional[checkpoint.SourceInfo] = None  # set by compile: what save_pretrained writes under
        self._uncalibrated = config.activation_scheme == "static-per-tensor"  # cleared by fxquant.calibrate
        # the model's float dtype while the graph computes in QuantConfig.compute_dtype (set by compile; cleared by
        # any dtype move, so it is only ever set while the two differ)
        self._io_dtype: Optional[torch.dtype] = None
        self.training = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.check_calibrated("run")
        return self._run_unchecked(args, kwargs)

    def check_calibrated(self, what: str) -> None:
        """Raise :class:`fxquant.CalibrationError` when the static scheme's scales are not calibrated yet."""
        if self._uncalibrated:
            raise CalibrationError(
                f"this QuantizedModel uses static per-tensor activation scales and is not calibrated, so it cannot be "
                f"{what}: call fxquant.calibrate(qmodel, batches) with a few representative batches first (or compile "
                "with calibration=batches)")

    def _calibrated(self, note: str) -> None:
        self._uncalibrated = False
        if self._report is not None:
            self._report.notes[:] = [n for n in self._report.notes if not n.startswith(_STATIC_NOTE)] + [note]

    def _run_unchecked(self, args: tuple, kwargs: dict) -> Any:
        """Bind and check the inputs, then run the graph (whatever its calibration)."""
        kwargs = {**kwargs, **self._fixed_kwargs}
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            names = [p for p in self._signature.parameters if p not in self._fixed_kwargs]
            raise TypeError(
                f"this QuantizedModel takes the inputs it was captured with, {names} (by name or in that order): {e}. "
                "Call it with those arguments, or compile again with example inputs that include the ones you need."
            ) from None
        self._check_inputs(bound.arguments)
        cast = self._io_dtype is not None
        if cast:  # QuantConfig.compute_dtype: float inputs of the model's dtype in, its outputs back
            args, kwargs = _cast_floats((args, kwargs), self._io_dtype, self._float_dtype)
        with torch.no_grad():
            try:
                out = self.graph_module(*args, **kwargs)
                return _cast_floats(out, self._float_dtype, self._io_dtype) if cast else out
            except AssertionError as e:  # a torch.export guard this check did not anticipate
                if "Guard failed" not in str(e):
                    raise
                raise InputError(f"the inputs do not fit the captured graph ({e}). Call it with inputs shaped like the "
                                 "example inputs, or compile again with example inputs of the shapes you need.") from None

    def _check_inputs(self, arguments: dict[str, Any]) -> None:
        grad = torch.is_grad_enabled()
        for name, value in arguments.items():
            if not isinstance(value, torch.Tensor):
                continue
            if grad and value.requires_grad:
                raise InputError(
                    f"input {name!r} requires grad, but fxquant's int8 graph is inference-only (its fused ops have no "
                    "backward, so no gradient would reach it). Call it under torch.no_grad() or torch.inference_mode(), "
                    "or pass the input detached; to train, train the float model and compile it again.")
            captured = self._input_shapes.get(name)
            if captured is None:
                continue
            shape = tuple(value.shape)
            if len(shape) != len(captured):
                raise InputError(
                    f"input {name!r} has {len(shape)} dimensions {shape}, but the model was captured with "
                    f"{len(captured)}: {_fmt_shape(captured)}. Call it with a {len(captured)}-d tensor, or compile "
                    "again with example inputs of the rank you need.")
            for dim, (got, want) in enumerate(zip(shape, captured)):
                if want is not None and got != want:
                    raise InputError(
                        f"input {name!r} has size {got} in dimension {dim} (shape {shape}), but the model was captured "
                        f"with {want} there, a static dimension ({_fmt_shape(captured)}; '?' marks the dynamic ones). "
                        f"Call it with size {want} in dimension {dim}, or compile again with example inputs of the "
                        "size you need.")

    # ------------------------------------------------------------------------------ module behaviour
    def train(self, mode: bool = True) -> "QuantizedModel":
        """Only ``eval()`` (``train(False)``) is allowed: the int8 graph is inference-only."""
        if mode:
            raise InputError("a QuantizedModel is inference-only and cannot be put in training mode: train the float "
                             "model, then compile it again with fxquant.compile")
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):
        """Every ``.to()`` / ``.half()`` / ``.cuda()`` ... lands here: move and cast as ``nn.Module`` does, then
        put the fp32 buffers back to fp32 and let the fused nodes' output dtype follow a float-dtype change."""
        old = self._float_dtype
        new = fn(torch.empty(0, dtype=old)).dtype if old is not None else None  # what fn does to a float tensor
        # The graph shares the user's Parameter objects: replace them with new ones instead of assigning
        # ``param.data`` (nn.Module's default), which would cast or move the user's model too.
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            super()._apply(fn, recurse)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        for name, buf in list(self.graph_module.named_buffers()):
            if _keeps_fp32(name) and buf.dtype != torch.float32:
                owner, leaf = parent_for(self.graph_module, name)
                owner._buffers[leaf] = buf.to(torch.float32)
        if new is not None and new != old:
            self._float_dtype = new
            if self.config.out_dtype is None:
                _retarget_out_dtype(self.graph_module, old, new)
            self._io_dtype = None  # the caller chose the dtype: inputs and outputs are theirs again
        return self

    def check_exportable(self, what: str) -> None:
        """Raise ValueError when ``QuantConfig.compute_dtype`` rounded the float parameters (see there)."""
        if self._io_dtype is not None:
            raise ValueError(
                f"{what}: this QuantizedModel holds its float parameters in {self._float_dtype} "
                f"(QuantConfig.compute_dtype), rounded from the model's {self._io_dtype}, so {what} would write rounded "
                "values; compile the model again without compute_dtype to export it")

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                        int8_head: bool = False) -> list:
        """Write a compressed-tensors W8A8 checkpoint (config.json + safetensors) that transformers, vLLM and
        ``fxquant.compile(model, inputs, weights=directory)`` load; see :func:`fxquant.checkpoint.save_pretrained`."""
        return checkpoint.save_pretrained(self, directory, max_shard_size=max_shard_size, int8_head=int8_head)

    def report(self) -> report.Report:
        """Every Linear's decision, the pattern counts and the fused node counts (``print()`` it)."""
        return self._report

    def golden(self, only_fused: bool = False) -> str:
        """Deterministic text of the fused graph (see :func:`fxquant.report.golden_text`)."""
        return report.golden_text(self.graph_module, only_fused=only_fused)

    def draw(self, path: Optional[str | os.PathLike] = None, *, block: Optional[str] = None,
             format: Optional[str] = None):  # noqa: A002 - matches matplotlib's savefig
        """Draw the fused graph, top to bottom, with fused nodes coloured by pattern (legend), float Linears
        outlined red with their decision's reason, and the int8 edges (a norm's quantized output into the
        Linears that read it) in blue. Needs matplotlib (``pip install 'fxquant[draw]'``; pure Python, no
        Graphviz).

        Without ``block`` only inputs, outputs, fused nodes, Linears, norms and attention are drawn: reshapes,
        views, transposes, elementwise ops, embeddings, masks, getitems and attributes are collapsed and
        their edges passed through. ``block`` (a module prefix such as ``"encoder.layer.0"``) draws every op
        of that module and below, plus the nodes outside that feed it (grey, dashed).

        Args:
            path: write the drawing there (a temp file in the same folder, renamed into place).
            block: module prefix to draw alone.
            format: ``"svg"`` or ``"png"``; default from ``path``'s suffix, else svg.

        Returns:
            a :class:`fxquant.draw.Drawing`; Jupyter shows it inline (``_repr_svg_``); ``.svg`` holds the text,
            ``.data`` the bytes of ``format``, ``.nodes`` the FX nodes drawn.

        Raises:
            ModuleNotFoundError: matplotlib is not installed (names the ``fxquant[draw]`` extra).
            ValueError: ``block`` matches no node, or the format is neither svg nor png.
            OSError: ``path`` cannot be written.
        """
        from .draw import draw_graph

        return draw_graph(self.graph_module, path, block=block, format=format)

    def to_networkx(self):
        """The fused graph as a ``networkx.DiGraph`` (see :func:`fxquant.report.to_networkx`)."""
        return report.to_networkx(self.graph_module)


def _captured_shapes(gm: fx.GraphModule) -> dict[str, tuple]:
    """Per placeholder: the captured shape, ``None`` for each dynamic dimension (torch.export's meta only)."""
    shapes = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shapes[node.target] = tuple(_static_size(d) for d in val.shape)
    return shapes


def _static_size(d) -> Optional[int]:
    """A dimension's size when the capture fixed it (an int, or a SymInt torch.export specialized to a
    number), else None (dynamic)."""
    if isinstance(d, int):
        return d
    expr = getattr(getattr(d, "node", None), "expr", None)
    return int(expr) if expr is not None and getattr(expr, "is_number", False) else None


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _cast_floats(tree: Any, old: torch.dtype, new: torch.dtype) -> Any:
    """Every tensor of dtype ``old`` in ``tree`` (tuples, dicts, Hugging Face ModelOutputs) cast to ``new``."""
    return _pytree.tree_map_only(torch.Tensor, lambda t: t.to(new) if t.dtype == old else t, tree)


def _retarget_out_dtype(gm: fx.GraphModule, old: torch.dtype, new: torch.dtype) -> None:
    """Fused Linears whose output dtype was the model's (``old``) now produce ``new``."""
    changed = False
    for node in gm.graph.nodes:
        if ops.FusedLinear.is_fused_linear(node):
            args = ops.FusedLinear.of(node)
            if args.out_dtype == old:
                args._replace(out_dtype=new).set(node)
                changed = True
    if changed:
        gm.recompile()


def compile(  # noqa: A001 - the project's front door is named like torch.compile on purpose
    model: torch.nn.Module,
    example_inputs: Optional[tuple | Mapping[str, Any]] = None,
    *,
    config: Optional[QuantConfig] = None,
    weights: Optional[str | os.PathLike | Mapping[str, torch.Tensor]] = None,
    calibration: Optional[Iterable[Any]] = None,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize ``model``'s Linears to W8A8 by graph rewriting.

    Steps: capture (``torch.export`` non-strict with example inputs, ``torch.fx.symbolic_trace``
    without) → canonicalize → annotate (heuristics per Linear) → fuse (``fxquant.patterns``) → lower.

    Args:
        model: the float ``nn.Module``. It is not modified: parameters, buffers, submodules and every
            training flag are as before (a model in training mode is captured in eval semantics, since
            fxquant builds inference graphs, and its flags are restored).
        example_inputs: a tuple of positional arguments or a dict of keyword arguments, as the model is
            called. Batch and sequence dimensions stay dynamic where torch.export allows.
        config: a :class:`QuantConfig`; default ``QuantConfig(target="cuda")`` when the model's
            parameters are on a CUDA device, else ``QuantConfig()`` (target ``cpu``).
        weights: a compressed-tensors W8A8 checkpoint (a directory with config.json and safetensors, a
            ``.safetensors`` file, or a state dict with int8 ``<m>.weight`` and ``<m>.weight_scale``;
            :mod:`fxquant.checkpoint`). Its tensors replace the model's in the compiled graph (the model is
            untouched), its int8 weights and scales are used as stored instead of quantizing, and which
            Linears are int8 follows the checkpoint: its float Linears stay float, and its int8 ones go int8
            wherever a pattern can run them (one that fxquant still keeps float, e.g. a tied weight, runs its
            dequantized weight W_q · s; the report says why).
        calibration: batches of representative inputs, each as the model is called (a tuple of positional args
            or a dict of keyword args; a list, or any iterable, which is read once). Used for
            ``QuantConfig.smoothquant`` (the float model's per-channel activation maxima) and, with
            ``activation_scheme="static-per-tensor"``, for the static scales (:func:`fxquant.calibrate`).
        progress: show tqdm progress bars while calibrating.

    Returns:
        A :class:`QuantizedModel`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``example_inputs`` is not a tuple, dict or None;
            ``config`` is not a QuantConfig.
        fxquant.TraceError: the model could not be captured (the cause is chained).
        fxquant.CheckpointError: ``weights`` cannot be read or does not fit the model (see
            :func:`fxquant.checkpoint.read_checkpoint` and :func:`fxquant.checkpoint.install`).
        fxquant.CalibrationError: ``smoothquant`` without ``calibration``, or with ``weights`` (a checkpoint's
            int8 weights are used as stored); ``calibration`` that nothing uses (dynamic scheme, no SmoothQuant);
            calibration data that is empty or does not fit the model.

    Numerics: compressed-tensors W8A8 "int-quantized" (see :mod:`fxquant.reference`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxquant.compile expects a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, Mapping)):
        hint = " (wrap a single tensor as (x,))" if isinstance(example_inputs, torch.Tensor) else ""
        raise TypeError(
            f"example_inputs must be a tuple of positional args or a dict of keyword args, got {type(example_inputs).__name__}{hint}"
        )
    if config is None:
        on_cuda = any(p.device.type == "cuda" for p in model.parameters())
        config = QuantConfig(target="cuda" if on_cuda else "cpu")
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fxquant.QuantConfig, got {type(config).__name__}")

    static = config.activation_scheme == "static-per-tensor"
    if config.smoothquant is not None and weights is not None:
        raise CalibrationError("QuantConfig.smoothquant rescales the float weights, but weights= gives int8 weights to use "
                               "as stored; drop one of the two (a checkpoint made with SmoothQuant has it folded in)")
    if config.smoothquant is not None and calibration is None:
        raise CalibrationError(f"QuantConfig(smoothquant={config.smoothquant}) needs calibration data: "
                               "fxquant.compile(model, example_inputs, config=config, calibration=batches)")
    if calibration is not None and not static and config.smoothquant is None:
        raise CalibrationError("calibration data was given but nothing uses it: the dynamic per-token scheme computes its "
                               "scales at run time; set QuantConfig(activation_scheme='static-per-tensor') and/or "
                               "smoothquant=alpha, or drop calibration=")
    calls = calib.batches_of(calibration) if calibration is not None else None
    stored = checkpoint.read_checkpoint(weights) if weights is not None else None
    notes = []
    if any(m.training for m in model.modules()):
        notes.append("the model was in training mode: captured in eval semantics (dropout off); its flags are unchanged")
    captured = capture(model, example_inputs)
    ops.register_inductor_decompositions()
    gm = captured.graph_module
    source = checkpoint.SourceInfo.of(model)
    if stored is not None:
        config = _checkpoint_config(gm, stored, config, source)
        notes.append(f"weights: {len(stored.int8)} int8 Linear(s) and {len(stored.floats)} float tensor(s) from "
                     f"{stored.origin}, used as stored")
    qmax = passes.resolve_weight_qmax(config)
    passes.annotate(gm, config, qmax, model)
    factors = {}
    if config.smoothquant is not None:
        float_model = QuantizedModel(gm, config, None, captured.fixed_kwargs)  # the annotated float graph, run as is
        factors = calib.smoothquant(gm, float(config.smoothquant), calls, float_model._run_unchecked, progress)
    stats = passes.fuse(gm, fuse_siblings=config.spec.fuse_siblings)
    passes.lower(gm, config, qmax)
    smoothed = calib.install_smoothing(gm, factors)
    decisions = passes.collect_decisions(gm)
    if config.smoothquant is not None:
        n_lin = sum(1 for d in decisions if any(p.startswith("smoothquant") for p in d.patterns))
        notes.append(f"SmoothQuant (alpha={config.smoothquant:g}) on {smoothed} quantized input(s), {n_lin} Linear(s): "
                     "weights W*diag(s), the quantizer multiplies by 1/s (pattern column: smoothquant)")
    if static:
        notes.append(f"{_STATIC_NOTE}: not calibrated yet; call fxquant.calibrate(qmodel, batches)")
    if config.target == "cpu" and qmax < 127 and config.weight_qmax is None:
        notes.append(
            f"this CPU has no VNNI: int8 weights use [-{qmax}, {qmax}] so oneDNN's u8*s8 int16 pair sums cannot saturate"
        )
    tied = [d for d in decisions if d.quantize and d.extra_bytes]
    if tied:
        notes.append(f"{len(tied)} Linear(s) tied to an embedding run int8 from their own int8 copy "
                     f"(+{sum(d.extra_bytes for d in tied) / 2**20:.1f} MiB); the embeddings stay float")
    if captured.fixed_kwargs:
        notes.append(f"captured with {captured.fixed_kwargs} (no KV cache in the graph)")
    masks = captured.attention_masks
    if any(masks.values()):
        notes.append(f"attention: {masks['all-true']} all-true mask(s) removed and {masks['causal']} causal mask(s) "
                     "replaced by is_causal=True, so SDPA keeps its FlashAttention kernels (fxquant.attention)")
    if not captured.dynamic:
        notes.append("torch.export could not keep input dims dynamic: call with the example inputs' shapes")
    rep = report.Report(decisions, stats, report.node_counts(gm), config.target, captured.front_end, qmax, notes,
                        report.gemm_rows(gm))
    dtypes = {d.out_dtype for d in decisions if d.quantize}
    float_dtype = dtypes.pop() if len(dtypes) == 1 and config.out_dtype is None else None
    qm = QuantizedModel(gm, config, rep, captured.fixed_kwargs, float_dtype)
    qm._source = source
    if config.compute_dtype is not None and config.compute_dtype != float_dtype:
        if float_dtype is None:
            notes.append(f"QuantConfig.compute_dtype={config.compute_dtype} not applied: the fused Linears' output "
                         "dtypes are mixed or fixed by QuantConfig.out_dtype, so the model has no one float dtype to replace")
        else:
            qm.to(config.compute_dtype)  # before calibration: the static scales are those of what runs
            qm._io_dtype = float_dtype
            notes.append(f"float work in {str(config.compute_dtype).replace('torch.', '')} (QuantConfig.compute_dtype); "
                         f"inputs and outputs stay {str(float_dtype).replace('torch.', '')}")
    if static and calls is not None:
        calib.calibrate_calls(qm, calls, config.calibration_method, float(config.percentile), progress)
    return qm


def _checkpoint_config(gm: fx.GraphModule, stored: "checkpoint.StoredWeights", config: QuantConfig,
                       source: "checkpoint.SourceInfo") -> QuantConfig:
    """Install a checkpoint into the captured graph and return the config that follows it: the checkpoint's
    float Linears skipped, every speed rule lifted for its int8 ones (the checkpoint decided), and a weight
    range that covers the stored weights (127, or 63 when every stored |W_q| ≤ 63, which keeps the CPU's
    7-bit oneDNN path exact)."""
    linears = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            linears.setdefault(passes.linear_name(gm, node), node)
    floats = checkpoint.install(gm, stored, linears, source)
    peak = max(int(w.abs().max()) if w.numel() else 0 for w, _ in stored.int8.values())
    return dataclasses.replace(config, skip=(*config.skip, *floats), min_ratio=0, min_n_unfused=0,
                               gated_output_int8=True, weight_qmax=63 if peak <= 63 else 127)
