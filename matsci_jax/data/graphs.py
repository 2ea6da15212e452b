"""Graphs straight from ASE `Atoms` or arrays, in the stored-example layout.

The converter and these helpers build examples with the same
`GraphSpec.example`, so a structure built here is exactly what a converted
dataset would hold.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from matsci_jax.data import batching
from matsci_jax.data.ase_reader import structure_from_atoms
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.data.structure import TAG_UNKNOWN, Structure


def graph_from_atoms(atoms, cutoff: float = 6.0,
                     max_neighbors: Optional[int] = 50,
                     task: str = "s2ef", representation: str = "graph",
                     num_neighbors: int = 16, bulk_samples: int = 8,
                     seed: int = 0) -> dict:
  """One structure as a stored example (dict of numpy arrays).

  Args:
    atoms: `ase.Atoms`; energy/forces are taken from its calculator results
      if present (NaN otherwise), fixed atoms from `FixAtoms`.
    cutoff: neighbour radius in Å.
    max_neighbors: nearest neighbours kept per atom (None: all).
    task: "s2ef" or "is2re" (adds the relaxed targets, NaN if absent).
    representation: "graph", or "point_cloud" for a point cloud whose K
      slots per centre are the edges (as `Dataset.split(...,
      representation="point_cloud")` gives them).
    num_neighbors, bulk_samples, seed: point-cloud settings (see
      `matsci_jax.data.point_cloud`); `cutoff` is its radius.

  Returns:
    The example: positions float32 [N, 3], senders/receivers int32 [E], ...
    (see `matsci_jax.data.schema`).
  """
  pc = (None if representation == "graph" else
        PointCloudSpec(cutoff, num_neighbors, bulk_samples, seed))
  spec = GraphSpec(cutoff, max_neighbors, representation, pc)
  return spec.example(structure_from_atoms(atoms, "<atoms>", 0), task)


def graph_from_arrays(atomic_numbers, positions, cell=None, pbc=False,
                      cutoff: float = 6.0,
                      max_neighbors: Optional[int] = 50,
                      fixed=None, tags=None, task: str = "s2ef") -> dict:
  """`graph_from_atoms` for plain arrays.

  Args:
    atomic_numbers: int [N].
    positions: float [N, 3] in Å.
    cell: float [3, 3] lattice vectors as rows in Å (None: no cell).
    pbc: bool or bool [3], periodicity along each lattice vector.
    cutoff, max_neighbors, task: as in `graph_from_atoms`.
    fixed: bool [N], atoms held fixed (default none).
    tags: int [N], OC20 tags (default unknown).
  """
  n = len(atomic_numbers)
  s = Structure(
      atomic_numbers=np.asarray(atomic_numbers, np.int32),
      positions=np.asarray(positions, np.float64),
      cell=np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64),
      pbc=np.broadcast_to(np.asarray(pbc, bool), (3,)).copy(),
      tags=(np.full(n, TAG_UNKNOWN, np.int32) if tags is None
            else np.asarray(tags, np.int32)),
      fixed=np.zeros(n, bool) if fixed is None else np.asarray(fixed, bool),
      source=("<arrays>", 0))
  return GraphSpec(cutoff, max_neighbors).example(s, task)


def batch_examples(examples: Sequence[dict],
                   budget: Optional[batching.Budget] = None,
                   extra_graphs: int = 1):
  """Pads examples into one batch; the budget defaults to a snug fit.

  Args:
    examples: stored examples (e.g. from `graph_from_atoms`).
    budget: padding budget; None fits the examples exactly plus one padding
      node and `extra_graphs` padding graphs.
    extra_graphs: padding graphs when the budget is chosen here.

  Returns:
    A padded `jraph.GraphsTuple` of numpy arrays.
  """
  if budget is None:
    budget = batching.Budget(
        n_node=sum(len(e["atomic_numbers"]) for e in examples) + 1,
        n_edge=max(sum(len(e["senders"]) for e in examples), 1),
        n_graph=len(examples) + max(extra_graphs, 1))
  return batching.collate(list(examples), budget, template=examples[0])
