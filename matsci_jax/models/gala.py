"""GALA: geometric algebra attention on point clouds (Spellings 2021).

Each centre atom sees its K neighbour slots (a point-cloud batch, see
`matsci_jax.data.point_cloud`: the edges reshape to [rows, K], one row per
centre). For every pair of slots (j, k) the geometric product of the
neighbour vectors r_j r_k = r_j . r_k + r_j ^ r_k gives rotation-invariant
attributes; in "full" invariant mode these are |r_j|, |r_k|, r_j . r_k and
|r_j ^ r_k|. Values are an MLP of those invariants merged ("concat") with the
joined ("concat") features of slots j and k; scores are an MLP of the values.

Attention is tied: the same weights give the invariant output
sum_k w_jk v_jk and a covariant update of the neighbour geometry,
r_j <- r_j + sum_k w_jk (a_jk r_j + b_jk r_k + c_jk (r_j x r_k) / cutoff), so
the multivector geometry is refined equivariantly between blocks. Blocks are
residual with layer normalisation; a final block reduces over all pairs to
one invariant vector per centre, and an MLP gives the centre's energy.

Physics the reference implementation left loose: the neighbour vectors come
from positions, cell and cell shifts inside the model (so forces are
`-jax.grad` of the energy), and every attention weight carries the smooth
cutoff envelope of both slots, normalised against a constant "sink" term,
so a neighbour entering the cutoff fades in continuously.

Pair tensors are [rows, K, K, width]. With `pairs_per_chunk`, each block
runs over chunks of rows in a scan and recomputes a chunk's pairs in the
backward pass instead of storing them: on CPUs the chunk stays in cache
(about 2x faster steps on dev-set batches, and a few MB of pair
activations instead of GBs), and on any device it bounds memory.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from matsci_jax import _compat  # noqa: F401  (jraph needs it)
from matsci_jax.models import (edge_sums, geometry, registry, remat,
                               scan_unroll)


def _smooth_norm(x2: jax.Array, eps: float = 1e-4) -> jax.Array:
  """sqrt(x2), smooth at 0 (pairs j = k have a zero wedge product)."""
  return jnp.sqrt(x2 + eps * eps) - eps


class _ValueNet(nn.Module):
  """Pair values from invariants and the two slots' features."""
  hidden_dim: int
  dilation: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, invariants, h):
    big = int(self.hidden_dim * self.dilation)
    # Concat merge/join as a sum of per-part products: the same function as
    # one Dense layer on the concatenation, without the [K, K, 2D] tensor.
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    x = (dense(big, name="invariants")(invariants)
         + dense(big, use_bias=False, name="left")(h)[..., :, None, :]
         + dense(big, use_bias=False, name="right")(h)[..., None, :, :])
    return dense(self.hidden_dim, name="out")(jax.nn.silu(x))


class _ScoreNet(nn.Module):
  hidden_dim: int
  dilation: float
  outputs: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, values):
    big = int(self.hidden_dim * self.dilation)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    return dense(self.outputs)(jax.nn.silu(dense(big)(values)))


