"""Config files (`configs/*.py`) loaded by path, as `--config=` loads them.

The files in `configs/` are not an installed package: `main` loads them by
path (`--config=configs/s2ef.py:megnet`), and they load each other with
`sibling`, so they work from any folder. Notebooks and scripts use `load`:

    config = config_files.load("configs/s2ef.py:megnet")
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import ml_collections

# The checkout this package was installed from (`pip install -e .`).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path: str) -> types.ModuleType:
  name = "matsci_jax_configs." + os.path.splitext(os.path.basename(path))[0]
  module = sys.modules.get(name)
  if module is None or getattr(module, "__file__", None) != path:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return module


def sibling(file: str, name: str) -> types.ModuleType:
  """The config file `name`.py in the folder of `file` (a config's
  `__file__`), as a module."""
  return _module(os.path.join(os.path.dirname(os.path.abspath(file)),
                              name + ".py"))


def load(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of "path/to/config.py[:arg]", like `--config=`.

  A relative path is looked up in the working folder, then in the checkout
  the package was installed from.

  Raises:
    FileNotFoundError: no such config file.
  """
  path, _, arg = spec.partition(":")
  for base in (os.getcwd(), _CHECKOUT):
    candidate = os.path.abspath(os.path.join(base, os.path.expanduser(path)))
    if os.path.isfile(candidate):
      module = _module(candidate)
      return module.get_config(arg) if arg else module.get_config()
  raise FileNotFoundError(f"no config file {path} in {os.getcwd()} or "
                          f"{_CHECKOUT}")


def dotted(fields: dict) -> ml_collections.ConfigDict:
  """A ConfigDict keyed by dotted field names ("model.hidden_dim"), in the
  order given (the grids and overrides of sweep configs)."""
  return ml_collections.ConfigDict(fields, allow_dotted_keys=True,
                                   sort_keys=False)
