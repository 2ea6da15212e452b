"""E(n)-equivariant graph neural network (Satorras et al. 2021) for energies.

Per layer, a message from neighbour j to centre i is

    m_ij = act(W2 act(W_r h_i + W_s h_j + W_e [d_ij^2, rbf(d_ij)] + b) + b2)
           * envelope(d_ij),

summed over j (divided by `avg_num_neighbors`), and the node update is
h_i <- h_i + MLP([h_i, m_i]). The first message layer is applied to nodes
before gathering (W_r h_i and W_s h_j are per-node products, gathered per
edge), which is the same function as applying it to the concatenation per
edge at a fraction of the work: only the second layer runs per edge.

Distances use the true periodic edge vectors, so per-atom outputs are
invariant to rotations, translations, permutations and wrapping atoms into
the cell; the Bessel basis and the polynomial envelope (e3nn-jax) make them
smooth when an atom crosses the cutoff. With `coordinate_update`, positions
are updated equivariantly between layers, x_i <- x_i - sum_j vec_ij phi(m_ij).
"""

from __future__ import annotations

import functools
from typing import Any

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from matsci_jax import _compat  # noqa: F401  (jraph needs it)
from matsci_jax.models import (edge_sums, geometry, registry, remat,
                               scan_unroll)


def _edge_terms(x: jax.Array, graph: jraph.GraphsTuple, edges: dict,
                cutoff: float, num_radial: int,
                vectors: bool) -> dict:
  """Edge inputs of a layer from positions, for the given edges.

  Args:
    x: float32 [n_node, 3] positions.
    graph: the padded batch (its cells and atoms' structures).
    edges: senders, receivers [n]; cell_shifts [n, 3]; mask [n].
    cutoff, num_radial: the distance expansion's radius and size.
    vectors: also return the edge vectors.

  Returns:
    senders and receivers, features [n, 1 + num_radial] (squared length
    over cutoff squared, then the Bessel basis), envelope [n] and, with
    `vectors`, vectors [n, 3].
  """
  view = graph._replace(senders=edges["senders"],
                        receivers=edges["receivers"],
                        edges={"cell_shifts": edges["cell_shifts"],
                               "mask": edges["mask"]})
  edge = geometry.edge_geometry(x, view, cutoff)
  rbf = e3nn.bessel(edge.d, num_radial, x_max=cutoff)
  terms = dict(senders=edges["senders"], receivers=edges["receivers"],
               features=jnp.concatenate([(edge.d2 / cutoff**2)[:, None], rbf],
                                        -1),
               envelope=edge.envelope)
  if vectors:
    terms["vectors"] = edge.vectors
  return terms


def _messages(layer: "EGNNLayer", edges: dict, h_receiver: jax.Array,
              h_sender: jax.Array, x: jax.Array,
              graph: jraph.GraphsTuple) -> tuple[dict, None]:
  """The layer's per-edge work on some of the edges, summed into atoms.

  Args:
    layer: the calling `EGNNLayer` (its parameters are created here).
    edges: the given edges' inputs as `_edge_terms` returns them or, in
      chunks, their senders, receivers, cell_shifts and mask, from which
      the terms are computed here (and recomputed in the backward pass),
      so that no per-edge array of all edges is kept.
    h_receiver, h_sender: per-atom halves of the first message layer
      [n_node, hidden_dim].
    x: float32 [n_node, 3] positions.
    graph: the padded batch.

  Returns:
    ({"messages": [n_node, hidden_dim], "positions": [n_node, 3] with a
    coordinate update}, None): float32 sums over the given edges.
  """
  if "features" not in edges:
    edges = _edge_terms(x, graph, edges, layer.cutoff, layer.num_radial,
                        layer.coordinate_update)
  act = getattr(jax.nn, layer.activation)
  d = layer.hidden_dim
  n_node = h_receiver.shape[0]
  receivers, envelope = edges["receivers"], edges["envelope"][:, None]
  dense = functools.partial(nn.Dense, dtype=layer.dtype)
  h_edge = dense(d, use_bias=False, name="message_edge")(edges["features"])
  m = act(h_receiver[receivers] + h_sender[edges["senders"]] + h_edge)
  # Float32 from here: the envelope is float32, and so are the sums.
  m = act(dense(d, name="message_out")(m)) * envelope
  # Receivers are sorted (centre-major edges, batched in order).
  sums = {"messages": jax.ops.segment_sum(
      m, receivers, num_segments=n_node, indices_are_sorted=True)}
  if layer.coordinate_update:
    w = dense(1, name="coord_out")(act(dense(d, name="coord")(m)))
    # The envelope: biases must not act beyond the cutoff.
    w = w.astype(jnp.float32) * envelope
    sums["positions"] = jax.ops.segment_sum(
        edges["vectors"] * w, receivers, num_segments=n_node,
        indices_are_sorted=True)
  return sums, None


