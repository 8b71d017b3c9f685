"""``fxquant.compile`` — the front door — and the :class:`QuantizedModel` it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import platform
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.utils import _pytree

from .config import QuantConfig, check_calibration
from .errors import CalibrationError, InputError
from .export import compressed_tensors
from .compiled import compiled_graph
from .generation import GENERATION_METHODS, GenerationState
from .generation import generate as _generate
from .frontend import kv_cache
from .frontend.capture import capture
from .ir import ops
from .ir.meta import collect_decisions
from .ir.notes import NoteKind, Notes
from .passes.base import CompileContext, debug_dir_from_env, dump_captured, run_pipeline
from .passes.pipeline import analysis_passes, transform_passes
from .plan.planner import QuantPlan, linear_name, linear_nodes, resolve_weight_qmax
from .program import Method, Program
from .targets import backends
from .tools import report
from .tools.draw import draw_graph
from .weights import calibration as calib
from .weights import checkpoint
from .weights.store import WeightStore

__all__ = ["compile", "calibrate", "QuantizedModel", "InputError"]


# Buffers that keep fp32 whatever dtype the model moves to: per-channel weight scales (the kernels' contract)
# and Gemma's 1 + weight (Gemma computes it in fp32).
_FP32_BUFFERS = ("weight_scale", "input_scale", "input_smooth")
_FP32_SUFFIXES = ("_plus_one",)


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

    * Methods: ``qmodel(...)`` runs ``"forward"``; ``qmodel.method(name)(...)`` runs another method captured
      with ``compile(..., methods={name: inputs})``. Every method's graph executes one plan and references one
      weight store (``qmodel.program``): no tensor is held twice.

    Attributes:
        graph_module: the fused ``torch.fx.GraphModule`` of ``"forward"`` (canonical ATen graph with fxquant ops).
        program: the :class:`fxquant.program.Program` (methods, plan, store).
        config: the :class:`QuantConfig` it was compiled with.
    """

    def __init__(self, program: Program, rep: Optional[report.Report], float_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.program = program
        self.graph_module = program.forward.graph_module
        self.config = program.config
        self._report = rep
        self._float_dtype = float_dtype
        self._uncalibrated = self.config is not None and self.config.activation_scheme == "static-per-tensor"  # cleared by fxquant.calibrate
        # the model's float dtype while the graph computes in QuantConfig.compute_dtype (set by compile; cleared by
        # any dtype move, so it is only ever set while the two differ)
        self._io_dtype: Optional[torch.dtype] = None
        self._masters: dict[int, torch.Tensor] = {}  # id(rounded compute tensor) -> the model's own (compute_dtype)
        self._conversion: Optional[dict] = None  # set only while _apply_compute_dtype's dtype move runs
        self._generation_state = GenerationState()  # the decode step's CUDA graph, once captured
        self._compile_generation: Optional[bool] = None  # compile(..., compile_generation=...); None: on CUDA
        self._compile_forward: Optional[bool] = None  # compile(..., compile_forward=...); None: see compiles_forward
        self.scheme_scores: Optional[dict] = None  # activation_scheme="auto": {candidate: (mean, min) cosine}
        self.training = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.check_calibrated("run")
        return self._run_unchecked(args, kwargs)

    @property
    def methods(self) -> tuple[str, ...]:
        """The names of the captured methods, ``"forward"`` first."""
        return tuple(self.program.methods)

    def method(self, name: str):
        """A callable running method ``name`` with the same checks as ``qmodel(...)``.

        Raises:
            KeyError: no method of that name (the message lists the captured ones).
        """
        if name not in self.program.methods:
            raise KeyError(f"this QuantizedModel has no method {name!r}; it has {list(self.program.methods)} "
                           "(compile with methods={name: example_inputs} to capture more)")

        def run(*args: Any, **kwargs: Any) -> Any:
            self.check_calibrated("run")
            return self._run_unchecked(args, kwargs, name)

        return run

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: Optional[int] = None, do_sample: Optional[bool] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, num_return_sequences: Optional[int] = None,
                 repetition_penalty: Optional[float] = None, no_repeat_ngram_size: Optional[int] = None,
                 min_length: Optional[int] = None, min_new_tokens: Optional[int] = None,
                 eos_token_id: Optional[int | list[int]] = None, pad_token_id: Optional[int] = None,
                 generation_config=None, streamer=None, logits_processor=None, stopping_criteria=None,
                 use_cache: Optional[bool] = None, stop_strings: Optional[str | list[str]] = None, tokenizer=None,
                 max_time: Optional[float] = None, **kwargs: Any) -> torch.Tensor:
        """Generate tokens with the program's KV cache, as transformers' ``generate`` does for a decoder-only LM
        (:mod:`fxquant.generation`).

        Args:
            input_ids: int64 [batch, prompt] with batch ≤ ``max_batch_size`` (compile argument); left-padded
                when the prompts differ in length.
            attention_mask: [batch, prompt], 1 for real tokens and 0 for (left) padding; default all ones.
            max_new_tokens: tokens to add per row; default from ``generation_config`` (``max_length`` 20).
            do_sample: sample instead of taking the argmax (seed with ``torch.manual_seed``).
            temperature, top_k, top_p, min_p: sampling warpers (transformers' ``TemperatureLogitsWarper``,
                ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``, in that order).
            num_return_sequences: samples per prompt (needs ``do_sample``); the result holds them in consecutive
                rows, ``batch × num_return_sequences`` ≤ ``max_batch_size``.
            repetition_penalty: transformers' ``RepetitionPenaltyLogitsProcessor`` (CTRL, Keskar et al., 2019:
                a logit of a token already in the row is divided by the penalty where positive, multiplied where
                negative); left padding is skipped as transformers ≥ 5.2x skips it.
            no_repeat_ngram_size: no n-gram of this size occurs twice in a row (``NoRepeatNGramLogitsProcessor``).
            min_length, min_new_tokens: EOS is masked until the row holds this many tokens (prompt included) /
                new tokens (``MinLengthLogitsProcessor``, ``MinNewTokensLengthLogitsProcessor``; with an EOS id).
            eos_token_id: one id or a list; a row stops at its first EOS and is then padded. Default the model's
                (``generation_config.eos_token_id`` when compiled).
            pad_token_id: what finished rows are padded with; default the model's, else the first EOS id, else 0.
            generation_config: a ``transformers.GenerationConfig``; keyword arguments override its fields
                (pass ``model.generation_config`` to use the model's sampling settings too).
            streamer: a transformers streamer (``put``/``end``), e.g. ``TextStreamer`` (batch 1).
            logits_processor: transformers ``LogitsProcessor`` objects (a ``LogitsProcessorList``) run after the
                built ones, before the sampling warpers; one of a built one's type replaces it (transformers'
                rule). Each is called ``(ids so far [B, t] int64, scores [B, V] fp32) -> scores``.
            stopping_criteria: transformers ``StoppingCriteria`` objects, called after each token as
                ``(ids so far, None) -> [B] bool``; a row stops where one says so (padded after it only when an
                EOS id is set, as transformers does).
            use_cache: accepted for callers written for transformers; the KV cache is always used (the tokens
                are the same).
            stop_strings, tokenizer: a row stops once its text ends with one of the strings
                (``StopStringCriteria``, which needs the model's tokenizer).
            max_time: seconds; generation stops after the token during which they ran out (``MaxTimeCriteria``;
                the clock starts when generate starts, the first call's compilation included).
            **kwargs: also ``return_dict_in_generate``, ``output_scores``, ``output_logits`` (as transformers:
                the result is then a ``GenerateDecoderOnlyOutput`` whose ``scores`` / ``logits`` hold one [batch,
                vocab] fp32 tensor per new token, after / before the processors). transformers' other generation
                settings are accepted only at their off value (``num_beams=1``, ...).

        Returns:
            int64 [batch × num_return_sequences, prompt + n] on the model's device: the prompt, then n ≤
            max_new_tokens tokens (n is less when every row reached EOS or a stopping criterion); with
            ``return_dict_in_generate``, transformers' ``GenerateDecoderOnlyOutput`` holding it as ``sequences``.

        Raises:
            InputError: no generation methods (compiled with ``generation=False`` or not a causal LM), bad
                ``input_ids`` / ``attention_mask``, more rows than ``max_batch_size``, or prompt +
                ``max_new_tokens`` above ``max_cache_len`` (the message names both and what to compile with).
            ValueError: a generation feature fxquant does not implement (beam search, assisted decoding, ...),
                from the keyword arguments or ``generation_config``; a setting out of range;
                ``num_return_sequences`` > 1 without ``do_sample``; ``stop_strings`` without ``tokenizer``.
            TypeError: a keyword transformers' ``generate`` does not know either.
            CalibrationError: a static-scheme model that is not calibrated.
        """
        return _generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         num_return_sequences=num_return_sequences, repetition_penalty=repetition_penalty,
                         no_repeat_ngram_size=no_repeat_ngram_size, min_length=min_length, min_new_tokens=min_new_tokens,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, generation_config=generation_config,
                         streamer=streamer, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                         use_cache=use_cache, stop_strings=stop_strings, tokenizer=tokenizer, max_time=max_time,
                         **kwargs)

    def _call_graph(self, method: str, *args: torch.Tensor) -> Any:
        """Run a method's graph on inputs fxquant built itself (no binding or shape checks; outputs in the
        model's float dtype when ``QuantConfig.compute_dtype`` differs); ``"prefill"`` and ``"decode"`` through
        ``torch.compile`` where :meth:`compiles_generation` says so."""
        fn = self.program.methods[method].graph_module
        if method in GENERATION_METHODS and self.compiles_generation():
            fn = compiled_graph(self, method, fn)
        out = fn(*args)
        return _cast_floats(out, self._float_dtype, self._io_dtype) if self._io_dtype is not None else out

    def compiles_generation(self) -> bool:
        """Whether ``generate`` runs the prefill and decode graphs through ``torch.compile``:
        ``compile(..., compile_generation=)`` when given, else as :meth:`compiles_forward` decides by default (the
        same machine rule and ``$FXQUANT_TORCH_COMPILE``); False without generation methods."""
        if self._compile_generation is not None:
            return self._compile_generation
        return "decode" in self.program.methods and self._torch_compile_default()

    def compiles_forward(self) -> bool:
        """Whether ``qmodel(...)`` (and the methods captured with ``methods=``) run the graph through ``torch.compile``
        (Inductor fuses the quantizations and epilogues with the float work around them): ``compile(...,
        compile_forward=)`` when given, else ``$FXQUANT_TORCH_COMPILE`` (``0`` / ``1``) when set, else True on a CUDA
        device and on an x86 CPU with a C++ compiler (:func:`fxquant.targets.backends.cpp_compiler`; ARM CPUs: not
        measured there, so off)."""
        if self._compile_forward is not None:
            return self._compile_forward
        return self._torch_compile_default()

    def _device(self) -> torch.device:
        """The program's device (every method's tensors live on one): its first parameter's or buffer's."""
        t = next(itertools.chain(self.parameters(), self.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    def _torch_compile_default(self) -> bool:
        env = os.environ.get("FXQUANT_TORCH_COMPILE", "").strip()
        if env in ("0", "1"):
            return env == "1"
        if self._device().type == "cuda":
            return True
        # x86 only: Inductor's CPU code for fxquant's decompositions is measured and tested there, not on ARM
        return platform.machine().lower() in ("x86_64", "amd64") and backends.cpp_compiler() is not None

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
            self._report.notes.drop([NoteKind.STATIC_UNCALIBRATED, NoteKind.STATIC_CALIBRATED])
            self._report.notes.add(NoteKind.STATIC_CALIBRATED, note, "calibrate")

    def _run_unchecked(self, args: tuple, kwargs: dict, method: str = "forward", compiled: bool = True) -> Any:
        """Bind and check the inputs, then run the method's graph (whatever its calibration): through torch.compile
        where :meth:`compiles_forward` says so, unless ``compiled`` is False (calibration's observers run eager)."""
        m = self.program.methods[method]
        kwargs = {**kwargs, **m.fixed_kwargs}
        try:
            bound = m.signature.bind(*args, **kwargs)
        except TypeError as e:
            names = [p for p in m.signature.parameters if p not in m.fixed_kwargs]
            raise TypeError(
                f"this QuantizedModel takes the inputs it was captured with, {names} (by name or in that order): {e}. "
                "Call it with those arguments, or compile again with example inputs that include the ones you need."
            ) from None
        self._check_inputs(bound.arguments, m.input_shapes)
        cast = self._io_dtype is not None
        if cast:  # QuantConfig.compute_dtype: float inputs of the model's dtype in, its outputs back
            args, kwargs = _cast_floats((args, kwargs), self._io_dtype, self._float_dtype)
        fn = m.graph_module
        mode = contextlib.nullcontext()
        if compiled and method not in GENERATION_METHODS and self.compiles_forward():
            fn = compiled_graph(self, method, fn)
            # one grad mode for the compiled graph whatever the caller's (no_grad or inference_mode): Dynamo guards on
            # the inputs' dispatch keys, which inference_mode changes, and would compile a second time
            mode = torch.inference_mode(False)
        with mode, torch.no_grad():
            try:
                out = fn(*args, **kwargs)
                return _cast_floats(out, self._float_dtype, self._io_dtype) if cast else out
            except AssertionError as e:  # a torch.export guard this check did not anticipate
                if "Guard failed" not in str(e):
                    raise
                raise InputError(f"the inputs do not fit the captured graph ({e}). Call it with inputs shaped like the "
                                 "example inputs, or compile again with example inputs of the shapes you need.") from None

    def _check_inputs(self, arguments: dict[str, Any], input_shapes: dict[str, tuple]) -> None:
        grad = torch.is_grad_enabled()
        for name, value in arguments.items():
            if not isinstance(value, torch.Tensor):
                continue
            if grad and value.requires_grad:
                raise InputError(
                    f"input {name!r} requires grad, but fxquant's int8 graph is inference-only (its fused ops have no "
                    "backward, so no gradient would reach it). Call it under torch.no_grad() or torch.inference_mode(), "
                    "or pass the input detached; to train, train the float model and compile it again.")
            captured = input_shapes.get(name)
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
        """Every ``.to()`` / ``.half()`` / ``.cuda()`` ... lands here: move and cast every tensor of every method's
        graph once (a tensor two graphs share stays shared), keep the fp32 buffers fp32, and let the fused
        nodes' output dtype follow a float-dtype change.

        The graphs share the user's Parameter objects: they are replaced with new ones, never written through
        ``param.data`` (nn.Module's default), which would cast or move the user's model too."""
        old = self._float_dtype
        new = fn(torch.empty(0, dtype=old)).dtype if old is not None else None  # what fn does to a float tensor
        self._generation_state = GenerationState()  # a captured decode graph holds the old tensors
        memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def convert(t: torch.Tensor, keep_fp32: bool) -> torch.Tensor:
            if id(t) not in memo:
                with torch.no_grad():
                    if keep_fp32:  # only fn's device move: a round trip through fn's dtype would round the values
                        out = t.to(device=fn(torch.empty(0, dtype=t.dtype, device=t.device)).device,
                                   dtype=torch.float32)
                    else:
                        out = fn(t)
                if isinstance(t, torch.nn.Parameter):
                    out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
                memo[id(t)] = (t, out)
            return memo[id(t)][1]

        for mod in self._graph_submodules():
            for name, param in mod._parameters.items():
                if param is not None:
                    mod._parameters[name] = convert(param, False)
            for name, buf in mod._buffers.items():
                if buf is not None:
                    mod._buffers[name] = convert(buf, _keeps_fp32(name))
        self.program.store.rebind(lambda t: memo[id(t)][1] if id(t) in memo else t)
        if self._conversion is not None:  # _apply_compute_dtype is asking what was rounded
            self._conversion.update(memo)
        if new is not None and new != old:
            self._masters = {}  # the caller chose the dtype: nothing is rounded from a master any more
        else:  # a device move: the masters move along (keyed by the moved compute tensors)
            self._masters = {id(memo[k][1]): fn(m) for k, m in self._masters.items() if k in memo}
        if new is not None and new != old:
            self._float_dtype = new
            if self.config.out_dtype is None:
                for m in self.program.methods.values():
                    _retarget_out_dtype(m.graph_module, old, new)
            self._io_dtype = None  # the caller chose the dtype: inputs and outputs are theirs again
        return self

    def _apply_compute_dtype(self) -> None:
        """``QuantConfig.compute_dtype``: hold the float work in that dtype, inputs and outputs in the model's."""
        want, have, notes = self.config.compute_dtype, self._float_dtype, self._report.notes
        if want == "auto":
            want = self._auto_compute_dtype()
        if want is None or want == have:
            return
        if have is None:
            notes.add(NoteKind.COMPUTE_DTYPE, f"QuantConfig.compute_dtype={want} not applied: the fused Linears' output "
                      "dtypes are mixed or fixed by QuantConfig.out_dtype, so the model has no one float dtype to replace",
                      "compile")
            return
        self._conversion = {}
        try:
            self.to(want)  # before calibration: the static scales are those of what runs
            conversion = self._conversion
        finally:
            self._conversion = None
        self._io_dtype = have
        # the tensors .to() rounded -> the model's own (the user's Parameters and buffers, unrounded): the masters
        # that save_pretrained / export_onnx / state_dict read (_exact_floats); no copy is made
        self._masters = {id(new): old for old, new in conversion.values() if new is not old and new.dtype != old.dtype}
        notes.add(NoteKind.COMPUTE_DTYPE, f"float work in {str(want).replace('torch.', '')} (QuantConfig.compute_dtype); "
                  f"inputs and outputs stay {str(have).replace('torch.', '')}", "compile")

    def _auto_compute_dtype(self) -> Optional[torch.dtype]:
        """``QuantConfig.compute_dtype="auto"``: bf16 for an fp32 model of the cpu target on a CPU with native bf16
        (AMX-BF16 / AVX512-BF16), where it is the fast float form; None (the model's dtype) anywhere else, and
        everywhere with ``$FXQUANT_AUTO_BF16=0`` (the test suite sets it, so that its graphs do not depend on the CPU)."""
        if os.environ.get("FXQUANT_AUTO_BF16", "").strip() == "0":
            return None
        if self.config.target != "cpu" or self._float_dtype != torch.float32 or not backends.cpu_native_bf16():
            return None
        if self._device().type != "cpu":
            return None
        self._report.notes.add(NoteKind.COMPUTE_DTYPE, "compute_dtype='auto': this CPU has native bf16, so the float "
                               "work runs in bf16 (pass QuantConfig(compute_dtype=None) to keep the model's fp32)", "compile")
        return torch.bfloat16

    def _check_auto_compute_dtype(self, example_inputs) -> None:
        """``compute_dtype="auto"`` chose bf16: run the example inputs once (eager); where the graph cannot compute in
        bf16 (a cast the capture fixed to fp32 feeding an op that needs equal dtypes: RoPE's cos/sin before SDPA in
        Hugging Face's LLMs), hand the model's own tensors back and compute in its dtype, with a note."""
        if example_inputs is None or not self._masters or self.config.compute_dtype != "auto":
            return
        args, kwargs = calib._as_call(example_inputs, 0)
        try:
            self._run_unchecked(args, kwargs, compiled=False)
            return
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        self._hand_back_masters()
        io = self._float_dtype
        self._generation_state = GenerationState()
        notes = self._report.notes
        notes.drop([NoteKind.COMPUTE_DTYPE])
        notes.add(NoteKind.COMPUTE_DTYPE, f"compute_dtype='auto': float work stays {str(io).replace('torch.', '')}; the "
                  f"graph does not run in bf16 ({first})", "compile")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """``nn.Module.state_dict``, with the model's own float tensors where ``QuantConfig.compute_dtype`` runs
        rounded copies (:meth:`_exact_floats`)."""
        with self._exact_floats():
            return super().state_dict(*args, **kwargs)

    @contextlib.contextmanager
    def _exact_floats(self):
        """While inside: the graphs hold the model's own float tensors again (the masters that
        ``QuantConfig.compute_dtype`` rounded), and the fused Linears output the model's dtype, so whatever reads the
        program (``save_pretrained``, ``export_onnx``, ``state_dict``) sees exactly what a model compiled without
        ``compute_dtype`` holds. On exit, the compute tensors are back (the same objects). A no-op without
        ``compute_dtype``."""
        if not self._masters:
            yield
            return
        compute, io, masters = self._float_dtype, self._io_dtype, self._masters
        back = self._hand_back_masters()
        try:
            yield
        finally:
            self._swap_tensors(back)
            for m in self.program.methods.values():
                _retarget_out_dtype(m.graph_module, io, compute)
            self._float_dtype, self._io_dtype, self._masters = compute, io, masters

    def _hand_back_masters(self) -> dict[int, torch.Tensor]:
        """Put the model's own float tensors (the masters) back into every graph and the store, and the fused Linears'
        output dtype back to the model's: the program is then what a model compiled without ``compute_dtype`` is.
        Returns the reverse mapping of the swap (to undo it)."""
        compute, io = self._float_dtype, self._io_dtype
        back = self._swap_tensors(self._masters)
        for m in self.program.methods.values():
            _retarget_out_dtype(m.graph_module, compute, io)
        self._float_dtype, self._io_dtype, self._masters = io, None, {}
        return back

    def _graph_submodules(self):
        """Every submodule of every method's graph, once (the methods share the model's submodules)."""
        seen: set[int] = set()
        for m in self.program.methods.values():
            for mod in m.graph_module.modules():
                if id(mod) not in seen:
                    seen.add(id(mod))
                    yield mod

    def _swap_tensors(self, mapping: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Replace every parameter / buffer ``t`` of every method's graph (and the store's references) by
        ``mapping[id(t)]`` where present; returns the reverse mapping."""
        reverse: dict[int, torch.Tensor] = {}
        for mod in self._graph_submodules():
            for table in (mod._parameters, mod._buffers):
                for name, t in table.items():
                    if t is not None and id(t) in mapping:
                        table[name] = mapping[id(t)]
                        reverse[id(table[name])] = t
        self.program.store.rebind(lambda t: mapping.get(id(t), t))
        return reverse

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                        int8_head: bool = False) -> list:
        """Write a compressed-tensors W8A8 checkpoint (config.json + safetensors) that transformers, vLLM and
        ``fxquant.compile(model, inputs, weights=directory)`` load; see :func:`fxquant.export.compressed_tensors.save_pretrained`."""
        return compressed_tensors.save_pretrained(self, directory, max_shard_size=max_shard_size, int8_head=int8_head)

    def report(self) -> report.Report:
        """Every Linear's decision, the pattern counts and the fused node counts (``print()`` it)."""
        return self._report

    def golden(self, only_fused: bool = False) -> str:
        """Deterministic text of the fused graph (see :func:`fxquant.ir.printer.golden_text`)."""
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
        return draw_graph(self.graph_module, path, block=block, format=format)

    def to_networkx(self):
        """The fused graph as a ``networkx.DiGraph`` (see :func:`fxquant.tools.report.to_networkx`)."""
        return report.to_networkx(self.graph_module)


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
    methods: Optional[Mapping[str, tuple | Mapping[str, Any]]] = None,
    progress: bool = True,
    debug_dir: Optional[str | os.PathLike] = None,
    generation: Optional[bool] = None,
    max_batch_size: int = 1,
    max_cache_len: Optional[int] = None,
    compile_generation: Optional[bool] = None,
    compile_forward: Optional[bool] = None,
) -> QuantizedModel:
    """Quantize ``model``'s Linears to W8A8 by graph rewriting.

    Steps: per method, capture (``torch.export`` non-strict with example inputs, ``torch.fx.symbolic_trace``
    without) and the analysis passes (install a checkpoint, annotate); one plan for the program
    (:class:`fxquant.plan.planner.QuantPlan`); per method, the target's pipeline (:mod:`fxquant.passes`):
    apply the plan → SmoothQuant → fuse patterns (``fxquant.patterns``) → share input quantization → fuse
    siblings → lower → install smoothing; then calibration of static scales.

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
            :mod:`fxquant.weights.checkpoint`). Its tensors replace the model's in the compiled graph (the model is
            untouched), its int8 weights and scales are used as stored instead of quantizing, and which
            Linears are int8 follows the checkpoint: its float Linears stay float, and its int8 ones go int8
            wherever a pattern can run them (one that fxquant still keeps float, e.g. a tied weight, runs its
            dequantized weight W_q · s; the report says why).
        calibration: batches of representative inputs, each as the model is called (a tuple of positional args
            or a dict of keyword args; a list, or any iterable, which is read once). Used for
            ``QuantConfig.smoothquant`` (the float model's per-channel activation maxima) and, with
            ``activation_scheme="static-per-tensor"``, for the static scales (:func:`fxquant.calibrate`).
        methods: more methods of the same model, ``{name: example_inputs}`` (e.g. the same decoder at another
            input signature); each is captured into its own graph, and every graph executes the one plan and
            references the one weight store (run with ``qmodel.method(name)(...)``). ``"forward"`` is
            ``example_inputs``.
        progress: show tqdm progress bars while calibrating.
        debug_dir: write the golden text of every method's graph after every pass there
            (``<method>/<NN>-<pass>.txt``); default ``$FXQUANT_DEBUG_DIR``, else nothing is written.
        generation: capture the ``"prefill"`` and ``"decode"`` methods with a static KV cache inside the program
            (:mod:`fxquant.frontend.kv_cache`), so ``qmodel.generate(...)`` runs. Default (None): for a Hugging
            Face causal LM given example inputs; True requires one; False captures ``forward`` only.
        max_batch_size: rows of the KV cache (``generate`` takes up to this many prompts at once).
        max_cache_len: cache slots per row (prompt + new tokens); default the model's
            ``generation_config.cache_config["max_cache_len"]``, else ``min(max_position_embeddings, 4096)``.
        compile_generation: run the prefill and decode methods through ``torch.compile`` (Inductor fuses the
            float work around fxquant's ops; compiled on the first ``generate``: seconds to a minute; a CPU needs
            a C++ compiler). Default (None): as ``compile_forward``'s (a CUDA device, or an x86 CPU with a C++
            compiler; ``$FXQUANT_TORCH_COMPILE`` overrides). Measured (docs/benchmarks.md): H100, Llama-3-8B shapes
            cut to 8 layers, decode step 1.63 → 1.10 ms; Qwen2-0.5B shapes, 2 AMX cores: decode step 49.5 → 41.7 ms.
        compile_forward: run ``forward`` (and the ``methods``) through ``torch.compile``, so that what ``compile``
            returns, called as it is, runs the fused form: Inductor fuses each quantization with the norm or residual
            add before it, and on a CPU each per-token GEMM epilogue with what follows. Compiled here on the example
            inputs (its time goes to the report); another input shape compiles once more with dynamic shapes.
            Default (None): on with a CUDA device or an x86 CPU with a C++ compiler
            (``$FXQUANT_TORCH_COMPILE=0`` / ``1`` overrides); where torch.compile fails, the eager graph runs and
            the report says why. Measured
            (docs/benchmarks.md): MiniLM 32 x 128, 2 AMX cores, dynamic per-token with bf16 float work, 134 ms eager
            against 82 ms compiled; BERT-large 32 x 512 on an H100, 22.2 against 20.6 ms.

    Returns:
        A :class:`QuantizedModel`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``example_inputs`` is not a tuple, dict or None;
            ``config`` is not a QuantConfig.
        fxquant.TraceError: the model could not be captured (the cause is chained).
        fxquant.CheckpointError: ``weights`` cannot be read or does not fit the model (see
            :func:`fxquant.weights.checkpoint.read_checkpoint` and :func:`fxquant.weights.checkpoint.install`).
        fxquant.CalibrationError: ``smoothquant`` without ``calibration``, or with ``weights`` (a checkpoint's
            int8 weights are used as stored); ``calibration`` that nothing uses (dynamic scheme, no SmoothQuant);
            calibration data that is empty or does not fit the model.

    Numerics: compressed-tensors W8A8 "int-quantized" (see :mod:`fxquant.ir.reference`).
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
    if compile_generation is not None and not isinstance(compile_generation, bool):
        raise TypeError(f"compile_generation must be True, False or None (the machine decides), got {compile_generation!r}")
    if compile_forward is not None and not isinstance(compile_forward, bool):
        raise TypeError(f"compile_forward must be True, False or None (on with a CUDA device or an x86 C++ compiler), got "
                        f"{compile_forward!r}")
    if config.activation_scheme == "auto":
        if calibration is not None and config.target == "cpu" and config.smoothquant is None and weights is None:
            return _compile_auto_scheme(model, example_inputs, config, calibration, dict(
                methods=methods, progress=progress, debug_dir=debug_dir, generation=generation,
                max_batch_size=max_batch_size, max_cache_len=max_cache_len, compile_generation=compile_generation),
                compile_forward)
        config = dataclasses.replace(config, activation_scheme="dynamic-per-token")

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
                               "smoothquant=alpha, or drop calibration= (activation_scheme='auto' chooses a static form "
                               "from calibration data for the cpu target only, without weights=)")
    if methods is not None:
        if not isinstance(methods, Mapping) or "forward" in methods:
            raise TypeError("methods must be a dict {name: example_inputs} of methods besides 'forward' "
                            "(forward's inputs are example_inputs)")
        for name, inputs in methods.items():
            if not isinstance(name, str) or not name.isidentifier() or not isinstance(inputs, (tuple, Mapping)):
                raise TypeError(f"methods[{name!r}]: give a name that is a Python identifier and a tuple or dict of "
                                "example inputs")
    gen_spec = None
    if generation or (generation is None and example_inputs is not None):
        gen_spec = kv_cache.generation_spec(model, max_batch_size, max_cache_len, required=bool(generation))
    if gen_spec is not None and methods is not None and {"prefill", "decode"} & set(methods):
        raise TypeError("methods 'prefill' and 'decode' are the generation methods fxquant captures itself; "
                        "name yours otherwise, or pass generation=False")
    calls = calib.batches_of(calibration) if calibration is not None else None
    stored = checkpoint.read_checkpoint(weights) if weights is not None else None
    notes = Notes()
    dump_dir = debug_dir_from_env(debug_dir)
    captured = {"forward": capture(model, example_inputs)}
    for name, inputs in (methods or {}).items():
        captured[name] = capture(model, inputs)
    if gen_spec is not None:
        device = next(model.parameters()).device
        wrapper = kv_cache.CausalLMWithCache(model, gen_spec)
        for name, (inputs, dynamic) in kv_cache.capture_specs(gen_spec, device).items():
            captured[name] = capture(wrapper, inputs, dynamic_shapes=dynamic)
    ops.register_inductor_decompositions()
    source = checkpoint.SourceInfo.of(model)
    first = captured["forward"]
    notes.extend(first.notes())
    if gen_spec is not None:
        g = gen_spec
        notes.add(NoteKind.GENERATION, f"generation: methods 'prefill' and 'decode' share a static KV cache of {g.num_layers} "
                  f"layer(s) x K,V [{g.max_batch_size}, {g.kv_heads}, {g.max_cache_len}, {g.head_dim}] (max_batch_size, "
                  "kv_heads, max_cache_len, head_dim)" + (f", sliding window {g.sliding_window}" if g.sliding_window else ""),
                  "compile")
    if stored is not None:
        config = stored.config_following(config, [linear_name(first.graph_module, n) for n in linear_nodes(first.graph_module)])
    qmax = resolve_weight_qmax(config)
    ctx = CompileContext(config, qmax, WeightStore(stored.int8 if stored is not None else None), notes=notes,
                         model=model, calibration=calls, progress=progress)
    ctx.runner = lambda gm: _float_runner(gm, captured[ctx.method].fixed_kwargs)
    ctx.decode_methods = frozenset({"decode"} if gen_spec is not None else ())
    graphs = {}
    analysis, transform = analysis_passes(ctx, stored, source), transform_passes(ctx)
    for name, cap in captured.items():
        dump_captured(dump_dir, name, cap.graph_module)
        ctx.method = name
        graphs[name] = run_pipeline(cap.graph_module, analysis, dump_dir, name)
    ctx.plan = QuantPlan.merge(graphs, qmax)
    for name in graphs:
        ctx.method = name
        graphs[name] = run_pipeline(graphs[name], transform, dump_dir, name, len(analysis) + 1)
    ctx.store.release_checkpoint()
    gm = graphs["forward"]
    decisions = collect_decisions(gm)
    if static:
        notes.add(NoteKind.STATIC_UNCALIBRATED, "static per-tensor activation scales: not calibrated yet; call "
                  "fxquant.calibrate(qmodel, batches)", "compile")
    rep = report.Report(decisions, ctx.stats, report.node_counts(gm), config.target, first.front_end, qmax, notes,
                        report.gemm_rows(gm))
    dtypes = {d.out_dtype for d in decisions if d.quantize}
    float_dtype = dtypes.pop() if len(dtypes) == 1 and config.out_dtype is None else None
    program = Program({name: Method(g, captured[name].fixed_kwargs) for name, g in graphs.items()}, ctx.plan,
                      ctx.store, config, source, gen_spec)
    qm = QuantizedModel(program, rep, float_dtype)
    qm._compile_generation = compile_generation
    qm._apply_compute_dtype()
    qm._check_auto_compute_dtype(example_inputs)
    if static and calls is not None:
        _calibrate_calls(qm, calls, config.calibration_method, float(config.percentile), progress)
    _compile_forward_now(qm, example_inputs, compile_forward)
    return qm


def _compile_forward_now(qm: QuantizedModel, example_inputs, compile_forward: Optional[bool]) -> None:
    """``compile(..., compile_forward=)``: record the choice, and compile ``forward`` now on the example inputs (so
    that the report gives the compile time and what runs) unless it is off, cannot run yet (no example inputs, a
    static model not calibrated) or may never run (a model with generation methods): then on first use."""
    qm._compile_forward = compile_forward
    if not qm.compiles_forward():
        why = ("compile_forward=False" if compile_forward is False else "FXQUANT_TORCH_COMPILE=0"
               if os.environ.get("FXQUANT_TORCH_COMPILE", "").strip() == "0" else "not an x86 CPU: unmeasured there"
               if platform.machine().lower() not in ("x86_64", "amd64") else "no C++ compiler for torch.compile")
        qm._report.notes.add(NoteKind.COMPILED, f"forward runs eager ({why}): the quantizations and GEMM epilogues are "
                             "separate passes", "compile")
        return
    if example_inputs is None or qm._uncalibrated or qm.program.generation is not None:
        return  # compiled on first use (a generating model may never call forward)
    args, kwargs = calib._as_call(example_inputs, 0)
    qm._run_unchecked(args, kwargs)


def _first_float(out: Any) -> torch.Tensor:
    """The first floating-point tensor of a model's output (``last_hidden_state``, ``logits``, ...)."""
    for leaf in _pytree.tree_leaves(out if not hasattr(out, "to_tuple") else out.to_tuple()):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise CalibrationError("activation_scheme='auto' compares the model's outputs with the float model's, but the "
                           "model returned no floating-point tensor; choose activation_scheme explicitly")


def _compile_auto_scheme(model, example_inputs, config: QuantConfig, calibration, kwargs: dict,
                         compile_forward: Optional[bool]) -> QuantizedModel:
    """``activation_scheme="auto"`` with calibration data (cpu target): compile dynamic per-token and static per-tensor
    with SmoothQuant at each α of :data:`fxquant.config.AUTO_SMOOTHQUANT_ALPHAS` (calibrated on the first three
    quarters of the batches), score each by the cosine of its output (first float tensor, per sample, padding
    positions of an ``attention_mask`` left out) against the float model's on the last quarter, and return the
    most accurate static model if its mean cosine is within :data:`fxquant.config.AUTO_STATIC_TOLERANCE` of the
    dynamic one's, else the dynamic model. The scores go to the report (note kind ``scheme``) and to
    ``qmodel.scheme_scores``."""
    from .config import AUTO_SMOOTHQUANT_ALPHAS, AUTO_STATIC_TOLERANCE

    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        calib.batches_of(calibration)  # raises the CalibrationError that names the problem
    batches = list(calibration)  # read once: every candidate is calibrated on the same batches
    calls = calib.batches_of(batches)
    # scored on batches the static scales did not see (the last quarter, at least one) where there are two or more:
    # scales fitted to the scoring data flatter the static forms (8 MiniLM sentences: held-in scores picked static,
    # whose held-out token cosine was 0.968 against dynamic's 0.997); the chosen model is then calibrated on all
    held = max(1, len(calls) // 4) if len(calls) >= 2 else 0
    fit, calls = (batches[:-held], calls[-held:]) if held else (batches, calls)
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ref = [_first_float(model(*a, **k)).float() for a, k in calls]
    finally:
        for m, f in flags.items():
            m.training = f

    def real(t: torch.Tensor, k: dict) -> torch.Tensor:
        """[B, -1] per sample; positions a padding mask marks 0 (``attention_mask`` [B, S] over an output [B, S, ...])
        are zeroed: what a model returns for padding is unconstrained and would dominate the score."""
        mask = k.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
            t = t * (mask != 0).reshape(*mask.shape, *([1] * (t.dim() - 2))).to(t.dtype)
        return t.reshape(t.shape[0], -1)

    def score(qm: QuantizedModel) -> tuple[float, float]:
        cos = []
        with torch.no_grad():
            for (a, k), r in zip(calls, ref):
                out = _first_float(qm(*a, **k)).float()
                cos.append(torch.nn.functional.cosine_similarity(real(out, k), real(r, k), dim=-1))
        c = torch.cat(cos)
        return float(c.mean()), float(c.min())

    scores: dict[str, tuple[float, float]] = {}
    kwargs = {**kwargs, "compile_forward": False}  # the candidates are scored eager; the chosen one is compiled last
    dynamic = compile(model, example_inputs, config=dataclasses.replace(config, activation_scheme="dynamic-per-token"),
                      **kwargs)
    scores["dynamic-per-token"] = score(dynamic)
    best, best_name = None, None
    for alpha in AUTO_SMOOTHQUANT_ALPHAS:
        name = f"static-per-tensor, smoothquant={alpha}"
        qm = compile(model, example_inputs, config=dataclasses.replace(
            config, activation_scheme="static-per-tensor", smoothquant=alpha), calibration=fit, **kwargs)
        scores[name] = score(qm)
        if best is None or scores[name][0] > scores[best_name][0]:
            best, best_name = qm, name
    static_ok = scores[best_name][0] >= scores["dynamic-per-token"][0] - AUTO_STATIC_TOLERANCE
    chosen, chosen_name = (best, best_name) if static_ok else (dynamic, "dynamic-per-token")
    if static_ok and held:
        calibrate(chosen, batches, progress=False)  # the final scales from every batch
    table = "; ".join(f"{n}: {m:.4f} / {lo:.4f}" for n, (m, lo) in scores.items())
    why = (f"the most accurate static form is within {AUTO_STATIC_TOLERANCE} of dynamic per-token's mean cosine, and "
           "static per-tensor runs faster on CPUs (no per-token scale pass; README, AMX figures)" if static_ok else
           f"no static form came within {AUTO_STATIC_TOLERANCE} of dynamic per-token's mean cosine")
    chosen._report.notes.add(NoteKind.SCHEME, f"activation_scheme='auto' with calibration: chose {chosen_name}, since "
                             f"{why}. Output cosine against the float model on {len(calls)} calibration batch(es) "
                             + (f"held out from the static scales' {len(fit)} (which then took all {len(batches)})"
                                if held else "(the only one, also the static scales' data)")
                             + f", mean / min per sample: {table}", "compile")
    chosen.scheme_scores = scores
    chosen._report.notes.drop([NoteKind.COMPILED])
    _compile_forward_now(chosen, example_inputs, compile_forward)
    return chosen


def _float_runner(gm: fx.GraphModule, fixed_kwargs: dict[str, Any]):
    """Run an annotated float graph as the user calls the model (SmoothQuant's statistics pass)."""
    program = Program({"forward": Method(gm, fixed_kwargs)}, None, WeightStore(), None)
    qm = QuantizedModel(program, None)
    qm._compile_forward = False
    return qm._run_unchecked


def calibrate(qmodel: QuantizedModel, batches: Iterable[Any], *, method: Optional[str] = None,
              percentile: Optional[float] = None, progress: bool = True) -> QuantizedModel:
    """Compute and install the static per-tensor activation scales of a model compiled with
    ``QuantConfig(activation_scheme="static-per-tensor")`` (formulas in :mod:`fxquant.weights.calibration`).

    The model runs every batch in its dynamic per-token form (when recalibrating, with its current static
    scales) while each quantizing node records the float value it quantizes; the scales are installed only
    after the last batch ran, so on any error the model is as before. Calling it again recalibrates. Every
    method of the program gets the same scales (observed on ``"forward"``).

    Args:
        qmodel: a :class:`fxquant.QuantizedModel` compiled with the static scheme.
        batches: an iterable of batches, each as the model is called: a tensor, a tuple of positional args or
            a dict of keyword args (shapes may differ between batches where the capture kept them dynamic).
        method: ``"minmax"`` or ``"percentile"``; default ``qmodel.config.calibration_method``.
        percentile: in (0, 100], for ``"percentile"``; default ``qmodel.config.percentile``.
        progress: show a tqdm progress bar.

    Returns:
        ``qmodel``, calibrated.

    Raises:
        TypeError: ``qmodel`` is not a QuantizedModel.
        CalibrationError: the model was not compiled with the static scheme, ``batches`` is empty or not an
            iterable of batches, a batch does not fit the model (the message names the batch), or a quantizing
            node saw no finite value.
        ValueError: an unknown method or a percentile outside (0, 100].
    """
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"calibrate needs a fxquant.QuantizedModel, got {type(qmodel).__name__}: compile the model with "
                        "fxquant.compile(model, example_inputs, config=QuantConfig(activation_scheme='static-per-tensor'))")
    if qmodel.config.activation_scheme != "static-per-tensor":
        raise CalibrationError(f"this model uses activation_scheme={qmodel.config.activation_scheme!r}, whose scales are "
                               "computed at run time; compile with QuantConfig(activation_scheme='static-per-tensor') to "
                               "calibrate static scales")
    method = qmodel.config.calibration_method if method is None else method
    percentile = qmodel.config.percentile if percentile is None else percentile
    check_calibration(method, percentile, "calibrate: ")
    return _calibrate_calls(qmodel, calib.batches_of(batches), method, float(percentile), progress)


def _calibrate_calls(qmodel: QuantizedModel, calls: list, method: str, percentile: float, progress: bool) -> QuantizedModel:
    graphs = [m.graph_module for m in qmodel.program.methods.values()]

    def eager(args, kwargs, name="forward"):  # the observers are nodes of the eager graphs
        return qmodel._run_unchecked(args, kwargs, name, compiled=False)

    n = calib.calibrate_graphs(graphs, eager, calls, method, percentile, qmodel.program.store, progress)
    qmodel._generation_state.compiled.clear()  # the graphs changed: compile again on next use
    qmodel._calibrated(f"static per-tensor activation scales of {n} quantizing node(s) calibrated "
                       f"({method}{f' {percentile:g}' if method == 'percentile' else ''}) on {len(calls)} batch(es)")
    return qmodel
