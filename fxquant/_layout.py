"""Map ``patterns/`` and ``kernels/`` into the ``fxquant`` namespace when fxquant runs from a source checkout.

Installed (wheel or editable), setuptools maps the repository's ``patterns/`` and ``kernels/`` to
``fxquant.patterns`` and ``fxquant.kernels`` (``pyproject.toml``). Imported straight from a checkout,
e.g. ``python -m fxquant demo`` in the repository root (``-m`` puts the current directory first on
``sys.path``), ``fxquant/`` has no such children; this registers exactly those two packages from beside
it, and nothing else of the checkout.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("patterns", "kernels")


def map_source_checkout(package: str, package_dir: Path, names: tuple[str, ...] = SUBPACKAGES) -> None:
    root = package_dir.parent
    for name in names:
        full = f"{package}.{name}"
        if full in sys.modules or (package_dir / name).is_dir() or not (root / name / "__init__.py").is_file():
            continue
        try:
            if importlib.util.find_spec(full) is not None:  # an editable install's finder maps it already
                continue
        except ModuleNotFoundError:
            pass
        spec = importlib.util.spec_from_file_location(full, root / name / "__init__.py", submodule_search_locations=[str(root / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        setattr(sys.modules[package], name, module)  # as the import system binds a loaded child
        spec.loader.exec_module(module)
