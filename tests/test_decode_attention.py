"""The decode attention kernel of ``fxquant.kernels.decode_attention`` against float64 attention, and the pass that
puts it into CUDA decode graphs.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` (set in conftest.py); on a GPU the same tests compile
it. Shapes are small and odd: L not a multiple of the 64-position block, D = 24 (not a power of two), rep 1 / 3 / 4,
S = 1 and 2, a mask broadcast over the batch, dtype-min and -inf masks, one split and several.

Tolerances: the float64 reference is SDPA's math on the same (rounded) inputs. fp32 runs IEEE fp32 dot products,
so its error is fp32 accumulation: SQNR ≥ 100 dB. bf16 rounds e^(s−m) to bf16 before P·V and O to bf16 at the end
(8 significant bits each, ≈ 50 dB each): ≥ 40 dB, as the eager attention it replaces (also checked).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fxquant.kernels import common
from fxquant.kernels import decode_attention as kd

needs_triton = pytest.mark.skipif(common.why_kernels_cannot_run() is not None, reason=str(common.why_kernels_cannot_run()))
DEVICE = "cuda" if torch.cuda.is_available() and not common.interpreting() else "cpu"


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    with warnings.catch_warnings():  # NumPy's exp of -inf and 0/0 of masked-out rows (never stored)
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def _operands(b, kv, rep, s, length, d, dtype, seed, mask_batch=True, filled=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, kv * rep, d, generator=g).to(dtype).transpose(1, 2)  # a transposed view, as in the graph
    k = torch.randn(b, kv, length, d, generator=g).to(dtype)
    v = torch.randn(b, kv, length, d, generator=g).to(dtype)
    filled = filled if filled is not None else [length - 3 - i for i in range(b)]
    neg = torch.finfo(dtype).min
    mask = torch.zeros(b if mask_batch else 1, 1, s, length, dtype=dtype)
    for row in range(mask.shape[0]):
        mask[row, :, :, filled[row]:] = neg  # the unfilled cache, as Hugging Face masks it
        mask[row, :, :, : row] = neg        # left padding
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE)


def _exact(q, k, v, mask, scale):
    """SDPA's math in float64 with query head h reading kv head h // rep."""
    rep = q.shape[1] // k.shape[1]
    k64 = k.cpu().double().repeat_interleave(rep, dim=1)
    v64 = v.cpu().double().repeat_interleave(rep, dim=1)
    scores = q.cpu().double() @ k64.transpose(-1, -2) * scale + mask.cpu().double()
    return torch.softmax(scores, -1) @ v64


def _sqnr(got, exact):
    err = (got.cpu().double() - exact).pow(2).mean()
    return float(10 * torch.log10(exact.pow(2).mean() / err))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,kv,rep,s,length,d,splits", [
    (1, 2, 4, 1, 70, 32, 1),      # Llama-like group, L past one block, one split
    (1, 2, 4, 1, 200, 32, 3),     # three splits (the batch-1 case), the last one short
    (3, 1, 3, 2, 45, 24, None),   # D not a power of two, S = 2, rep 3, the splits the kernel picks
    (2, 3, 1, 1, 130, 16, 2),     # no grouping (MHA), D at tl.dot's minimum
])
def test_kernel_matches_float64(dtype, b, kv, rep, s, length, d, splits):
    q, k, v, mask = _operands(b, kv, rep, s, length, d, dtype, seed=length)
    scale = d ** -0.5
    got = kd.decode_attention(q, k, v, mask, scale, splits=splits)
    assert got.shape == (b, kv * rep, s, d) and got.dtype == dtype and got.is_contiguous()
    exact = _exact(q, k, v, mask, scale)
    assert _sqnr(got, exact) >= (100.0 if dtype == torch.float32 else 40.0)
    # the eager form the pass writes elsewhere (Hugging Face's eager attention) is as close
    ref = kd.decode_attention_reference(q, k, v, mask, scale)
    assert _sqnr(ref, exact) >= (100.0 if dtype == torch.float32 else 35.0)
    sdpa = kd.decode_attention_sdpa(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), scale)
    assert _sqnr(sdpa, exact) >= (100.0 if dtype == torch.float32 else 35.0)


