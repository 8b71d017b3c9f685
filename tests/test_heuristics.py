"""Tables for the pure heuristics predicates and QuantConfig validation / overrides."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fxquant
from fxquant import TARGETS, QuantConfig
from fxquant.plan import rules as heuristics
from fxquant.config import TargetSpec
from fxquant.plan.rules import (
    Verdict,
    beneficial_ratio,
    dtype_supported,
    int8_pays_off,
    is_aligned,
    is_skipped,
)


# ------------------------------------------------------------------------------------ beneficial_ratio
@pytest.mark.parametrize(
    "k, n, expected",
    [
        (64, 64, 32.0),
        (128, 128, 64.0),
        (128, 64, 128 * 64 / 192),  # 42.67
        (256, 128, 256 * 128 / 384),  # 85.33: Llama k/v_proj at hidden 256 with 4 heads, 2 kv heads
        (192, 192, 96.0),  # exactly the cpu / arm-sve2 default threshold
        (64, 256, 51.2),
        (256, 4, 1024 / 260),
        (384, 384, 192.0),
        (1, 1, 0.5),
        (0, 64, 0.0),
        (0, 0, 0.0),  # K + N = 0 is defined as 0, not a ZeroDivisionError
        (4096, 11008, 4096 * 11008 / (4096 + 11008)),
    ],
)
def test_beneficial_ratio(k, n, expected):
    assert beneficial_ratio(k, n) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("k, n", [(64, 256), (7, 3), (1000, 10)])
def test_beneficial_ratio_is_symmetric(k, n):
    assert beneficial_ratio(k, n) == beneficial_ratio(n, k)


# ------------------------------------------------------------------------------------- int8_pays_off
@pytest.mark.parametrize(
    "k, n, min_ratio, ok",
    [
        (192, 192, 96.0, True),  # 96 >= 96: the cpu default threshold, equality passes
        (256, 256, 96.0, True),  # 128 >= 96
        (128, 128, 96.0, False),  # 64 < 96
        (256, 128, 96.0, False),  # 85.3 < 96 (Llama k/v_proj of the test models)
        (64, 256, 96.0, False),  # 51.2 < 96
        (64, 64, 32.0, True),  # equal to the threshold passes (>=)
        (64, 64, 32.0001, False),
        (64, 4, 0.0, True),  # min_ratio 0 quantizes everything
        (0, 0, 0.0, True),
        (384, 384, 256.0, False),  # cuda threshold
        (4096, 4096, 256.0, True),
        (4096, 4096, math.inf, False),
    ],
)
def test_int8_pays_off(k, n, min_ratio, ok):
    v = int8_pays_off(k, n, min_ratio)
    assert isinstance(v, Verdict)
    assert v.ok is ok and bool(v) is ok
    assert "ratio" in v.reason
    if not ok:
        assert f"{beneficial_ratio(k, n):.1f}" in v.reason and "min_ratio" in v.reason


# ----------------------------------------------------------------------------------------- is_aligned
@pytest.mark.parametrize(
    "k, n, alignment, ok, bad",
    [
        (64, 64, 8, True, []),
        (64, 64, 1, True, []),
        (33, 17, 1, True, []),
        (65, 64, 8, False, ["K=65"]),  # only K not a multiple
        (64, 65, 8, False, ["N=65"]),  # only N
        (65, 67, 8, False, ["K=65", "N=67"]),  # both named
        (12, 8, 4, True, []),
        (10, 8, 4, False, ["K=10"]),
        (0, 0, 8, True, []),
    ],
)
def test_is_aligned(k, n, alignment, ok, bad):
    v = is_aligned(k, n, alignment)
    assert v.ok is ok
    for b in bad:
        assert b in v.reason
    if ok:
        assert "K=" not in v.reason and "N=" not in v.reason
    else:
        assert f"multiple of {alignment}" in v.reason
        # a dimension that is aligned is not blamed
        for name, val in (("K", k), ("N", n)):
            if val % alignment == 0:
                assert f"{name}={val}" not in v.reason


# ----------------------------------------------------------------------------------------- is_skipped
@pytest.mark.parametrize(
    "name, skip, ok, reason_part",
    [
        ("pooler.dense", ["pooler.dense"], True, "skipped by name"),
        ("pooler.dense", ["pooler"], False, "not in skip list"),  # exact names do not prefix-match
        ("pooler.dense", ["dense"], False, "not in skip list"),
        ("pooler.dense", [], False, "not in skip list"),
        ("pooler.dense", ["re:pooler\\..*"], True, "re:pooler"),
        ("encoder.layer.0.attention.output.dense", ["re:.*attention\\.output.*"], True, "skipped by pattern"),
        # re: entries use fullmatch: a partial match is not enough
        ("encoder.layer.0.attention.output.dense", ["re:attention"], False, "not in skip list"),
        ("encoder.layer.0.attention.output.dense", ["re:.*attention"], False, "not in skip list"),
        ("encoder.layer.0.attention.output.dense", ["re:encoder"], False, "not in skip list"),
        ("layers.1.mlp.up_proj", ["re:layers\\.[0-9]+\\.mlp\\..*_proj"], True, "skipped by pattern"),
        ("layers.1.mlp.up_proj", ["re:layers\\.[02-9]+\\.mlp\\..*"], False, "not in skip list"),
        # a name that merely looks like a regex is compared literally without the re: prefix
        ("lm_head", [".*"], False, "not in skip list"),
        ("lm_head", ["re:.*"], True, "skipped by pattern"),
        ("lm_head", ["other", "lm_head"], True, "skipped by name"),
    ],
)
def test_is_skipped(name, skip, ok, reason_part):
    v = is_skipped(name, skip)
    assert v.ok is ok
    assert reason_part in v.reason


# ------------------------------------------------------------------------------------ dtype_supported
@pytest.mark.parametrize(
    "dtype, ok",
    [
        (torch.float32, True),
        (torch.float16, True),
        (torch.bfloat16, True),
        (torch.float64, False),
        (torch.int8, False),
        (torch.int32, False),
        (torch.int64, False),
        (torch.float8_e4m3fn, False),
        (None, False),
    ],
)
def test_dtype_supported(dtype, ok):
    v = dtype_supported(dtype)
    assert v.ok is ok
    assert str(dtype) in v.reason


# ------------------------------------------------------------------------------- QuantConfig errors
@pytest.mark.parametrize(
    "kwargs, exc, field",
    [
        (dict(target="gpu"), ValueError, "target"),
        (dict(target="CPU"), ValueError, "target"),
        (dict(target=None), ValueError, "target"),
        (dict(min_ratio=-1), ValueError, "min_ratio"),
        (dict(min_ratio=-0.5), ValueError, "min_ratio"),
        (dict(min_ratio="48"), ValueError, "min_ratio"),
        (dict(min_ratio=float("nan")), ValueError, "min_ratio"),
        (dict(alignment=0), ValueError, "alignment"),
        (dict(alignment=-8), ValueError, "alignment"),
        (dict(alignment=8.0), ValueError, "alignment"),
        (dict(weight_qmax=6), ValueError, "weight_qmax"),
        (dict(weight_qmax=128), ValueError, "weight_qmax"),
        (dict(weight_qmax=255), ValueError, "weight_qmax"),
        (dict(weight_qmax=63.0), ValueError, "weight_qmax"),
        (dict(skip="pooler.dense"), TypeError, "skip"),  # a bare string is not a list of names
        (dict(skip=["ok", 3]), TypeError, "skip"),
        (dict(skip=["re:(unclosed"]), ValueError, "skip"),
        (dict(skip=["re:*bad"]), ValueError, "skip"),
        (dict(filter_fn="not callable"), TypeError, "filter_fn"),
        (dict(filter_fn=42), TypeError, "filter_fn"),
        (dict(activation_scheme="static-per-token"), ValueError, "activation_scheme"),
        (dict(smoothquant=-0.1), ValueError, "smoothquant"),
        (dict(calibration_method="entropy"), ValueError, "calibration_method"),
        (dict(percentile=0), ValueError, "percentile"),
        (dict(activation_scheme=""), ValueError, "activation_scheme"),
        (dict(out_dtype=torch.int8), ValueError, "out_dtype"),
        (dict(out_dtype=torch.float64), ValueError, "out_dtype"),
        (dict(out_dtype="float16"), ValueError, "out_dtype"),
    ],
)
def test_quant_config_rejects(kwargs, exc, field):
    with pytest.raises(exc) as info:
        QuantConfig(**kwargs)
    assert type(info.value) is exc
    assert field in str(info.value)


def test_quant_config_bad_regex_chains_re_error():
    import re

    with pytest.raises(ValueError) as info:
        QuantConfig(skip=["fine", "re:a[b"])
    assert "re:a[b" in str(info.value)
    assert isinstance(info.value.__cause__, re.error)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(target="cuda"),
        dict(target="arm-sve2"),
        dict(min_ratio=0),
        dict(min_ratio=0.0),
        dict(min_ratio=1e9),
        dict(alignment=1),
        dict(weight_qmax=7),
        dict(weight_qmax=127),
        dict(skip=["a", "re:b.*"]),
        dict(skip=("a",)),
        dict(filter_fn=lambda name, module: True),
        dict(out_dtype=torch.bfloat16),
        dict(out_dtype=torch.float16),
        dict(out_dtype=torch.float32),
    ],
)
def test_quant_config_accepts(kwargs):
    cfg = QuantConfig(**kwargs)
    assert isinstance(cfg.skip, tuple)
    assert cfg.skip == tuple(kwargs.get("skip", ()))


def test_quant_config_is_frozen():
    cfg = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.min_ratio = 3  # type: ignore[misc]


def test_quant_config_skip_list_is_copied():
    names = ["a"]
    cfg = QuantConfig(skip=names)
    names.append("b")
    assert cfg.skip == ("a",)


# --------------------------------------------------------------------------------------- config.spec
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(), TargetSpec(96.0, 1, None, 0, True, backends=("triton", "onednn", "aten"))),
        (dict(target="cuda"), TargetSpec(512.0, 8, 127, 2048, True, device="cuda")),
        (dict(target="arm-sve2"), TargetSpec(96.0, 4, 127)),
        (dict(min_ratio=0), TargetSpec(0.0, 1, None, 0, True, backends=("triton", "onednn", "aten"))),
        (dict(min_ratio=12), TargetSpec(12.0, 1, None, 0, True, backends=("triton", "onednn", "aten"))),
        (dict(target="cuda", alignment=16), TargetSpec(512.0, 16, 127, 2048, True, device="cuda")),
        (dict(target="cuda", weight_qmax=63), TargetSpec(512.0, 8, 63, 2048, True, device="cuda")),
        (dict(weight_qmax=127), TargetSpec(96.0, 1, 127, 0, True, backends=("triton", "onednn", "aten"))),
        (dict(target="arm-sve2", min_ratio=1.5, alignment=2, weight_qmax=100), TargetSpec(1.5, 2, 100)),
        (dict(target="cuda", min_n_unfused=0), TargetSpec(512.0, 8, 127, 0, True, device="cuda")),
    ],
)
def test_config_spec_overrides(kwargs, expected):
    spec = QuantConfig(**kwargs).spec
    assert spec == expected
    assert isinstance(spec.min_ratio, float)


def test_config_spec_does_not_mutate_targets():
    before = dict(TARGETS)
    QuantConfig(target="cuda", min_ratio=1, alignment=2, weight_qmax=9).spec
    assert TARGETS == before
    assert TARGETS["cuda"] == TargetSpec(512.0, 8, 127, 2048, True, device="cuda")


@pytest.mark.parametrize("field", ["min_ratio", "alignment", "weight_qmax", "min_n_unfused"])
def test_config_rejects_bool_numbers(field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: True})


# ------------------------------------------------------------------- the separate-quantization-pass rule
def test_quantize_pass_rule_verdicts():
    assert heuristics.quantize_pass_pays_off(2048, 2048)
    v = heuristics.quantize_pass_pays_off(768, 2048)
    assert not v and "N = 768 < min_n_unfused 2048" in v.reason
    assert heuristics.quantize_pass_pays_off(0, 0)


class _Block(torch.nn.Module):
    """fc after GELU (own quantization pass, N=1024), q/k sharing one input (N=2048 together), and
    fc2 after a LayerNorm (quantization fused into it)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1024, 1024)
        self.q, self.k = torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)
        self.ln = torch.nn.LayerNorm(1024)
        self.fc2 = torch.nn.Linear(1024, 1024)

    def forward(self, x):
        h = self.fc(torch.nn.functional.gelu(x))
        h = self.q(h) + self.k(h)
        return self.fc2(self.ln(h))


def test_cuda_keeps_float_a_linear_whose_own_quantization_pass_does_not_pay():
    model = _Block().eval()
    qm = fxquant.compile(model, (torch.randn(2, 1024),), config=QuantConfig(target="cuda"))
    by_name = {d.name: d for d in qm.report().decisions}
    assert not by_name["fc"].quantize and "min_n_unfused 2048" in by_name["fc"].reason
    assert by_name["q"].quantize and by_name["k"].quantize  # 1024 + 1024 columns share one pass
    assert by_name["fc2"].quantize  # LayerNorm input: quantized inside the LayerNorm kernel
    off = fxquant.compile(model, (torch.randn(2, 1024),), config=QuantConfig(target="cuda", min_n_unfused=0))
    assert all(d.quantize for d in off.report().decisions)
