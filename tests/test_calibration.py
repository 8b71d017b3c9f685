"""Calibration (issue #11): static per-tensor activation scales and SmoothQuant, in torch.

Numbers asserted: the installed scales against an independent computation over the calibration batches
(minmax; percentile by numpy's nearest-rank ``inverted_cdf``), the SmoothQuant rewrite against the float model
(exact up to fp32 rounding), SQNR of the static model against float, and the errors a user can cause."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant.ir import ops, reference
from fxquant.plan import planner as passes
from fxquant.program import Method, Program
from fxquant.weights import calibration
from fxquant.weights.store import WeightStore
from fxquant.frontend.capture import capture

STATIC = "static-per-tensor"


class _OutlierMLP(torch.nn.Module):
    """LayerNorm whose γ has a few large channels (the activation outliers SmoothQuant is about, Xiao et al.
    2023 §3) feeding two sibling Linears, GELU, and a Linear that quantizes its own input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(64)
        with torch.no_grad():
            self.norm.weight[:4] = 40.0
        self.up = torch.nn.Linear(64, 128)
        self.gate = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)

    def forward(self, x):
        h = self.norm(x)
        return self.down(F.gelu(self.up(h)) * self.gate(h))


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 5 + i, 64, generator=g),) for i in range(n)]


def _cfg(**kw):
    return fxquant.QuantConfig(min_ratio=0, weight_qmax=127, backend="reference", **kw)


def _buffers(qm, leaf):
    return {name: b for name, b in qm.graph_module.named_buffers() if name.endswith("." + leaf)}


def test_minmax_scales_are_the_calibration_maxima_and_the_model_runs_with_them(sqnr):
    model = _OutlierMLP().eval()
    batches = _batches()
    qm = fxquant.compile(model, batches[0], config=_cfg(activation_scheme=STATIC), calibration=batches, progress=False)
    scales = _buffers(qm, "input_scale")
    # one scale per quantizing node: the norm's (shared by up and gate) and down's own
    assert sorted(scales) == ["down.input_scale", "up.input_scale"], sorted(scales)
    with torch.no_grad():
        want = max(float(F.layer_norm(x, (64,), model.norm.weight, model.norm.bias).abs().max()) for (x,) in batches) / 127
    assert scales["up.input_scale"].dtype == torch.float32 and scales["up.input_scale"].shape == (1,)
    assert math.isclose(float(scales["up.input_scale"]), want, rel_tol=1e-6)
    # down's input comes out of the int8 Linears (calibration runs the dynamic form): close to the float maximum
    with torch.no_grad():
        float_down = max(float((F.gelu(model.up(model.norm(x))) * model.gate(model.norm(x))).abs().max()) for (x,) in batches)
    assert abs(float(scales["down.input_scale"]) * 127 / float_down - 1) < 0.02
    # the static model computes its reference numerics: quantize with the scales, exact GEMM, epilogue
    x = torch.randn(3, 7, 64)
    h = F.layer_norm(x, (64,), model.norm.weight, model.norm.bias)
    h_q, h_s = reference.quantize_per_token(h, scales["up.input_scale"])
    assert torch.equal(h_s, scales["up.input_scale"].expand(3, 7, 1))
    with torch.no_grad():
        got = qm(x)
        ref = model(x)
    assert sqnr(ref, got) >= 25.0  # measured 27.5 dB: per-tensor scales over LayerNorm outliers of 40


def test_percentile_is_the_mean_of_each_batchs_nearest_rank_percentile():
    model = _OutlierMLP().eval()
    batches = _batches()
    qm = fxquant.compile(model, batches[0], config=_cfg(activation_scheme=STATIC, calibration_method="percentile",
                                                        percentile=99.0), calibration=batches, progress=False)
    with torch.no_grad():
        per_batch = [np.percentile(F.layer_norm(x, (64,), model.norm.weight, model.norm.bias).abs().numpy(), 99.0,
                                   method="inverted_cdf") for (x,) in batches]
    got = float(_buffers(qm, "input_scale")["up.input_scale"])
    assert math.isclose(got, float(np.mean(per_batch)) / 127, rel_tol=1e-5)
    # recalibrating with minmax replaces the scales in place (same buffers, larger values)
    fxquant.calibrate(qm, batches, method="minmax", progress=False)
    assert float(_buffers(qm, "input_scale")["up.input_scale"]) > got
    assert len(_buffers(qm, "input_scale")) == 2


def test_smoothquant_rewrite_is_exact_on_the_float_graph():
    """W·diag(s) with the activation times diag(s)⁻¹ gives the float model's outputs (fp32 rounding only)."""
    model = _OutlierMLP().eval()
    batches = _batches()
    config = _cfg(smoothquant=0.5)
    user_weight = model.up.weight.detach().clone()
    gm = capture(model, batches[0]).graph_module
    passes.annotate(gm, config, 127, model)
    probe = fxquant.QuantizedModel(Program({"forward": Method(gm, {})}, None, WeightStore(), config), None)
    factors = calibration.smoothquant(gm, 0.5, calibration.batches_of(batches), probe._run_unchecked, WeightStore(),
                                      progress=False)
    assert len(factors) == 2  # the norm's group (up, gate) and down's
    # apply each factor to its group's input, as the quantizers do, and run the float graph
    g = gm.graph
    for node in list(g.nodes):
        d = node.meta.get("fxquant") if node.op == "call_function" and node.target is torch.ops.aten.linear.default else None
        if d is not None and d.group in factors:
            name = f"_smooth_{d.group}"
            if not hasattr(gm, name):
                gm.register_buffer(name, factors[d.group])
            with g.inserting_before(node):
                scaled = g.call_function(torch.ops.aten.mul.Tensor, (node.args[0], g.get_attr(name)))
            node.args = (scaled, *node.args[1:])
    gm.recompile()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert not torch.equal(gm.up.weight, model.up.weight)  # the graph's own weights were rescaled ...
    assert torch.equal(model.up.weight, user_weight)  # ... and the user's are not
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_smoothquant_helps_static_accuracy_and_is_reported(sqnr):
    """LayerNorm with outlier channels into one Linear: static per-tensor scales are set by the outliers, and
    smoothing them (a mild α: SmoothQuant's α is a per-model knob; on MiniLM 0.8 is best) gains SQNR."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight[:4] = 40.0
    model = torch.nn.Sequential(norm, torch.nn.Linear(64, 128)).eval()
    batches = _batches()
    x = torch.randn(4, 9, 64)
    with torch.no_grad():
        ref = model(x)
    plain = fxquant.compile(model, batches[0], config=_cfg(activation_scheme=STATIC), calibration=batches, progress=False)
    smooth = fxquant.compile(model, batches[0], config=_cfg(activation_scheme=STATIC, smoothquant=0.3),
                             calibration=batches, progress=False)
    with torch.no_grad():
        plain_db, smooth_db = sqnr(ref, plain(x)), sqnr(ref, smooth(x))
    assert smooth_db >= plain_db + 3.0, (plain_db, smooth_db)  # measured 31.9 -> 40.0 dB
    d = smooth.report().decisions[0]
    assert d.patterns[0] == "smoothquant(α=0.3)" and d.pattern.startswith("smoothquant(α=0.3)+")
    assert any(n.startswith("SmoothQuant (alpha=0.3) on 1 quantized input(s), 1 Linear(s)") for n in smooth.report().notes)
    assert sorted(_buffers(smooth, "input_smooth")) == ["1.input_smooth"]
    # the user's model is untouched
    assert torch.equal(norm.weight[:4], torch.full((4,), 40.0))
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_smoothquant_with_dynamic_scheme(sqnr):
    model = _OutlierMLP().eval()
    batches = _batches()
    x = torch.randn(4, 9, 64)
    with torch.no_grad():
        ref = model(x)
        dyn = fxquant.compile(model, batches[0], config=_cfg())(x)
        smooth = fxquant.compile(model, batches[0], config=_cfg(smoothquant=0.5), calibration=batches, progress=False)(x)
    assert sqnr(ref, smooth) >= sqnr(ref, dyn) + 1.0  # measured 33.2 -> 38.5 dB


def test_calibration_errors_leave_the_model_as_it_was(tmp_path):
    model = _OutlierMLP().eval()
    batches = _batches()
    qm = fxquant.compile(model, batches[0], config=_cfg(activation_scheme=STATIC), progress=False)
    before = qm.golden()
    with pytest.raises(fxquant.CalibrationError, match="not calibrated"):
        qm(batches[0][0])
    with pytest.raises(fxquant.CalibrationError, match="calibration data is empty"):
        fxquant.calibrate(qm, iter([]))
    with pytest.raises(fxquant.CalibrationError, match="iterable of batches"):
        fxquant.calibrate(qm, batches[0][0])
    with pytest.raises(fxquant.CalibrationError, match="calibration batch 1 cannot be run"):
        fxquant.calibrate(qm, [batches[0], (torch.randn(2, 64),)], progress=False)
    with pytest.raises(fxquant.CalibrationError, match="calibration batch 0 is a str"):
        fxquant.calibrate(qm, ["text"], progress=False)
    with pytest.raises(ValueError, match="method='mean' is unknown"):
        fxquant.calibrate(qm, batches, method="mean")
    assert qm.golden() == before and not _buffers(qm, "input_scale")
    with pytest.raises(fxquant.CalibrationError, match="not calibrated"):
        qm(batches[0][0])
    fxquant.calibrate(qm, batches, progress=False)
    assert qm(batches[0][0]).shape == (2, 5, 64)

    with pytest.raises(fxquant.CheckpointError, match="cannot carry"):
        qm.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()

    dynamic = fxquant.compile(model, batches[0], config=_cfg())
    with pytest.raises(fxquant.CalibrationError, match="computed at run time"):
        fxquant.calibrate(dynamic, batches)
    with pytest.raises(fxquant.CalibrationError, match="needs calibration data"):
        fxquant.compile(model, batches[0], config=_cfg(smoothquant=0.5))
    with pytest.raises(fxquant.CalibrationError, match="nothing uses it"):
        fxquant.compile(model, batches[0], config=_cfg(activation_scheme="dynamic-per-token"), calibration=batches)
    with pytest.raises(fxquant.CalibrationError, match="nothing uses it"):  # auto: a static form for cpu only
        fxquant.compile(model, batches[0], config=_cfg(target="cuda"), calibration=batches)
    with pytest.raises(ValueError, match="smoothquant=1.5"):
        fxquant.QuantConfig(smoothquant=1.5)
    with pytest.raises(ValueError, match="activation_scheme='static'"):
        fxquant.QuantConfig(activation_scheme="static")


@pytest.mark.skipif(not fxquant.targets.backends.onednn_available(), reason="this torch build has no oneDNN int8 Linear")
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_static_scale_runs_in_onednns_own_epilogue(activation, out_dtype):
    """A static scale reaches oneDNN as its src scale, with bias and activation as its post-op (silu is not one
    of them: the torch epilogue runs); the result is the reference epilogue's up to rounding order."""
    from fxquant.targets import backends

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 96, generator=g), torch.randn(80, 96, generator=g) * 0.05, torch.randn(80, generator=g)
    qmax = 127 if backends.cpu_int8_full_range_exact() else 63
    w_q, w_s = reference.quantize_weight_per_channel(w, qmax)
    scale = torch.tensor([float(x.abs().max()) / 127])
    x_q, x_s = backends.quantize_per_token(x, scale)
    assert x_s.is_contiguous() and torch.equal(x_s, scale.expand(37, 1))  # s in every row, its own tensor
    got = backends.run_linear(x_q, x_s, ops.INT8_LINEAR_Q_C.record(x_q, x_s, w_q, w_s, b, activation, "onednn", qmax, out_dtype), out_dtype)
    want = reference.int8_linear(x_q, x_s.contiguous(), w_q, w_s, b, activation, out_dtype)
    assert got.dtype == out_dtype
    # measured: <= 2.4e-7 (fp32, |y| ~ 2) and 0 (bf16) apart
    torch.testing.assert_close(got, want, rtol=1e-5 if out_dtype == torch.float32 else 1e-2, atol=1e-5)


def test_auto_scheme_measures_static_smoothquant_against_dynamic_and_keeps_the_best():
    """activation_scheme="auto" (the default) with calibration data: dynamic per-token and static per-tensor with
    each SmoothQuant α are compiled (static scales from the first three quarters of the batches) and scored (output
    cosine against the float model on the last quarter);
    the most accurate static form is returned when it is within AUTO_STATIC_TOLERANCE of dynamic's, else the
    dynamic model; the report says which and why. Without calibration, auto is dynamic per-token."""
    from fxquant.config import AUTO_SMOOTHQUANT_ALPHAS, AUTO_STATIC_TOLERANCE

    model = _OutlierMLP().eval()
    batches = _batches()
    assert fxquant.QuantConfig().activation_scheme == "auto"
    plain = fxquant.compile(model, batches[0], config=_cfg(), progress=False)
    assert plain.config.activation_scheme == "dynamic-per-token" and plain.scheme_scores is None
    qm = fxquant.compile(model, batches[0], config=_cfg(), calibration=iter(batches), progress=False)  # read once
    scores = qm.scheme_scores
    statics = {f"static-per-tensor, smoothquant={a}": a for a in AUTO_SMOOTHQUANT_ALPHAS}
    assert set(scores) == {"dynamic-per-token", *statics}
    assert all(0.9 < lo <= mean <= 1.0 + 1e-6 for mean, lo in scores.values()), scores
    best = max(statics, key=lambda n: scores[n][0])
    if scores[best][0] >= scores["dynamic-per-token"][0] - AUTO_STATIC_TOLERANCE:
        assert (qm.config.activation_scheme, qm.config.smoothquant) == ("static-per-tensor", statics[best])
    else:
        assert (qm.config.activation_scheme, qm.config.smoothquant) == ("dynamic-per-token", None)
    # the outlier channels make α matter: the strengths measured give different accuracies
    assert max(scores[n][0] for n in statics) - min(scores[n][0] for n in statics) > 1e-5, scores
    # scored on the held-out last quarter (here the last of 3 batches): the dynamic score is what the dynamic model
    # computes there
    with torch.no_grad():
        (x,) = batches[-1]
        cos = F.cosine_similarity(plain(x).reshape(x.shape[0], -1), model(x).reshape(x.shape[0], -1), dim=-1)
    assert abs(float(cos.mean()) - scores["dynamic-per-token"][0]) < 1e-6
    chosen = best if qm.config.activation_scheme == "static-per-tensor" else "dynamic-per-token"
    note = [n for n in qm.report().notes if n.kind.value == "scheme"]
    assert len(note) == 1 and f"chose {chosen}" in note[0] and "1 calibration batch(es) held out" in note[0], note