@needs_triton
def test_kernel_masks_broadcast_and_minus_inf():
    """A mask of batch 1 broadcasts over the rows; -inf masks (not only dtype-min) give weight 0, including a split
    whose every position is masked (its partial must not poison the combine)."""
    q, k, v, mask = _operands(2, 2, 2, 1, 150, 32, torch.float32, seed=7, mask_batch=False, filled=[40])
    mask = torch.where(mask < 0, float("-inf"), 0.0)
    got = kd.decode_attention(q, k, v, mask, 0.2, splits=3)  # splits 2 and 3 are fully masked
    exact = _exact(q, k, v, mask.expand(2, 1, 1, 150), 0.2)
    assert _sqnr(got, exact) >= 100.0
    # stale values in the masked tail (a reused cache row) must not matter
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:], v2[:, :, 40:] = 1e4, -1e4  # finite: 0 · NaN is NaN here as in SDPA
    assert torch.equal(kd.decode_attention(q, k2, v2, mask, 0.2, splits=3), got)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,kv,rep,s,length,filled,splits", [
    (1, 2, 4, 1, 300, 200, 4),   # 200 filled of 300: two of four splits get work (two blocks each), two are empty
    (1, 2, 4, 1, 1024, 70, None),  # splits picked for 1024 slots, 70 filled: one busy split, the rest empty
    (2, 1, 3, 2, 200, 133, 3),   # S = 2 (cache_position of two slots), filled not a multiple of the block
    (3, 2, 2, 1, 160, 5, None),  # almost empty cache, the splits the kernel picks
    (1, 2, 4, 1, 90, 90, 2),     # full cache: the bound reads what the unbounded kernel reads
])
def test_kernel_reads_only_the_filled_cache(dtype, b, kv, rep, s, length, filled, splits, monkeypatch):
    """With cache_position the slots past cache_position[-1] are never read: NaN there (K, V and the mask) leaves
    the result equal to attention over the filled slots alone, and to the unbounded kernel on a clean cache. The
    split workspaces start as NaN: ranges past the filled slots store nothing, and the combine must not read them."""
    q, k, v, mask = _operands(b, kv, rep, s, length, 32, dtype, seed=filled, filled=[length] * b)
    pos = torch.arange(filled - s, filled, device=DEVICE)
    scale = 32 ** -0.5
    k[:, :, filled:], v[:, :, filled:], mask[..., filled:] = float("nan"), float("nan"), float("nan")
    empty = torch.empty
    nan_workspace = lambda *a, **kw: empty(*a, **kw).fill_(float("nan"))  # noqa: E731
    monkeypatch.setattr(kd.torch, "empty", nan_workspace)
    got = kd.decode_attention(q, k, v, mask, scale, cache_position=pos, splits=splits)
    monkeypatch.setattr(kd.torch, "empty", empty)
    exact = _exact(q, k[:, :, :filled], v[:, :, :filled], mask[..., :filled], scale)
    assert torch.isfinite(got).all()
    assert _sqnr(got, exact) >= (100.0 if dtype == torch.float32 else 40.0)
    clean = [t.clone() for t in (k, v, mask)]
    for t in clean[:2]:
        t[:, :, filled:] = 0
    clean[2][..., filled:] = torch.finfo(dtype).min
    full = kd.decode_attention(q, *clean, scale, splits=splits)
    assert _sqnr(got, full.cpu().double()) >= (100.0 if dtype == torch.float32 else 40.0)
    ref = kd.decode_attention_reference(q, k, v, mask, scale, cache_position=pos)
    assert torch.isfinite(ref).all() and _sqnr(ref, exact) >= (100.0 if dtype == torch.float32 else 35.0)
    # the form the op takes where the kernel does not run (CPUs): one SDPA call over the filled slots
    sdpa = kd.decode_attention_sdpa(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), scale, cache_position=pos.cpu())
    assert sdpa.shape == got.shape and sdpa.is_contiguous()
    assert torch.isfinite(sdpa).all() and _sqnr(sdpa, exact) >= (100.0 if dtype == torch.float32 else 35.0)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs an sm_90+ GPU")