class GalaBlock(nn.Module):
  """One tied attention block over the slot pairs of each centre.

  The call signature is a scan body's, `(carry, rows) -> (carry, outputs)`,
  so that `_chunked` can run it over chunks of rows; the carry is unused.
  """
  hidden_dim: int
  dilation: float
  cutoff: float
  reduce: bool
  max_score: float = 5.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, r, h, weight):
    """r [R, K, 3], h [R, K, D], weight [R, K] (envelope x mask).

    Returns (carry, (out, r)): out [R, D] when reducing, else [R, K, D], and
    the updated neighbour vectors [R, K, 3].
    """
    scale = 1.0 / self.cutoff
    rj, rk = r[:, :, None, :], r[:, None, :, :]
    # A contraction, not sum(rj * rk, -1): XLA:CPU (jax 0.10) fuses that
    # broadcast-multiply-reduce wrongly for a single row of 40+ slots.
    dot = jnp.einsum("rjc,rkc->rjk", r, r) * scale * scale
    wedge = jnp.cross(jnp.broadcast_to(rj, dot.shape + (3,)),
                      jnp.broadcast_to(rk, dot.shape + (3,)))
    wedge_norm = _smooth_norm(jnp.sum(wedge * wedge, -1)) * scale * scale
    nj = _smooth_norm(jnp.sum(r * r, -1)) * scale
    invariants = jnp.stack([
        jnp.broadcast_to(nj[:, :, None], dot.shape),
        jnp.broadcast_to(nj[:, None, :], dot.shape), dot, wedge_norm], -1)
    values = _ValueNet(self.hidden_dim, self.dilation, self.dtype,
                       name="values")(invariants, h)
    # Tied attention: one network gives the score and, for non-reducing
    # blocks, the three coefficients of the covariant update.
    heads = _ScoreNet(self.hidden_dim, self.dilation,
                      outputs=1 if self.reduce else 4, dtype=self.dtype,
                      name="scores")(values)
    # Attention weights and the geometry update in float32.
    heads = heads.astype(jnp.float32)
    logits = heads[..., 0]
    # Bounded scores: exp(score) can never outweigh a vanishing envelope, so
    # slots fade in and out over the envelope's width, not abruptly.
    logits = self.max_score * jnp.tanh(logits / self.max_score)
    pair_weight = weight[:, :, None] * weight[:, None, :]
    # Envelope-weighted softmax against a sink exp(0): continuous as slots
    # enter or leave the cutoff, and safe when a centre has no neighbours.
    axes = (1, 2) if self.reduce else (2,)
    top = jax.lax.stop_gradient(jnp.maximum(
        jnp.max(jnp.where(pair_weight > 0, logits, 0.0), axis=axes,
                keepdims=True), 0.0))
    w = pair_weight * jnp.exp(logits - top)
    w = w / (jnp.exp(-top) + jnp.sum(w, axis=axes, keepdims=True))
    if self.reduce:
      return carry, (jnp.einsum("rjk,rjkd->rd", w, values), r)
    out = jnp.einsum("rjk,rjkd->rjd", w, values)
    coeffs = heads[..., 1:]
    update = (coeffs[..., 0:1] * rj + coeffs[..., 1:2] * rk
              + coeffs[..., 2:3] * wedge * scale)
    r = r + jnp.einsum("rjk,rjkc->rjc", w, update)
    return carry, (out, r)


def _chunked(name: str, chunk_rows: int, policy: str, r, h, weight,
             **fields):
  """GalaBlock(**fields) on all rows, `chunk_rows` at a time (0: at once).

  Rows are padded with empty slots (zero weight) to a whole number of
  chunks. The scan shares the block's parameters, so the parameters and the
  outputs do not depend on the chunk size. All rows at once, the block is
  rematerialised with `policy` (see `models.remat`); chunks always are.
  Call from a compact method.
  """
  rows = r.shape[0]
  if not chunk_rows or chunk_rows >= rows:
    block = remat.wrap(GalaBlock, policy)
    return block(name=name, **fields)(None, r, h, weight)[1]
  n = -(-rows // chunk_rows)
  pad = n * chunk_rows - rows

  def split(x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n, chunk_rows) + x.shape[1:])

  # Recompute each chunk's pair tensors in the backward pass: storing them
  # would bring back the memory the chunks save.
  scan = nn.scan(nn.remat(GalaBlock, prevent_cse=False),
                 variable_broadcast="params", split_rngs={"params": False},
                 in_axes=0, out_axes=0, length=n,
                 unroll=scan_unroll.unroll())
  _, outs = scan(name=name, **fields)(None, split(r), split(h), split(weight))
  return jax.tree_util.tree_map(
      lambda x: x.reshape((n * chunk_rows,) + x.shape[2:])[:rows], outs)


