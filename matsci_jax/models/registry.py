"""Models by name: `get("egnn", hidden_dim=64)` or `from_config(config.model)`.

Adding a model is one file with an `EnergyModel` and one decorator:

    @registry.register("my_model")
    class MyModel(registry.EnergyModel):
      ...
      @nn.compact
      def __call__(self, graph, positions=None) -> jax.Array:
        ...  # per-atom outputs [n_node]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
from flax.linen import kw_only_dataclasses

from matsci_jax import _compat  # noqa: F401  (jraph needs it)


class EnergyModel(nn.Module):
  """What every registered model is: a padded batch in, energies out.

  `__call__(graph, positions=None)` returns float32 per-atom outputs
  [n_node], zero on padding nodes, which `matsci_jax.energy` scales, shifts
  and sums per structure; or, when `per_graph_output` is True, one output per
  structure [n_graph], zero on padding graphs. Forces are minus its gradient
  with respect to `positions`.

  Attributes:
    representation: class variable, the batches the model reads: "graph"
      (neighbour-list edges) or "point_cloud" (K neighbour slots per centre,
      see `matsci_jax.data.point_cloud`).
    per_graph_output: property, True when the model gives one output per
      structure (a non-extensive readout) instead of one per atom.
    head_modules: class variable, the top-level parameter modules of the
      energy head, whose last layer has `num_heads` outputs; a trained
      model's other parameters (the encoder) must fit a model it
      initialises (`matsci_jax.finetune`).
    dtype: computation dtype of the dense layers (jnp.bfloat16 for mixed
      precision); parameters, positions, sums and outputs stay float32.
      It comes after a subclass's own fields in the constructor, so
      `model.clone(dtype=jnp.bfloat16)` works for every model.
    num_heads: energy heads on the shared encoder, one per data source
      (`config.model.heads = "per_source"`); with more than one, outputs
      gain a last axis [..., num_heads] and `matsci_jax.energy` picks each
      structure's head by its source.
    edge_chunk: edges per chunk of each layer's edge work (0: all at once).
      Chunks bound activation memory for structures whose edges do not fit
      in one pass; results do not depend on it (`models.edge_sums`).
    edge_axis: inside `jax.shard_map`, the mesh axes a batch's edges are
      split over, atoms replicated; sums over edges are completed across
      it. Set by `matsci_jax.energy.shard_edges`, None elsewhere.
  """
  representation: ClassVar[str] = "graph"
  head_modules: ClassVar[tuple[str, ...]] = ()
  # Keyword-only: subclass fields keep their places in the constructor.
  dtype: Any = kw_only_dataclasses.field(default=jnp.float32, kw_only=True)
  num_heads: int = kw_only_dataclasses.field(default=1, kw_only=True)
  edge_chunk: int = kw_only_dataclasses.field(default=0, kw_only=True)
  edge_axis: str | tuple[str, ...] | None = kw_only_dataclasses.field(
      default=None, kw_only=True)

  def heads_output(self, out: jax.Array) -> jax.Array:
    """A head layer's output [n, num_heads] as the contract's [n] (one
    head) or [n, num_heads]."""
    return out[:, 0] if self.num_heads == 1 else out

  @property
  def per_graph_output(self) -> bool:
    return False

  def __call__(self, graph: jraph.GraphsTuple,
               positions: jax.Array | None = None) -> jax.Array:
    """Model outputs of a padded batch.

    Args:
      graph: padded batch (see `matsci_jax.data.batching.collate`) of the
        model's `representation`.
      positions: float32 [n_node, 3] to use instead of
        `graph.nodes["positions"]` (forces differentiate with respect to
        these).

    Returns:
      float32 [n_node], zero on padding nodes; or [n_graph], zero on padding
      graphs, when `per_graph_output` is True; with `num_heads` > 1, a
      last axis of that size.
    """
    raise NotImplementedError(
        f"{type(self).__name__} must define __call__(graph, positions=None)")


_MODELS: dict[str, type[EnergyModel]] = {}


def register(name: str) -> Callable[[type[EnergyModel]], type[EnergyModel]]:
  """Class decorator that registers an `EnergyModel` under `name`."""
  def wrap(cls):
    if not (isinstance(cls, type) and issubclass(cls, EnergyModel)):
      what = (f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type)
              else repr(cls))
      raise TypeError(f"cannot register {what} as model {name!r}: it is not "
                      "an EnergyModel; subclass matsci_jax.models.EnergyModel "
                      "instead of nn.Module")
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


def model_class(name: str) -> type[EnergyModel]:
  """The class registered as `name` (for its `representation`, say)."""
  if name not in _MODELS:
    raise KeyError(f"unknown model {name!r}; registered: {', '.join(names())}")
  return _MODELS[name]


def get(name: str, **kwargs) -> EnergyModel:
  """Builds the registered model `name` with keyword arguments."""
  return model_class(name)(**kwargs)


HEADS = ("shared", "per_source")


def from_config(model_config, num_sources: int = 1) -> EnergyModel:
  """Builds a model from a config: a `name` field and the module's fields.

  `heads` ("shared", the default, or "per_source") gives the model one
  energy head per data source of `num_sources`.
  """
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  heads = kwargs.pop("heads", "shared")
  if heads not in HEADS:
    raise ValueError(f"config.model.heads must be one of {HEADS}, got "
                     f"{heads!r}")
  if heads == "per_source" and num_sources > 1:
    kwargs["num_heads"] = num_sources
  cls = model_class(name)
  # dataclasses.fields leaves out class variables such as `representation`.
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that model {name!r} "
                     f"does not take; it takes {sorted(fields)}")
  return cls(**kwargs)
