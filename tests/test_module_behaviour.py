"""A QuantizedModel behaves like the nn.Module it replaces, for inference: dtype and device moves, the
inference-only rule for autograd and training mode, and input checks that name what is wrong."""

from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant import InputError


class LNMLP(torch.nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (the model of the failures this file guards against)."""

    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(512)
        self.fc1, self.fc2 = torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


@pytest.fixture()
def compiled():
    torch.manual_seed(0)
    model = LNMLP().eval()
    x = torch.randn(2, 7, 512)
    return model, fxquant.compile(model, (x,)), x


def _int8_buffers(qm):
    return {n: b.dtype for n, b in qm.graph_module.named_buffers() if b.dtype == torch.int8}


@pytest.mark.parametrize("move", ["to", "method"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_move_keeps_int8_weights_and_fp32_scales(compiled, untouched, sqnr, move, dtype):
    model, qm, x = compiled
    int8_before = _int8_buffers(qm)
    moved = untouched(model, lambda: qm.to(dtype) if move == "to" else (qm.bfloat16() if dtype == torch.bfloat16 else qm.half()))
    assert moved is qm
    assert _int8_buffers(qm) == int8_before and int8_before
    scales = {n: b.dtype for n, b in qm.graph_module.named_buffers() if n.endswith("weight_scale")}
    assert scales and set(scales.values()) == {torch.float32}
    assert {p.dtype for p in qm.parameters()} == {dtype}  # LayerNorm weight and bias, the float tensors
    with torch.no_grad():
        out = qm(x.to(dtype))
        ref = copy.deepcopy(model).to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert sqnr(ref.float(), out.float()) >= 25.0
    qm.float()
    with torch.no_grad():
        back = qm(x)
    assert back.dtype == torch.float32 and sqnr(model(x), back) >= 25.0


def test_out_dtype_from_config_is_kept_on_moves():
    model = LNMLP().eval()
    x = torch.randn(2, 3, 512)
    qm = fxquant.compile(model, (x,), config=fxquant.QuantConfig(out_dtype=torch.float32))
    qm.to(torch.bfloat16)
    with torch.no_grad():
        assert qm(x.bfloat16()).dtype == torch.float32


def test_input_that_requires_grad_is_refused(compiled):
    _, qm, x = compiled
    with pytest.raises(InputError, match=r"input 'x' requires grad.*inference-only.*torch.no_grad"):
        qm(x.clone().requires_grad_())
    with torch.no_grad():
        qm(x.clone().requires_grad_())  # fine without grad mode
    out = qm(x)  # grad mode on, plain input: runs without autograd
    assert not out.requires_grad


def test_train_mode_is_refused_eval_allowed(compiled):
    _, qm, _ = compiled
    with pytest.raises(InputError, match="inference-only.*train the float model"):
        qm.train()
    assert qm.eval() is qm and not qm.training


def test_wrong_feature_size_names_input_dimension_and_capture(compiled):
    _, qm, _ = compiled
    with pytest.raises(InputError, match=r"input 'x' has size 300 in dimension 2 .* captured with 512 there"):
        qm(torch.randn(2, 7, 300))
    with pytest.raises(InputError, match=r"input 'x' has 2 dimensions .* captured with 3: \(\?, \?, 512\)"):
        qm(torch.randn(7, 512))
    with torch.no_grad():
        assert qm(torch.randn(3, 11, 512)).shape == (3, 11, 512)  # dynamic dims stay dynamic


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_to_cuda_and_back(compiled, sqnr):
    model, qm, x = compiled
    qm.cuda()
    with torch.no_grad():
        out = qm(x.cuda())
    assert out.device.type == "cuda" and sqnr(model(x), out.cpu()) >= 25.0
    qm.cpu()
    with torch.no_grad():
        assert sqnr(model(x), qm(x)) >= 25.0


def test_state_dict_round_trip_deepcopy_and_threads(compiled):
    """load_state_dict writes the int8 weights in place: the CPU backend's packed copy must follow (it is
    keyed by the tensor and its version)."""
    import threading

    _, qm, x = compiled
    other = fxquant.compile(LNMLP().eval(), (x,))  # other random weights, same structure
    with torch.no_grad():
        want = qm(x)
        assert not torch.equal(other(x), want)  # packs the other weights first
        other.load_state_dict(qm.state_dict())
        assert torch.equal(other(x), want)
        assert {k: v.dtype for k, v in other.state_dict().items()} == {k: v.dtype for k, v in qm.state_dict().items()}
        assert torch.equal(copy.deepcopy(qm)(x), want)
    results = [None] * 4

    def run(i):
        with torch.no_grad():
            results[i] = qm(x)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, want) for r in results)
