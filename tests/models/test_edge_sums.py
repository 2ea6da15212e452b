"""Edge work in chunks: the same parameters and results, bounded memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

from matsci_jax.data.graphs import batch_examples, graph_from_atoms
from matsci_jax.energy import Normalizer, make_energy_and_forces_fn
from matsci_jax import models
from matsci_jax.models import edge_sums
from tests.models.test_models import CASES, CUTOFF, _model, _structures

NORM = Normalizer(scale=jnp.float32(1.0), shift=jnp.float32(0.1),
                  element_energies=jnp.zeros(119, jnp.float32))


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Between them, every kind of edge work: EGNN messages and coordinate
# updates, MEGNet edge states and Set2Set edge pooling, GALA rows.
@pytest.mark.parametrize("case", ["egnn_coords", "megnet_set2set", "gala"])
def test_chunks_give_the_same_parameters_and_results(case):
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None, **CASES[case][1])
                          for a in _structures()])
  model = _model(case)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
  e0, f0 = jax.jit(make_energy_and_forces_fn(model, NORM))(params, graph)
  n_edge = graph.senders.shape[0]
  # Not a divisor of the edge count: the last chunk is shorter.
  chunk = 5 * CASES[case][0].get("num_neighbors", 7)
  assert n_edge % chunk and n_edge > 4 * chunk
  chunked = model.clone(edge_chunk=chunk)
  chunked_params = jax.jit(chunked.init)(jax.random.PRNGKey(0), graph)
  jax.tree_util.tree_map(np.testing.assert_array_equal, chunked_params,
                         params)
  e, f = jax.jit(make_energy_and_forces_fn(chunked, NORM))(params, graph)
  assert relative_error(e, e0) < 1e-5
  assert relative_error(f, f0) < 1e-5
  assert np.abs(np.asarray(f0)).max() > 1e-4  # Not trivially equal.


def test_chunks_bound_the_memory_of_energy_and_forces():
  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(4)
  atoms.rattle(0.05, seed=0)
  graph = batch_examples([graph_from_atoms(atoms, 6.0, None)])
  n_edge = graph.senders.shape[0]
  assert n_edge > 15_000
  model = models.get("egnn", hidden_dim=64, num_layers=3, cutoff=6.0)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)

  def temporaries(m):
    fn = jax.jit(make_energy_and_forces_fn(m, NORM))
    return fn.lower(params, graph).compile().memory_analysis(
    ).temp_size_in_bytes

  whole = temporaries(model)
  chunked = temporaries(model.clone(edge_chunk=n_edge // 16))
  # Unchunked, the layers keep several [n_edge, 64] float32 arrays each.
  assert whole > 3 * n_edge * 64 * 4
  assert chunked < whole / 3, (chunked, whole)


def test_padded_edges_are_masked_self_loops_of_the_last_node():
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None)
                          for a in _structures()])
  n_edge, n_node = graph.senders.shape[0], graph.nodes["mask"].shape[0]
  padded = edge_sums.pad_edges(jax.tree_util.tree_map(jnp.asarray, graph), 64)
  n = padded.senders.shape[0]
  assert n % 64 == 0 and n_edge <= n < n_edge + 64
  assert np.all(np.diff(np.asarray(padded.receivers)) >= 0)
  assert np.all(np.asarray(padded.senders[n_edge:]) == n_node - 1)
  assert not np.asarray(padded.edges["mask"][n_edge:]).any()
  assert np.all(np.asarray(padded.edges["cell_shifts"][n_edge:]) == 0)
  assert int(padded.n_edge.sum()) == n
  assert edge_sums.pad_edges(padded, 64) is padded


def test_reductions_over_chunks():
  values = jnp.arange(24.0)
  segments = jnp.repeat(jnp.arange(4), 6)
  edges = {"v": values, "s": segments}

  def sums(e):
    return jax.ops.segment_sum(e["v"], e["s"], num_segments=4)

  def maxima(e):
    return jax.ops.segment_max(e["v"], e["s"], num_segments=4)

  expected = np.asarray(sums(edges))
  # 5 and 7 leave a shorter last chunk.
  for chunk in (0, 4, 5, 7, 8, 24):
    np.testing.assert_array_equal(edge_sums.reduce_edges(
        sums, jnp.zeros(4), edges, chunk=chunk), expected)
    np.testing.assert_array_equal(edge_sums.reduce_edges(
        maxima, jnp.full(4, -jnp.inf), edges, chunk=chunk, op="max"),
        [5, 11, 17, 23])
