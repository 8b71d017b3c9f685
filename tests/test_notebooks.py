"""Every notebook in notebooks/ runs top to bottom in a fresh Jupyter kernel (nbclient + ipykernel), as a user
would run it, against the installed fxquant; the repository's files are never written.

The kernel is this interpreter: the test writes a kernelspec into a temporary directory with
``ipykernel.kernelspec.write_kernel_spec`` (argv ``[sys.executable, "-m", "ipykernel_launcher", ...]``) and
hands nbclient a ``KernelManager`` whose ``KernelSpecManager`` looks only there. So neither a kernelspec
installed elsewhere under the name ``python3`` (another Python, another venv) nor a missing one changes which
Python runs the notebook, and nothing is installed into the user's Jupyter directories. The spec's ``env``
sets ``MPLBACKEND=Agg`` (no display; ``plt`` figures are drawn but not shown).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; each notebook runs in < 60 s on 2 cores, a busy CI runner gets headroom
KERNEL_NAME = "python3"


def _kernel_manager(spec_dir: Path):
    """A KernelManager that starts ``sys.executable -m ipykernel_launcher`` with MPLBACKEND=Agg."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    write_kernel_spec(spec_dir / KERNEL_NAME, overrides={"env": {"MPLBACKEND": "Agg"}})
    ksm = KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False)
    spec = ksm.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, spec.argv
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    before = path.read_bytes()
    nb = nbformat.reads(before.decode("utf-8"), as_version=4)
    assert any(c.cell_type == "code" for c in nb.cells), f"{path.name} has no code cells"
    run_dir = tmp_path / "cwd"  # the kernel's working directory: anything a notebook writes lands here
    run_dir.mkdir()
    client = nbclient.NotebookClient(
        copy.deepcopy(nb), km=_kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME, allow_errors=False, resources={"metadata": {"path": str(run_dir)}})
    try:
        executed = client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # its message holds the cell's source and traceback
        pytest.fail(f"{path.name}: a cell raised\n{e}", pytrace=False)
    assert path.read_bytes() == before, f"executing {path.name} changed the file"
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    """Committed notebooks carry no outputs or execution counts, and open with a markdown cell that says
    what the notebook shows."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name} must start with a markdown cell"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


def test_notebooks_found():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
    assert os.path.isdir(NOTEBOOK_DIR)
