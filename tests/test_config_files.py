"""configs/*.py load by path from anywhere; nothing needs them installed."""

import os
import subprocess
import sys

import pytest

from matsci_jax import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_files_load_from_another_folder(tmp_path):
  """From a folder outside the checkout, with `configs` not importable."""
  code = (
      "import sys; from matsci_jax import config_files\n"
      f"c = config_files.load({os.path.join(REPO, 'configs', 'is2re.py')!r}"
      " + ':gala')\n"
      "assert c.data.task == 'is2re' and c.model.name == 'gala', c\n"
      "t = config_files.load('configs/test.py:megnet')\n"
      "assert t.model.name == 'megnet' and t.train.num_steps == 40\n"
      "assert 'configs' not in sys.modules and 'data_prep' not in "
      "sys.modules\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=""))
  assert out.returncode == 0, out.stderr[-3000:]


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="no config file configs/x.py"):
    config_files.load("configs/x.py")