def test_pdl_computes_the_same(monkeypatch):
    """PDL changes when the kernel and its combine may launch, not what they compute: one split and several, with
    and without cache_position, with the early dependents signal and without it, eager and in a CUDA graph, bit for
    bit the output without PDL (common.use_pdl, pdl_early_signal)."""
    q, k, v, mask = _operands(2, 2, 4, 1, 700, 64, torch.bfloat16, seed=7)
    pos = torch.tensor([650], device=DEVICE)
    for splits, cache_position in ((1, None), (5, None), (5, pos), (None, pos)):
        monkeypatch.setenv("FXQUANT_PDL", "0")
        want = kd.decode_attention(q, k, v, mask, 0.125, cache_position=cache_position, splits=splits)
        monkeypatch.setenv("FXQUANT_PDL", "1")
        assert common.use_pdl(q.device)
        monkeypatch.setenv("FXQUANT_PDL_TRIGGER", "0")
        assert torch.equal(kd.decode_attention(q, k, v, mask, 0.125, cache_position=cache_position, splits=splits),
                           want)
        monkeypatch.delenv("FXQUANT_PDL_TRIGGER")
        assert common.pdl_early_signal()
        assert torch.equal(kd.decode_attention(q, k, v, mask, 0.125, cache_position=cache_position, splits=splits),
                           want)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = kd.decode_attention(q, k, v, mask, 0.125, cache_position=cache_position, splits=splits)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


def test_kernel_rejects_a_malformed_cache_position():
    q, k, v, mask = _operands(1, 2, 2, 1, 64, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="cache_position must be an int32 / int64 \\[S\\] = \\[1\\]"):
        kd.decode_attention(q, k, v, mask, 0.25, cache_position=torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="cache_position"):
        kd.decode_attention(q, k, v, mask, 0.25, cache_position=torch.zeros(1, device=DEVICE))


def test_pick_splits():
    # batch 1, Llama-3-8B (8 kv heads), 132 SMs, L = 640: 10 blocks, at most 5 splits of two blocks each (the
    # split counts measured fastest on an H100: see pick_splits)
    assert kd.pick_splits(8, 640, 132) == 5
    assert kd.pick_splits(64, 640, 132) == 3  # batch 8
    assert kd.pick_splits(256, 640, 132) == 1  # batch 32: 256 programs already fill the GPU
    assert kd.pick_splits(8, 64, 132) == 1  # one block: nothing to split


def test_reference_rejects_nothing_the_kernel_accepts():
    """The reference is the eager math the pass writes on CPUs: same shapes in, same [B, H, S, D] out."""
    q, k, v, mask = _operands(2, 2, 3, 2, 33, 24, torch.float32, seed=3)
    ref = kd.decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.3)
    assert ref.shape == (2, 6, 2, 24)
    assert _sqnr(ref, _exact(q, k, v, mask, 0.3)) >= 100.0


def test_pass_writes_one_op_per_layer_reading_only_the_filled_cache(monkeypatch):
    """The decode graph of a small Llama holds one fxquant::decode_attention per layer, each taking the graph's
    cache_position (its CPU form: one SDPA call over the filled slots), and generates the tokens Hugging Face's
    attention (SDPA over repeat_kv's copies of the whole cache) generates. On a CUDA target the op takes
    cache_position only where the Triton kernel runs (the SDPA form would read it on the host), and prefill keeps
    Hugging Face's SDPA over the prompt block's own slots."""
    transformers = pytest.importorskip("transformers")
    import fxquant
    from fxquant.ir import ops
    from fxquant.ir.notes import NoteKind
    from fxquant.passes import decode_attention as pda
    from fxquant.program import program_of

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))

    def build(method="decode"):
        qm = fxquant.compile(model, {"input_ids": prompt}, config=fxquant.QuantConfig(min_ratio=0), max_batch_size=2,
                             max_cache_len=24, progress=False, compile_generation=False)
        return qm, program_of(qm, method).methods[method].graph_module

    qm, gm = build()
    for graph in (gm, program_of(qm, "prefill").methods["prefill"].graph_module):  # the prefill block too (CPU)
        nodes = [n for n in graph.graph.nodes if n.target is ops.DECODE_ATTENTION]
        assert len(nodes) == 2
        assert torch.ops.aten.scaled_dot_product_attention.default not in [n.target for n in graph.graph.nodes]
        assert [(n.args[5].op, n.args[5].target) for n in nodes] == [("placeholder", "cache_position")] * 2
    notes = qm.report().notes.of(NoteKind.GENERATION)
    assert sum("2 of them only up to cache_position" in note for note in notes) == 2
    got = qm.generate(prompt, max_new_tokens=6)

    rewrite = pda.decode_attention
    monkeypatch.setattr(pda, "decode_attention", lambda gm, position, **kw: (0, 0))  # Hugging Face's attention as captured
    plain, plain_gm = build()
    assert torch.equal(plain.generate(prompt, max_new_tokens=6), got)

    # a CUDA target: cache_position where the kernel takes the shapes, not where the SDPA form would run
    def rewritten(fits):
        monkeypatch.setattr(pda, "kernel_fits", lambda *a: fits)
        graph = torch.fx.Graph()
        graph.output(graph.graph_copy(plain_gm.graph, {}))
        g = torch.fx.GraphModule(plain_gm, graph)
        assert rewrite(g, pda._cache_position(g.graph), on_cuda=True) == (2, 2 if fits else 0)
        return [len(n.args) > 5 for n in g.graph.nodes if n.target is ops.DECODE_ATTENTION]

    assert rewritten(True) == [True, True] and rewritten(False) == [False, False]
    # CUDA prefill keeps Hugging Face's SDPA: a block's bound would be a host read inside its CUDA graph
    prefill = build("prefill")[1]
    assert rewrite(prefill, pda._cache_position(prefill.graph), on_cuda=True, blocks=False) == (0, 0)

    # ... but over the prompt block's own slots [0, S): with NaN in every cache slot, the prefill that reads the
    # whole cache (Hugging Face's form) gives NaN logits (masked weights are 0, and 0 · NaN is NaN); the block-only
    # prefill generates the tokens above
    monkeypatch.setattr(pda, "decode_attention", lambda gm, position, blocks=False, **kw:
                        (0, 0) if blocks else rewrite(gm, position, blocks=blocks, **kw))
    cuda_like, prefill = build("prefill")

    def poisoned():
        for buf in prefill.kv_cache.buffers():
            buf.fill_(float("nan"))
        return cuda_like.generate(prompt, max_new_tokens=6)

    assert not torch.equal(poisoned(), got)
    assert pda.prefill_block_only(prefill) == 2
    sliced = [n for n in prefill.graph.nodes if n.target is torch.ops.aten.slice.Tensor and len(n.args) == 4
              and isinstance(n.args[3], torch.fx.Node) and n.args[3].target is torch.ops.aten.sym_size.int]
    assert len(sliced) == 2 * 3  # K, V and the mask of each layer, up to the query block's length
    assert torch.equal(poisoned(), got)

@pytest.mark.parametrize("kind", ["qwen2", "mistral", "phi3"])
def test_block_only_prefill_generates_the_same_tokens(kind, monkeypatch):
    """CUDA's prefill form (Hugging Face's SDPA over repeat_kv, sliced to the prompt block's own slots by
    prefill_block_only) on the other model families, a left-padded batch, Mistral with a sliding window: with NaN in
    every cache slot before generating, the tokens equal those of the program whose prefill is left as captured
    (clean cache)."""
    transformers = pytest.importorskip("transformers")
    import fxquant
    from fxquant.passes import decode_attention as pda
    from fxquant.program import program_of

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, attn_implementation="sdpa")
    if kind == "mistral":
        common["sliding_window"] = 16  # the 8 + 10 tokens cross it
    if kind == "phi3":
        common.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig,
           "phi3": transformers.Phi3Config}[kind](**common)
    model = getattr(transformers, {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                                   "phi3": "Phi3ForCausalLM"}[kind])(cfg).eval()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    rewrite = pda.decode_attention
    monkeypatch.setattr(pda, "decode_attention", lambda gm, position, blocks=False, **kw:
                        (0, 0) if blocks else rewrite(gm, position, blocks=blocks, **kw))  # prefill as on CUDA
    qm = fxquant.compile(model, {"input_ids": prompt}, config=fxquant.QuantConfig(min_ratio=0), max_batch_size=2,
                         max_cache_len=18, progress=False, compile_generation=False)
    want = qm.generate(prompt, attention_mask=mask, max_new_tokens=10)
    prefill = program_of(qm, "prefill").methods["prefill"].graph_module
    assert pda.prefill_block_only(prefill) == 2
    for buf in prefill.kv_cache.buffers():
        buf.fill_(float("nan"))
    assert torch.equal(qm.generate(prompt, attention_mask=mask, max_new_tokens=10), want)
