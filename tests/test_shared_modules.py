"""One Linear module called several times (weight sharing across calls, as in ALBERT) vs a weight tied to
another op (kept float)."""

from __future__ import annotations

import pytest
import torch

import fxquant


class CalledTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(256, 256)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class TiedToEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(512, 256)
        self.head = torch.nn.Linear(256, 512, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


@pytest.mark.parametrize("front_end", ["export", "symbolic_trace"])
def test_module_called_twice_is_quantized_once(front_end, sqnr):
    torch.manual_seed(0)
    m = CalledTwice().eval()
    x = torch.randn(4, 256)
    qm = fxquant.compile(m, (x,) if front_end == "export" else None)
    rep = qm.report()
    assert [d.name for d in rep.decisions] == ["fc", "fc"]
    assert rep.num_int8 == 2
    int8_buffers = [n for n, b in qm.graph_module.named_buffers() if b.dtype == torch.int8]
    assert int8_buffers == ["fc.weight"]  # one set of int8 weights serves both calls
    assert rep.decisions[0].activation == "relu"
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 33.0  # measured 36.9 dB


class TiedToMatmul(torch.nn.Module):
    """The Linear's weight is also read by another matmul: no int8 copy can stand in for it there."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(256, 512, bias=False)

    def forward(self, x):
        return self.head(x) + x @ self.head.weight.t()


def test_lm_head_tied_to_embedding_gets_its_own_int8_copy(sqnr):
    torch.manual_seed(0)
    m = TiedToEmbedding().eval()
    ids = torch.randint(0, 512, (2, 8))
    qm = fxquant.compile(m, (ids,))
    (d,) = qm.report().decisions
    assert d.quantize and "tied to an embedding" in d.reason
    assert d.extra_bytes == 512 * 256 + 4 * 512  # int8 [N, K] + fp32 scales
    assert any("tied to an embedding" in n and "+0.1 MiB" in n for n in qm.report().notes)
    state = qm.graph_module.state_dict()
    (float_w,) = [t for t in state.values() if t.dtype == torch.float32 and t.shape == (512, 256)]
    assert float_w.data_ptr() == m.emb.weight.data_ptr()  # the embedding reads the user's float table, untouched
    assert state["head.int8.weight"].dtype == torch.int8
    assert qm.report().node_counts["aten.embedding"] == 1 and qm.report().node_counts["fxquant.int8_linear"] == 1
    with torch.no_grad():
        ref, out = m(ids), qm(ids)
    assert sqnr(ref, out) >= 30.0


def test_weight_tied_to_another_op_stays_float():
    m = TiedToMatmul().eval()
    x = torch.randn(2, 256)
    qm = fxquant.compile(m, (x,))
    (d,) = qm.report().decisions
    assert not d.quantize and "tied" in d.reason and d.rule == "tied"
    with torch.no_grad():
        assert torch.equal(qm(x), m(x))


class TiedBetweenLinears(torch.nn.Module):
    """Two Linear modules, one weight Parameter, two biases: torch.export names the weight ``b.weight`` in both
    calls, so a Linear named by its weight would take the other's name (and its int8 buffers, bias included)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_weight_tied_between_linears_stays_float_under_each_name():
    torch.manual_seed(0)
    m, x = TiedBetweenLinears().eval(), torch.randn(4, 16, 256)
    qm = fxquant.compile(m, (x,), config=fxquant.QuantConfig(min_ratio=0))
    rep = qm.report()
    assert [d.name for d in rep.decisions] == ["a", "b"]
    assert [(d.quantize, d.rule) for d in rep.decisions] == [(False, "tied")] * 2
    with torch.no_grad():
        assert torch.equal(qm(x), m(x))


def test_albert_shared_layers_quantized(sqnr):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(embedding_size=128, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=1024, vocab_size=512, max_position_embeddings=64)
    m = transformers.AlbertModel(cfg).eval()
    ids = torch.randint(0, 512, (2, 16))
    qm = fxquant.compile(m, {"input_ids": ids})
    rep = qm.report()
    # one shared layer (q, k, v, dense, ffn, ffn_output) called 3 times, plus embedding projection and pooler
    shared = [d for d in rep.decisions if ".albert_layer_groups." in d.name]
    assert len(shared) == 6 * 3 and all(d.quantize for d in shared)
    with torch.no_grad():
        ref, out = m(input_ids=ids).last_hidden_state, qm(input_ids=ids).last_hidden_state
    assert sqnr(ref, out) >= 38.0, "measured 41.5 dB"
