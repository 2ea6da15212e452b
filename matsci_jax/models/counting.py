"""Parameter counts of model configs (used by README and its test)."""

from __future__ import annotations

import jax
import numpy as np

from matsci_jax import models


def count_parameters(model_config, representation: str = "graph") -> int:
  """Parameters of the model a config describes (shape inference only)."""
  from ase.build import bulk

  from matsci_jax.data.graphs import batch_examples, graph_from_atoms
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  model = models.get(name, **kwargs)
  atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
  k = kwargs.get("num_neighbors", 16)
  graph = batch_examples([graph_from_atoms(
      atoms, kwargs.get("cutoff", 6.0), 50, representation=representation,
      num_neighbors=k)])
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), graph)
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
