"""S2EF losses on padded batches (real graphs and atoms only): energy,
forces and stress.

Errors are divided by the normaliser's scale, so loss weights do not depend
on the units or spread of a dataset.
"""

from __future__ import annotations

import jax.numpy as jnp


def _masked_mean(values, mask, count=None):
  """Mean over the mask, or masked sum / `count` (counts over a whole step:
  micro-batches and devices, so that their terms add up to the mean)."""
  mask = mask.astype(values.dtype)
  total = jnp.sum(mask) if count is None else count
  return jnp.sum(values * mask) / jnp.maximum(total, 1.0)


def loss_counts(graph) -> dict:
  """What the loss terms average over: real graphs, atoms and free atoms
  with forces, and structures with stress."""
  f32 = jnp.float32
  return {"graphs": jnp.sum(graph.globals["mask"], dtype=f32),
          "atoms": jnp.sum(force_mask(graph, False), dtype=f32),
          "free_atoms": jnp.sum(force_mask(graph, True), dtype=f32),
          "stress_graphs": jnp.sum(stress_mask(graph), dtype=f32)}


def force_mask(graph, free_atoms_only: bool):
  """Atoms whose forces count: real atoms of structures with forces
  (`globals["has_forces"]` when a batch mixes sources), optionally only
  free ones."""
  mask = graph.nodes["mask"]
  if "has_forces" in graph.globals:
    mask = mask & graph.globals["has_forces"][graph.nodes["graph"]]
  if free_atoms_only:
    mask = mask & ~graph.nodes["fixed"]
  return mask


def stress_mask(graph):
  """Structures whose stress counts: real ones, and of those only the ones
  with stress when a batch mixes sources (`globals["has_stress"]`)."""
  mask = graph.globals["mask"]
  if "has_stress" in graph.globals:
    mask = mask & graph.globals["has_stress"]
  return mask


def energy_loss(pred, graph, scale, kind: str = "mae",
                per_atom: bool = True, count=None):
  """Energy term: MAE or MSE of (E_pred - E) / scale, per atom if asked.

  `count`: the number of graphs to average over (default: this batch's).
  """
  err = (pred - graph.globals["energy"]) / scale
  if per_atom:
    n_atoms = jnp.maximum(graph.n_node.astype(err.dtype), 1.0)
    err = err / n_atoms
  values = jnp.abs(err) if kind == "mae" else err * err
  if kind not in ("mae", "mse"):
    raise ValueError(f"energy loss must be 'mae' or 'mse', got {kind!r}")
  return _masked_mean(values, graph.globals["mask"], count)


def force_loss(pred, graph, scale, kind: str = "l2mae",
               free_atoms_only: bool = True, count=None):
  """Force term over counted atoms (`count`: their number, default this
  batch's).

  kinds: "l2mae" (mean per-atom L2 norm of the error, OC20's choice), "mae"
  (mean absolute component error) and "mse" (mean squared component error).
  """
  scale = jnp.asarray(scale)
  if scale.ndim:  # Per atom (several sources).
    scale = scale[:, None]
  err = (pred - graph.nodes["forces"]) / scale
  mask = force_mask(graph, free_atoms_only)
  if kind == "l2mae":
    # Safe norm: a zero error must not give a NaN gradient.
    sq = jnp.sum(err * err, axis=-1)
    safe = jnp.where(sq > 0, sq, 1.0)
    values = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
  elif kind == "mae":
    values = jnp.mean(jnp.abs(err), axis=-1)
  elif kind == "mse":
    values = jnp.mean(err * err, axis=-1)
  else:
    raise ValueError("force loss must be 'l2mae', 'mae' or 'mse', "
                     f"got {kind!r}")
  return _masked_mean(values, mask, count)


def stress_loss(pred, graph, scale, count=None):
  """Stress term: mean absolute component error of (sigma_pred - sigma) /
  scale over structures with stress (`count`: their number, default this
  batch's). `scale` is a scalar or per structure [n_graph]."""
  scale = jnp.asarray(scale)
  if scale.ndim:
    scale = scale[:, None, None]
  err = (pred - graph.globals["stress"]) / scale
  values = jnp.mean(jnp.abs(err), axis=(-2, -1))
  return _masked_mean(values, stress_mask(graph), count)
