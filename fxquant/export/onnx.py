"""ONNX export of a compiled model: standard ONNX operators that ONNX Runtime and OpenVINO run with integer
kernels. The form follows the model's ``QuantConfig.activation_scheme``.

**Dynamic per-token** (fxquant's default, :mod:`fxquant.ir.reference`), per fused Linear::

    s_x  = max(ReduceMax(|x · m|, axis=-1) / 127, eps)              fp32, one scale per token; m: SmoothQuant's
                                                                   1/s where installed (a Mul), else 1
    x_q  = Cast<int8>(Clip(Round(x · m · Reciprocal(s_x)), -127, 127))  Round: half to even, as torch.round
    acc  = MatMulInteger(x_q + 128 as uint8, W_qᵀ, a_zero_point=128)   int32, exact (MatMulInteger, opset 10)
    y    = act((Cast<float>(acc) · s_w) · s_x + b) → output dtype

``W_q`` (int8, zero point 0) and ``s_w`` (fp32, per output channel) are initializers; fused GEMMs (siblings,
SwiGLU's gate/up) export as the one GEMM fxquant runs; a norm that quantizes its output exports as the float
norm (``LayerNormalization``, or RMSNorm's ReduceMean/Sqrt) followed by the same quantization. Every other op
is torch.onnx's own translation. ONNX Runtime's CPU provider runs ``MatMulInteger`` with its integer GEMM
(and fuses the dequantizing ``Mul`` into ``MatMulIntegerToFloat``). The activations travel as uint8 with zero
point 128 because MLAS's u8·s8 kernels are its fast ones; on a CPU without VNNI they sum u8·s8 pairs in int16,
which cannot saturate with the 7-bit weights fxquant uses on such CPUs (2·255·63 < 2¹⁵), but can with
full-range weights from a VNNI machine (the same caveat as ONNX Runtime's own ``quantize_dynamic``). The
QuantizeLinear/DequantizeLinear operators take one scale per tensor or per axis of fixed size, so they cannot
state a per-token scale; hence the explicit ops.

**Static per-tensor** (``activation_scheme="static-per-tensor"``, calibrated): QDQ, the form of TensorRT's
explicit quantization, per original Linear (gate and up of a gated MLP as two, and siblings run as one GEMM
as their Linears)::

    x_dq = DequantizeLinear(QuantizeLinear(x · m, s, zp), s, zp)     s: the calibrated scalar; zp: int8 0
    y    = act(MatMul(x_dq, DequantizeLinear(W_qᵀ, s_w, axis=1)) + b)   weights int8, zero point 0, per channel

Each Linear gets its own Q/DQ pair (the exporter's optimizer merges identical ones; they are split again);
norms, GELU and the rest are their float ONNX ops: the graph states the reference numerics, not the fused
kernels. ``qdq_dtype="uint8"`` writes zero point 128 (the same integers, shifted), the form ONNX Runtime's
x86 kernels take at every consumer (see :func:`export_onnx`); OpenVINO runs either as int8 FullyConnected
layers.

Source of the operator semantics: ONNX operator specs (``MatMulInteger``, ``Round``, ``ReduceMax``-18,
``LayerNormalization``-17, ``QuantizeLinear``/``DequantizeLinear``-13 per-axis), https://onnx.ai/onnx/operators/;
TensorRT "Working with Quantized Types", explicit quantization (Q/DQ placement, symmetric int8).
"""

from __future__ import annotations

import copy
import math
import operator
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..ir import ops
from ..ir.attrs import fetch_attr
from ..ir.meta import members_of
from ..ir.views import AtenSlice
from ..kernels.common import GATED_ACTIVATIONS, SCALE_EPS
from ..program import program_of

__all__ = ["export_onnx", "integer_ops", "MIN_OPSET"]

MIN_OPSET = 18  # ReduceMax/ReduceMean with axes as an input, Split with num_outputs
# Activation zero points of the static QDQ form: int8 0 (TensorRT's explicit quantization accepts only this), or
# uint8 128, the same integers shifted, which ONNX Runtime's x86 kernels take at every consumer (see export_onnx)
_QDQ_ZERO_POINTS = {"int8": np.array(0, dtype=np.int8), "uint8": np.array(128, dtype=np.uint8)}