class EGNNLayer(nn.Module):
  """One message-passing layer; returns updated (features, positions).

  The edge work runs through `edge_sums.scan_edges`: at once, in chunks of
  `edge_chunk` edges, or on this device's edges of `edge_axis`.
  """
  hidden_dim: int
  activation: str
  avg_num_neighbors: float
  coordinate_update: bool
  cutoff: float
  num_radial: int
  dtype: Any = jnp.float32
  edge_chunk: int = 0
  edge_axis: str | tuple[str, ...] | None = None
  recompute_edges: bool = False  # edges holds the raw edges, not terms.

  @nn.compact
  def __call__(self, h, x, edges, graph):
    if self.recompute_edges:
      edges = _edge_terms(x, graph, edges, self.cutoff, self.num_radial,
                          self.coordinate_update)
    act = getattr(jax.nn, self.activation)
    d = self.hidden_dim
    n_node = h.shape[0]
    # Per-node halves of the first message layer, gathered to edges.
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    h_receiver = dense(d, name="message_receiver")(h)
    h_sender = dense(d, use_bias=False, name="message_sender")(h)
    init = {"messages": jnp.zeros((n_node, d), jnp.float32)}
    if self.coordinate_update:
      init["positions"] = jnp.zeros((n_node, 3), jnp.float32)
    sums, _ = edge_sums.scan_edges(
        self, _messages, init, edges, (h_receiver, h_sender, x, graph),
        chunk=self.edge_chunk, axis=self.edge_axis)
    agg = sums["messages"] / self.avg_num_neighbors
    if self.coordinate_update:
      x = x - (sums["positions"] / self.avg_num_neighbors
               * graph.nodes["mask"][:, None])
    u = act(dense(d, name="update_self")(h)
            + dense(d, use_bias=False, name="update_message")(agg))
    return h + dense(d, name="update_out")(u).astype(h.dtype), x


@registry.register("egnn")
class EGNN(registry.EnergyModel):
  """EGNN giving one invariant scalar per atom.

  Attributes:
    hidden_dim: width of node features and messages.
    num_layers: message-passing layers.
    activation: name of a `jax.nn` activation.
    cutoff: radius in Å of the envelope (edges beyond it contribute nothing;
      use the dataset's cutoff).
    num_radial: Bessel functions in the distance expansion.
    avg_num_neighbors: divides summed messages, keeping activations O(1).
    coordinate_update: update positions equivariantly between layers.
    readout_hidden: width of the per-atom output MLP.
    num_species: size of the atom-type embedding table (Z < num_species).
    remat: rematerialise each layer with this policy (see `models.remat`).
    scan_layers: run the layers as one `nn.scan` over parameters stacked
      along a leading axis ("layers" instead of "layer_0", "layer_1", ...):
      compiled once whatever the depth, and with remat the step holds one
      layer's intermediates at a time (large models; checkpoints of the
      two forms do not load into each other).
    dtype: computation dtype of the dense layers (jnp.bfloat16 for mixed
      precision); parameters, positions, sums and outputs stay float32.
  """
  hidden_dim: int = 128
  num_layers: int = 3
  activation: str = "silu"
  cutoff: float = 6.0
  num_radial: int = 8
  avg_num_neighbors: float = 32.0
  coordinate_update: bool = False
  readout_hidden: int = 64
  num_species: int = 119
  remat: str = ""
  scan_layers: bool = False

  head_modules = ("readout", "readout_out")

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple,
               positions: jax.Array | None = None) -> jax.Array:
    """Per-atom outputs.

    Args:
      graph: padded batch (see `matsci_jax.data.batching.collate`).
      positions: float [n_node, 3] to use instead of `graph.nodes
        ["positions"]` (forces differentiate with respect to these).

    Returns:
      float [n_node], zero on padding nodes.
    """
    x = graph.nodes["positions"] if positions is None else positions
    act = getattr(jax.nn, self.activation)
    h = nn.Embed(self.num_species, self.hidden_dim, name="embed")(
        graph.nodes["atomic_numbers"])

    chunk = edge_sums.chunk_size(self.edge_chunk, graph.senders.shape[0])

    raw = dict(senders=graph.senders, receivers=graph.receivers,
               cell_shifts=graph.edges["cell_shifts"],
               mask=graph.edges["mask"])

    def edge_terms(x):
      if chunk:  # Each chunk computes its own, in the layer.
        return raw
      return _edge_terms(x, graph, raw, self.cutoff, self.num_radial,
                         self.coordinate_update)

    layer = functools.partial(
        remat.wrap(EGNNLayer, self.remat), self.hidden_dim, self.activation,
        self.avg_num_neighbors, self.coordinate_update, self.cutoff,
        self.num_radial, dtype=self.dtype, edge_chunk=chunk,
        edge_axis=self.edge_axis)
    if self.scan_layers:
      # With coordinate updates every step computes its edge terms from the
      # positions it receives (the first from the input positions).
      recompute = self.coordinate_update and not chunk
      steps = nn.scan(
          lambda mdl, carry, edges, graph: (mdl(*carry, edges, graph), None),
          variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
          unroll=scan_unroll.unroll())
      (h, x), _ = steps(layer(recompute_edges=recompute, name="layers"),
                        (h, x), raw if recompute else edge_terms(x), graph)
    else:
      edges = edge_terms(x)
      for i in range(self.num_layers):
        if self.coordinate_update and i > 0:
          edges = edge_terms(x)
        h, x = layer(name=f"layer_{i}")(h, x, edges, graph)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    out = dense(self.num_heads, name="readout_out")(
        act(dense(self.readout_hidden, name="readout")(h)))
    out = out.astype(jnp.float32) * graph.nodes["mask"][:, None]
    return self.heads_output(out)