@registry.register("gala")
class Gala(registry.EnergyModel):
  """GALA giving one energy per centre atom (zero for other atoms).

  Attributes:
    hidden_dim: width of slot features and values.
    depth: tied attention blocks before the final reduction.
    dilation: width factor of the score and value MLPs.
    num_neighbors: K, slots per centre; must equal the dataset's.
    nearest_neighbors: use only each centre's first (nearest) slots, this
      many; 0 uses all K. Pair work grows as its square, so 8 of 16 stored
      slots costs about a quarter. Like any nearest-k rule, the energy jumps
      where two neighbours swap rank at the boundary.
    cutoff: envelope radius in Å (the point-cloud cutoff).
    num_species: one-hot size for atom types.
    pairs_per_chunk: slot pairs per chunk of rows in each block (see the
      module docstring); 0 processes all rows at once, which is fastest
      where memory is plentiful (accelerators). A nonzero `edge_chunk`
      (slots per chunk, whole rows) takes its place.
    remat: with all rows at once, rematerialise each block with this
      policy (see `models.remat`).
    dtype: computation dtype of the dense layers (jnp.bfloat16 for mixed
      precision); parameters, positions, attention weights, sums and
      outputs stay float32.
  """
  representation = "point_cloud"  # K neighbour slots per centre.

  hidden_dim: int = 64
  depth: int = 2
  dilation: float = 2.0
  num_neighbors: int = 16
  nearest_neighbors: int = 0
  cutoff: float = 6.0
  num_species: int = 119
  pairs_per_chunk: int = 1024
  remat: str = ""

  head_modules = ("final", "energy")

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple,
               positions: jax.Array | None = None) -> jax.Array:
    """Per-atom outputs [n_node]: each centre's energy, 0 elsewhere."""
    k = self.num_neighbors
    n_edge = graph.senders.shape[0]
    if n_edge % k:
      raise ValueError(
          f"the batch has {n_edge} edges, not a multiple of num_neighbors="
          f"{k}: use a point-cloud batch with {k} slots per centre")
    x = graph.nodes["positions"] if positions is None else positions
    mask = graph.edges["mask"]
    edge = geometry.edge_geometry(x, graph, self.cutoff)
    rows = n_edge // k
    r = jnp.where(mask[:, None], edge.vectors, 0.0).reshape(rows, k, 3)
    weight = edge.envelope.reshape(rows, k)
    z = graph.nodes["atomic_numbers"]
    center = graph.receivers.reshape(rows, k)[:, 0]
    # Symmetric one-hot types of centre and neighbour, projected up.
    onehot_c = jax.nn.one_hot(z[center], self.num_species)
    onehot_n = jax.nn.one_hot(z[graph.senders], self.num_species).reshape(
        rows, k, self.num_species)
    used = self.nearest_neighbors or k
    if not 0 < used <= k:
      raise ValueError(f"nearest_neighbors={self.nearest_neighbors} must be "
                       f"between 1 and num_neighbors={k} (0: all)")
    # Slots are stored nearest first within each centre.
    r, weight, onehot_n = r[:, :used], weight[:, :used], onehot_n[:, :used]
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    h = (dense(self.hidden_dim, name="embed_center")(onehot_c)[:, None]
         + dense(self.hidden_dim, use_bias=False,
                 name="embed_neighbor")(onehot_n)).astype(jnp.float32)
    if self.edge_chunk:  # Whole rows of about edge_chunk slots.
      chunk_rows = max(1, self.edge_chunk // k)
    else:
      chunk_rows = max(1, self.pairs_per_chunk // (used * used)) \
          if self.pairs_per_chunk else 0
    fields = dict(hidden_dim=self.hidden_dim, dilation=self.dilation,
                  cutoff=self.cutoff, dtype=self.dtype)
    for i in range(self.depth):
      out, r = _chunked(f"block_{i}", chunk_rows, self.remat, r, h, weight,
                        reduce=False, **fields)
      out = dense(self.hidden_dim, name=f"mlp_{i}_out")(jax.nn.silu(
          dense(int(self.hidden_dim * self.dilation), name=f"mlp_{i}")(out)))
      h = nn.LayerNorm(name=f"norm_{i}")(h + out.astype(jnp.float32))
    pooled, _ = _chunked("reduce", chunk_rows, self.remat, r, h, weight,
                         reduce=True, **fields)
    energy = dense(self.num_heads, use_bias=False, name="energy")(
        jax.nn.silu(dense(self.hidden_dim, name="final")(pooled)))
    energy = energy.astype(jnp.float32)
    # Padding rows belong to the padding node, which the node mask removes.
    n_node = z.shape[0]
    # Rows are independent: with edges split over devices, each centre's
    # row is on one device, and this is the only sum across them.
    per_atom = edge_sums.complete(jax.ops.segment_sum(
        energy, center, num_segments=n_node, indices_are_sorted=True),
        self.edge_axis)
    return self.heads_output(per_atom * graph.nodes["mask"][:, None])
