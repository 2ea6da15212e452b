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

Structures of many atoms are searched on several threads (`search_threads`);
the edges are sorted here, so they do not depend on the thread count.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np
import vesin

from matsci_jax.data import structure

# Recorded in every converted dataset's metadata.
NEIGHBOR_RULE = ("pairs with 0 < distance <= cutoff under periodic images; "
                 "each centre keeps its max_neighbors nearest, ties broken "
                 "by neighbour index, then image shift")

# Structures of at least this many atoms are searched on every core this
# process may use. Smaller ones take milliseconds, and the converter runs
# one worker process per core: threads there would only compete.
THREADED_MIN_ATOMS = 20_000

# Elements per pass when packing sort keys, so that the float and integer
# temporaries of a pass stay a few MB however many edges there are.
_CHUNK = 1 << 22


class Edges(NamedTuple):
  """A directed edge list. Shapes: senders/receivers [E], cell_shifts [E, 3],
  distances [E] (None when not asked for)."""
  senders: np.ndarray
  receivers: np.ndarray
  cell_shifts: np.ndarray
  distances: Optional[np.ndarray]


def search_threads(num_atoms: int) -> int:
  """Threads for the neighbour search of `num_atoms` atoms: one below
  `THREADED_MIN_ATOMS`, else the number of cores this process may run on
  (its CPU affinity, which containers and `taskset` narrow)."""
  if num_atoms < THREADED_MIN_ATOMS:
    return 1
  try:
    return max(len(os.sched_getaffinity(0)), 1)
  except AttributeError:  # No affinity on this platform.
    return os.cpu_count() or 1


def _aperiodic_box(positions: np.ndarray, cutoff: float) -> np.ndarray:
  # vesin needs a box even without periodicity; any box works as long as it
  # is not used for images.
  extent = np.ptp(positions, axis=0) if len(positions) else np.zeros(3)
  return np.diag(np.maximum(extent, 0.0) + 2 * cutoff + 1.0)


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                  cutoff: float, max_neighbors: Optional[int] = None, *,
                  distances: bool = True,
                  n_threads: Optional[int] = None) -> Edges:
  """Computes the edges of one structure.

  Args:
    positions: float [N, 3] Cartesian positions in Å.
    cell: float [3, 3] lattice vectors as rows in Å.
    pbc: bool [3] periodicity per lattice vector.
    cutoff: radius in Å; pairs with 0 < d <= cutoff are kept.
    max_neighbors: keep at most this many nearest neighbours per centre
      (None keeps all).
    distances: return the distances too (graphs need none: leaving them
      out saves a float64 array of the edges).
    n_threads: threads of the search (default `search_threads(N)`); the
      edges do not depend on it.

  Returns:
    `Edges`, sorted by receiver then distance: senders/receivers int32 [E],
    cell_shifts int32 [E, 3], distances float64 [E] or None.

  Raises:
    ValueError: a periodic cell so small for its atoms that the list would
      exceed `structure.max_edges`.
  """
  positions = np.ascontiguousarray(positions, dtype=np.float64)
  n = len(positions)
  pbc = np.asarray(pbc, bool)
  box = np.asarray(cell, np.float64)
  if not pbc.any():
    box = _aperiodic_box(positions, cutoff)
  else:
    _check_size(n, box, cutoff)
  calc = vesin.NeighborList(cutoff=float(cutoff), full_list=True,
                            n_threads=n_threads or search_threads(n))
  # i, j and shifts are views of vesin's buffers, which live as long as
  # `calc` (this function); only the selected edges are copied out.
  i, j, shifts, d = calc.compute(positions, box, pbc.tolist(),
                                 quantities="ijSd", copy=False)
  zero = d <= 1e-8  # A centre's own image at zero distance is no neighbour.
  if zero.any():
    keep = ~zero
    i, j, shifts, d = i[keep], j[keep], shifts[keep], d[keep]
  del zero
  counts = np.zeros(n, np.int64)
  for part in _chunks(len(i)):
    counts += np.bincount(i[part], minlength=n)
  order = _edge_order(i, j, shifts, d, n, cutoff)
  if max_neighbors is not None and len(order) and counts.max() > max_neighbors:
    # The first `kept` of each centre's sorted edges: their positions in
    # `order` are the kept ones' running index plus the edges skipped so far.
    kept = np.minimum(counts, max_neighbors)
    skipped = np.cumsum(counts) - counts - (np.cumsum(kept) - kept)
    order = order[np.arange(int(kept.sum())) + np.repeat(skipped, kept)]
    counts = kept
  receivers = np.repeat(np.arange(n, dtype=np.int32), counts)
  senders = np.empty(len(order), np.int32)
  for part in _chunks(len(order)):
    senders[part] = j[order[part]]
  cell_shifts = np.asarray(shifts[order], np.int32)
  return Edges(senders=senders, receivers=receivers, cell_shifts=cell_shifts,
               distances=d[order] if distances else None)


