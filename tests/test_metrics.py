"""Metrics from padded batches: exact, whatever the packing."""

import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from matsci_jax import metrics


def _batch(n_node, energy_pred, energy_true, pad_graphs=1):
  """Energies of len(n_node) structures plus padding graphs (one padding
  atom each, predictions of 100 eV that must not count)."""
  n_node = list(n_node) + [1] * pad_graphs
  mask = [True] * (len(n_node) - pad_graphs) + [False] * pad_graphs
  graph = jraph.GraphsTuple(
      nodes={}, edges={}, senders=jnp.zeros(0, jnp.int32),
      receivers=jnp.zeros(0, jnp.int32),
      n_node=jnp.asarray(n_node, jnp.int32),
      n_edge=jnp.zeros(len(n_node), jnp.int32),
      globals={"mask": jnp.asarray(mask)})
  pad = [100.0] * pad_graphs
  return graph, (jnp.asarray(list(energy_pred) + pad, jnp.float32),
                 jnp.asarray(list(energy_true) + [0.0] * pad_graphs,
                             jnp.float32))


def test_energy_per_atom_mae_divides_each_structure_by_its_atoms():
  n_node, pred, true = [2, 4, 10], [1.0, 0.0, 3.0], [0.0, 2.0, 1.0]
  graph, (p, t) = _batch(n_node, pred, true)
  out = metrics.finalize(metrics.accumulate(
      None, metrics.batch_sums(graph, p, t)))
  assert out["energy_mae"] == pytest.approx((1 + 2 + 2) / 3)
  assert out["energy_per_atom_mae"] == pytest.approx(
      (1 / 2 + 2 / 4 + 2 / 10) / 3)
  # The same structures in two batches with other padding.
  first, (p1, t1) = _batch(n_node[:1], pred[:1], true[:1], pad_graphs=2)
  second, (p2, t2) = _batch(n_node[1:], pred[1:], true[1:])
  total = metrics.accumulate(None, metrics.batch_sums(first, p1, t1))
  total = metrics.accumulate(total, metrics.batch_sums(second, p2, t2))
  split = metrics.finalize(total)
  for key in ("energy_mae", "energy_per_atom_mae", "ewt"):
    np.testing.assert_allclose(split[key], out[key], rtol=1e-6)
