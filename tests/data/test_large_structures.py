"""Large structures: threaded search, size limits that scale with the atoms,
and the one-pass collation, all on small stand-ins."""

import jraph
import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc111

from benchmarks.graph_build import bulk_structure
from matsci_jax.data import batching, neighbors, structure
from matsci_jax.data.ase_reader import structure_from_atoms
from matsci_jax.data.graphs import graph_from_atoms
from matsci_jax.data.neighbors import neighbor_list
from matsci_jax.data.point_cloud import point_cloud


def _rattled_bulk():
  """4,000 Cu atoms in a 36 Å cube: 6 search cells per axis, for threads to
  share."""
  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((10, 10, 10))
  atoms.rattle(0.05, seed=2)
  return atoms


@pytest.mark.parametrize("cap", [None, 12, 50])
def test_threaded_search_gives_the_same_edges(cap):
  atoms = _rattled_bulk()
  args = (atoms.positions, atoms.cell.array, atoms.pbc, 6.0, cap)
  one = neighbor_list(*args, n_threads=1)
  for threads in (2, 4):
    many = neighbor_list(*args, n_threads=threads)
    for a, b in zip(one, many):
      assert a.dtype == b.dtype and np.array_equal(a, b), threads


def test_only_large_structures_search_on_several_threads(monkeypatch):
  monkeypatch.setattr(neighbors.os, "sched_getaffinity",
                      lambda pid: set(range(6)), raising=False)
  assert neighbors.search_threads(neighbors.THREADED_MIN_ATOMS - 1) == 1
  assert neighbors.search_threads(neighbors.THREADED_MIN_ATOMS) == 6
  asked = []

  class Recording(neighbors.vesin.NeighborList):
    def __init__(self, **kwargs):
      asked.append(kwargs["n_threads"])
      super().__init__(**kwargs)

  monkeypatch.setattr(neighbors.vesin, "NeighborList", Recording)
  atoms = _rattled_bulk()
  args = (atoms.positions, atoms.cell.array, atoms.pbc, 6.0, 50)
  small = neighbor_list(*args)
  monkeypatch.setattr(neighbors, "THREADED_MIN_ATOMS", len(atoms))
  large = neighbor_list(*args)
  assert asked == [1, 6]
  assert all(np.array_equal(a, b) for a, b in zip(small, large))


def test_graph_edges_leave_out_the_distances():
  atoms = _rattled_bulk()[:500]
  args = (atoms.positions, atoms.cell.array, atoms.pbc, 6.0, 50)
  with_d = neighbor_list(*args)
  without = neighbor_list(*args, distances=False)
  assert without.distances is None and with_d.distances.dtype == np.float64
  assert all(np.array_equal(a, b) for a, b in zip(with_d[:3], without[:3]))


def test_a_million_atom_supercell_is_within_the_limits():
  # Diamond, the densest solid: about 160 pairs per atom within 6 Å, so a
  # million atoms ask for 1.6e8 pairs, more than a small cell may have.
  cell = np.eye(3) * 3.567 * 50  # 50**3 cubic cells of 8 atoms.
  neighbors._check_size(10**6, cell, 6.0)
  assert structure.max_edges(10**6) >= 160 * 10**6
  # 63**3 cubic fcc cells, the first "million" of whole cells.
  assert structure.MAX_ATOMS >= 4 * 63**3
  # Edge indices and counts stay within int32.
  assert structure.MAX_ATOMS * structure.MAX_EDGES_PER_ATOM < 2**31


def test_a_crafted_large_cell_is_still_refused():
  # A million atoms at ten times the density of diamond: 1.5e9 pairs.
  positions = np.zeros((10**6, 3))
  with pytest.raises(ValueError, match=(
      r"holding 1,000,000 atoms gives about 1.5e\+09 neighbour pairs within "
      r"6.0 Å \(1.53e\+03 per atom\), more than the 500,000,000 a structure "
      r"of 1,000,000 atoms may have \(structure.max_edges: 100,000,000, or "
      r"500 per atom if more\); the cell is too small for its atoms")):
    neighbor_list(positions, np.eye(3) * 84.0, np.ones(3, bool), 6.0, 50)


