"""Periodic edge geometry on padded graphs, safe to differentiate.

Padding edges join a padding node to itself, so their length is zero; the
square root and the radial basis are evaluated on a harmless stand-in length
there, so that gradients (forces) never see 0/0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jraph


def edge_vectors(positions: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
  """Vectors from each centre (receiver) to its neighbour's image (sender).

  Args:
    positions: float [n_node, 3] in Å (differentiated for forces).
    graph: padded batch with `globals["cell"]` [n_graph, 3, 3],
      `edges["cell_shifts"]` [n_edge, 3] and `nodes["graph"]` [n_node].

  Returns:
    float [n_edge, 3]: positions[s] - positions[r] + cell_shifts @ cell.
  """
  cell = graph.globals["cell"][graph.nodes["graph"][graph.receivers]]
  shifts = graph.edges["cell_shifts"].astype(positions.dtype)
  offset = jnp.einsum("ei,eij->ej", shifts, cell.astype(positions.dtype))
  return positions[graph.senders] - positions[graph.receivers] + offset


def safe_lengths(vectors: jax.Array, edge_mask: jax.Array,
                 fill: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Squared lengths and lengths, with `fill` on padding edges.

  Returns:
    (d2, d): float [n_edge] each.
  """
  d2 = jnp.sum(vectors * vectors, axis=-1)
  d2 = jnp.where(edge_mask, d2, fill * fill)
  return d2, jnp.sqrt(d2)
