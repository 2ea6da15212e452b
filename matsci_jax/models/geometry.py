"""Periodic edge geometry on padded graphs, safe to differentiate.

Padding edges join a padding node to itself, so their length is zero; the
square root and the radial basis are evaluated on a harmless stand-in length
there, so that gradients (forces) never see 0/0.
"""

from __future__ import annotations

from typing import NamedTuple

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import jraph

from matsci_jax import _compat  # noqa: F401  (jraph needs it)


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


class EdgeGeometry(NamedTuple):
  """Per-edge geometry of a padded batch (see `edge_geometry`).

  Attributes:
    vectors: float [n_edge, 3], centre (receiver) to neighbour (sender).
    d2: float [n_edge], squared lengths (cutoff**2 / 4 on padding edges).
    d: float [n_edge], lengths (cutoff / 2 on padding edges).
    envelope: float [n_edge], smooth cutoff weight: 1 at d = 0, 0 from the
      cutoff on and on padding edges.
  """
  vectors: jax.Array
  d2: jax.Array
  d: jax.Array
  envelope: jax.Array


def edge_geometry(positions: jax.Array, graph: jraph.GraphsTuple,
                  cutoff: float) -> EdgeGeometry:
  """Edge vectors, lengths and the cutoff envelope the models share.

  Args:
    positions: float [n_node, 3] in Å (differentiated for forces).
    graph: padded batch as for `edge_vectors`, with `edges["mask"]`
      [n_edge].
    cutoff: envelope radius in Å.

  Returns:
    `EdgeGeometry`; the envelope is e3nn's `poly_envelope(5, 2)(d / cutoff)`,
    which goes to zero smoothly at the cutoff.
  """
  mask = graph.edges["mask"]
  vectors = edge_vectors(positions, graph)
  # Padding edges get a length inside the cutoff, where the envelope and
  # radial bases are smooth; the mask zeroes their envelope.
  d2, d = safe_lengths(vectors, mask, fill=cutoff / 2)
  envelope = e3nn.poly_envelope(5, 2)(d / cutoff)
  envelope = jnp.where(mask & (d < cutoff), envelope, 0.0)
  return EdgeGeometry(vectors, d2, d, envelope)
