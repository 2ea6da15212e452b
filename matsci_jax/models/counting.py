"""Parameter counts of model configs (used by README and its test)."""

from __future__ import annotations

import jax
import numpy as np

from matsci_jax import models


def count_parameters(model_config, representation: str | None = None) -> int:
  """Parameters of the model a config describes (shape inference only).

  Args:
    model_config: mapping with the model's `name` and its fields.
    representation: "graph" or "point_cloud", the batch to infer shapes on;
      None takes the model class's `representation`.
  """
  from ase.build import bulk

  from matsci_jax.data.graphs import batch_examples, graph_from_atoms
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  if representation is None:
    representation = models.model_class(name).representation
  model = models.get(name, **kwargs)
  atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
  k = kwargs.get("num_neighbors", 16)
  graph = batch_examples([graph_from_atoms(
      atoms, kwargs.get("cutoff", 6.0), 50, representation=representation,
      num_neighbors=k)])
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), graph)
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
