"""Read compressed-tensors W8A8 checkpoints into :func:`fxquant.compile` (``weights=``): the format fxquant
writes (:mod:`fxquant.export.compressed_tensors`, whose docstring gives it field by field), llm-compressor's
W8A8 output and any "int-quantized" checkpoint with per-channel or per-tensor int8 weights and dynamic
per-token int8 activations. Dequantized W = W_q · s (compressed-tensors' ``IntQuantizationCompressor``,
zero point 0 when symmetric).

A checkpoint is untrusted input: only safetensors files are read (never pickle), every shard an index names
must lie inside the checkpoint's directory, scales must be finite and positive, and every problem raises
:class:`fxquant.CheckpointError` naming the file, the entry, the layer or the scheme field, before anything
is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx

from ..errors import CheckpointError
from ..ir.attrs import fetch_attr, parent_for
from ..ir.views import AtenLinear

__all__ = ["read_checkpoint", "install", "StoredWeights", "SourceInfo", "SAFE_NAME", "INDEX_NAME"]

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
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


def _fetch_any(gm: fx.GraphModule, names: list[str]) -> Optional[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for the first of ``names`` the graph has (torch.export keeps one name for a tied
    tensor), or None."""
    for name in names:
        try:
            return name, fetch_attr(gm, name)
        except AttributeError:
            continue
    return None


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

    def config_following(self, config, linear_names: list[str]):
        """The config that follows this checkpoint: its float Linears skipped (``linear_names`` are the model's), every
        speed rule lifted for its int8 ones (the checkpoint decided), and a weight range that covers the stored weights
        (127, or 63 when every stored |W_q| <= 63, which keeps the CPU's 7-bit oneDNN path exact)."""
        floats = [n for n in dict.fromkeys(linear_names) if n not in self.int8]
        peak = max(int(w.abs().max()) if w.numel() else 0 for w, _ in self.int8.values())
        return dataclasses.replace(config, skip=(*config.skip, *floats), min_ratio=0, min_n_unfused=0,
                                   gated_output_int8=True, weight_qmax=63 if peak <= 63 else 127)


