"""The notebooks in notebooks/: each runs top to bottom without an error (nbclient, an IPython kernel on this
interpreter, from the repository root, CPU only), and none is committed with outputs."""

import glob
import os
import re
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
MINI = os.path.join(ROOT, "models", "mini", "high_noise_model")
CELL_TIMEOUT_S = 900

nbformat = pytest.importorskip("nbformat")


def _kernel_env() -> dict:
    """The kernel's environment: this one, on the CPU, without the test session's 8 forced host devices, and with
    one OpenBLAS thread (the LAPACK behind jnp.linalg on CPU: its spinning threads make the small SVDs of the
    quantization 10-100x slower while the other test worker keeps the second core busy)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", OPENBLAS_NUM_THREADS="1")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend
    return env


def _execute(nb):
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute(env=_kernel_env())
    return nb


def test_notebooks_exist():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_w4a4_anatomy.ipynb", "03_kernels.ipynb"} <= names, sorted(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
    """Outputs are stripped in git: no outputs, no execution counts, no widget state."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{os.path.basename(path)}: code cells {dirty} carry outputs or execution counts; clear them "
        "(Jupyter: Edit > Clear outputs of all cells) before committing"
    )
    assert "widgets" not in nb.metadata, f"{os.path.basename(path)}: widget state in the metadata"


def test_kernel_is_this_interpreter():
    """The "python3" kernel the notebooks run in is this interpreter (the venv with wanjax), not another Python."""
    v4 = nbformat.v4
    nb = v4.new_notebook(cells=[v4.new_code_cell("import sys, wanjax; print(sys.executable)")])
    out = _execute(nb).cells[0].outputs
    text = "".join(o.get("text", "") for o in out if o.output_type == "stream").strip()
    assert os.path.realpath(text) == os.path.realpath(sys.executable), (text, sys.executable)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(MINI), reason="models/mini is not shipped in this checkout")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
    """Every cell runs without an error (nbclient raises CellExecutionError with the cell and traceback)."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    _execute(nb)
    seconds = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    print(f"{os.path.basename(path)}: executed in {seconds:.1f} s")
