"""Every notebook in colab/ runs top to bottom (in quick mode, on CPU)."""

import glob
import os

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


def test_there_are_notebooks():
  assert [os.path.basename(p)[:2] for p in NOTEBOOKS] == ["01", "02", "03",
                                                          "04"]


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
  """One folder for the notebooks of this session: the dev set is built once."""
  return str(tmp_path_factory.mktemp("notebooks"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_is_stored_without_outputs(path, shared_dir,
                                                     monkeypatch):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:  # Outputs are cleared in git.
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, path
  monkeypatch.setenv("MATSCI_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("MATSCI_JAX_NOTEBOOK_DIR", shared_dir)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()
