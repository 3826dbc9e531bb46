"""The Colab notebooks in notebooks/: committed without outputs, and each runs top to bottom.

Execution uses nbclient with a real IPython kernel, on the notebooks' small settings
(``SHIFTJAX_NOTEBOOK_SMALL=1``, read by each notebook's ``parameters`` cell), with data,
workdirs and the kernel's working directory in temporary folders. Any error in any cell
fails the test. Select or skip the module with ``pytest -m notebooks`` /
``-m "not notebooks"``; it runs by default (about 3.5 minutes of CPU for the four).
"""

import json
import os
import pathlib
import shutil

import pytest

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("quickstart.ipynb", "train_fashion_mnist.ipynb", "deploy_packed.ipynb",
            "speech_slu.ipynb", "any_model.ipynb")
# Seconds a single cell may take before the run fails (generous: shared CPUs).
CELL_TIMEOUT = 900

FASHION_MNIST_FILE = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
# What a notebook needs from the machine beyond Python packages; without it the notebook
# would try to apt-get it (as on Colab), which a test must not do.
NEEDS = {
    "quickstart.ipynb": ("Fashion-MNIST", lambda: os.path.isfile(FASHION_MNIST_FILE),
                         "apt-get install dataset-fashion-mnist"),
    "train_fashion_mnist.ipynb": ("Fashion-MNIST", lambda: os.path.isfile(FASHION_MNIST_FILE),
                                  "apt-get install dataset-fashion-mnist"),
    "deploy_packed.ipynb": ("Fashion-MNIST", lambda: os.path.isfile(FASHION_MNIST_FILE),
                            "apt-get install dataset-fashion-mnist"),
    "any_model.ipynb": ("Fashion-MNIST", lambda: os.path.isfile(FASHION_MNIST_FILE),
                        "apt-get install dataset-fashion-mnist"),
    "speech_slu.ipynb": ("espeak-ng", lambda: shutil.which("espeak-ng") is not None,
                         "apt-get install espeak-ng flite"),
}


def read_json(name):
  with open(NOTEBOOK_DIR / name, encoding="utf-8") as f:
    return json.load(f)


def code_cells(nb):
  return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell):
  return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


# ------------------------------------------------------------------------ committed form


def test_every_notebook_is_there():
  assert set(EXPECTED) <= set(NOTEBOOKS), f"missing: {set(EXPECTED) - set(NOTEBOOKS)}"
  assert set(NEEDS) >= set(NOTEBOOKS), "say in NEEDS what a new notebook needs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = read_json(name)
  for i, cell in enumerate(code_cells(nb)):
    assert cell.get("outputs") == [], (
        f"{name} code cell {i} has outputs; strip them (e.g. `jupyter nbconvert "
        "--clear-output --inplace` or nbformat) before committing")
    assert cell.get("execution_count") is None, f"{name} code cell {i} has an execution count"
    assert "execution" not in cell.get("metadata", {}), f"{name} code cell {i} has timings"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_ready(name):
  nbformat = pytest.importorskip("nbformat")
  nbformat.validate(nbformat.read(str(NOTEBOOK_DIR / name), as_version=4))
  cells = code_cells(read_json(name))
  install = source(cells[0])
  # First code cell: install shiftjax only when it is not importable.
  assert "import shiftjax" in install and "except ImportError" in install, install
  assert "%pip install" in install and "git+" in install, install
  # The small-settings switch: a `parameters` cell (papermill) reading the env variable.
  params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(params) == 1 and cells.index(params[0]) == 1, "cell 2 must be the parameters cell"
  assert "SMALL = " in source(params[0]) and "SHIFTJAX_NOTEBOOK_SMALL" in source(params[0])


# ------------------------------------------------------------------------------ running


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data_dir for all notebooks: Fashion-MNIST is prepared once."""
  return tmp_path_factory.mktemp("notebook_data")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_on_small_settings(name, data_dir, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  what, available, how = NEEDS[name]
  if not available():
    pytest.skip(f"{name} needs {what} ({how})")

  # The kernel inherits this environment.
  monkeypatch.setenv("SHIFTJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("SHIFTJAX_DATA_DIR", str(data_dir))
  monkeypatch.setenv("SHIFTJAX_WORKDIR", str(tmp_path / "workdirs"))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # The checkout's code, whatever else is installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  cwd = tmp_path / "cwd"
  cwd.mkdir()

  nb = nbformat.read(str(NOTEBOOK_DIR / name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()  # raises CellExecutionError naming the cell on any error

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type == "display_data" and "image/png" in o.get("data", {})
             for o in outputs), f"{name} drew no figure"
