"""Point-cloud representation: each centre atom with K neighbour slots.

Centres are the adsorbate (tag 2) and surface (tag 1) atoms plus a seeded
random sample of bulk (tag 0) atoms; in structures without tags every atom
is a centre. Each centre keeps its K nearest neighbours within the cutoff
(periodic images included), padded to exactly K slots with a mask.

The slots are stored as an edge list grouped by centre, K consecutive edges
per centre (neighbour -> centre, same sign convention as graph edges), so a
batch of point clouds is a padded graph whose edges reshape to
[n_edge / K, K]: one row per centre. Models build the atom-type features of
a slot (one-hot of the centre's and of the neighbour's element) from the
atomic numbers, so they are not stored.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from matsci_jax.data.neighbors import Edges, neighbor_list
from matsci_jax.data.structure import Structure, TAG_UNKNOWN


class PointCloud(NamedTuple):
  """Slots of C centres, K each: arrays of length C*K ([C*K, 3] shifts)."""
  senders: np.ndarray      # int32, neighbour atom of each slot (0 if empty)
  receivers: np.ndarray    # int32, centre atom of each slot
  cell_shifts: np.ndarray  # int32 [C*K, 3]
  mask: np.ndarray         # bool, True for a real neighbour
  centers: np.ndarray      # int32 [C], centre atoms


def select_centers(tags: np.ndarray, bulk_samples: int,
                   rng: np.random.Generator) -> np.ndarray:
  """Indices of the centre atoms (sorted)."""
  if np.any(tags == TAG_UNKNOWN):
    return np.arange(len(tags), dtype=np.int32)
  surface = np.nonzero(tags > 0)[0]
  bulk = np.nonzero(tags == 0)[0]
  k = min(bulk_samples, len(bulk))
  sample = rng.choice(bulk, size=k, replace=False) if k else bulk[:0]
  return np.sort(np.concatenate([surface, sample])).astype(np.int32)


def point_cloud(s: Structure, cutoff: float, num_neighbors: int,
                bulk_samples: int, rng: np.random.Generator,
                edges: Optional[Edges] = None) -> PointCloud:
  """Builds the point cloud of one structure.

  Args:
    s: the structure.
    cutoff: neighbour radius in Å.
    num_neighbors: K, slots per centre (the K nearest neighbours are kept).
    bulk_samples: bulk (tag 0) atoms sampled as extra centres.
    rng: generator for that sample (seed it per structure).
    edges: `neighbor_list(..., cutoff, M)` of `s` for some M >= K (or no
      cap), if already computed; its K nearest per centre are the slots.
  """
  centers = select_centers(s.tags, bulk_samples, rng)
  if edges is None:
    edges = neighbor_list(s.positions, s.cell, s.pbc, cutoff, num_neighbors,
                          distances=False)
  k = num_neighbors
  # Edges are sorted by centre then distance: a centre's slots are its
  # first (up to K) edges, which start where its edges start.
  counts = np.bincount(edges.receivers, minlength=s.num_atoms)
  starts = (np.cumsum(counts) - counts)[centers]
  filled = np.minimum(counts[centers], k)
  slot = np.arange(int(filled.sum())) - np.repeat(np.cumsum(filled) - filled,
                                                  filled)
  src = np.repeat(starts, filled) + slot
  dst = np.repeat(np.arange(len(centers)) * k, filled) + slot
  # Empty slots point at the centre itself (a zero vector), masked out.
  senders = np.repeat(centers, k).astype(np.int32)
  senders[dst] = edges.senders[src]
  shifts = np.zeros((len(senders), 3), np.int32)
  shifts[dst] = edges.cell_shifts[src]
  mask = np.zeros(len(senders), bool)
  mask[dst] = True
  return PointCloud(senders=senders,
                    receivers=np.repeat(centers, k).astype(np.int32),
                    cell_shifts=shifts, mask=mask, centers=centers)