def _translations(qdq_dtype: str = "int8"):
    """onnxscript (trace-only) translations of fxquant's fused ops for ``torch.onnx.export``."""
    import onnxscript
    from onnxscript import opset18 as op

    DT = onnxscript.ir.DataType
    dtypes = {torch.float32: DT.FLOAT, torch.float16: DT.FLOAT16, torch.bfloat16: DT.BFLOAT16}

    def const(v: float):
        return op.Constant(value_float=float(v))

    def last_axis():
        return op.Constant(value_ints=[-1])

    def dtype_of(x):
        dt = getattr(x, "dtype", None)
        return dt if dt is not None else DT.FLOAT

    def empty(x):  # a norm-quant op's float output when return_float=False: an empty tensor, as in torch
        return op.Cast(op.ConstantOfShape(op.Constant(value_ints=[0]), value=onnxscript.ir.tensor([0.0])), to=dtype_of(x))

    def quantize(x, act_smooth=None):
        xf = op.Cast(x, to=DT.FLOAT)
        if act_smooth is not None:  # SmoothQuant's diag(s)^-1, applied to the value quantized only
            xf = op.Mul(xf, act_smooth)
        amax = op.ReduceMax(op.Abs(xf), last_axis(), keepdims=1)
        scale = op.Max(op.Div(amax, const(127.0)), const(SCALE_EPS))
        x_q = op.Cast(op.Clip(op.Round(op.Mul(xf, op.Reciprocal(scale))), const(-127.0), const(127.0)), to=DT.INT8)
        return x_q, scale

    def activation(y, name: str):
        if name == "none":
            return y
        if name == "relu":
            return op.Relu(y)
        if name == "gelu":
            return op.Mul(op.Mul(const(0.5), y), op.Add(const(1.0), op.Erf(op.Div(y, const(math.sqrt(2.0))))))
        if name == "gelu_tanh":
            inner = op.Mul(const(math.sqrt(2.0 / math.pi)), op.Add(y, op.Mul(const(0.044715), op.Mul(y, op.Mul(y, y)))))
            return op.Mul(op.Mul(const(0.5), y), op.Add(const(1.0), op.Tanh(inner)))
        if name == "silu":
            return op.Mul(y, op.Sigmoid(y))
        if name in GATED_ACTIVATIONS:
            gate, up = op.Split(y, axis=-1, num_outputs=2)
            return op.Mul(activation(gate, GATED_ACTIVATIONS[name]), up)
        raise ValueError(f"export_onnx: no ONNX form for the epilogue activation {name!r}")

    def linear_q(x_q, x_scale, w_q, w_scale, bias, act: str, out_dt):
        # x_q + 128 as uint8 with zero point 128: the same integers (MatMulInteger subtracts the zero point),
        # and ONNX Runtime's MLAS runs u8·s8 GEMMs 2.3-2.5x faster than s8·s8 (MiniLM, AVX2)
        shift = op.Constant(value=onnxscript.ir.tensor(np.array(128, dtype=np.int32)))
        x_u8 = op.Cast(op.Add(op.Cast(x_q, to=DT.INT32), shift), to=DT.UINT8)
        zero_point = op.Constant(value=onnxscript.ir.tensor(np.array(128, dtype=np.uint8)))
        acc = op.MatMulInteger(x_u8, op.Transpose(w_q, perm=[1, 0]), zero_point)
        y = op.Mul(op.Mul(op.Cast(acc, to=DT.FLOAT), op.Reshape(w_scale, last_axis())), x_scale)
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=DT.FLOAT))
        return op.Cast(activation(y, act), to=out_dt)

    def static_linear(x, w_q, w_scale, bias, act: str, act_scale, act_smooth, out_dt):
        # TensorRT's explicit-quantization form: QuantizeLinear -> DequantizeLinear (symmetric, zero point 0 or its
        # uint8 shift, the calibrated scalar scale) in front of MatMul, whose other input is DequantizeLinear of
        # the int8 weight (axis 1 of W_q^T: per output channel, zero point 0); bias and activation in float
        # after it. A gated GEMM arrives here as its two Linears (_per_linear_graph).
        if act in GATED_ACTIVATIONS:
            raise ValueError("export_onnx: a gated GEMM reached the static form unsplit (a bug in fxquant)")
        xf = op.Cast(x, to=DT.FLOAT)
        if act_smooth is not None:
            xf = op.Mul(xf, act_smooth)
        s = op.Squeeze(act_scale)  # a scalar: the per-tensor form of the QDQ ops
        zp = op.Constant(value=onnxscript.ir.tensor(_QDQ_ZERO_POINTS[qdq_dtype]))
        x_dq = op.DequantizeLinear(op.QuantizeLinear(xf, s, zp), s, zp)
        w_dq = op.DequantizeLinear(op.Transpose(w_q, perm=[1, 0]), op.Reshape(w_scale, last_axis()), axis=1)
        y = op.MatMul(x_dq, w_dq)
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=DT.FLOAT))
        return op.Cast(activation(y, act), to=out_dt)

    def quantize_per_token(x, act_scale=None, act_smooth=None):
        if act_scale is not None:
            raise ValueError("export_onnx: a static quantize_per_token node is left after unfusing (a bug in fxquant)")
        return quantize(x, act_smooth)

    def int8_linear(x, w_q, w_scale, bias, activation: str, backend: str, w_qmax: int, out_dtype=None,
                    act_scale=None, act_smooth=None):
        out_dt = dtypes.get(out_dtype, dtype_of(x))
        if act_scale is not None:
            return static_linear(x, w_q, w_scale, bias, activation, act_scale, act_smooth, out_dt)
        x_q, scale = quantize(x, act_smooth)
        return linear_q(x_q, scale, w_q, w_scale, bias, activation, out_dt)

    def int8_linear_q(x_q, x_scale, w_q, w_scale, bias, activation: str, backend: str, w_qmax: int, out_dtype=None):
        return linear_q(x_q, x_scale, w_q, w_scale, bias, activation, dtypes.get(out_dtype, DT.FLOAT))

    def layer_norm_quant(x, normalized_shape, weight, bias, eps: float, return_float: bool, act_scale=None,
                         act_smooth=None):
        xf = op.Cast(x, to=DT.FLOAT)
        k = op.Shape(xf, start=-1)
        w = op.Cast(weight, to=DT.FLOAT) if weight is not None else op.ConstantOfShape(k, value=onnxscript.ir.tensor([1.0]))
        b = op.Cast(bias, to=DT.FLOAT) if bias is not None else op.ConstantOfShape(k, value=onnxscript.ir.tensor([0.0]))
        ln = op.LayerNormalization(xf, w, b, axis=-1, epsilon=eps)  # (Y, Mean, InvStdDev) when traced
        y = op.Cast(ln[0] if isinstance(ln, (tuple, list)) else ln, to=dtype_of(x))
        y_q, scale = quantize(y, act_smooth)
        return (y if return_float else empty(x)), y_q, scale

    def rms_norm_quant(x, weight, eps: float, cast_before_weight: bool, return_float: bool, act_scale=None,
                       act_smooth=None):
        xf = op.Cast(x, to=DT.FLOAT)
        ms = op.ReduceMean(op.Mul(xf, xf), last_axis(), keepdims=1)
        n = op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(ms, const(eps)))))
        if weight is None:
            y = op.Cast(n, to=dtype_of(x))
        elif cast_before_weight:  # Hugging Face LlamaRMSNorm: weight * n.to(x.dtype)
            y = op.Mul(weight, op.Cast(n, to=dtype_of(x)))
        else:  # torch.nn.RMSNorm / Gemma: the product in fp32
            y = op.Cast(op.Mul(n, op.Cast(weight, to=DT.FLOAT)), to=dtype_of(x))
        y_q, scale = quantize(y, act_smooth)
        return (y if return_float else empty(x)), y_q, scale

    fx = torch.ops.fxquant
    return {fx.quantize_per_token.default: quantize_per_token, fx.int8_linear.default: int8_linear,
            fx.int8_linear_q.default: int8_linear_q, fx.layer_norm_quant.default: layer_norm_quant,
            fx.rms_norm_quant.default: rms_norm_quant}