def read_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> StoredWeights:
    """Read a compressed-tensors W8A8 checkpoint: a directory (config.json + safetensors, sharded or not), a
    ``.safetensors`` file, or an in-memory state dict (int8 ``<m>.weight`` with ``<m>.weight_scale``).

    Raises:
        CheckpointError: no safetensors file (pickled ``.bin`` checkpoints are refused), a truncated or corrupt
            file, a scheme fxquant does not run (named: 4-bit, fp8, group/block strategies, asymmetric,
            static or weight-only activations, KV-cache quantization), an int8 weight without its scale, a
            scale whose shape does not fit its weight, a scale value that is not finite and > 0 (NaN, inf, zero
            or negative: named with the tensor, the count and the first row), a ``model.safetensors.index.json``
            that is not a {tensor name: shard file name} map, or an index entry naming a shard outside the
            checkpoint directory (an absolute path, a ``..`` component, a symlink out of it: named with the
            tensor and the shard). Raised while reading, before ``fxquant.compile`` captures the model, which is
            untouched.
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
            data = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{index}: not a safetensors index, not readable JSON ({e})") from e
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            got = (f"weight_map is {json.dumps(weight_map)[:60]}" if isinstance(data, dict)
                   else f"the file holds a JSON {type(data).__name__}")
            raise CheckpointError(f"{index}: not a safetensors index: it needs a non-empty \"weight_map\" object "
                                  f"{{tensor name: shard file name}}, but {got}; re-save the checkpoint, or delete the "
                                  f"index if the directory holds a single {SAFE_NAME}")
        paths: dict[str, Path] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{index}: weight_map entry {tensor!r}: {json.dumps(shard)[:60]} is not a shard file "
                                      f"name (a string); each entry maps a tensor name to a shard file; re-save the checkpoint")
            if shard not in paths:
                paths[shard] = _shard_path(directory, index, tensor, shard)
        files = list(paths.values())
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


def _shard_path(directory: Path, index: Path, tensor: str, shard: str) -> Path:
    """``directory / shard`` for an index's weight_map entry ``tensor: shard``, refused unless it is a file name
    inside the checkpoint directory: no absolute path, no ``..`` component, and, once symlinks are resolved, a
    location inside the resolved directory (the index is untrusted input: it must not make fxquant read
    elsewhere)."""
    entry = f"weight_map entry {tensor!r}: {shard!r}"
    what_to_do = (f"a shard must be a file inside {directory} named relative to it (e.g. "
                  f"'model-00001-of-00002.safetensors'); fix the index or copy the shard files into the directory")
    if not shard or Path(shard).is_absolute():
        raise CheckpointError(f"{index}: {entry} is {'empty' if not shard else 'an absolute path'}; {what_to_do}")
    if ".." in Path(shard).parts:
        raise CheckpointError(f"{index}: {entry} has a '..' component, which leaves the checkpoint directory; {what_to_do}")
    path = directory / shard
    try:
        root, resolved = directory.resolve(), path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise CheckpointError(f"{index}: {entry} cannot be resolved ({e}); {what_to_do}") from e
    if resolved == root or not resolved.is_relative_to(root):
        raise CheckpointError(f"{index}: {entry} resolves to {str(resolved)!r}, outside the checkpoint directory "
                              f"{str(root)!r} (a symlink out of it?); {what_to_do} (real files, not symlinks to "
                              f"elsewhere: e.g. huggingface_hub.snapshot_download(local_dir=...))")
    return path


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
            n, per_tensor = t.shape[0], scale.numel() == 1
            if per_tensor:
                scale = scale.reshape(1, 1).expand(n, 1)
            elif scale.numel() != n or scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != 1):
                raise CheckpointError(f"{origin}: {owner}.weight_scale has shape {tuple(scale.shape)}; the weight "
                                      f"{tuple(t.shape)} needs [{n}, 1], [{n}] or one value (per-channel or per-tensor)")
            if not scale.is_floating_point():
                raise CheckpointError(f"{origin}: {owner}.weight_scale is {scale.dtype}; scales are floating point")
            scale = scale.reshape(n, 1).to(torch.float32).contiguous()
            _check_scale(scale, f"{origin}: {owner}.weight_scale", per_tensor)
            int8[owner] = (t.contiguous(), scale)
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


def _check_scale(scale: torch.Tensor, what: str, per_tensor: bool) -> None:
    """Refuse a weight scale [N, 1] (fp32, as it will be used) with a value that is not finite and > 0: W ≈ W_q · s
    would be NaN, inf, all zeros or sign-flipped. An all-zero weight row still needs a positive scale (any)."""
    s = scale.reshape(-1)
    kinds = {"NaN": s.isnan(), "infinite": s.isinf(), "zero": s == 0, "negative": (s < 0) & s.isfinite()}
    found = []
    for kind, mask in kinds.items():
        rows = mask.nonzero().reshape(-1)
        if rows.numel():
            found.append(f"{rows.numel()} {kind} (first at row {int(rows[0])})")
    if found:
        scope = (f" (one per-tensor value, expanded to the weight's {s.numel()} rows)" if per_tensor
                 else f" of {s.numel()} rows")
        raise CheckpointError(f"{what} has {', '.join(found)}{scope} after the cast to float32; weight scales must be "
                              f"finite and > 0 (W = weight · weight_scale, an all-zero row too takes a positive scale): "
                              f"the checkpoint is corrupt or was not made by an int8 quantizer; re-export it")


def install(gm: fx.GraphModule, stored: StoredWeights, linears: Mapping[str, fx.Node], source: SourceInfo) -> list[str]:
    """Put a checkpoint into a freshly captured graph (before annotation); the user's model is untouched:
    the graph's module tree is its own (``capture._own_module_tree``), and attributes are replaced, never
    written in place.

    * float tensors replace the graph's attributes of the same name, or of a name tied to it (cast to the
      attribute's dtype);
    * each int8 Linear's float weight becomes its dequantized value W_q · s (what a Linear that fxquant keeps
      float computes with); the program's weight store holds its W_q and s to use as they are.

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
        target = AtenLinear.of(linears[name]).weight.target
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
    return [n for n in linears if n not in stored.int8]
