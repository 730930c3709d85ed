"""Every notebook in ``notebooks/`` is stored clean and runs top to bottom at its default size.

The notebooks run in a Jupyter kernel started from this interpreter (``sys.executable``, i.e. the
project's venv under ``make test``), whatever kernelspecs are installed elsewhere: the test writes
its own ``python3`` kernelspec into a temporary directory and starts the kernel from it, with the
repository root as working directory and on ``PYTHONPATH`` (so that ``import experiments``
works), matplotlib's inline backend (no GUI; figures become PNG outputs, so the test sees that
they are drawn) and no dataset downloads (``TSCNC_OFFLINE=1``: Fashion-MNIST is read from a local
copy when there is one, otherwise the notebooks fall back to synthetic data).
"""

import json
import os
import pathlib
import sys
import time

import nbclient
import nbformat
import pytest
import stall
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB_URL = "https://colab.research.google.com/github/tscnc-jax/tscnc_jax/blob/main/notebooks/{}"
PRINT_EXECUTABLE = "import sys\nprint(sys.executable)"


def _ids(path: pathlib.Path) -> str:
    return path.stem


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_opens_with_colab_badge_and_install_cell(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert f"]({COLAB_URL.format(path.name)})" in first.source, "missing or wrong Colab badge"
    install = _code_cells(nb)[0].source
    assert 'if "google.colab" in sys.modules:' in install
    assert "pip" in install and "install" in install


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernelspec manager that only knows a ``python3`` kernel running ``sys.executable``."""
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / "python3").mkdir()
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {
        "PYTHONPATH": pythonpath,
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "OPENBLAS_NUM_THREADS": "1",
        "TSCNC_OFFLINE": "1",
    }
    if "TSCNC_TFDS_DIR" not in os.environ:  # prepare data in a temporary tfds directory
        env["TSCNC_TFDS_DIR"] = str(tmp_path_factory.mktemp("tfds"))
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
        "env": env,
    }
    (kernels / "python3" / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs(path, kernel_spec_manager):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PRINT_EXECUTABLE))
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_spec_manager)
    # No per-cell timeout (a slow machine is not a failure); a kernel that stops using the CPU
    # is killed by the stall watch, which fails the test (tests/stall.py).
    client = nbclient.NotebookClient(
        nb, km=km, kernel_name="python3", timeout=None,
        resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    with stall.watch_children():
        client.execute(cleanup_kc=True)  # raises CellExecutionError at the first failing cell
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    outputs = nb.cells[-1].outputs
    assert outputs[0]["text"].strip() == sys.executable, "the kernel ran another interpreter"
    figures = sum("image/png" in output.get("data", {})
                  for cell in _code_cells(nb) for output in cell.outputs)
    plots = sum(cell.source.count("plt.show()") for cell in _code_cells(nb))
    assert figures >= plots, f"{plots} plt.show() calls but {figures} figures were drawn"
