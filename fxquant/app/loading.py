"""The shell's one front end: check and load a Hugging Face model directory (an encoder, a causal LM, or a
compressed-tensors W8A8 checkpoint of either), its tokenizer, example inputs and calibration samples.

Every command of :mod:`fxquant.app.cli` loads through here; a mistake of the user's raises :class:`UsageError`
with one line naming the thing at fault and what to do.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["UsageError", "Loaded", "check_model_dir", "load_model", "example_inputs", "read_calibration", "tokenize_calibration",
           "copy_side_files", "SAMPLE_TEXT"]

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog."
SECOND_TEXT = "A second, somewhat longer sentence, so that the example's batch rows differ in length."
# Files a Hugging Face directory keeps beside the weights: the tokenizer's and the generation defaults
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
              "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
              "chat_template.json", "generation_config.json")


class UsageError(ValueError):
    """A mistake on the command line or in the user's files, found before or instead of any work."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


@dataclass
class Loaded:
    """A loaded model directory.

    Attributes:
        model_dir: the directory.
        model: the float ``nn.Module`` in eval mode; for a checkpoint, a float skeleton of its architecture
            (random weights: compile it with ``weights=model_dir``).
        tokenizer: its tokenizer, or None when the directory has none.
        causal: a causal LM (``architectures`` ending in ``ForCausalLM``).
        weights: ``model_dir`` when it is a compressed-tensors checkpoint (pass as ``fxquant.compile(weights=)``),
            else None.
    """

    model_dir: str
    model: Any
    tokenizer: Any
    causal: bool
    weights: Optional[str] = None


def check_model_dir(model_dir: str) -> None:
    """Raise :class:`UsageError` unless ``model_dir`` is a directory holding a config.json."""
    if not os.path.isdir(model_dir):
        raise UsageError(f"model directory {model_dir!r} does not exist: give a Hugging Face model directory "
                         "(config.json, weights, tokenizer)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"{model_dir!r} holds no config.json: not a Hugging Face model directory (save one with "
                         "model.save_pretrained(dir))")


def _quant_method(config) -> Optional[str]:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return str(qc.get("quant_method"))


def load_model(model_dir: str, *, need_tokenizer: bool = False, causal_only: bool = False,
               device: Optional[str] = None) -> Loaded:
    """Load ``model_dir`` offline (``HF_HUB_OFFLINE``): ``AutoModelForCausalLM`` when its config's
    ``architectures`` end in ``ForCausalLM``, else ``AutoModel``. A compressed-tensors checkpoint (config.json
    with ``quantization_config.quant_method == "compressed-tensors"``, as ``save_pretrained`` or llm-compressor
    write) loads as a float skeleton of its config; its int8 weights come in through ``compile(weights=)``.

    Raises:
        UsageError: no such directory, no config.json, an architecture transformers cannot build, another
            quantization method, no tokenizer when ``need_tokenizer``, not a causal LM when ``causal_only``.
        ModuleNotFoundError: transformers is not installed.
    """
    check_model_dir(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("fxquant's shell commands need transformers: install with "
                                  "`pip install 'fxquant[demo]'`") from e
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read the config.json of {model_dir!r} ({type(e).__name__}: {_one_line(e)}): check "
                         "its model_type, or upgrade transformers if the architecture is newer") from None
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    if causal_only and not causal:
        archs = getattr(config, "architectures", None) or [getattr(config, "model_type", "?")]
        raise UsageError(f"{model_dir!r} is a {', '.join(archs)}, not a causal LM (architectures ending in "
                         "ForCausalLM): generate needs one")
    method = _quant_method(config)
    if method not in (None, "compressed-tensors"):
        raise UsageError(f"{model_dir!r} is quantized with {method!r}: fxquant reads float models and "
                         "compressed-tensors W8A8 checkpoints; give the float model's directory")
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    weights = None
    try:
        if method is not None:
            config.quantization_config = None  # the float skeleton; compile(weights=) brings the int8 tensors
            model = auto.from_config(config)
            weights = model_dir
        else:
            model = auto.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        raise UsageError(f"cannot load the model in {model_dir!r} with transformers.{auto.__name__} "
                         f"({type(e).__name__}: {_one_line(e)}): check its config.json and weight files") from None
    model = model.eval()
    if device is not None:
        model = model.to(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    if tokenizer is None and need_tokenizer:
        raise UsageError(f"{model_dir!r} holds no tokenizer transformers can load (tokenizer.json / "
                         "tokenizer_config.json): copy the model's tokenizer files into it")
    return Loaded(model_dir, model, tokenizer, causal, weights)


def _tokenize(loaded: Loaded, text: str | list[str], device=None) -> dict:
    texts = [text] if isinstance(text, str) else list(text)
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
    keep = ("input_ids", "attention_mask") if loaded.causal else tuple(enc)  # a causal LM takes no token_type_ids
    return {k: (enc[k].to(device) if device is not None else enc[k]) for k in keep if k in enc}


def example_inputs(loaded: Loaded, text: str = SAMPLE_TEXT, device=None, batch: int = 1) -> dict:
    """Keyword inputs for ``fxquant.compile``: ``text`` tokenized (batch 1), else ``input_ids`` of shape (1, 16).

    ``batch=2``: two sentences of different lengths, padded (when the tokenizer has a pad token), or two rows of
    16 ids: an example whose batch and sequence sizes differ, so that torch.export keeps both dynamic (a size-1
    dimension is specialized)."""
    import torch

    if loaded.tokenizer is not None:
        if batch > 1 and loaded.tokenizer.pad_token is not None:
            return _tokenize(loaded, [text, SECOND_TEXT][:batch], device)
        return _tokenize(loaded, text, device)
    vocab = int(getattr(loaded.model.config, "vocab_size", None) or 2)
    return {"input_ids": (torch.arange(16 * batch, device=device) % vocab).reshape(batch, 16)}


def read_calibration(path: str) -> list[str]:
    """Calibration samples from a text file: one sample per line, or JSON lines with a ``"text"`` field. Blank
    lines are skipped. Read before the model loads, so a bad file fails fast.

    Raises:
        UsageError: the file is missing, unreadable, not UTF-8, empty, or a JSON line without a string ``"text"``.
    """
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--calibration {path!r} does not exist: give a text file, one sample per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --calibration {path!r} ({type(e).__name__}: {_one_line(e)}): give a UTF-8 "
                         "text file, one sample per line (or JSON lines with a \"text\" field)") from None
    texts = []
    for n, line in enumerate(raw.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--calibration {path!r} line {n}: not valid JSON ({e.msg}); give plain text lines "
                                 "or JSON lines with a \"text\" field") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise UsageError(f"--calibration {path!r} line {n}: a JSON line needs a non-empty string "
                                 "\"text\" field")
            line = obj["text"]
        texts.append(line)
    if not texts:
        raise UsageError(f"--calibration {path!r} holds no sample: give one text sample per line")
    return texts


def tokenize_calibration(texts: list[str], loaded: Loaded) -> list[dict]:
    """Each sample tokenized alone (batch 1) with the model's tokenizer, on the model's device.

    Raises:
        UsageError: the model directory holds no tokenizer.
    """
    if loaded.tokenizer is None:
        raise UsageError(f"--calibration needs the model's tokenizer, but {loaded.model_dir!r} holds none: copy "
                         "the tokenizer files into it")
    device = next(loaded.model.parameters()).device
    return [_tokenize(loaded, t, device) for t in texts]


def copy_side_files(model_dir: str, out_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files and generation_config.json of ``model_dir`` into ``out_dir``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied
