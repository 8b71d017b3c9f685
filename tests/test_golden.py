"""Golden-graph snapshots of the fused graph, in the compact form of ``fxquant.tools.report.golden_text``.

One snapshot per registered pattern (its ``example()``) and front end, plus a small-config BERT.
Update after an intended change with:

    pytest tests/test_golden.py --snapshot-update

and read the diff of ``tests/__snapshots__/test_golden.ambr`` in review. Counts and numerics are asserted
next to each snapshot, so a snapshot is never the only check.
"""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.patterns import REGISTRY

FRONT_ENDS = {"export": lambda x: x, "symbolic_trace": lambda x: None}

# pattern -> front end -> the nonzero {pattern: matched} counts when compiling its own example (default
# QuantConfig, whose cpu target runs sibling Linears reading one quantized input as one GEMM: sibling_fusion).
# SwiGLU and the Hugging Face RMSNorm are matched on torch.export's ATen graph; symbolic_trace records them as
# Python operators and methods (operator.mul, Tensor.pow), so there the Linears fuse one by one and siblings
# share one quantization pass, then one GEMM.
EXPECTED_MATCHES = {
    "swiglu": {"export": {"swiglu": 2},  # down_proj reads the SwiGLU product: float by default
               "symbolic_trace": {"linear_act": 2, "linear": 3, "shared_input_quant": 2}},
    "fused_gate_up": {"export": {"fused_gate_up": 1},  # down_proj reads the gated product: float by default
                      "symbolic_trace": {"linear": 2}},  # chunk is a Python method call there: no match
    "linear_act": {"export": {"linear_act": 4, "linear": 1}},
    "linear": {"export": {"linear": 2}},
    "layer_norm_linear": {"export": {"linear": 4, "layer_norm_linear": 2, "sibling_fusion": 1}},
    "rms_norm_linear": {"export": {"linear": 4, "rms_norm_linear": 2, "sibling_fusion": 1},
                        "symbolic_trace": {"linear": 4, "shared_input_quant": 1, "sibling_fusion": 1}},
}


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("pattern", REGISTRY, ids=lambda p: p.name)
def test_pattern_golden(pattern, front_end, snapshot, sqnr):
    torch.manual_seed(0)
    model, inputs = pattern.example()
    qm = fxquant.compile(model, FRONT_ENDS[front_end](inputs))
    assert qm.golden() == snapshot
    stats = qm.report().pattern_stats
    expected = EXPECTED_MATCHES[pattern.name]
    expected = expected.get(front_end, expected["export"])
    assert {name: s.matched for name, s in stats.items() if s.matched} == expected
    with torch.no_grad():
        ref, out = model(*inputs), qm(*inputs)
    assert sqnr(ref, out) > 25, f"{pattern.name}/{front_end}: SQNR {sqnr(ref, out):.1f} dB"


def test_bert_golden(snapshot, small_bert):
    torch.manual_seed(0)
    model = small_bert(num_layers=2)
    ids = torch.randint(0, 512, (2, 16))
    qm = fxquant.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert qm.golden(only_fused=True) == snapshot
    counts = qm.report().node_counts
    # per layer: q, k, v read ln as one GEMM (1 int8_linear_q), intermediate reads ln (1), 2 plain Linears; + pooler
    assert counts["fxquant.layer_norm_quant"] == 2 * 2
    assert counts["fxquant.int8_linear_q"] == 2 * 2
    assert counts["fxquant.int8_linear"] == 2 * 2 + 1
    assert counts.get("aten.linear", 0) == 0


def test_bert_static_smoothquant_golden(snapshot, small_bert, sqnr):
    """The static + SmoothQuant graph: the same fused nodes, each quantizing node with its calibrated
    ``input_scale`` and SmoothQuant ``input_smooth`` (one pair per quantizing node, none on the GEMMs)."""
    torch.manual_seed(0)
    model = small_bert(num_layers=2)
    ids = torch.randint(0, 512, (2, 16))
    batches = [{"input_ids": torch.randint(0, 512, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
               for _ in range(2)]
    config = fxquant.QuantConfig(activation_scheme="static-per-tensor", smoothquant=0.8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    qm = fxquant.compile(model, inputs, config=config, calibration=batches, progress=False)
    assert qm.golden(only_fused=True) == snapshot
    counts = qm.report().node_counts
    assert counts["fxquant.layer_norm_quant"] == 2 * 2 and counts["fxquant.int8_linear_q"] == 2 * 2
    assert counts["fxquant.int8_linear"] == 2 * 2 + 1
    quantizers = 2 * 2 + 2 * 2 + 1  # norm-quant ops + Linears quantizing their own input
    names = [n for n, _ in qm.graph_module.named_buffers()]
    assert sum(n.endswith(".input_scale") for n in names) == quantizers
    assert sum(n.endswith(".input_smooth") for n in names) == quantizers
    with torch.no_grad():
        assert sqnr(model(**inputs).last_hidden_state, qm(**inputs).last_hidden_state) > 20