def _per_linear_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a static-scheme graph (sharing its tensors) in which every int8 Linear quantizes its own float
    input: a norm-quant op becomes the float norm, a shared ``quantize_per_token`` disappears, and each
    ``int8_linear_q`` reading them becomes ``int8_linear`` of the float value with the quantizer's static scale
    and SmoothQuant factor; a gated GEMM becomes its gate and up Linears, a sibling GEMM its Linears. Same
    numbers; the ONNX form then gets one QuantizeLinear/DequantizeLinear pair per Linear, as TensorRT's explicit
    quantization requires (a pair must not be shared between consumers)."""
    g = torch.fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    g._codegen = copy.deepcopy(gm.graph._codegen)
    module = torch.fx.GraphModule(gm, g)
    g = module.graph
    quantizers = (ops.QUANTIZE_PER_TOKEN, ops.LAYER_NORM_QUANT, ops.RMS_NORM_QUANT)
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in quantizers:
            continue
        r = ops.CONTRACTS[node.target].record_of(node)
        with g.inserting_before(node):
            value = r.x if node.target is ops.QUANTIZE_PER_TOKEN else \
                g.call_function(ops.quantized_value, (node.target, *node.args))
        for item in list(node.users):
            assert item.op == "call_function" and item.target is operator.getitem, item.format_node()
            if node.target is not ops.QUANTIZE_PER_TOKEN and item.args[1] == ops.NORM_QUANT_FLOAT:
                item.replace_all_uses_with(value)
                continue
            for lin in list(item.users):
                if lin.op == "call_function" and lin.target is ops.INT8_LINEAR_Q:
                    ops.FusedLinear.of(lin)._replace(x=value, x_q=None, x_scale=None, act_scale=r.act_scale,
                                                     act_smooth=r.act_smooth).set(lin)
    for node in [n for n in g.nodes if ops.FusedLinear.is_fused_linear(n)]:
        if ops.FusedLinear.of(node).activation in GATED_ACTIVATIONS:
            _split_gated(module, node)
        elif len(members_of(node)) > 1:
            _split_siblings(module, node)
    g.eliminate_dead_code()
    g.lint()
    module.recompile()
    return module


def _rows_of(module: torch.fx.GraphModule, node: torch.fx.Node, rows: slice, what: str) -> ops.FusedLinear:
    """The fused Linear ``node`` restricted to output channels ``rows`` of its stacked weight: its int8 weight,
    scale and bias rows as buffers of their own (named after ``what``), inserted before ``node``."""
    g = module.graph
    f = ops.FusedLinear.of(node)
    parts = {}
    for field in ("w_q", "w_scale", "bias"):
        attr = getattr(f, field)
        if attr is None:
            parts[field] = None
            continue
        name = f"_export_{what}_{attr.target.replace('.', '_')}"
        module.register_buffer(name, fetch_attr(module, attr.target)[rows].clone())
        with g.inserting_before(node):
            parts[field] = g.get_attr(name)
    return f._replace(**parts)


def _split_gated(module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Replace a gated GEMM (gate over up stacked in one [2I, K] weight) by its two Linears, act(gate) · up."""
    g = module.graph
    f = ops.FusedLinear.of(node)
    half = ops.out_features(fetch_attr(module, f.w_q.target), f.activation)
    halves = []
    for h, (what, act) in enumerate((("gate", GATED_ACTIVATIONS[f.activation]), ("up", "none"))):
        part = _rows_of(module, node, slice(h * half, (h + 1) * half), what)
        with g.inserting_before(node):
            halves.append(part._replace(activation=act).call(g))
    with g.inserting_before(node):
        product = g.call_function(torch.ops.aten.mul.Tensor, tuple(halves))
    node.replace_all_uses_with(product)
    g.erase_node(node)


def _split_siblings(module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Replace a sibling GEMM (the Linears reading one input, weights stacked in one [ΣN, K]) by its Linears:
    each slice of the GEMM's output (``rewrite.fuse_sibling_linears``) becomes the Linear of those rows."""
    g = module.graph
    start, pieces = 0, {}
    for member in members_of(node):
        part = _rows_of(module, node, slice(start, start + member.n), member.name.replace(".", "_"))
        with g.inserting_before(node):
            pieces[(start, start + member.n)] = part.call(g)
        start += member.n
    for user in list(node.users):
        rows = (AtenSlice.of(user).start, AtenSlice.of(user).end) if AtenSlice.matches(user) else None
        if rows not in pieces:
            raise ValueError(f"export_onnx: {user.format_node()} reads the sibling GEMM {node.name} other than as "
                             "one Linear's slice (a bug in fxquant)")
        user.replace_all_uses_with(pieces[rows])
        g.erase_node(user)
    g.erase_node(node)


def export_onnx(qmodel, path: str | os.PathLike, example_inputs: tuple | Mapping[str, Any], *,
                opset: int = MIN_OPSET, dynamic: bool = True, qdq_dtype: str = "int8") -> Path:
    """Export a compiled model to ONNX (the form in the module docstring), check it, and write it atomically.

    Args:
        qmodel: a :class:`fxquant.QuantizedModel` with at least one int8 Linear.
        path: the ``.onnx`` file to write (its directory must exist). Written under a temporary name in that
            directory, checked with ``onnx.checker.check_model(full_check=True)``, then renamed: on any error
            nothing is left at ``path`` (an existing file there is untouched).
        example_inputs: the inputs as the model is called (a tuple of positional args or a dict of keyword
            args), e.g. the ones given to ``fxquant.compile``.
        opset: ONNX opset, ≥ 18 (:data:`MIN_OPSET`).
        dynamic: keep every input dimension dynamic where torch.export can (``Dim.AUTO``); False fixes the
            example's shapes.
        qdq_dtype: the static form's activation type: ``"int8"`` (zero point 0: TensorRT's explicit
            quantization, OpenVINO) or ``"uint8"`` (zero point 128: the same integers, x + 128). ONNX Runtime's
            x86 CPU kernels take u8 activations; it converts an int8 Q/DQ pair to uint8 itself only where the
            QuantizeLinear has one consumer, and its common-subexpression pass merges the identical pairs of
            q/k/v into one QuantizeLinear with three: measured on MiniLM (ORT 1.32, AVX2), 18 of 37 MatMuls run
            as integer GEMMs with int8, 36 of 37 with uint8. Ignored by the dynamic form.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: ``qmodel`` is not a QuantizedModel (compile the model with ``fxquant.compile`` first), or
            ``example_inputs`` is not a tuple or dict.
        ValueError: no Linear of the model runs int8 (nothing to export in this form), ``opset`` < 18, an
            unknown ``qdq_dtype``, or the directory of ``path`` does not exist. A model compiled with
            ``QuantConfig.compute_dtype`` exports its model's own (unrounded) float tensors and dtype: the same
            file as without it.
        fxquant.CalibrationError: a static-scheme model that is not calibrated (:func:`fxquant.calibrate`).
        ModuleNotFoundError: onnx / onnxscript missing (``pip install 'fxquant[export]'``).
    """
    program_of(qmodel, "export_onnx")  # TypeError for anything but a QuantizedModel
    with qmodel._exact_floats():  # QuantConfig.compute_dtype: the model's own float tensors, not the rounded ones
        return _export_onnx(qmodel, path, example_inputs, opset=opset, dynamic=dynamic, qdq_dtype=qdq_dtype)


def _export_onnx(qmodel, path: str | os.PathLike, example_inputs: tuple | Mapping[str, Any], *,
                opset: int = MIN_OPSET, dynamic: bool = True, qdq_dtype: str = "int8") -> Path:

    program = program_of(qmodel, "export_onnx")
    if qmodel.report().num_int8 == 0:
        raise ValueError("export_onnx: no Linear of this model runs int8 (see qmodel.report() for why), so there is "
                         "no W8A8 graph to export; lower min_ratio or export the float model with torch.onnx")
    if qdq_dtype not in _QDQ_ZERO_POINTS:
        raise ValueError(f"export_onnx: qdq_dtype={qdq_dtype!r} is unknown; choose one of {sorted(_QDQ_ZERO_POINTS)}")
    static = qmodel.config.activation_scheme == "static-per-tensor"
    if static:
        qmodel.check_calibrated("exported")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset={opset!r} is too old; the W8A8 form needs opset >= {MIN_OPSET} "
                         f"(ReduceMax with axes as an input)")
    if not isinstance(example_inputs, (tuple, Mapping)):
        raise TypeError(f"example_inputs must be a tuple of positional args or a dict of keyword args, "
                        f"got {type(example_inputs).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"export_onnx: the directory of {str(path)!r} does not exist")
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"export_onnx needs onnx and onnxscript: pip install 'fxquant[export]' ({e})") from e

    args, kwargs = (tuple(example_inputs), {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    kwargs.update(program.forward.fixed_kwargs)
    shapes = None
    if dynamic:
        auto = torch.export.Dim.AUTO

        def spec(v):
            return {d: auto for d in range(v.dim())} if isinstance(v, torch.Tensor) else None

        shapes = tuple(spec(a) for a in args) if args else {k: spec(v) for k, v in kwargs.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad():
            module = _per_linear_graph(qmodel.graph_module) if static else qmodel.graph_module
            program = torch.onnx.export(module.eval(), args, kwargs=kwargs or None, dynamo=True,
                                        custom_translation_table=_translations(qdq_dtype), opset_version=opset,
                                        dynamic_shapes=shapes, verbose=False)
        program.save(tmp)
        if static:
            _dedicated_qdq_pairs(tmp)
        onnx.checker.check_model(tmp, full_check=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _dedicated_qdq_pairs(path: str) -> int:
    """Give every reader of an activation's QuantizeLinear -> DequantizeLinear pair its own copy of the pair
    (TensorRT's explicit quantization places one pair per consumer; the exporter's optimizer merges the
    identical pairs in front of q, k and v). Rewrites the file in place, external data untouched; returns the
    number of pairs added."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[int, list] = {}  # id(QuantizeLinear) -> [(reader, input index, its DequantizeLinear)]
    for user in nodes:
        for j, name in enumerate(user.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                readers.setdefault(id(q), [q]).append((user, j, dq))
    before: dict[int, list] = {}
    added = 0
    for q, *uses in readers.values():
        for k, (user, j, dq) in enumerate(uses[1:], start=1):
            q_copy = onnx.NodeProto()
            q_copy.CopyFrom(q)
            q_copy.name, q_copy.output[0] = f"{q.name}_pair{k}", f"{q.output[0]}_pair{k}"
            dq_copy = onnx.NodeProto()
            dq_copy.CopyFrom(dq)
            dq_copy.name, dq_copy.output[0], dq_copy.input[0] = f"{dq.name}_pair{k}", f"{dq.output[0]}_pair{k}", q_copy.output[0]
            user.input[j] = dq_copy.output[0]
            before.setdefault(id(user), []).extend([q_copy, dq_copy])
            added += 1
    if not added:
        return 0
    ordered = [m for n in nodes for m in (*before.get(id(n), []), n)]
    read = {i for n in ordered for i in n.input} | {o.name for o in model.graph.output}
    kept = [n for n in ordered if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in read for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, path)
    return added


def integer_ops(optimized_model: str | os.PathLike) -> dict[str, int]:
    """Counts of the integer-GEMM operators in an ONNX model (e.g. ONNX Runtime's optimized graph, written with
    ``SessionOptions.optimized_model_filepath``): MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul,
    QLinearMatMul, ConvInteger, QGemm."""
    import onnx

    names = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "ConvInteger", "QGemm")
    model = onnx.load(str(optimized_model), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in names:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts

