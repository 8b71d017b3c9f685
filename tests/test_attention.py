"""``fxquant.frontend.attention``: shape-only SDPA masks are removed (exactly), data-dependent and windowed ones kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fxquant
from fxquant.frontend.capture import capture


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]


class MaskedAttention(torch.nn.Module):
    """SDPA with a mask built from shapes only: ``kind`` = all-true, causal, or a sliding window of 3."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        i = torch.arange(s, device=x.device)
        if self.kind == "all-true":
            mask = (i >= 0)[None, None, None, :].expand(b, 1, s, s)
        elif self.kind == "causal":
            mask = (i[None, :] <= i[:, None])[None, None].expand(b, 1, s, s)
        else:  # sliding window: needs the constant 3, so it must be left alone
            mask = ((i[:, None] - i[None, :]) < 3) & (i[None, :] <= i[:, None])
            mask = mask[None, None].expand(b, 1, s, s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_all_true_and_causal_masks_are_removed_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    for kind, expected in (("all-true", {"all-true": 1, "causal": 0}), ("causal", {"all-true": 0, "causal": 1})):
        model = MaskedAttention(kind).eval()
        cap = capture(model, (x,))
        assert cap.attention_masks == expected, kind
        (node,) = _sdpa_nodes(cap.graph_module)
        assert _mask(node) is None and _causal(node) == (kind == "causal")
        with torch.no_grad():
            for seq in (9, 4, 21):  # other sequence lengths: the graph stays exact
                xs = torch.randn(3, seq, 32)
                torch.testing.assert_close(cap.graph_module(xs), model(xs), rtol=1e-5, atol=1e-6)


def test_sliding_window_mask_is_kept():
    x = torch.randn(2, 9, 32)
    cap = capture(MaskedAttention("window").eval(), (x,))
    assert cap.attention_masks == {"all-true": 0, "causal": 0}
    (node,) = _sdpa_nodes(cap.graph_module)
    assert _mask(node) is not None


def test_padding_mask_from_the_inputs_is_kept(small_bert):
    model = small_bert(num_layers=1)
    ids = torch.randint(0, 512, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    qm = fxquant.compile(model, {"input_ids": ids, "attention_mask": mask})
    assert all(_mask(n) is not None for n in _sdpa_nodes(qm.graph_module))
    assert not any("attention:" in note for note in qm.report().notes)


def test_hf_decoder_gets_is_causal_and_a_report_note():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 16))
    qm = fxquant.compile(model, {"input_ids": ids})
    nodes = _sdpa_nodes(qm.graph_module)
    assert len(nodes) == 2 and all(_mask(n) is None and _causal(n) for n in nodes)
    assert any("2 causal mask(s) replaced by is_causal=True" in note for note in qm.report().notes)


def _mask(node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _causal(node):
    return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
