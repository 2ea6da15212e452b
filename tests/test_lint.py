"""The tree passes the linter (ruff, configured in pyproject.toml)."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
  ruff = (shutil.which("ruff")
          or os.path.join(os.path.dirname(sys.executable), "ruff"))
  assert os.path.exists(ruff), "ruff comes with the test extras: .[test]"
  out = subprocess.run([ruff, "check", "--no-cache", REPO],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
