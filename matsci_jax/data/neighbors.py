"""Periodic neighbour lists with OC20's radius + max-neighbour rule.

Edge convention (the same as OC20's `edge_index` / `cell_offsets`): an edge
carries a message from `senders` (the neighbour j) to `receivers` (the centre
i), and its vector points from the centre to the neighbour's image:

    vec = positions[senders] - positions[receivers] + cell_shifts @ cell

Each centre keeps its `max_neighbors` nearest neighbours within `cutoff`
(nearest first, ties broken by neighbour index, then image). OC20's writer
applies the same radius and cap but often keeps one neighbour fewer (its
search returns the centre's own image in a slot) and breaks near-ties at the
last slot differently, so stored OC20 edges and ours differ only among
neighbours equidistant (to float32 precision) with the farthest one kept.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import vesin

from matsci_jax.data.structure import MAX_EDGES

# Recorded in every converted dataset's metadata.
NEIGHBOR_RULE = ("pairs with 0 < distance <= cutoff under periodic images; "
                 "each centre keeps its max_neighbors nearest, ties broken "
                 "by neighbour index, then image shift")


class Edges(NamedTuple):
  """A directed edge list. Shapes: senders/receivers [E], cell_shifts [E, 3]."""
  senders: np.ndarray
  receivers: np.ndarray
  cell_shifts: np.ndarray
  distances: np.ndarray


def _aperiodic_box(positions: np.ndarray, cutoff: float) -> np.ndarray:
  # vesin needs a box even without periodicity; any box works as long as it
  # is not used for images.
  extent = np.ptp(positions, axis=0) if len(positions) else np.zeros(3)
  return np.diag(np.maximum(extent, 0.0) + 2 * cutoff + 1.0)


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                  cutoff: float, max_neighbors: Optional[int] = None) -> Edges:
  """Computes the edges of one structure.

  Args:
    positions: float [N, 3] Cartesian positions in Å.
    cell: float [3, 3] lattice vectors as rows in Å.
    pbc: bool [3] periodicity per lattice vector.
    cutoff: radius in Å; pairs with 0 < d <= cutoff are kept.
    max_neighbors: keep at most this many nearest neighbours per centre
      (None keeps all).

  Returns:
    `Edges`, sorted by receiver then distance: senders/receivers int32 [E],
    cell_shifts int32 [E, 3], distances float64 [E].
  """
  positions = np.ascontiguousarray(positions, dtype=np.float64)
  pbc = np.asarray(pbc, bool)
  box = np.asarray(cell, np.float64)
  if not pbc.any():
    box = _aperiodic_box(positions, cutoff)
  else:
    _check_size(len(positions), box, cutoff)
  calc = vesin.NeighborList(cutoff=float(cutoff), full_list=True,
                            n_threads=1)
  i, j, shifts, d = calc.compute(positions, box, pbc.tolist(),
                                 quantities="ijSd")
  zero = d <= 1e-8  # A centre's own image at zero distance is no neighbour.
  if zero.any():
    i, j, shifts, d = i[~zero], j[~zero], shifts[~zero], d[~zero]
  order = _edge_order(i, j, shifts, d, len(positions), cutoff)
  counts = np.bincount(i, minlength=len(positions))
  if max_neighbors is not None and len(i) and counts.max() > max_neighbors:
    # Rank of each sorted edge within its centre.
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    order = order[rank < max_neighbors]
    counts = np.minimum(counts, max_neighbors)
  receivers = np.repeat(np.arange(len(positions), dtype=np.int32), counts)
  return Edges(senders=j[order].astype(np.int32), receivers=receivers,
               cell_shifts=shifts[order].astype(np.int32), distances=d[order])


def _check_size(num_atoms: int, cell: np.ndarray, cutoff: float) -> None:
  """Refuses a periodic cell so small for its atoms that the list would
  exceed `MAX_EDGES` (a damaged or crafted cell would otherwise ask for
  many gigabytes): about N * N * (sphere volume / cell volume) pairs."""
  volume = abs(float(np.linalg.det(cell)))
  if volume <= 0:
    return
  pairs = num_atoms * num_atoms * (4 / 3 * np.pi * cutoff**3) / volume
  if pairs > MAX_EDGES:
    raise ValueError(
        f"a cell of {volume:.3g} Å^3 holding {num_atoms:,} atoms gives about "
        f"{pairs:.2g} neighbour pairs within {cutoff} Å, more than the "
        f"{MAX_EDGES:,} a structure may have (structure.MAX_EDGES)")


def _edge_order(i, j, shifts, d, num_atoms, cutoff) -> np.ndarray:
  """The permutation sorting edges by centre, distance, neighbour, shift.

  One sort of int64 keys does most of it. A key packs, from the top bits,
  the centre, the distance scaled to integer steps, and the edge's index
  (so that a plain sort, faster than an argsort, gives the permutation).
  Steps keep the distance order but can merge distances closer than a
  step, and exact ties (common in symmetric cells), so edges whose centre
  and step agree are then sorted by the full key.
  """
  if not len(i):
    return np.zeros(0, np.intp)
  index_bits = max(int(len(i) - 1).bit_length(), 1)
  center_bits = max(int(num_atoms - 1).bit_length(), 1)
  # At most 52 bits of distance: the precision of a float64 near the cutoff.
  step_bits = min(52, 63 - index_bits - center_bits)
  if step_bits < 16:  # Too coarse to be worth it (far beyond MAX_EDGES).
    return np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, d, i))
  top = (1 << step_bits) - 1
  steps = np.minimum(d * (top / max(float(cutoff), float(d.max()))), top)
  key = i.astype(np.int64) << step_bits | steps.astype(np.int64)
  key = np.sort(key << index_bits | np.arange(len(i), dtype=np.int64))
  order = key & ((1 << index_bits) - 1)
  key >>= index_bits
  same = key[1:] == key[:-1]
  if same.any():
    tied = np.flatnonzero(np.concatenate([same, [False]])
                          | np.concatenate([[False], same]))
    sub = order[tied]
    s = shifts[sub]
    order[tied] = sub[np.lexsort((s[:, 2], s[:, 1], s[:, 0], j[sub], d[sub],
                                  key[tied]))]
  return order


def edge_vectors(positions, cell, senders, receivers, cell_shifts):
  """Edge vectors (neighbour image minus centre) in Å, shape [E, 3]."""
  return positions[senders] - positions[receivers] + cell_shifts @ cell
