"""Models by name: `get("egnn", hidden_dim=64)` or `from_config(config.model)`.

Adding a model is one file with a Flax module and one decorator:

    @registry.register("my_model")
    class MyModel(nn.Module):
      ...
      def __call__(self, graph) -> jax.Array:  # per-atom outputs [n_node]
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

_MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator that registers a Flax module under `name`."""
  def wrap(cls):
    old = _MODELS.get(name)
    # A class defined again in the same place (a re-run notebook cell)
    # replaces its earlier self; another class may not take the name.
    if old is not None and (old.__module__, old.__qualname__) != (
        cls.__module__, cls.__qualname__):
      raise ValueError(f"a model named {name!r} is already registered "
                       f"({old.__module__}.{old.__qualname__})")
    _MODELS[name] = cls
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_MODELS)


def get(name: str, **kwargs) -> nn.Module:
  """Builds the registered model `name` with keyword arguments."""
  if name not in _MODELS:
    raise KeyError(f"unknown model {name!r}; registered: {', '.join(names())}")
  return _MODELS[name](**kwargs)


def from_config(model_config) -> nn.Module:
  """Builds a model from a config with a `name` field and the module's fields."""
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  cls = _MODELS.get(name)
  if cls is None:
    raise KeyError(f"unknown model {name!r}; registered: {', '.join(names())}")
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that model {name!r} "
                     f"does not take; it takes {sorted(fields)}")
  return cls(**kwargs)
