"""compressed-tensors W8A8 checkpoints: write a compiled model, read one into :func:`fxquant.compile`.

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
``QuantizationArgs`` and the ``int-quantized`` compressor (``IntQuantizationCompressor``: W_q =
clamp(round(W / s)), W = W_q · s, zero point 0 when symmetric).

Only safetensors files are read (never pickle). Every problem found while reading raises
:class:`fxquant.CheckpointError` naming the file, the layer or the scheme field, before anything is used.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx

from ._attrs import fetch_attr, parent_for
from .errors import CheckpointError

__all__ = ["save_pretrained", "read_checkpoint", "StoredWeights", "SourceInfo", "quantization_config",
           "SAFE_NAME", "INDEX_NAME", "STORED_KEY"]

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
STORED_KEY = "fxquant_stored_weights"  # gm.meta: {linear name: (w_q int8 [N, K], scale fp32 [N, 1])}
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


# ------------------------------------------------------------------------------------------------ save
@dataclass(frozen=True)
class SourceInfo:
    """What :func:`save_pretrained` needs from the float model, recorded by ``compile`` without keeping the
    model alive: its state-dict names (aliases of one tensor, like a tied LM head, point at the first name),
    its Hugging Face config and class name when it has them."""

    keys: tuple[str, ...]
    aliases: Mapping[str, str]
    config: Any = None
    architecture: Optional[str] = None
    head: Optional[str] = None  # the output head (``get_output_embeddings()``), e.g. "lm_head"

    def names_of(self, key: str) -> list[str]:
        """``key`` and every other state-dict name of the same tensor (the first name first)."""
        root = self.aliases.get(key, key)
        return [root, *(a for a, first in self.aliases.items() if first == root)]

    @staticmethod
    def of(model: torch.nn.Module) -> "SourceInfo":
        seen: dict[tuple, str] = {}
        aliases: dict[str, str] = {}
        keys = []
        for k, t in model.state_dict(keep_vars=True).items():
            ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
            if ident is not None and ident in seen:
                aliases[k] = seen[ident]
            elif ident is not None:
                seen[ident] = k
            keys.append(k)
        config = getattr(model, "config", None)
        get_head = getattr(model, "get_output_embeddings", None)
        head_module = get_head() if callable(get_head) else None
        head = next((n for n, m in model.named_modules() if m is head_module), None) if head_module is not None else None
        return SourceInfo(tuple(keys), aliases, config if hasattr(config, "to_dict") else None, type(model).__name__, head)


def _int8_tensors(gm: fx.GraphModule) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], set[str]]:
    """Per original Linear name: (w_q [N, K], scale [N, 1], bias [N] or None), split from the fused GEMMs
    (siblings, SwiGLU's gate/up) in the order they were stacked; and the int8 Linears that read a tied copy."""
    from . import ops
    from .rewrite import members_of

    out: dict[str, tuple] = {}
    tied: set[str] = set()
    for node in gm.graph.nodes:
        if not ops.FusedLinear.is_fused_linear(node):
            continue
        f = ops.FusedLinear.of(node)
        w, s = fetch_attr(gm, f.w_q.target), fetch_attr(gm, f.w_scale.target)
        b = fetch_attr(gm, f.bias.target) if f.bias is not None else None
        start = 0
        for d in members_of(node):
            rows = slice(start, start + d.n)
            start += d.n
            if d.extra_bytes:
                tied.add(d.name)
                continue
            out.setdefault(d.name, (w[rows], s.reshape(-1, 1)[rows], b[rows] if b is not None else None))
        assert start == w.shape[0], f"fused GEMM {node.name}: members cover {start} of {w.shape[0]} rows"
    return out, tied


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
        ValueError: the model holds rounded float parameters (``QuantConfig.compute_dtype``; nothing is written).
    """
    from safetensors.torch import save_file

    from .api import QuantizedModel

    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"save_pretrained needs a fxquant.QuantizedModel (from fxquant.compile), got {type(qmodel).__name__}")
    qmodel.check_exportable("save_pretrained")
    config = qmodel.config
    if config.activation_scheme != "dynamic-per-token" or config.smoothquant is not None:
        raise CheckpointError(
            f"save_pretrained writes compressed-tensors' dynamic per-token W8A8; this model uses "
            f"activation_scheme={config.activation_scheme!r}, smoothquant={config.smoothquant!r}, whose static scales or "
            "SmoothQuant factors (applied in fxquant's quantizers, not folded into the weights) that form cannot carry. "
            "Export it with fxquant.export_onnx, or compile a dynamic model without SmoothQuant to save a checkpoint")
    gm, source = qmodel.graph_module, qmodel._source
    int8, tied = _int8_tensors(gm)
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


def _fetch_any(gm: fx.GraphModule, names: list[str]) -> Optional[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for the first of ``names`` the graph has (torch.export keeps one name for a tied
    tensor), or None."""
    for name in names:
        try:
            return name, fetch_attr(gm, name)
        except AttributeError:
            continue
    return None


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


# ------------------------------------------------------------------------------------------------ load
@dataclass
class StoredWeights:
    """A checkpoint read into memory: ``int8`` {Linear name: (w_q int8 [N, K], scale fp32 [N, 1])}, the float
    tensors by state-dict name, the Linears the file keeps float (``ignore`` entries, exact or ``re:``) and
    where it came from."""

    int8: dict[str, tuple[torch.Tensor, torch.Tensor]]
    floats: dict[str, torch.Tensor]
    ignore: list[str] = field(default_factory=list)
    origin: str = "state dict"

    def ignored(self, name: str) -> bool:
        return any(re.fullmatch(p[3:], name) if p.startswith("re:") else p == name for p in self.ignore)


def read_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> StoredWeights:
    """Read a compressed-tensors W8A8 checkpoint: a directory (config.json + safetensors, sharded or not), a
    ``.safetensors`` file, or an in-memory state dict (int8 ``<m>.weight`` with ``<m>.weight_scale``).

    Raises:
        CheckpointError: no safetensors file (pickled ``.bin`` checkpoints are refused), a truncated or corrupt
            file, a scheme fxquant does not run (named: 4-bit, fp8, group/block strategies, asymmetric,
            static or weight-only activations, KV-cache quantization), an int8 weight without its scale, or a
            scale whose shape does not fit its weight.
    """
    if isinstance(source, Mapping):
        return _stored(dict(source), [], "state dict")
    path = Path(source)
    if path.is_file():
        files, qconfig = [path], _read_qconfig(path.parent / "config.json", required=False)
    elif path.is_dir():
        qconfig = _read_qconfig(path / "config.json", required=True)
        files = _shard_files(path)
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (give a directory with config.json and "
                              f"model.safetensors, a .safetensors file or a state dict)")
    ignore = _check_scheme(qconfig, str(path)) if qconfig is not None else []
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(_read_safetensors(f))
    return _stored(tensors, ignore, str(path))


def _read_qconfig(config_path: Path, required: bool) -> Optional[dict]:
    if not config_path.is_file():
        if required:
            raise CheckpointError(f"{config_path}: missing; a compressed-tensors checkpoint has config.json with a "
                                  f"quantization_config")
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not readable JSON ({e})") from e
    qc = config.get("quantization_config") or config.get("compression_config")
    if qc is None:
        raise CheckpointError(f"{config_path}: no quantization_config: this is a float checkpoint; load it with "
                              f"the model's own loader and call fxquant.compile without weights=")
    return qc


def _check_scheme(qc: Mapping, where: str) -> list[str]:
    """Refuse, naming the field, every scheme fxquant does not run; return the ``ignore`` list."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: quantization_config {what}; fxquant runs W8A8 int8 only: int8 symmetric "
                               f"per-channel (or per-tensor) weights, dynamic per-token int8 activations")

    if qc.get("quant_method") not in ("compressed-tensors", None):
        raise refuse(f"quant_method={qc.get('quant_method')!r} is not compressed-tensors")
    if qc.get("format") not in ("int-quantized", None):
        raise refuse(f"format={qc.get('format')!r} (only 'int-quantized' stores int8 weights with scales)")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise refuse(f"quantization_status={qc.get('quantization_status')!r}: the weights are not stored compressed")
    if qc.get("kv_cache_scheme"):
        raise refuse("has a kv_cache_scheme (KV-cache quantization)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise refuse("has no config_groups")
    for gname, group in groups.items():
        if group.get("format") not in (None, "int-quantized"):
            raise refuse(f"group {gname!r} format={group.get('format')!r}")
        w, a = group.get("weights") or {}, group.get("input_activations")
        for key, want in (("num_bits", 8), ("type", "int"), ("symmetric", True)):
            if w.get(key, want) != want:
                raise refuse(f"group {gname!r} weights.{key}={w.get(key)!r} (targets {group.get('targets')})")
        if w.get("strategy") not in ("channel", "tensor") or w.get("group_size") or w.get("block_structure"):
            raise refuse(f"group {gname!r} weights.strategy={w.get('strategy')!r} (group/block scales are not run)")
        if w.get("dynamic"):
            raise refuse(f"group {gname!r} has dynamic weights")
        if a is None:
            raise refuse(f"group {gname!r} is weight-only (no input_activations: W8A16)")
        for key, want in (("num_bits", 8), ("type", "int"), ("symmetric", True)):
            if a.get(key, want) != want:
                raise refuse(f"group {gname!r} input_activations.{key}={a.get(key)!r}")
        if not a.get("dynamic", False):
            raise refuse(f"group {gname!r} has static input scales (input_activations.dynamic=false)")
        if a.get("strategy") not in ("token", "tensor"):
            raise refuse(f"group {gname!r} input_activations.strategy={a.get('strategy')!r}")
        if group.get("output_activations"):
            raise refuse(f"group {gname!r} quantizes output activations")
    ignore = list(qc.get("ignore") or [])
    for p in ignore:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise CheckpointError(f"{where}: ignore entry {p!r} is not a valid regular expression ({e})") from e
    return ignore


def _shard_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard(s) that are missing: {absent[:3]}")
        return files
    single = directory / SAFE_NAME
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" ({', '.join(pickled[:3])} are pickle files, which fxquant never loads)" if pickled else ""
    raise CheckpointError(f"{directory}: no {SAFE_NAME} or {INDEX_NAME}{hint}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e


def _stored(tensors: dict[str, torch.Tensor], ignore: list[str], origin: str) -> StoredWeights:
    int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    floats: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and t.dtype == torch.int8:
            if t.dim() != 2:
                raise CheckpointError(f"{origin}: {key} is int8 {tuple(t.shape)}; an int8 Linear weight is [N, K]")
            scale = tensors.get(f"{owner}.weight_scale")
            if scale is None:
                raise CheckpointError(f"{origin}: {key} is int8 but {owner}.weight_scale is missing")
            n = t.shape[0]
            if scale.numel() == 1:
                scale = scale.reshape(1, 1).expand(n, 1)
            elif scale.numel() != n or scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != 1):
                raise CheckpointError(f"{origin}: {owner}.weight_scale has shape {tuple(scale.shape)}; the weight "
                                      f"{tuple(t.shape)} needs [{n}, 1], [{n}] or one value (per-channel or per-tensor)")
            if not scale.is_floating_point():
                raise CheckpointError(f"{origin}: {owner}.weight_scale is {scale.dtype}; scales are floating point")
            int8[owner] = (t.contiguous(), scale.reshape(n, 1).to(torch.float32).contiguous())
        elif leaf in ("weight_zero_point", "input_scale", "input_zero_point"):
            if leaf != "weight_zero_point" or bool(t.ne(0).any()):
                raise CheckpointError(f"{origin}: {key}: {'static input scales' if 'input' in leaf else 'asymmetric weights'} "
                                      f"are not run by fxquant (dynamic per-token activations, symmetric weights)")
        elif leaf in ("weight_packed", "weight_shape", "weight_global_scale", "weight_g_idx"):
            raise CheckpointError(f"{origin}: {key}: packed / 4-bit / grouped weights are not run by fxquant (W8A8 int8 only)")
        elif leaf != "weight_scale":
            if t.dtype == torch.float8_e4m3fn or t.dtype == torch.float8_e5m2:
                raise CheckpointError(f"{origin}: {key} is {t.dtype}: fp8 checkpoints are not run by fxquant (int8 only)")
            floats[key] = t
    orphans = [k for k in tensors if k.endswith(".weight_scale") and k.rpartition(".")[0] not in int8]
    if orphans:
        raise CheckpointError(f"{origin}: {orphans[0]} has no int8 weight beside it (the weight is "
                              f"{tensors.get(orphans[0].rpartition('.')[0] + '.weight', torch.empty(0)).dtype})")
    if not int8:
        raise CheckpointError(f"{origin}: no int8 Linear weights (<name>.weight int8 with <name>.weight_scale)")
    return StoredWeights(int8, floats, ignore, origin)


def install(gm: fx.GraphModule, stored: StoredWeights, linears: Mapping[str, fx.Node], source: SourceInfo) -> list[str]:
    """Put a checkpoint into a freshly captured graph (before annotation); the user's model is untouched:
    the graph's module tree is its own (``capture._own_module_tree``), and attributes are replaced, never
    written in place.

    * float tensors replace the graph's attributes of the same name, or of a name tied to it (cast to the
      attribute's dtype);
    * each int8 Linear's float weight becomes its dequantized value W_q · s (what a Linear that fxquant keeps
      float computes with), and ``gm.meta[STORED_KEY]`` holds its W_q and s for the rewrite to use as they are.

    Returns the Linears the checkpoint keeps float (for ``QuantConfig.skip``).

    Raises:
        CheckpointError: a tensor for a layer the model does not have, a shape that differs, an int8 Linear the
            model does not call as a Linear, a tensor the model uses that the checkpoint lacks: a checkpoint
            for another model (nothing is changed).
    """
    origin = stored.origin
    unknown = [n for n in stored.int8 if n not in linears]
    if unknown:
        raise CheckpointError(f"{origin}: int8 weights for {unknown[:3]}, which the model does not call as Linears "
                              f"(a checkpoint for another model?)")
    keys = set(source.keys)
    extra = [k for k in stored.floats if k not in keys]
    if extra:
        raise CheckpointError(f"{origin}: tensors the model does not have: {extra[:3]} (a checkpoint for another model?)")
    plan: dict[str, torch.Tensor] = {}
    for name, (w_q, scale) in stored.int8.items():
        target = linears[name].args[1].target
        current = fetch_attr(gm, target)
        if tuple(current.shape) != tuple(w_q.shape):
            raise CheckpointError(f"{origin}: {name}.weight is {tuple(w_q.shape)} but the model's {name} is "
                                  f"{tuple(current.shape)} (a checkpoint for another model?)")
        plan[target] = (w_q.to(torch.float32) * scale).to(current.dtype)
    for key, t in stored.floats.items():
        found = _fetch_any(gm, source.names_of(key))
        if found is None:
            continue  # in the model's state dict but unused by the captured forward
        target, current = found
        if tuple(current.shape) != tuple(t.shape):
            raise CheckpointError(f"{origin}: {key} is {tuple(t.shape)} but the model's is {tuple(current.shape)} "
                                  f"(a checkpoint for another model?)")
        plan[target] = t.to(current.dtype)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in keys}
    absent = sorted(used - set(plan))
    if absent:
        raise CheckpointError(f"{origin}: no value for {len(absent)} tensor(s) the model uses, e.g. {absent[:3]} "
                              f"(a checkpoint for another model, or a partial one?)")
    for target, value in plan.items():  # nothing is changed before every check passed
        current = fetch_attr(gm, target)
        parent, leaf = parent_for(gm, target)
        if isinstance(current, torch.nn.Parameter):
            parent.register_parameter(leaf, torch.nn.Parameter(value.to(current.device), requires_grad=False))
        else:
            parent.register_buffer(leaf, value.to(current.device))
    gm.meta[STORED_KEY] = {n: (w_q, s) for n, (w_q, s) in stored.int8.items()}
    return [n for n in linears if n not in stored.int8]
