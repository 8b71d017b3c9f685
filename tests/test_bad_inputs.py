"""What users get wrong, and inputs at the edges: wrong argument types, untraceable models, dtypes that
stay float, empty batches, input ranks, non-finite values, zero weights, training mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxquant
from fxquant import QuantConfig, TraceError

FRONT_ENDS = ["export", "symbolic_trace"]

# These tests are about inputs and edge cases, not the beneficial-ratio threshold: they compile with
# min_ratio=0 so that their small Linears (64 -> 256: ratio 51.2, under the cpu default 96) are int8.
ALL_RATIOS = QuantConfig(min_ratio=0)


def _ei(front_end, *args):
    return tuple(args) if front_end == "export" else None


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


# ------------------------------------------------------------------------------- argument types
@pytest.mark.parametrize(
    "model, type_name",
    [
        ("a string", "str"),
        (lambda x: x, "function"),
        (torch.randn(3), "Tensor"),
        (None, "NoneType"),
        (nn.Linear, "type"),  # the class, not an instance
    ],
)
def test_compile_rejects_non_module(model, type_name):
    with pytest.raises(TypeError) as info:
        fxquant.compile(model)
    assert type_name in str(info.value)
    assert "nn.Module" in str(info.value)


def test_example_inputs_bare_tensor():
    with pytest.raises(TypeError) as info:
        fxquant.compile(MLP(), torch.randn(2, 64))
    msg = str(info.value)
    assert "(x,)" in msg and "Tensor" in msg


@pytest.mark.parametrize("bad, type_name", [([torch.randn(2, 64)], "list"), ("x", "str"), (3, "int"), ({1, 2}, "set")])
def test_example_inputs_wrong_container(bad, type_name):
    with pytest.raises(TypeError) as info:
        fxquant.compile(MLP(), bad)
    assert type_name in str(info.value)
    assert "(x,)" not in str(info.value)  # the hint is for bare tensors only


@pytest.mark.parametrize("config, type_name", [({"target": "cpu"}, "dict"), ("cpu", "str"), (fxquant.TARGETS["cpu"], "TargetSpec")])
def test_config_wrong_type(config, type_name):
    with pytest.raises(TypeError) as info:
        fxquant.compile(MLP(), (torch.randn(2, 64),), config=config)
    assert "QuantConfig" in str(info.value) and type_name in str(info.value)


def test_argument_errors_leave_model_untouched(untouched):
    m = MLP()

    def bad_calls():
        for kwargs in ({"example_inputs": torch.randn(2, 64)}, {"config": {"target": "cpu"}}):
            with pytest.raises(TypeError):
                fxquant.compile(m, **kwargs)

    untouched(m, bad_calls)


# ------------------------------------------------------------------------------- untraceable models
class DataDependent(nn.Module):
    """Python control flow on a tensor value: symbolic_trace cannot follow it, nor can torch.export."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 256)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 256)

    def forward(self, x):
        raise RuntimeError("forward is broken on purpose")


@pytest.mark.parametrize(
    "model_cls, example_inputs, front_end, cause_type",
    [
        (DataDependent, None, "torch.fx.symbolic_trace", Exception),
        (DataDependent, (torch.randn(2, 64),), "torch.export", Exception),
        (Raises, (torch.randn(2, 64),), "torch.export", RuntimeError),
        (Raises, {"x": torch.randn(2, 64)}, "torch.export", RuntimeError),
    ],
)
def test_untraceable_model_raises_trace_error(untouched, model_cls, example_inputs, front_end, cause_type):
    m = model_cls()
    m.train()

    def attempt():
        with pytest.raises(TraceError) as info:
            fxquant.compile(m, example_inputs)
        return info.value

    err = untouched(m, attempt)
    assert isinstance(err, fxquant.FxquantError)
    msg = str(err)
    assert model_cls.__name__ in msg
    assert front_end in msg
    assert err.model_class == model_cls.__name__ and err.front_end == front_end
    assert err.__cause__ is not None and isinstance(err.__cause__, cause_type)
    assert type(err.__cause__).__name__ in msg
    if model_cls is Raises:
        assert "forward is broken on purpose" in msg
    assert "What to do" in msg
    assert all(mod.training for mod in m.modules())


