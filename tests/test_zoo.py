"""A property-based zoo (hypothesis): random small MLP and transformer-like blocks — odd widths, with and
without bias, LayerNorm / RMSNorm / none, every epilogue activation and the gated MLP, shared Linears — called
at random batch and sequence sizes. Properties: compile never crashes, the user's model is never modified,
every Linear has a decision (with a reason when float), the output matches the float model (SQNR bar), and
the fused graph still exports with torch.export. Bounded for CI (max_examples, no deadline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxquant

ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "silu": F.silu}


class Block(torch.nn.Module):
    """norm -> (q, k, v) mixed + residual -> norm -> MLP (plain activation or gated) + residual."""

    def __init__(self, d, f, norm, act, gated, bias, shared):
        super().__init__()
        make_norm = {"layer": lambda: torch.nn.LayerNorm(d), "rms": lambda: torch.nn.RMSNorm(d, eps=1e-6),
                     "none": lambda: torch.nn.Identity()}[norm]
        self.n1, self.n2 = make_norm(), make_norm()
        self.q, self.k, self.v = (torch.nn.Linear(d, d, bias=bias) for _ in range(3))
        self.up = torch.nn.Linear(d, f, bias=bias)
        self.gate = torch.nn.Linear(d, f, bias=bias) if gated else None
        self.down = torch.nn.Linear(f, d, bias=bias)
        self.act, self.shared = ACTS[act], shared

    def forward(self, x):
        h = self.n1(x)
        x = x + self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)
        if self.shared:  # one Linear module called twice (ALBERT-style weight sharing)
            x = x + self.v(self.n1(x))
        h = self.n2(x)
        mid = self.act(self.gate(h)) * self.up(h) if self.gate is not None else self.act(self.up(h))
        return x + self.down(mid)


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    d=st.sampled_from([32, 48, 64, 100]),
    f=st.sampled_from([64, 96, 130]),
    norm=st.sampled_from(["layer", "rms", "none"]),
    act=st.sampled_from(sorted(ACTS)),
    gated=st.booleans(),
    bias=st.booleans(),
    shared=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    calls=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9)), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_zoo(d, f, norm, act, gated, bias, shared, dtype, calls, seed, untouched, sqnr):
    torch.manual_seed(seed)
    model = Block(d, f, norm, act, gated, bias, shared).eval().to(dtype)
    x = torch.randn(2, 5, d, dtype=dtype)
    # every Linear is a candidate (min_ratio=0), down after a gated MLP too: all fused paths run
    config = fxquant.QuantConfig(min_ratio=0, gated_output_int8=True)
    qm = untouched(model, lambda: fxquant.compile(model, (x,), config=config))
    rep = qm.report()
    assert len(rep.decisions) == 5 + shared + gated  # q, k, v, up, down; v called twice; gate
    assert all(d_.quantize or d_.reason for d_ in rep.decisions)
    assert rep.num_int8 == len(rep.decisions)  # nothing here is float for another reason than a bug
    bar = 20.0 if dtype == torch.float32 else 15.0  # bf16 model: the float reference itself rounds to 8 bits
    with torch.no_grad():
        for b, s in calls:
            xs = torch.randn(b, s, d, dtype=dtype)
            ref, out = model(xs), qm(xs)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            value = sqnr(ref.float(), out.float())
            assert value >= bar, f"SQNR {value:.1f} dB < {bar}"
    ep = torch.export.export(qm.graph_module, (x,))
    with torch.no_grad():
        assert torch.equal(ep.module()(x), qm(x))
