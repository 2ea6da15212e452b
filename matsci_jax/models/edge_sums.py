"""Sums over a batch's edges: at once, in chunks, or split over devices.

A message-passing layer does its heavy work per edge ([n_edge, width]
tensors) and then sums it into atoms or structures. For a structure whose
edges do not fit a device in one pass, that edge work can run

* in chunks on one device (`EnergyModel.edge_chunk`): a scan over chunks of
  edges that adds each chunk's sums to a carry and recomputes the chunk in
  the backward pass, so activation memory is bounded by the chunk;
* split over the devices of a mesh axis (`EnergyModel.edge_axis`, inside
  `jax.shard_map`; see `matsci_jax.energy.shard_edges`): every device holds
  all atoms and a slice of the edges, sums its slice, and the sums are
  completed with `psum` across the axis; gradients (forces) come back
  summed over devices by the transpose of that `psum`.

Both run the same body function with the same parameters, so results equal
the single-pass ones up to the order of floating-point additions.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from matsci_jax import _compat
from matsci_jax.models import scan_unroll


def pad_edges(graph: jraph.GraphsTuple, multiple: int) -> jraph.GraphsTuple:
  """`graph` with masked edges appended up to a multiple of `multiple` (a
  whole number of edges, or point-cloud rows, per device).

  The new edges join the last node, a padding node in every padded batch
  (see `data.batching.collate`), to itself with no cell shift, so receivers
  stay sorted and their envelope, and every sum they enter, is zero. A
  batch of numpy arrays stays on the host.
  """
  n_edge = graph.senders.shape[0]
  pad = -n_edge % multiple
  if not pad:
    return graph
  xp = np if isinstance(graph.senders, np.ndarray) else jnp
  last = graph.nodes["mask"].shape[0] - 1

  def extend(x, fill):
    return xp.concatenate([x, xp.full((pad,) + x.shape[1:], fill, x.dtype)])

  edges = {k: extend(v, False if k == "mask" else 0)
           for k, v in graph.edges.items()}
  # The new edges belong to the last graph, a padding graph.
  n_edge = xp.concatenate([graph.n_edge[:-1], graph.n_edge[-1:] + pad])
  return graph._replace(senders=extend(graph.senders, last),
                        receivers=extend(graph.receivers, last), edges=edges,
                        n_edge=n_edge)


def complete(sums: Any, axis: str | tuple[str, ...] | None) -> Any:
  """Edge sums of this device completed over `axis` (None: unchanged)."""
  return sums if axis is None else jax.lax.psum(sums, axis)


def complete_max(values: Any, axis: str | tuple[str, ...] | None) -> Any:
  """Maxima over this device's edges completed over `axis`."""
  return values if axis is None else jax.lax.pmax(values, axis)


