"""Dotted attribute paths in a module tree (``encoder.layer.0.weight``), shared by the passes."""

from __future__ import annotations

from typing import Any

import torch


def fetch_attr(root: torch.nn.Module, target: str) -> Any:
    """The object at dotted path ``target`` under ``root``. Raises AttributeError naming the missing part."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def parent_for(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    """``(parent module, leaf name)`` of ``path``, creating empty container modules on the way."""
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    return mod, leaf
