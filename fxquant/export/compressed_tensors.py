"""Write a compiled model as a compressed-tensors W8A8 checkpoint (the format of
:mod:`fxquant.weights.checkpoint`, which reads it back).

The format ("int-quantized", compressed-tensors' ``QuantizationScheme`` W8A8; what llm-compressor writes,
vLLM's ``CompressedTensorsW8A8Int8`` and transformers read)::

    config.json    the model's config + "quantization_config": {quant_method "compressed-tensors",
                   format "int-quantized", quantization_status "compressed", config_groups {group_0:
                   {targets ["Linear"], weights {num_bits 8, type int, symmetric, strategy channel, dynamic
                   false}, input_activations {num_bits 8, type int, symmetric, strategy token, dynamic true}}},
                   ignore [the Linears kept float]}
    model.safetensors   (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
                   <linear>.weight        int8 [N, K]   W ≈ weight · weight_scale (per output channel)
                   <linear>.weight_scale  [N, 1]        fxquant writes fp32 (its own scales, exactly)
                   <linear>.bias          float [N]     when the Linear has one
                   every other tensor of the model's state dict, float, under its own name

Source: compressed-tensors (github.com/neuralmagic/compressed-tensors), ``QuantizationConfig``,
``QuantizationArgs`` and the ``int-quantized`` compressor. The int8 tensors are read from the program's
weight store (one Linear's rows of the GEMM it runs in), the float ones from the compiled graph.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..errors import CheckpointError
from ..program import Program, program_of
from ..weights.checkpoint import INDEX_NAME, SAFE_NAME, SourceInfo, _fetch_any

__all__ = ["save_pretrained", "quantization_config", "check_savable"]

_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
            "group_size": None, "block_structure": None, "observer": "minmax"}
_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
           "group_size": None, "block_structure": None, "observer": None}



def quantization_config(ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of an fxquant W8A8 checkpoint (see the module docstring)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(_WEIGHTS),
                                      "input_activations": dict(_INPUTS), "output_activations": None}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }




def _int8_tensors(program: Program, decisions) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], set[str]]:
    """Per int8 Linear name: (w_q [N, K], scale [N, 1], bias [N] or None), its rows of the GEMM it runs in
    (siblings, SwiGLU's gate/up), read from the store; and the int8 Linears that run from a tied copy."""
    out: dict[str, tuple] = {}
    tied: set[str] = set()
    int8 = set(program.store.int8_linears())
    for d in decisions:
        if d.name not in int8:
            continue
        if d.extra_bytes:
            tied.add(d.name)
            continue
        out.setdefault(d.name, program.store.linear(d.name))
    return out, tied


def check_savable(config) -> None:
    """Raise :class:`CheckpointError` when a model compiled with ``config`` (a QuantConfig) cannot be written by
    :func:`save_pretrained`: the static scheme or SmoothQuant, which the dynamic W8A8 format cannot carry."""
    if config.activation_scheme != "dynamic-per-token" or config.smoothquant is not None:
        raise CheckpointError(
            f"save_pretrained writes compressed-tensors' dynamic per-token W8A8; this model uses "
            f"activation_scheme={config.activation_scheme!r}, smoothquant={config.smoothquant!r}, whose static scales or "
            "SmoothQuant factors (applied in fxquant's quantizers, not folded into the weights) that form cannot carry. "
            "Export it with fxquant.export_onnx, or compile a dynamic model without SmoothQuant to save a checkpoint")


def save_pretrained(qmodel, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    int8_head: bool = False) -> list[Path]:
    """Write ``qmodel`` as a compressed-tensors W8A8 checkpoint (format in the module docstring).

    Every int8 Linear is written under its own name, also those fxquant runs as one GEMM (sibling fusion,
    SwiGLU's gate/up): their rows are split back per Linear. Linears kept float, and a Linear that runs int8
    from its own copy of a weight tied to an embedding (the format has no int8 copy beside a float table;
    loaders re-tie), are written float and listed in ``ignore``. Other tensors: the model's state dict, float.
    Files are written under temporary names and renamed, so an interrupted save leaves no half-written file.
    Tokenizer and generation files are the user's to copy.

    Args:
        qmodel: a :class:`fxquant.QuantizedModel` (from ``fxquant.compile``).
        directory: created if missing; existing files of the same names are replaced.
        max_shard_size: bytes or a string like ``"5GB"``; above it the weights are sharded with an index
            (``huggingface_hub.split_torch_state_dict_into_shards``, as transformers does).
        int8_head: write an int8 output head (``lm_head``) as int8. Default False: it is written as its
            dequantized weight W_q · s in the model's dtype and listed in ``ignore``, as llm-compressor's
            recipes do, since vLLM does not quantize the head (vLLM 0.32 refused an int8 ``lm_head``:
            "no module or parameter named 'lm_head.weight_scale'"). transformers and fxquant load either.

    Returns:
        The paths written (config.json, the safetensors files, the index when sharded).

    Raises:
        CheckpointError: a tensor of the model's state dict is not in the compiled graph, or the model uses the
            static scheme or SmoothQuant, which the dynamic W8A8 format cannot carry (nothing is written).
        TypeError: ``qmodel`` is not a QuantizedModel.

    A model compiled with ``QuantConfig.compute_dtype`` writes its model's own (unrounded) float tensors: the
    same checkpoint as without it.
    """
    program_of(qmodel, "save_pretrained")  # TypeError for anything but a QuantizedModel
    with qmodel._exact_floats():  # QuantConfig.compute_dtype: the model's own float tensors, not the rounded ones
        return _save_pretrained(qmodel, directory=directory, max_shard_size=max_shard_size, int8_head=int8_head)


def _save_pretrained(qmodel, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    int8_head: bool = False) -> list[Path]:

    from safetensors.torch import save_file

    program = program_of(qmodel, "save_pretrained")
    check_savable(qmodel.config)
    gm, source = program.forward.graph_module, program.source
    int8, tied = _int8_tensors(program, qmodel.report().decisions)
    decisions = {d.name: d for d in qmodel.report().decisions}
    linears = set(decisions)
    head = None  # (dequantized weight, bias) of an int8 head written float
    if not int8_head and source.head in int8:
        w_q, scale, bias = int8.pop(source.head)
        head = ((w_q.to(torch.float32) * scale).to(decisions[source.head].dtype or torch.float32), bias)
    tensors: dict[str, torch.Tensor] = {}
    missing = []
    for key in source.keys:
        if key in source.aliases:
            continue  # one tensor, one name (safetensors stores no aliases); loaders re-tie
        owner, _, leaf = key.rpartition(".")
        if head is not None and owner == source.head and leaf in ("weight", "bias"):
            value = head[0] if leaf == "weight" else head[1]
            if value is not None:
                tensors[key] = value
            continue
        if owner in int8 and leaf in ("weight", "bias"):
            w_q, scale, bias = int8[owner]
            if leaf == "weight":
                tensors[key], tensors[f"{owner}.weight_scale"] = w_q, scale.to(torch.float32)
            elif bias is not None:
                tensors[key] = bias
            continue
        found = _fetch_any(gm, source.names_of(key))
        if found is None:
            missing.append(key)
            continue
        tensors[key] = found[1].detach()
    if missing:
        raise CheckpointError(f"save_pretrained: {len(missing)} tensor(s) of the model's state dict are not in the "
                              f"compiled graph (e.g. {missing[:3]}); nothing was written. They are unused by the "
                              f"captured forward; compile with example inputs that use them")
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    ignore = sorted((linears - set(int8)) | tied)
    config = _config_dict(source, ignore, tensors)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _split(tensors, max_shard_size)
    staged: list[tuple[Path, Path]] = []
    try:
        for filename, names in shards.items():
            tmp = _temp_path(directory, filename)
            staged.append((tmp, directory / filename))
            save_file({n: tensors[n] for n in names}, str(tmp), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {n: f for f, names in shards.items() for n in sorted(names)}}
            _write_staged(staged, directory, INDEX_NAME, json.dumps(index, indent=2))
        _write_staged(staged, directory, "config.json", json.dumps(config, indent=2, sort_keys=True))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    # a previous save of the other layout must not shadow this one
    (directory / (SAFE_NAME if len(shards) > 1 else INDEX_NAME)).unlink(missing_ok=True)
    return [final for _, final in staged]




def _config_dict(source: SourceInfo, ignore: list[str], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if source.config is not None:
        config = source.config.to_dict()
        config["architectures"] = config.get("architectures") or [source.architecture]
    else:
        config = {"architectures": [source.architecture]}
    floats = {t.dtype for t in tensors.values() if t.is_floating_point() and t.dtype != torch.float32} or {torch.float32}
    if len(floats) == 1:
        config["torch_dtype"] = config["dtype"] = str(floats.pop()).removeprefix("torch.")
    config["quantization_config"] = quantization_config(ignore)
    return json.loads(json.dumps(config, default=str))


def _split(tensors: Mapping[str, torch.Tensor], max_shard_size: int | str) -> dict[str, list[str]]:
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    limit = _parse_size(max_shard_size)
    if size <= limit:
        return {SAFE_NAME: list(tensors)}
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(tensors), filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
    return {f: list(names) for f, names in split.filename_to_tensors.items()}


def _parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", value, flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size={value!r}: give bytes or a size like '5GB' / '500MiB'")
    unit = m.group(2).upper()
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _temp_path(directory: Path, filename: str) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _write_staged(staged: list[tuple[Path, Path]], directory: Path, filename: str, text: str) -> None:
    tmp = _temp_path(directory, filename)
    staged.append((tmp, directory / filename))
    tmp.write_text(text + "\n")