# --------------------------------------------------------------------------- dtypes that stay float
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_float64_linear_stays_float(front_end, untouched):
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).double().eval()
    x = torch.randn(3, 64, dtype=torch.float64)
    qm = untouched(m, lambda: fxquant.compile(m, _ei(front_end, x), config=ALL_RATIOS))
    rep = qm.report()
    assert len(rep.decisions) == 2 and rep.num_int8 == 0
    for d in rep.decisions:
        assert not d.quantize and d.dtype == torch.float64
        assert "float64" in d.reason
    assert rep.node_counts.get("aten.linear") == 2
    assert not any(k.startswith("fxquant.") for k in rep.node_counts)
    with torch.no_grad():
        out = qm(x)
        assert out.dtype == torch.float64
        assert torch.equal(out, m(x))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_integer_weight_linear_is_kept(front_end, untouched):
    """nn.Linear can hold int64 weights as non-trainable Parameters, and F.linear runs on int64 on CPU."""

    class IntLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 256)
            g = torch.Generator().manual_seed(3)
            self.fc.weight = nn.Parameter(torch.randint(-3, 4, (256, 64), generator=g), requires_grad=False)
            self.fc.bias = nn.Parameter(torch.randint(-3, 4, (256,), generator=g), requires_grad=False)

        def forward(self, x):
            return self.fc(x)

    m = IntLinear().eval()
    x = torch.randint(-5, 6, (4, 64))
    qm = untouched(m, lambda: fxquant.compile(m, _ei(front_end, x), config=ALL_RATIOS))
    (d,) = qm.report().decisions
    assert not d.quantize and d.dtype == torch.int64 and "int64" in d.reason
    out = qm(x)
    assert out.dtype == torch.int64 and torch.equal(out, m(x))


# -------------------------------------------------------------------------------- empty batch, ranks
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_empty_batch(front_end):
    m = MLP().eval()
    qm = fxquant.compile(m, _ei(front_end, torch.randn(4, 64)), config=ALL_RATIOS)
    assert qm.report().num_int8 == 2
    # an exported graph keeps the example's rank; a symbolically traced one takes any rank
    shapes = [(0, 64)] if front_end == "export" else [(0, 64), (0, 3, 64), (2, 0, 64)]
    for shape in shapes:
        out = qm(torch.randn(shape))
        assert out.shape == (*shape[:-1], 64) and out.dtype == torch.float32


def test_empty_batch_as_example_input():
    m = MLP().eval()
    qm = fxquant.compile(m, (torch.randn(0, 64),), config=ALL_RATIOS)
    assert qm.report().num_int8 == 2
    assert qm(torch.randn(0, 64)).shape == (0, 64)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("shape", [(64,), (2, 3, 64), (2, 3, 5, 64)])
def test_input_ranks(front_end, shape, sqnr):
    m = nn.Sequential(nn.Linear(64, 256)).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g)
    qm = fxquant.compile(m, _ei(front_end, x), config=ALL_RATIOS)
    assert qm.report().node_counts == {"fxquant.int8_linear": 1}
    with torch.no_grad():
        out, ref = qm(x), m(x)
        assert out.shape == (*shape[:-1], 256)
        assert sqnr(ref, out) >= 35.0  # measured ~40-41 dB
        if front_end == "symbolic_trace" and len(shape) > 1:
            # rows are quantized independently: the same rows as one 2-D batch give the same numbers
            # (an exported graph is specialized to the example's rank, so only the traced one takes 2-D)
            assert torch.equal(qm(x.reshape(-1, 64)).reshape(out.shape), out)


def test_bare_linear_model_with_example_inputs():
    m = nn.Linear(64, 256).eval()
    x = torch.randn(3, 64)
    qm = fxquant.compile(m, (x,), config=ALL_RATIOS)
    assert qm.report().num_int8 == 1
    assert qm(x).shape == (3, 256)


def test_bare_linear_model_symbolic_trace(sqnr):
    m = nn.Linear(64, 256).eval()
    x = torch.randn(3, 64)
    qm = fxquant.compile(m, config=ALL_RATIOS)
    assert qm.report().num_int8 == 1
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 35.0


# --------------------------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("model_kind", ["linear", "mlp"])
def test_nan_inf_rows_propagate_like_float(front_end, model_kind):
    m = (nn.Sequential(nn.Linear(64, 256)) if model_kind == "linear" else MLP()).eval()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    qm = fxquant.compile(m, _ei(front_end, x), config=ALL_RATIOS)
    assert qm.report().num_int8 == sum(isinstance(mod, nn.Linear) for mod in m.modules())
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[4, 0] = -float("inf")
    with torch.no_grad():
        out, ref = qm(x), m(x)
    bad_out = ~torch.isfinite(out).all(dim=1)
    bad_ref = ~torch.isfinite(ref).all(dim=1)
    assert bad_ref.tolist() == [False, True, True, False, True, False]
    assert bad_out.tolist() == bad_ref.tolist()
    clean = [0, 3, 5]
    assert torch.isfinite(out[clean]).all()
    # the clean rows are exactly what the clean rows alone give (per-token quantization)
    with torch.no_grad():
        assert torch.equal(out[clean], qm(x[clean]))


# ------------------------------------------------------------------------------- zero weight rows
@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.GELU()])
def test_zero_weight_rows_give_bias(front_end, act):
    lin = nn.Linear(64, 256)
    with torch.no_grad():
        lin.weight[5:9] = 0
        lin.weight[100] = 0
        lin.bias[6] = -0.75  # a negative bias, clipped by ReLU
    m = nn.Sequential(lin, act).eval() if act is not None else nn.Sequential(lin).eval()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(6)) * 3
    qm = fxquant.compile(m, _ei(front_end, x), config=ALL_RATIOS)
    assert qm.report().num_int8 == 1
    with torch.no_grad():
        out = qm(x)
        expected = lin.bias if act is None else act(lin.bias)
    zero_rows = [5, 6, 7, 8, 100]
    assert torch.equal(out[:, zero_rows], expected[zero_rows].expand(7, len(zero_rows)))


# ---------------------------------------------------------------------------------- training mode
class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(256, 64)
        self.drop2 = nn.Dropout(0.3)
        self.norm = nn.BatchNorm1d(64)

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x)))
        return self.norm(self.drop2(self.fc2(h)))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_training_mode_model(front_end, untouched):
    m = WithDropout()
    m.train()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    qm = untouched(m, lambda: fxquant.compile(m, _ei(front_end, x), config=ALL_RATIOS))
    assert all(mod.training for mod in m.modules())
    rep = qm.report()
    assert any("training mode" in n for n in rep.notes)
    assert rep.num_int8 == 2
    names = [
        str(n.target) for n in qm.graph_module.graph.nodes if n.op in ("call_function", "call_module", "call_method")
    ]
    assert not any("dropout" in t.lower() for t in names), names
    assert not any(isinstance(mod, nn.Dropout) for mod in qm.graph_module.modules())
    with torch.no_grad():
        a, b = qm(x), qm(x)
    assert torch.equal(a, b)  # no dropout randomness


@pytest.mark.parametrize(
    "front_end",
    ["export", "symbolic_trace"],
)
def test_training_mode_model_runs_in_eval_semantics(front_end, sqnr):
    m = WithDropout()
    with torch.no_grad():
        m.norm.running_mean.normal_(generator=torch.Generator().manual_seed(8))
        m.norm.running_var.uniform_(0.5, 2.0)
    m.train()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    qm = fxquant.compile(m, _ei(front_end, x), config=ALL_RATIOS)
    assert qm.report().num_int8 == 2  # the comparison below is of a quantized model
    running_mean = m.norm.running_mean.clone()
    with torch.no_grad():
        out = qm(x)
    # calling the quantized model must not touch the user's BatchNorm statistics
    assert m.norm.num_batches_tracked.item() == 0
    assert torch.equal(m.norm.running_mean, running_mean)
    m.eval()
    with torch.no_grad():
        ref = m(x)  # eval semantics: running BatchNorm statistics, no dropout
    assert sqnr(ref, out) >= 30.0  # measured ~50 dB (export)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_eval_mode_model_has_no_training_note(front_end):
    m = MLP().eval()
    qm = fxquant.compile(m, _ei(front_end, torch.randn(2, 64)))
    assert not any("training mode" in n for n in qm.report().notes)
    assert not any(mod.training for mod in m.modules())


def test_call_with_other_arguments_than_captured_is_explained(small_bert):
    torch.manual_seed(0)
    m = small_bert(num_layers=1)
    ids = torch.randint(0, 512, (2, 16))
    qm = fxquant.compile(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(TypeError, match=r"captured with, \['input_ids', 'attention_mask'\].*missing a required argument: 'attention_mask'"):
        qm(input_ids=ids)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'token_type_ids'.*compile again"):
        qm(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    # the captured inputs by name or in order, other shapes: fine
    assert qm(input_ids=ids[:1, :9], attention_mask=torch.ones_like(ids[:1, :9])).last_hidden_state.shape == (1, 9, 256)
    assert qm(ids, torch.ones_like(ids)).last_hidden_state.shape == (2, 16, 256)
