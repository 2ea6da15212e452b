"""MEGNet (Chen et al. 2019): edge, node and global-state blocks.

Each block updates, with skip connections,

    e_k <- e_k + phi_e(v_s(k), v_r(k), e_k, u)                 (edges)
    v_i <- v_i + phi_v(mean_k->i e_k, v_i, u)                  (nodes)
    u   <- u   + phi_u(mean_k e_k, mean_i v_i, u)              (global state)

after a small dense "pre" network on each of e, v, u. Edge features are a
Gaussian expansion of the distance; distances are computed inside the model
from positions, cell and cell shifts, so the energy is invariant and forces
are `-jax.grad` of it. Edge means are weighted by a smooth cutoff envelope
(an edge at the cutoff has weight zero) and divided by max(total weight, 1),
so energies stay continuous when an atom crosses the cutoff.

Readouts: "per_atom" (an MLP on node features, summed per structure by the
energy function: extensive, for S2EF) or "set2set" (Set2Set over nodes and
edges plus the state, then an MLP: one value per structure, for IS2RE).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from matsci_jax import _compat  # noqa: F401  (jraph needs it)
from matsci_jax.models import edge_sums, geometry, registry, remat


def _activation(name: str):
  if name == "shifted_softplus":
    return lambda x: jax.nn.softplus(x) - np.log(2.0)
  return getattr(jax.nn, name)


class MLP(nn.Module):
  features: Sequence[int]
  activation: str
  activate_last: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    act = _activation(self.activation)
    for i, f in enumerate(self.features):
      x = nn.Dense(f, dtype=self.dtype)(x)
      if i < len(self.features) - 1 or self.activate_last:
        x = act(x)
    return x


def _softened_mean(total, norm):
  """A weighted mean from its sums, softened to a weighted sum below a total
  weight of one.

  A plain weighted mean jumps when the last neighbour leaves the cutoff (its
  weight cancels); dividing by max(total weight, 1) makes it go to zero
  smoothly, and equals the mean whenever a full neighbour is present.
  """
  return total / jnp.maximum(norm, 1.0)[:, None]


def _gaussians(d, num, width, cutoff):
  """Gaussian expansion [n, num] of distances [n] on 0..cutoff."""
  centers = jnp.linspace(0.0, cutoff, num)
  return jnp.exp(-((d[:, None] - centers) / width) ** 2)


def _edge_update(block: "MegNetBlock", edges: dict, v, u, node_graph):
  """A block's per-edge work on some of the edges.

  Args:
    block: the calling `MegNetBlock` (its edge parameters are created here).
    edges: senders, receivers, weights (the envelope) [n], and the edge
      states "state" [n, width] or, in the first block, "distances" [n].
    v: float [n_node, pre[-1]], node features after the block's "pre" net.
    u: float [n_graph, pre[-1]], state features after it.
    node_graph: int [n_node], each atom's structure.

  Returns:
    (weighted sums of the new edge messages and of the weights into atoms
    and structures, float32 new edge states [n, block_mlp[-1]]).
  """
  mlp = functools.partial(MLP, activation=block.activation, dtype=block.dtype)
  senders, receivers = edges["senders"], edges["receivers"]
  weights = edges["weights"]
  e0 = edges.get("state")
  if e0 is None:  # The first block expands distances itself, chunk by chunk.
    e0 = _gaussians(edges["distances"], block.num_gaussians,
                    block.gaussian_width, block.cutoff) * weights[:, None]
  edge_graph = node_graph[receivers]
  e = mlp(block.pre, name="pre_edge")(e0)
  e = mlp(block.mlp, name="phi_e")(jnp.concatenate(
      [v[senders], v[receivers], e, u[edge_graph]], -1))
  weighted = e * weights[:, None]
  segment_sum = functools.partial(jax.ops.segment_sum,
                                  indices_are_sorted=True)
  n_node, n_graph = v.shape[0], u.shape[0]
  sums = {"node": segment_sum(weighted, receivers, num_segments=n_node),
          "node_weight": segment_sum(weights, receivers, num_segments=n_node),
          "graph": segment_sum(weighted, edge_graph, num_segments=n_graph),
          "graph_weight": segment_sum(weights, edge_graph,
                                      num_segments=n_graph)}
  if e0.shape[-1] != e.shape[-1]:  # Skip connection, projected.
    e0 = nn.Dense(e.shape[-1], dtype=block.dtype, name="skip_edge")(e0)
  # The residual streams stay float32.
  return sums, (e + e0).astype(jnp.float32)


class MegNetBlock(nn.Module):
  """One MEGNet block; its edge work runs through `edge_sums.scan_edges`
  (at once, in chunks of `edge_chunk` edges, or on this device's edges of
  `edge_axis`). The first block (`num_gaussians` > 0) expands distances
  into edge features itself."""
  pre: Sequence[int]
  mlp: Sequence[int]
  activation: str
  dtype: Any = jnp.float32
  num_gaussians: int = 0
  gaussian_width: float = 0.5
  cutoff: float = 6.0
  edge_chunk: int = 0
  edge_axis: str | tuple[str, ...] | None = None

  @nn.compact
  def __call__(self, edges, v, u, graph):
    n_node, n_graph = v.shape[0], u.shape[0]
    node_graph = graph.nodes["graph"]
    v0, u0 = v, u
    mlp = functools.partial(MLP, activation=self.activation, dtype=self.dtype)
    v = mlp(self.pre, name="pre_node")(v)
    u = mlp(self.pre, name="pre_state")(u)
    width = self.mlp[-1]
    init = {"node": jnp.zeros((n_node, width), jnp.float32),
            "node_weight": jnp.zeros((n_node,), jnp.float32),
            "graph": jnp.zeros((n_graph, width), jnp.float32),
            "graph_weight": jnp.zeros((n_graph,), jnp.float32)}
    sums, e = edge_sums.scan_edges(
        self, _edge_update, init, edges, (v, u, node_graph),
        chunk=self.edge_chunk, axis=self.edge_axis)
    e_to_v = _softened_mean(sums["node"], sums["node_weight"])
    v = mlp(self.mlp, name="phi_v")(
        jnp.concatenate([e_to_v, v, u[node_graph]], -1))
    e_to_u = _softened_mean(sums["graph"], sums["graph_weight"])
    node_weight = graph.nodes["mask"].astype(jnp.float32)
    v_to_u = _softened_mean(
        jax.ops.segment_sum(v * node_weight[:, None], node_graph,
                            num_segments=n_graph, indices_are_sorted=True),
        jax.ops.segment_sum(node_weight, node_graph, num_segments=n_graph,
                            indices_are_sorted=True))
    u = mlp(self.mlp, name="phi_u")(
        jnp.concatenate([e_to_u, v_to_u, u], -1))
    if v0.shape[-1] != v.shape[-1]:
      v0 = nn.Dense(v.shape[-1], dtype=self.dtype, name="skip_node")(v0)
    if u0.shape[-1] != u.shape[-1]:
      u0 = nn.Dense(u.shape[-1], dtype=self.dtype, name="skip_state")(u0)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return e, f32(v + v0), f32(u + u0)


class Set2Set(nn.Module):
  """Set2Set pooling (Vinyals et al. 2016) of padded sets into segments.

  Pooling edges, it runs in chunks of `chunk` and over the devices of
  `axis` like a block's edge work (`edge_sums.reduce_edges`).
  """
  steps: int
  chunk: int = 0
  axis: str | tuple[str, ...] | None = None

  @nn.compact
  def __call__(self, x, segments, num_segments, weights):
    """Pools x [n, d] into [num_segments, 2d].

    `weights` [n] multiply the attention (0 for padding; the cutoff envelope
    for edges, so that an edge fades in smoothly).
    """
    d = x.shape[-1]
    cell = nn.OptimizedLSTMCell(d, name="lstm")
    carry = cell.initialize_carry(jax.random.PRNGKey(0), (num_segments, 2 * d))
    q_star = jnp.zeros((num_segments, 2 * d), x.dtype)
    items = {"x": x, "segments": segments, "weights": weights}
    reduce = functools.partial(edge_sums.reduce_edges, chunk=self.chunk,
                               axis=self.axis)

    def scores(items, q):
      return jnp.sum(items["x"] * q[items["segments"]], -1)

    def top_score(items, q):
      live = items["weights"] > 0
      return jax.ops.segment_max(
          jnp.where(live, scores(items, q), -jnp.inf), items["segments"],
          num_segments=num_segments)

    def attention_sums(items, q, top):
      live = items["weights"] > 0
      w = items["weights"] * jnp.exp(jnp.where(
          live, scores(items, q) - top[items["segments"]], 0.0))
      return (jax.ops.segment_sum(w, items["segments"],
                                  num_segments=num_segments),
              jax.ops.segment_sum(w[:, None] * items["x"], items["segments"],
                                  num_segments=num_segments))

    for _ in range(self.steps):
      carry, q = cell(carry, q_star)
      # The softmax shift cancels in the weights: no gradient through it
      # (and none through the maximum over devices, which has no rule).
      top = reduce(top_score, jnp.full((num_segments,), -jnp.inf),
                   jax.lax.stop_gradient(items), (jax.lax.stop_gradient(q),),
                   op="max")
      top = jnp.where(jnp.isfinite(top), top, 0.0)
      denom, weighted = reduce(
          attention_sums, (jnp.zeros((num_segments,), jnp.float32),
                           jnp.zeros((num_segments, d), jnp.float32)),
          items, (q, top))
      r = weighted / jnp.maximum(denom, 1e-12)[:, None]
      q_star = jnp.concatenate([q, r], -1)
    return q_star


@registry.register("megnet")
class MegNet(registry.EnergyModel):
  """MEGNet giving per-atom outputs ("per_atom") or per-structure ("set2set").

  Attributes:
    embed_dim: atom-type embedding width.
    pre: widths of the dense network applied before each block.
    block_mlp: widths of phi_e, phi_v and phi_u.
    num_blocks: number of MEGNet blocks.
    num_gaussians: Gaussians in the distance expansion (0..cutoff).
    gaussian_width: their width in Å.
    cutoff: envelope radius in Å (the dataset's cutoff).
    readout: "per_atom" or "set2set".
    readout_mlp: widths of the final MLP (a last width-1 layer follows).
    set2set_steps: Set2Set iterations.
    activation: "shifted_softplus" (as in MEGNet) or a `jax.nn` name.
    num_species: size of the embedding table.
    remat: rematerialise each block with this policy (see `models.remat`).
    dtype: computation dtype of the dense layers (jnp.bfloat16 for mixed
      precision); parameters, positions, sums and outputs stay float32.
  """
  embed_dim: int = 16
  pre: Sequence[int] = (64, 32)
  block_mlp: Sequence[int] = (64, 64, 32)
  num_blocks: int = 3
  num_gaussians: int = 100
  gaussian_width: float = 0.5
  cutoff: float = 6.0
  readout: str = "per_atom"
  readout_mlp: Sequence[int] = (32, 16)
  set2set_steps: int = 3
  activation: str = "shifted_softplus"
  num_species: int = 119
  remat: str = ""

  head_modules = ("readout",)

  @property
  def per_graph_output(self) -> bool:
    return self.readout == "set2set"

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple,
               positions: jax.Array | None = None) -> jax.Array:
    """Per-atom outputs [n_node] or, with Set2Set, per-structure [n_graph]."""
    if self.readout not in ("per_atom", "set2set"):
      raise ValueError(f"readout must be 'per_atom' or 'set2set', got "
                       f"{self.readout!r}")
    x = graph.nodes["positions"] if positions is None else positions
    node_mask = graph.nodes["mask"]
    n_graph = graph.globals["mask"].shape[0]
    chunk = edge_sums.chunk_size(self.edge_chunk, graph.senders.shape[0])
    edge = geometry.edge_geometry(x, graph, self.cutoff)
    edges = {"senders": graph.senders, "receivers": graph.receivers,
             "weights": edge.envelope, "distances": edge.d}
    v = nn.Embed(self.num_species, self.embed_dim, name="embed")(
        graph.nodes["atomic_numbers"])
    u = jnp.broadcast_to(
        self.param("state0", nn.initializers.zeros, (self.embed_dim,)),
        (n_graph, self.embed_dim))
    block = remat.wrap(MegNetBlock, self.remat)
    for i in range(self.num_blocks):
      first = dict(num_gaussians=self.num_gaussians,
                   gaussian_width=self.gaussian_width,
                   cutoff=self.cutoff) if i == 0 else {}
      e, v, u = block(self.pre, self.block_mlp, self.activation,
                      dtype=self.dtype, edge_chunk=chunk,
                      edge_axis=self.edge_axis, name=f"block_{i}", **first)(
                          edges, v, u, graph)
      edges = {"senders": graph.senders, "receivers": graph.receivers,
               "weights": edge.envelope, "state": e}
    head = MLP(tuple(self.readout_mlp) + (self.num_heads,), self.activation,
               activate_last=False, dtype=self.dtype, name="readout")
    if self.readout == "per_atom":
      return self.heads_output(head(v).astype(jnp.float32)
                               * node_mask[:, None])
    node_graph = graph.nodes["graph"]
    pooled_v = Set2Set(self.set2set_steps, name="set2set_nodes")(
        v, node_graph, n_graph, node_mask.astype(v.dtype))
    pooled_e = Set2Set(self.set2set_steps, chunk=chunk, axis=self.edge_axis,
                       name="set2set_edges")(
        e, node_graph[graph.receivers], n_graph, edge.envelope)
    out = head(jnp.concatenate([pooled_v, pooled_e, u], -1))
    return self.heads_output(out.astype(jnp.float32)
                             * graph.globals["mask"][:, None])
