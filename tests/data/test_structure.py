"""Structure validation: bounds, and atoms written twice."""

import itertools

import numpy as np
import pytest

from matsci_jax.data import structure
from matsci_jax.data.lmdb_reader import LmdbReader
from matsci_jax.data.structure import DataError, Structure, validate

CELL = np.array([[6.0, 0.0, 0.0], [1.5, 5.0, 0.0], [0.5, 1.0, 7.0]])


def _structure(positions, cell=CELL, pbc=(True, True, True), **kw):
  n = len(positions)
  return Structure(atomic_numbers=np.full(n, 29, np.int32),
                   positions=np.asarray(positions, np.float64),
                   cell=np.asarray(cell, np.float64), pbc=np.array(pbc),
                   tags=np.zeros(n, np.int32), fixed=np.zeros(n, bool),
                   source=("f.lmdb", "7"), **kw)


def _positions(n=6, seed=0, cell=CELL):
  return np.random.default_rng(seed).uniform(0.1, 0.9, (n, 3)) @ cell


def test_identical_positions_are_refused():
  pos = _positions()
  pos[4] = pos[1]
  with pytest.raises(DataError, match=r"f.lmdb, entry '7': atoms 1 and 4 "
                     r"are at the same position \(0.0e\+00 Å apart"):
    validate(_structure(pos))
  # Without periodicity too.
  with pytest.raises(DataError, match="atoms 1 and 4"):
    validate(_structure(pos, cell=np.zeros((3, 3)), pbc=(False,) * 3))


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -1, 0), (1, 1, -1)])
def test_an_atom_on_anothers_periodic_image_is_refused(shift):
  pos = _positions()
  pos[5] = pos[2] + np.array(shift) @ CELL + 3e-7
  with pytest.raises(DataError, match=r"atoms 2 and 5 are at the same"):
    validate(_structure(pos))
  # Along a non-periodic direction the image does not exist.
  pbc = [s == 0 for s in shift]
  validate(_structure(pos, pbc=pbc))


def test_images_across_the_cell_faces_are_found():
  # Wrapped coordinates just inside opposite faces (fairchem wraps them).
  pos = _positions()
  pos[0] = np.zeros(3)
  pos[3] = CELL.sum(axis=0) - 1e-9
  with pytest.raises(DataError, match="atoms 0 and 3"):
    validate(_structure(pos))
  # A slab whose non-periodic vector is zero.
  slab = CELL.copy()
  slab[2] = 0
  pos = _positions(cell=CELL)
  pos[3] = pos[0] + slab[0] + slab[1]
  with pytest.raises(DataError, match="atoms 0 and 3"):
    validate(_structure(pos, cell=slab, pbc=(True, True, False)))


def test_close_but_distinct_atoms_are_accepted():
  pos = _positions()
  pos[4] = pos[1] + [4e-6, 0, 0]  # Beyond 2 * sqrt(3) * MIN_DISTANCE.
  validate(_structure(pos))
  pos[4] = pos[1] + [0.5, 0, 0]
  validate(_structure(pos))


def test_coincident_atoms_agrees_with_all_pairs():
  rng = np.random.default_rng(0)
  found = 0
  for _ in range(300):
    n = int(rng.integers(2, 25))
    cell = rng.normal(size=(3, 3)) * 2 + np.eye(3) * 5
    pbc = rng.random(3) < 0.6
    frac = rng.random((n, 3))
    if rng.random() < 0.3:  # Lattice sites: many equal coordinates.
      frac = np.round(frac * 4) / 4
    pos = frac @ cell
    if rng.random() < 0.5:
      i, j = rng.choice(n, 2, replace=False)
      pos[j] = (pos[i] + (rng.integers(-2, 3, 3) * pbc) @ cell
                + rng.normal(size=3) * 3e-7)
    shifts = np.unique(
        np.array(list(itertools.product(range(-3, 4), repeat=3))) * pbc,
        axis=0) @ cell
    d = np.linalg.norm(pos[:, None, None] - pos[None, :, None]
                       - shifts[None, None], axis=-1).min(-1)
    np.fill_diagonal(d, np.inf)
    pair = structure.coincident_atoms(pos, cell, pbc)
    if d.min() < structure.MIN_DISTANCE:
      assert pair is not None
    if pair is not None:
      i, j, dist = pair
      assert i < j and abs(d[i, j] - dist) < 1e-9
      assert dist <= 2 * np.sqrt(3) * structure.MIN_DISTANCE
      found += 1
  assert 100 < found < 200



def test_coincident_atoms_are_found_whatever_the_hash(monkeypatch):
  """Points sharing a cube share a hash; other points may too (a
  collision), and the exact comparison then decides. With every hash
  equal, the answers must not change."""
  rng = np.random.default_rng(3)
  cases = []
  for _ in range(60):
    n = int(rng.integers(2, 20))
    cell = rng.normal(size=(3, 3)) + np.eye(3) * 4
    pbc = rng.random(3) < 0.6
    pos = rng.random((n, 3)) @ cell
    if rng.random() < 0.5:
      i, j = rng.choice(n, 2, replace=False)
      pos[j] = pos[i] + (rng.integers(-1, 2, 3) * pbc) @ cell
    cases.append((pos, cell, pbc, structure.coincident_atoms(pos, cell, pbc)))
  assert 10 < sum(c[-1] is not None for c in cases) < 50
  monkeypatch.setattr(structure, "_mix", lambda x: x & np.uint64(0))
  for pos, cell, pbc, want in cases:
    assert structure.coincident_atoms(pos, cell, pbc) == want
  # Signed zeros are one position.
  pos = np.array([[0.0, 0.0, 0.0], [-0.0, -0.0, -0.0], [1.0, 1.0, 1.0]])
  assert structure.coincident_atoms(pos, np.zeros((3, 3)),
                                    np.zeros(3, bool)) == (0, 1, 0.0)


def test_atom_and_edge_bounds(monkeypatch):
  monkeypatch.setattr(structure, "MAX_ATOMS", 5)
  with pytest.raises(DataError, match=r"f.lmdb, entry '7': 6 atoms, more "
                     r"than the 5 a structure may have"):
    validate(_structure(_positions(6)))
  validate(_structure(_positions(5)))
  monkeypatch.setattr(structure, "MAX_EDGES", 10)
  monkeypatch.setattr(structure, "MAX_EDGES_PER_ATOM", 1)
  edges = np.zeros((2, 11), np.int64)
  with pytest.raises(DataError, match=r"11 stored edges, more than the 10"):
    validate(_structure(_positions(5), edge_index=edges))
  validate(_structure(_positions(5), edge_index=edges[:, :10]))


def test_bounds_sit_far_above_oc20():
  assert structure.MAX_ATOMS >= 1000 * 500
  assert structure.MAX_EDGES >= 1000 * 500 * 50


@pytest.mark.parametrize("dataset", [
    "oc20_s2ef_toy/edges", "oc20_s2ef_toy/fairchem_core_1.9_noedges",
    "oc20_s2ef_toy_legacy/noedges", "oc20_is2re_toy/data.lmdb",
    "oc20_is2re_toy/pyg2_tutorial/data.lmdb", "matsciml_lips_devset"])
def test_every_fixture_entry_is_valid(shared_data, dataset):
  reader = LmdbReader(str(shared_data / dataset))
  for i in range(len(reader)):
    validate(reader[i])
