"""The fused nodes of an fxquant graph: ``torch.library`` custom ops with fake (meta) implementations.

Because every op has a fake implementation, a fused GraphModule can itself be ``torch.export``-ed and
``torch.compile``-d; Dynamo treats each op as one opaque call.

==================================  ==========================================================================
op                                  meaning (numerics: :mod:`fxquant.ir.reference`)
==================================  ==========================================================================
``fxquant::quantize_per_token``     x [..., K] float → (int8 [..., K], fp32 scale [..., 1]); static / smoothed
                                    with ``act_scale`` / ``act_smooth`` (below)
``fxquant::int8_linear``            float x [..., K] → quantize per token → int8 GEMM → epilogue → [..., N]
``fxquant::int8_linear_q``          already-quantized (x_q, x_scale) → int8 GEMM → epilogue → [..., N]
``fxquant::int8_weight_linear``     W8A16: float x [..., K] × int8 weight (dequantized in the kernel) → epilogue
                                    → [..., N]; no activation quantization (decode-sized M, memory-bound)
``fxquant::layer_norm_quant``       LayerNorm + per-token quantize: (y float or empty, y_q int8, scale fp32)
``fxquant::rms_norm_quant``         RMSNorm + per-token quantize: the same three outputs
``fxquant::decode_attention``       grouped-query attention over the KV cache (decode; prefill on CPUs): q [B, H,
                                    S, D], K / V [B, KV, L, D], additive mask [B or 1, 1, S, L] → [B, H, S, D];
                                    with ``cache_position`` [S] only slots ≤ cache_position[S-1] are read
==================================  ==========================================================================

Arguments shared by the Linear ops: ``w_q`` int8 [N, K], ``w_scale`` fp32 [N, 1], ``bias`` [N] or None,
``activation`` in ``reference.ACTIVATIONS`` (the GEMM epilogue; the gated ``swiglu`` takes gate and up
stacked as [2I, K] and returns [..., I]), ``backend`` (the lowering pass's choice, re-checked per call by
:func:`fxquant.targets.backends.pick_backend`), ``w_qmax`` (the weight's range, which decides whether oneDNN is
exact), ``out_dtype`` (None: x's dtype).

The contract: each op's schema below is the one place its signature is written; :class:`_Contract` derives
the typed argument record from it, and :class:`FusedLinear` is the one view of both Linear ops. Graph
passes, the report, golden text and exporters build and read nodes through these, never by position.

The quantizing ops (``quantize_per_token``, ``int8_linear``, the norm-quant ops) take two optional trailing
tensors: ``act_scale`` fp32 [1], the static per-tensor scale of ``QuantConfig(activation_scheme=
"static-per-tensor")`` installed by :func:`fxquant.calibrate` (None: per token, at run time), and
``act_smooth`` fp32 [K], SmoothQuant's per-channel 1/s by which the value is multiplied before it is quantized
(the float output a norm returns is not smoothed). Nodes without them print and trace as before.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx

from ..kernels.common import GATED_ACTIVATIONS

__all__ = ["LIBRARY", "FusedLinear",
           "contract_of", "CONTRACTS", "out_features", "quantized_value"]

_NS = "fxquant"

# Registered through ``torch.library.Library`` rather than ``@torch.library.custom_op``: the latter wraps
# every call in Python that checks outputs for aliasing, 40-80 µs per call on an H200 host (cProfile of
# bench/profile_gpu.py), more than the GPU time of a mid-sized int8 GEMM.
LIBRARY = torch.library.Library(_NS, "DEF")  # fxquant.targets.backends registers the kernels

_SCHEMA_ARG = re.compile(r"^\s*(?P<type>[\w\[\]?]+)\s+(?P<name>\w+)(?:\s*=\s*(?P<default>\w+))?\s*$")


class _Contract:
    """One fused op: its ``torch.library`` schema — the only place its signature is spelled — and the typed
    record of its arguments (a NamedTuple built from the schema) that every graph writer and reader uses.

    ``record_of(node)`` reads a node's arguments as the record, ``call(graph, record)`` inserts a node at the
    graph's current insertion point, ``set(node, record)`` rewrites a node's arguments. Nothing outside this
    module indexes a fused node's ``args`` by position.
    """

    def __init__(self, name: str, params: str, returns: str):
        LIBRARY.define(f"{name}({params}) -> {returns}")
        fields, defaults = [], {}
        for p in params.split(","):
            m = _SCHEMA_ARG.match(p)
            assert m, f"cannot read schema argument {p!r} of fxquant::{name}"
            fields.append(m["name"])
            if m["default"] is not None:
                defaults[m["name"]] = None if m["default"] == "None" else m["default"]
        self.name = name
        self.record = collections.namedtuple(_camel(name), fields, defaults=[defaults[f] for f in fields if f in defaults])
        self.fields = tuple(fields)
        self._trailing_none = sum(1 for f in fields if f in defaults and defaults[f] is None)

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops.fxquant, self.name), "default")

    def record_of(self, node: fx.Node):
        assert node.target is self.op, f"{node.format_node()} is not a fxquant::{self.name} node"
        return self.record(*node.args, **node.kwargs)

    def call(self, graph: fx.Graph, record) -> fx.Node:
        return graph.call_function(self.op, self._args(record))

    def set(self, node: fx.Node, record) -> None:
        node.args, node.kwargs = self._args(record), {}

    def _args(self, record) -> tuple:
        """The record as positional args, trailing arguments left at their ``None`` default dropped (a node of a
        dynamic-scheme graph reads as it did before the static-scheme arguments existed)."""
        args = list(record)
        for _ in range(self._trailing_none):
            if args[-1] is not None:
                break
            args.pop()
        return tuple(args)


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


QUANTIZE_PER_TOKEN_C = _Contract("quantize_per_token", "Tensor x, Tensor? act_scale=None, Tensor? act_smooth=None",
                                  "(Tensor, Tensor)")
INT8_LINEAR_C = _Contract(
    "int8_linear",
    "Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, str activation, str backend, int w_qmax, "
    "ScalarType? out_dtype=None, Tensor? act_scale=None, Tensor? act_smooth=None",
    "Tensor",
)
INT8_LINEAR_Q_C = _Contract(
    "int8_linear_q",
    "Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, str activation, str backend, "
    "int w_qmax, ScalarType out_dtype",
    "Tensor",
)
INT8_WEIGHT_LINEAR_C = _Contract(
    "int8_weight_linear",
    "Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, str activation, str backend, ScalarType? out_dtype=None, "
    "Tensor? act_smooth=None",
    "Tensor",
)
LAYER_NORM_QUANT_C = _Contract(
    "layer_norm_quant",
    "Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps, bool return_float, "
    "Tensor? act_scale=None, Tensor? act_smooth=None",
    "(Tensor, Tensor, Tensor)",
)
RMS_NORM_QUANT_C = _Contract(
    "rms_norm_quant",
    "Tensor x, Tensor? weight, float eps, bool cast_before_weight, bool return_float, Tensor? act_scale=None, "
    "Tensor? act_smooth=None",
    "(Tensor, Tensor, Tensor)",
)
DECODE_ATTENTION_C = _Contract(
    "decode_attention", "Tensor q, Tensor k_cache, Tensor v_cache, Tensor mask, float scale, "
    "Tensor? cache_position=None", "Tensor")
# Ops whose outputs are (y float or empty, y_q int8, scale fp32): a norm that quantizes its own output.
NORM_QUANT_CONTRACTS = (LAYER_NORM_QUANT_C, RMS_NORM_QUANT_C)
NORM_QUANT_FLOAT, NORM_QUANT_Q, NORM_QUANT_SCALE = 0, 1, 2  # output indices of the norm-quant ops


# ------------------------------------------------------------------ fake (meta) implementations
# The kernels behind each op are registered by fxquant.targets.backends (imported by ``import fxquant``).
@torch.library.register_fake(f"{_NS}::quantize_per_token")
def _(x, act_scale=None, act_smooth=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def out_features(w_q: torch.Tensor, activation: str) -> int:
    """N of a fused Linear's output: the weight's rows, or half of them for a gated epilogue (SwiGLU:
    gate and up projections stacked as one [2I, K] weight, output [..., I])."""
    return w_q.shape[0] // 2 if activation in GATED_ACTIVATIONS else w_q.shape[0]


@torch.library.register_fake(f"{_NS}::int8_linear_q")
def _(x_q, x_scale, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype):
    return x_q.new_empty((*x_q.shape[:-1], out_features(w_q, activation)), dtype=out_dtype)


@torch.library.register_fake(f"{_NS}::int8_linear")
def _(x, w_q, w_scale, bias, activation, backend, w_qmax, out_dtype=None, act_scale=None, act_smooth=None):
    return x.new_empty((*x.shape[:-1], out_features(w_q, activation)), dtype=out_dtype or x.dtype)


@torch.library.register_fake(f"{_NS}::int8_weight_linear")
def _(x, w_q, w_scale, bias, activation, backend, out_dtype=None, act_smooth=None):
    return x.new_empty((*x.shape[:-1], out_features(w_q, activation)), dtype=out_dtype or x.dtype)


def _layer_norm_quant_fake(x, normalized_shape, weight, bias, eps, return_float, act_scale=None, act_smooth=None):
    return _norm_quant_fake(x, return_float)


def _rms_norm_quant_fake(x, weight, eps, cast_before_weight, return_float, act_scale=None, act_smooth=None):
    return _norm_quant_fake(x, return_float)


def _norm_quant_fake(x, return_float):
    y = x.new_empty(x.shape) if return_float else x.new_empty(0)
    return y, x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.register_fake(f"{_NS}::decode_attention")
def _(q, k_cache, v_cache, mask, scale, cache_position=None):
    return q.new_empty(q.shape)  # contiguous [B, H, S, D]


torch.library.register_fake(f"{_NS}::layer_norm_quant", _layer_norm_quant_fake)
torch.library.register_fake(f"{_NS}::rms_norm_quant", _rms_norm_quant_fake)


# The OpOverloads that fused graph nodes call (the functions above are their implementations).
QUANTIZE_PER_TOKEN = QUANTIZE_PER_TOKEN_C.op
INT8_LINEAR = INT8_LINEAR_C.op
INT8_LINEAR_Q = INT8_LINEAR_Q_C.op
INT8_WEIGHT_LINEAR = INT8_WEIGHT_LINEAR_C.op
LAYER_NORM_QUANT = LAYER_NORM_QUANT_C.op
DECODE_ATTENTION = DECODE_ATTENTION_C.op
RMS_NORM_QUANT = RMS_NORM_QUANT_C.op
CONTRACTS = {c.op: c for c in (QUANTIZE_PER_TOKEN_C, INT8_LINEAR_C, INT8_LINEAR_Q_C, INT8_WEIGHT_LINEAR_C,
                               *NORM_QUANT_CONTRACTS)}


def quantized_value(target, *args) -> torch.Tensor:
    """The float tensor a quantizing op called as ``target(*args)`` quantizes, before any SmoothQuant factor:
    its input ``x``, or for a norm-quant op the float norm output (what ``return_float`` returns)."""
    from . import reference

    r = CONTRACTS[target].record(*args)
    if target is LAYER_NORM_QUANT:
        return torch.nn.functional.layer_norm(r.x, r.normalized_shape, r.weight, r.bias, r.eps)
    if target is RMS_NORM_QUANT:
        return reference.rms_norm(r.x, r.weight, r.eps, r.cast_before_weight)
    return r.x


def contract_of(node: fx.Node) -> Optional[_Contract]:
    """The contract of a fused node, or None for any other node."""
    return CONTRACTS.get(node.target) if node.op == "call_function" else None


class FusedLinear(NamedTuple):
    """The one view of a fused Linear node (``int8_linear`` or ``int8_linear_q``) that passes, the report and
    exporters read and write. ``x`` is the float input of ``int8_linear``; ``x_q``/``x_scale`` the already
    quantized input of ``int8_linear_q`` (the other is None)."""

    x: Any
    x_q: Any
    x_scale: Any
    w_q: Any
    w_scale: Any
    bias: Any
    activation: str
    backend: str
    w_qmax: int
    out_dtype: Optional[torch.dtype]
    act_scale: Any = None  # int8_linear only: the static scale / SmoothQuant factor of its own quantization
    act_smooth: Any = None

    @staticmethod
    def is_fused_linear(node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in (INT8_LINEAR, INT8_LINEAR_Q)

    @classmethod
    def of(cls, node: fx.Node) -> "FusedLinear":
        c = CONTRACTS[node.target]
        r = c.record_of(node)._asdict()
        return cls(x=r.pop("x", None), x_q=r.pop("x_q", None), x_scale=r.pop("x_scale", None), **r)

    def _contract(self) -> _Contract:
        return INT8_LINEAR_C if self.x_q is None else INT8_LINEAR_Q_C

    def call(self, graph: fx.Graph) -> fx.Node:
        """Insert the node (``int8_linear_q`` when the input is already quantized)."""
        return self._contract().call(graph, self._record())

    def set(self, node: fx.Node) -> None:
        """Rewrite ``node`` to this op and these arguments."""
        c = self._contract()
        node.target = c.op
        c.set(node, self._record())

    def _record(self):
        c = self._contract()
        return c.record(**{f: getattr(self, f) for f in c.fields})


# ------------------------------------------------------------------------- torch.compile (Inductor) fusion
def _register_inductor_decompositions() -> bool:
    """Let Inductor fuse the quantization into the ops around it.

    Under ``torch.compile`` the custom ops are opaque, so a quantization would stay one kernel of its own
    after, say, a residual add, an RMSNorm or SiLU·mul that Inductor already fused. These decompositions
    (applied by Inductor only, never in eager mode or ``torch.export``) rewrite ``quantize_per_token`` into
    its pure-torch definition (:func:`fxquant.ir.reference.quantize_per_token`), ``int8_linear`` into that
    plus ``int8_linear_q``, and ``layer_norm_quant`` into ``layer_norm`` plus that, so Inductor emits one
    fused kernel for "whatever precedes → LayerNorm → quantize": a Triton kernel on CUDA, a vectorized C++
    loop on CPU. The GEMM stays fxquant's kernel (Triton on CUDA, oneDNN on CPU).

    Numerics: Inductor divides with the GPU's fast fp32 division (≤ 2 ulp), so a value at an exact
    rounding tie can land one int8 step away from the reference; every other value is identical. On CPU
    the generated code is IEEE fp32 with round-half-to-even, as the reference.
    ``FXQUANT_INDUCTOR_FUSION``: ``1`` (default) on every device, ``cuda`` on CUDA only (other graphs keep
    the opaque ops), ``0`` nowhere.
    Uses ``torch._inductor.decomposition.register_decomposition``, a private API present since torch 2.0;
    where it is missing, nothing is registered and the ops stay opaque.
    """
    import os

    mode = os.environ.get("FXQUANT_INDUCTOR_FUSION", "1")
    if mode == "0":
        return False
    try:
        from torch._inductor.decomposition import register_decomposition
    except ImportError:  # pragma: no cover - torch without Inductor
        return False
    from . import reference

    def declined(x: torch.Tensor) -> bool:
        return mode == "cuda" and x.device.type != "cuda"

    def broadcast_scale(out: tuple, act_scale) -> tuple:
        """A static quantizer's scale (last output) as the [1] scale broadcast to [..., 1] (stride 0), not the
        per-row copy the eager op must return: the Linear reading it then sees one scale for every row (below)."""
        if act_scale is None:
            return out
        scale = out[-1]
        return (*out[:-1], act_scale.to(torch.float32).reshape(1).expand(scale.shape))

    @register_decomposition([QUANTIZE_PER_TOKEN])
    def _quantize(x, act_scale=None, act_smooth=None):
        if declined(x):
            return NotImplemented
        return broadcast_scale(reference.quantize_per_token(x, act_scale, act_smooth), act_scale)

    @register_decomposition([INT8_LINEAR])
    def _int8_linear(*args, **kwargs):
        r = INT8_LINEAR_C.record(*args, **kwargs)
        if declined(r.x):
            return NotImplemented
        x_q, x_scale = broadcast_scale(reference.quantize_per_token(r.x, r.act_scale, r.act_smooth), r.act_scale)
        return INT8_LINEAR_Q(x_q, x_scale, r.w_q, r.w_scale, r.bias, r.activation, r.backend, r.w_qmax, r.out_dtype or r.x.dtype)

    @register_decomposition([INT8_LINEAR_Q])
    def _int8_linear_q(*args, **kwargs):
        # CPU, per-token scales: oneDNN takes one src scale, so the eager op runs the GEMM (fp32 acc·s_w) and then
        # its epilogue as separate passes inside the opaque op. Here the GEMM stays fxquant's op (called with
        # src scale 1, no bias, no activation, fp32 out: the same acc·s_w) and the epilogue becomes ATen ops that
        # Inductor fuses with whatever follows (the next LayerNorm / residual add / quantization).
        #
        # Two departures from the eager op's numerics, both far below the int8 activations' own error, because this
        # epilogue is bound by memory traffic over the [M, N] GEMM output (MiniLM's FFN: [4096, 1536], 25 MB in fp32;
        # 2 AMX cores): (1) where the Linear's output is bf16, the GEMM hands it over in bf16 (acc·s_w rounded to
        # 8 significant bits before ·s_x + b, then rounded again: at most one more bf16 rounding, relative 2⁻⁹);
        # (2) GELU (erf) and GELU-tanh run as the sigmoid form of the tanh approximation
        # (:func:`fxquant.ir.reference.gelu_sigmoid_form`, |Δ| ≤ 4.7e-4 from erf), cheap enough for Inductor to
        # recompute in the next Linear's amax and quantization loops instead of storing it (Inductor's vectorized
        # erf would cost that twice). MiniLM 32 x 128, 2 AMX cores, alternating processes: 80-85 -> 75-77 ms, mean
        # cosine 0.99710 -> 0.99701 (docs/benchmarks.md, issue #24).
        r = INT8_LINEAR_Q_C.record(*args, **kwargs)
        s = r.x_scale
        if declined(r.x_q) or r.x_q.device.type != "cpu" or s.dim() < 2 or s.shape[-2] == 1 or s.stride(-2) == 0:
            # one scale for every row (static: a [1] scale broadcast to [M, 1]; a single token): oneDNN's own
            # epilogue applies it, the bias and the activation inside the GEMM, with a bf16 output where native
            return NotImplemented
        one = torch.ones(1, dtype=torch.float32, device=r.x_q.device)
        gemm_dtype = torch.bfloat16 if r.out_dtype == torch.bfloat16 else torch.float32
        y = INT8_LINEAR_Q(r.x_q, one, r.w_q, r.w_scale, None, "none", r.backend, r.w_qmax, gemm_dtype).float()
        if r.activation in ("gelu", "gelu_tanh"):
            y = reference.apply_epilogue(y, r.x_scale, r.bias, "none", torch.float32, inplace=False)
            return reference.gelu_sigmoid_form(y).to(r.out_dtype)
        return reference.apply_epilogue(y, r.x_scale, r.bias, r.activation, r.out_dtype, inplace=False)

    @register_decomposition([LAYER_NORM_QUANT])
    def _layer_norm_quant(x, normalized_shape, weight, bias, eps, return_float, act_scale=None, act_smooth=None):
        if declined(x):
            return NotImplemented
        return broadcast_scale(reference.layer_norm_quant(x, normalized_shape, weight, bias, eps, return_float,
                                                          act_scale, act_smooth), act_scale)

    @register_decomposition([RMS_NORM_QUANT])
    def _rms_norm_quant(x, weight, eps, cast_before_weight, return_float, act_scale=None, act_smooth=None):
        if declined(x):
            return NotImplemented
        return broadcast_scale(reference.rms_norm_quant(x, weight, eps, cast_before_weight, return_float, act_scale,
                                                        act_smooth), act_scale)

    # Inductor copies this registry into a cached table the first time anything is compiled
    # (``fast_random_decomps``, an lru_cache, private): after a torch.compile that ran before this registration
    # (a user's bf16 baseline, say), that table lacks these decompositions, and the ops reached Inductor's
    # lowering undecomposed: on torch 2.13 they stayed opaque calls (no fusion), on torch 2.11 the compile failed
    # with "both a fallback and a decomp for same op". Dropping the cached copy makes the next compile see them.
    from torch._inductor import decomposition as inductor_decomposition

    cached_table = getattr(inductor_decomposition, "fast_random_decomps", None)
    table_refreshed = hasattr(cached_table, "cache_clear")
    if table_refreshed:
        cached_table.cache_clear()
    # Where a decomposition declines (mode "cuda", other devices) or may not be seen (no cached table to drop),
    # the op stays in the graph and Inductor lowers it as a fallback (a call of the op). Inductor creates that
    # fallback lazily and asserts that no decomposition exists for the op ("both a fallback and a decomp for same
    # op"); registering the fallback here, declaring the overlap, is what it asks for.
    # ``int8_linear_q`` always: its decomposition declines for static scales and calls the op itself.
    overlapping = (INT8_LINEAR_Q,) if mode != "cuda" and table_refreshed else (
        QUANTIZE_PER_TOKEN, INT8_LINEAR, INT8_LINEAR_Q, LAYER_NORM_QUANT, RMS_NORM_QUANT)
    try:
        from torch._inductor.lowering import make_fallback

        for op in overlapping:
            make_fallback(op, warn=False, override_decomp=True)
    except Exception:  # pragma: no cover - an Inductor without this API: the old behaviour, never a failed import
        pass
    return True


@functools.cache
def register_inductor_decompositions() -> bool:
    """Register the decompositions above once per process (``fxquant.compile`` calls it, so that any
    ``torch.compile`` of a QuantizedModel sees them); True when they are registered."""
    return _register_inductor_decompositions()


# CUDA machines register at import, as they always did (torch.compile of the ops alone, outside a
# QuantizedModel, fuses there too). Elsewhere fxquant.compile registers them: importing Inductor's
# decompositions costs ~1.5 s from a bare `import torch` (`import fxquant` went from 0.35 to 3 s on the 2-core
# AVX2 EPYC when this ran at import on every machine), well under that after torch.export has run.
INDUCTOR_FUSION = torch.cuda.is_available() and register_inductor_decompositions()
