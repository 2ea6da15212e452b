"""Lazy attributes for package `__init__`s (PEP 562).

`import matsci_jax` stays cheap (converter and loader worker processes
import it), while `mj.load`, `mj.ase`, ... import their modules on first use.
"""

from __future__ import annotations

import importlib


def attach(package: str, names: dict[str, str]):
  """Returns `(__getattr__, __dir__)` resolving `names`.

  Args:
    package: the package's `__name__`.
    names: attribute -> "module" (the module itself) or "module:attribute".
  """
  namespace = importlib.import_module(package).__dict__

  def __getattr__(name):
    if name not in names:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module, _, attr = names[name].partition(":")
    value = importlib.import_module(module)
    if attr:
      value = getattr(value, attr)
    namespace[name] = value  # Later lookups skip this function.
    return value

  def __dir__():
    return sorted(set(namespace) | set(names))

  return __getattr__, __dir__