def test_stored_edges_may_grow_with_the_atoms(monkeypatch):
  monkeypatch.setattr(structure, "MAX_EDGES", 10)
  monkeypatch.setattr(structure, "MAX_EDGES_PER_ATOM", 3)
  positions = np.arange(15.0).reshape(5, 3) * 2.0

  def entry(n_edges):
    return structure.Structure(
        atomic_numbers=np.full(5, 29, np.int32), positions=positions,
        cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
        tags=np.full(5, -1, np.int32), fixed=np.zeros(5, bool),
        edge_index=np.zeros((2, n_edges), np.int64), source=("f.lmdb", 7))

  structure.validate(entry(15))  # 3 per atom: more than MAX_EDGES.
  with pytest.raises(structure.DataError, match=(
      r"f.lmdb, entry 7: 16 stored edges, more than the 15 a structure of 5 "
      r"atoms may have \(structure.max_edges\)")):
    structure.validate(entry(16))


def test_shared_edges_give_the_slots_of_their_own_search():
  slab = fcc111("Pt", (3, 3, 4), vacuum=6.0)
  add_adsorbate(slab, "O", 1.5, "fcc")
  slab.pbc = True
  slab.set_tags(np.where(slab.positions[:, 2] > 10.0, 1, 0))
  s = structure_from_atoms(slab, "<slab>", 0)
  shared = neighbor_list(s.positions, s.cell, s.pbc, 6.0, 50)
  a = point_cloud(s, 6.0, 16, 5, np.random.default_rng(1), shared)
  b = point_cloud(s, 6.0, 16, 5, np.random.default_rng(1))
  assert len(a.centers) < s.num_atoms
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def _jraph_collate(examples, budget):
  """The layout `collate` keeps: jraph's batch then pad, as it was built."""
  graphs = [jraph.GraphsTuple(
      nodes={k: ex[k] for k in batching.NODE_FIELDS if k in ex},
      edges={k: ex[k] for k in batching.EDGE_FIELDS if k in ex},
      globals={k: np.asarray(ex[k], batching._GRAPH_DTYPES.get(k))[None]
               for k in batching.GRAPH_FIELDS if k in ex},
      senders=ex["senders"], receivers=ex["receivers"],
      n_node=np.asarray([len(ex["atomic_numbers"])], np.int32),
      n_edge=np.asarray([len(ex["senders"])], np.int32)) for ex in examples]
  return jraph.pad_with_graphs(jraph.batch_np(graphs), budget.n_node,
                               budget.n_edge, budget.n_graph)


@pytest.mark.parametrize("representation", ["graph", "point_cloud"])
def test_collate_keeps_jraphs_layout(representation):
  examples = [graph_from_atoms(bulk_structure(n, seed=n), 4.0, 12,
                               representation=representation,
                               num_neighbors=8)
              for n in (32, 108, 60)]
  budget = batching.Budget(n_node=240, n_edge=3000, n_graph=5)
  got = batching.collate(examples, budget)
  want = _jraph_collate(examples, budget)
  for field in ("senders", "receivers", "n_node", "n_edge"):
    a, b = getattr(got, field), getattr(want, field)
    assert a.dtype == np.int32 and np.array_equal(a, b), field
  for part in ("nodes", "edges", "globals"):
    a, b = getattr(got, part), getattr(want, part)
    for k, v in b.items():
      if k in ("sid", "fid"):
        v = v.astype(np.int32)
      if k == "slot_mask":
        continue  # Folded into edges["mask"], checked below.
      assert a[k].dtype == v.dtype and np.array_equal(a[k], v,
                                                      equal_nan=True), k
  real = np.arange(budget.n_edge) < want.n_edge[:3].sum()
  slots = (want.edges["slot_mask"] if "slot_mask" in want.edges
           else np.ones(budget.n_edge, bool))
  assert np.array_equal(got.edges["mask"], real & slots)
  assert np.array_equal(got.nodes["mask"], np.arange(240) < 188)
  assert np.array_equal(got.nodes["graph"],
                        np.repeat(np.arange(5), want.n_node))
  assert got.globals["mask"].tolist() == [True] * 3 + [False] * 2
  empty = batching.collate([], budget, template=examples[0])
  assert empty.n_node.tolist() == [240, 0, 0, 0, 0]
  assert empty.senders.dtype == np.int32 and not empty.senders.any()
  assert all(v.shape[0] == 240 for v in empty.nodes.values())


def test_bulk_structure_has_about_the_atoms_asked_for():
  sizes = {n: len(bulk_structure(n)) for n in (1000, 10**4)}
  assert sizes == {1000: 1008, 10**4: 10192}
  a, b = bulk_structure(1000, seed=1), bulk_structure(1000, seed=1)
  assert np.array_equal(a.positions, b.positions) and a.pbc.all()
  assert not np.array_equal(a.positions, bulk_structure(1000).positions)