def scan_edges(mdl: nn.Module, body: Callable, init: Any, edges: Any,
               broadcast: Sequence[Any] = (), *, chunk: int = 0,
               axis: str | tuple[str, ...] | None = None) -> tuple[Any, Any]:
  """Runs `body` over all edges and sums its per-chunk results.

  Args:
    mdl: the calling module (from a compact method); parameters that
      `body` creates live in its scope, so they are the same at any chunk
      size and without chunks.
    body: `body(mdl, edges, *broadcast) -> (sums, per_edge)`, where `sums`
      is a pytree shaped like `init` (sums over the given edges) and
      `per_edge` a pytree of [n, ...] arrays (or None).
    init: zeros shaped like `sums` (its shapes and dtypes; the values are
      not used).
    edges: pytree of per-edge arrays [n_edge, ...].
    broadcast: arguments every chunk sees whole (per-atom features).
    chunk: edges per chunk; 0 (or at least n_edge) runs all at once.
    axis: mesh axis the edges are split over, or None.

  Returns:
    (sums over all edges and devices, per-edge outputs [n_edge, ...]).
  """
  n_edge = _num_edges(edges)
  if not chunk or chunk >= n_edge:
    sums, per_edge = body(mdl, edges, *broadcast)
    return complete(sums, axis), per_edge
  full, rest = divmod(n_edge, chunk)

  def step(mdl, carry, index, edges, *broadcast):
    sums, per_edge = body(mdl, _chunk(edges, index * chunk, chunk),
                          *broadcast)
    return jax.tree_util.tree_map(jnp.add, carry, sums), per_edge

  carry = _varying(jax.tree_util.tree_map(jnp.zeros_like, init), axis,
                   (edges, broadcast))
  # Each chunk is sliced inside the step, and recomputed in the backward
  # pass: nothing per edge is stored for it (storing its activations, or
  # even its slice of the inputs, would bring back memory of all edges).
  scan = nn.scan(nn.remat(step, prevent_cse=False),
                 variable_broadcast="params", split_rngs={"params": False},
                 in_axes=(0,) + (nn.broadcast,) * (1 + len(broadcast)),
                 length=full, unroll=scan_unroll.unroll())
  sums, per_edge = scan(mdl, carry, jnp.arange(full), edges, *broadcast)
  per_edge = jax.tree_util.tree_map(
      lambda x: x.reshape((full * chunk,) + x.shape[2:]), per_edge)
  if rest:  # The last, shorter chunk.
    tail_sums, tail = nn.remat(body, prevent_cse=False)(
        mdl, _chunk(edges, full * chunk, rest), *broadcast)
    sums = jax.tree_util.tree_map(jnp.add, sums, tail_sums)
    per_edge = jax.tree_util.tree_map(
        lambda a, b: jnp.concatenate([a, b]), per_edge, tail)
  return complete(sums, axis), per_edge


def chunk_size(chunk: int, n_edge: int) -> int:
  """`chunk` (edges per chunk), or 0 when all `n_edge` fit one chunk."""
  return 0 if not chunk or chunk >= n_edge else int(chunk)


def reduce_edges(fn: Callable, init: Any, edges: Any,
                 broadcast: Sequence[Any] = (), *, chunk: int = 0,
                 axis: str | tuple[str, ...] | None = None,
                 op: str = "sum") -> Any:
  """`scan_edges` for parameter-free work: reduces `fn`'s results.

  Args:
    fn: `fn(edges, *broadcast) -> partial`, a pytree shaped like `init`.
    init: the reduction's identity (zeros for "sum", -inf for "max").
    edges, broadcast, chunk, axis: as in `scan_edges`.
    op: "sum" or "max", over chunks and then over `axis`.

  Returns:
    The reduction over all edges (and devices).
  """
  combine, finish = ((jnp.add, complete) if op == "sum"
                     else (jnp.maximum, complete_max))
  n_edge = _num_edges(edges)
  if not chunk or chunk >= n_edge:
    return finish(fn(edges, *broadcast), axis)
  full, rest = divmod(n_edge, chunk)

  @jax.checkpoint
  def step(carry, index):
    part = fn(_chunk(edges, index * chunk, chunk), *broadcast)
    return jax.tree_util.tree_map(combine, carry, part), None

  out, _ = jax.lax.scan(step, _varying(init, axis, (edges, broadcast)),
                        jnp.arange(full),
                        unroll=scan_unroll.unroll())
  if rest:
    part = jax.checkpoint(fn)(_chunk(edges, full * chunk, rest), *broadcast)
    out = jax.tree_util.tree_map(combine, out, part)
  return finish(out, axis)


def _num_edges(edges: Any) -> int:
  return jax.tree_util.tree_leaves(edges)[0].shape[0]


def _chunk(edges: Any, start, size: int) -> Any:
  """Edges [start, start + size) of every per-edge array."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), edges)


def _varying(x: Any, axis: str | tuple[str, ...] | None, like: Any) -> Any:
  """A scan's initial carry, marked as varying over `axis` and over every
  mesh axis the scanned inputs `like` vary over (inside `shard_map`, a
  device's batch does), like the sums each step adds to it."""
  axes = set(() if axis is None else
             axis if isinstance(axis, tuple) else (axis,))
  axes |= set(_compat.varying_axes(like))

  def mark(leaf):
    missing = tuple(sorted(axes - set(_compat.varying_axes(leaf))))
    return _compat.to_varying(leaf, missing)

  return jax.tree_util.tree_map(mark, x)