def _chunks(n: int):
  """Slices covering range(n) in `_CHUNK` steps."""
  for start in range(0, n, _CHUNK):
    yield slice(start, min(start + _CHUNK, n))


def _check_size(num_atoms: int, cell: np.ndarray, cutoff: float) -> None:
  """Refuses a periodic cell so small for its atoms that the list would
  exceed `structure.max_edges` (a damaged or crafted cell would otherwise
  ask for many gigabytes): about N * N * (sphere volume / cell volume)
  pairs."""
  volume = abs(float(np.linalg.det(cell)))
  if volume <= 0:
    return
  pairs = num_atoms * num_atoms * (4 / 3 * np.pi * cutoff**3) / volume
  limit = structure.max_edges(num_atoms)
  if pairs > limit:
    raise ValueError(
        f"a cell of {volume:.3g} Å^3 holding {num_atoms:,} atoms gives about "
        f"{pairs:.2g} neighbour pairs within {cutoff} Å "
        f"({pairs / num_atoms:.3g} per atom), more than the {limit:,} a "
        f"structure of {num_atoms:,} atoms may have (structure.max_edges: "
        f"{structure.MAX_EDGES:,}, or {structure.MAX_EDGES_PER_ATOM} per "
        "atom if more); the cell is too small for its atoms")


def _edge_order(i, j, shifts, d, num_atoms, cutoff) -> np.ndarray:
  """The permutation sorting edges by centre, distance, neighbour, shift.

  One sort of int64 keys does most of it. A key packs, from the top bits,
  the centre, the distance scaled to integer steps, and the edge's index
  (so that a plain sort, faster than an argsort, gives the permutation).
  Steps keep the distance order but can merge distances closer than a
  step, and exact ties (common in symmetric cells), so edges whose centre
  and step agree are then sorted by the full key. When centre and index
  leave fewer than 16 bits of steps (over 10**8 pairs among millions of
  atoms), keys hold centre and step alone and an argsort gives the
  permutation.
  """
  n = len(i)
  if not n:
    return np.zeros(0, np.intp)
  index_bits = max(int(n - 1).bit_length(), 1)
  center_bits = max(int(num_atoms - 1).bit_length(), 1)
  packed = 63 - center_bits - index_bits >= 16
  # At most 52 bits of distance: the precision of a float64 near the cutoff.
  step_bits = min(52, 63 - center_bits - (index_bits if packed else 0))
  top = (1 << step_bits) - 1
  scale = top / max(float(cutoff), float(d.max()))
  key = np.empty(n, np.int64)
  for part in _chunks(n):
    k = i[part].astype(np.int64)
    k <<= step_bits
    k |= np.minimum(d[part] * scale, top).astype(np.int64)
    if packed:
      k <<= index_bits
      k |= np.arange(part.start, part.stop, dtype=np.int64)
    key[part] = k
  del k
  if packed:
    key.sort()
    same = np.empty(n - 1, bool)
    for part in _chunks(n - 1):
      after = slice(part.start + 1, part.stop + 1)
      same[part] = (key[part] >> index_bits) == (key[after] >> index_bits)
    tied = _runs(same)
    tied_keys = key[tied] >> index_bits
    key &= (1 << index_bits) - 1  # The permutation, in place of the keys.
    order = key
  else:
    order = np.argsort(key)
    key = key[order]
    tied = _runs(key[1:] == key[:-1])
    tied_keys = key[tied]
  if len(tied):
    sub = order[tied]
    s = shifts[sub]
    order[tied] = sub[np.lexsort((s[:, 2], s[:, 1], s[:, 0], j[sub], d[sub],
                                  tied_keys))]
  return order


def _runs(same: np.ndarray) -> np.ndarray:
  """Indices of the elements equal to a neighbour, given `same`, whether
  each element equals the next (bool [n - 1])."""
  tied = np.zeros(len(same) + 1, bool)
  tied[:-1] = same
  tied[1:] |= same
  return np.flatnonzero(tied)


def edge_vectors(positions, cell, senders, receivers, cell_shifts):
  """Edge vectors (neighbour image minus centre) in Å, shape [E, 3]."""
  return positions[senders] - positions[receivers] + cell_shifts @ cell
