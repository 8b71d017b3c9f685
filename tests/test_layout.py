"""patterns/ and kernels/ live at the repository root but belong to the fxquant namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = (
    "import importlib.util, fxquant, fxquant.patterns, fxquant.kernels; "
    "print(len(fxquant.patterns.REGISTRY), importlib.util.find_spec('patterns') is None, "
    "importlib.util.find_spec('kernels') is None, fxquant.patterns.__name__)"
)


def _run(cwd: Path, *flags: str) -> str:
    proc = subprocess.run([sys.executable, *flags, "-c", CHECK], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_installed_namespace(tmp_path):
    # away from the checkout: the installed package; no top-level `patterns` or `kernels` module exists
    assert _run(tmp_path) == ["6", "True", "True", "fxquant.patterns"]


def test_source_checkout_maps_subpackages():
    # `python -c` / `python -m` in the repository root import fxquant/ from the checkout itself
    n, _, _, name = _run(REPO)
    assert (n, name) == ("6", "fxquant.patterns")
