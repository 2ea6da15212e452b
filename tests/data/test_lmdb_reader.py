"""Published OC20/matsciml fixture files decode to what their READMEs state."""

import pickle

import lmdb
import numpy as np
import pytest

from matsci_jax.data.ase_reader import AseReader
from matsci_jax.data.lmdb_reader import LmdbReader
from matsci_jax.data.readers import open_readers
from matsci_jax.data.structure import DataError, TAG_UNKNOWN

E_REF = 11.577167122749579
Y_FIRST = 4.2275324975276085
Y_LAST = -3.2182456713414496
S2EF_VARIANTS = {
    "oc20_s2ef_toy/noedges": 101,
    "oc20_s2ef_toy/edges": 101,
    "oc20_s2ef_toy/fairchem_core_1.9_noedges": 101,
    "oc20_s2ef_toy/fairchem_core_1.9_edges_every10": 11,
    "oc20_s2ef_toy_legacy/noedges": 101,
    "oc20_s2ef_toy_legacy/edges_every10": 11,
}


@pytest.mark.parametrize("variant,count", sorted(S2EF_VARIANTS.items()))
def test_s2ef_variants_decode(shared_data, variant, count):
  reader = LmdbReader(str(shared_data / variant))
  assert len(reader) == count
  step = 100 // (count - 1)
  for i in range(count):
    s = reader[i]
    assert s.num_atoms == 38
    assert s.positions.shape == (38, 3) and s.forces.shape == (38, 3)
    assert np.array_equal(
        np.bincount(s.atomic_numbers, minlength=30)[[1, 6, 29]], [8, 3, 27])
    assert s.cell.shape == (3, 3) and s.pbc.all()
    assert set(np.unique(s.tags)) <= {0, 1, 2} and (s.tags == 2).sum() == 11
    assert s.fixed.dtype == bool and s.fixed.sum() > 0
    assert s.sid == 1000001 and s.fid == i * step
    assert s.energy_relaxed is None
    if "edges" in variant and "noedges" not in variant:
      e = s.edge_index.shape[1]
      assert 1709 <= e <= 1835 and s.cell_offsets.shape == (e, 3)
      vec = (s.positions[s.edge_index[0]] - s.positions[s.edge_index[1]]
             + s.cell_offsets @ s.cell)
      d = np.linalg.norm(vec, axis=1)
      assert d.max() <= 6.0 + 1e-4 and d.min() > 0
    else:
      assert s.edge_index is None
  assert reader[0].energy == Y_FIRST
  assert reader[count - 1].energy == Y_LAST


def test_pyg1_and_pyg2_layouts_give_identical_arrays(shared_data):
  pairs = [("oc20_s2ef_toy/noedges", "oc20_s2ef_toy_legacy/noedges", 1),
           ("oc20_s2ef_toy/edges", "oc20_s2ef_toy_legacy/edges_every10", 10),
           ("oc20_is2re_toy/pyg2_tutorial", "oc20_is2re_toy", 1)]
  for new, old, step in pairs:
    a = LmdbReader(str(shared_data / new))
    b = LmdbReader(str(shared_data / old))
    assert len(b) == (len(a) - 1) // step + 1
    for i in range(len(b)):
      x, y = a[i * step], b[i]
      for field in ("atomic_numbers", "positions", "cell", "pbc", "tags",
                    "fixed", "forces", "positions_relaxed", "edge_index",
                    "cell_offsets"):
        u, v = getattr(x, field), getattr(y, field)
        assert (u is None) == (v is None), field
        if u is not None:
          assert u.dtype == v.dtype and np.array_equal(u, v), (new, i, field)
      assert (x.energy, x.energy_relaxed, x.sid, x.fid) == (
          y.energy, y.energy_relaxed, y.sid, y.fid)


def test_fairchem_writer_wraps_positions_into_the_cell(shared_data):
  classic = LmdbReader(str(shared_data / "oc20_s2ef_toy/noedges"))
  fairchem = LmdbReader(
      str(shared_data / "oc20_s2ef_toy/fairchem_core_1.9_noedges"))
  s, t = classic[50], fairchem[50]
  frac = np.linalg.solve(t.cell.T, t.positions.T).T
  assert (frac[:, :2] >= -1e-5).all() and (frac[:, :2] < 1 + 1e-5).all()
  # Same structure up to lattice translations.
  delta = np.linalg.solve(s.cell.T, (t.positions - s.positions).T).T
  assert np.allclose(delta, np.round(delta), atol=1e-4)
  assert s.energy == t.energy and np.array_equal(s.forces, t.forces)


@pytest.mark.parametrize("variant", ["oc20_is2re_toy",
                                     "oc20_is2re_toy/pyg2_tutorial"])
def test_is2re_files(shared_data, variant):
  reader = LmdbReader(str(shared_data / variant / "data.lmdb"))
  assert len(reader) == 10
  for k in range(10):
    s = reader[k]
    assert s.sid == 3000000 + 10 * k and s.num_atoms == 38
    assert s.energy_relaxed == Y_LAST
    assert s.positions_relaxed.shape == (38, 3)
    assert 1712 <= s.edge_index.shape[1] <= 1828
  assert reader[0].energy == Y_FIRST
  assert abs(reader[9].energy - -3.2084) < 1e-4
  # Every entry pairs a frame with the same relaxed frame.
  assert np.array_equal(reader[0].positions_relaxed,
                        reader[9].positions_relaxed)


def test_matsciml_lips_devset(shared_data):
  reader = LmdbReader(str(shared_data / "matsciml_lips_devset"))
  assert len(reader) == 200
  energies = []
  for i in range(0, 200, 7):
    s = reader[i]
    assert s.num_atoms == 83 and s.pbc.all() and s.cell.shape == (3, 3)
    assert np.array_equal(np.bincount(s.atomic_numbers)[[3, 15, 16]],
                          [27, 12, 44])
    assert (s.tags == TAG_UNKNOWN).all() and not s.fixed.any()
    assert s.forces.shape == (83, 3) and np.isfinite(s.forces).all()
    energies.append(s.energy)
  assert -359.3 < min(energies) and max(energies) < -356.1


def test_lmdb_values_equal_the_source_extxyz(shared_data):
  src = shared_data / "oc20_s2ef_toy/source/0.extxyz"
  ase_reader = AseReader(str(src), subtract_reference=True)
  lmdb_reader = LmdbReader(str(shared_data / "oc20_s2ef_toy/noedges"))
  assert len(ase_reader) == len(lmdb_reader) == 101
  for i in (0, 37, 100):
    a, b = ase_reader[i], lmdb_reader[i]
    assert a.energy == b.energy  # y = E - E_ref, exactly as preprocess_ef.
    assert (a.sid, a.fid) == (b.sid, b.fid)
    assert np.array_equal(a.positions.astype(np.float32), b.positions)
    assert np.array_equal(a.forces.astype(np.float32), b.forces)
    assert np.array_equal(a.atomic_numbers, b.atomic_numbers)
    assert np.array_equal(a.tags, b.tags) and np.array_equal(a.fixed, b.fixed)
  raw = AseReader(str(src))
  assert abs(raw[0].energy - (Y_FIRST + E_REF)) < 1e-9


def test_open_readers_dispatch(shared_data, tmp_path):
  (r,) = open_readers(str(shared_data / "oc20_s2ef_toy/edges"))
  assert isinstance(r, LmdbReader) and r.files[0].endswith("data.0000.lmdb")
  (r,) = open_readers(str(shared_data / "oc20_s2ef_toy/source"))
  assert isinstance(r, AseReader)
  with pytest.raises(FileNotFoundError, match="no such"):
    open_readers(str(tmp_path / "missing"))


def _write_lmdb(path, entries, length=None):
  env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
  with env.begin(write=True) as txn:
    for k, v in entries.items():
      txn.put(str(k).encode(), v)
    if length is not None:
      txn.put(b"length", pickle.dumps(length))
  env.close()


def _entry(n=3, **overrides):
  rng = np.random.default_rng(n)
  fields = {"pos": rng.uniform(0, 5, (n, 3)).astype(np.float32),
            "atomic_numbers": np.full(n, 29, np.int64),
            "cell": (np.eye(3) * 5).astype(np.float32)[None],
            "energy": np.float64(-1.0),
            "forces": np.zeros((n, 3), np.float32)}
  fields.update(overrides)
  return pickle.dumps({k: v for k, v in fields.items() if v is not None})


def test_length_key_must_match_the_entries(tmp_path):
  _write_lmdb(tmp_path / "data.0000.lmdb", {0: _entry(), 1: _entry()}, length=3)
  with pytest.raises(DataError,
                     match=r"data.0000.lmdb, entry 'length'.*3 entries.*2"):
    LmdbReader(str(tmp_path))


def test_noncontiguous_keys_and_metadata_keys(tmp_path):
  _write_lmdb(tmp_path / "a.lmdb", {5: _entry(2), 17: _entry(3), 2: _entry(4),
                                    "metadata": b"x"})
  reader = LmdbReader(str(tmp_path / "a.lmdb"))
  assert [reader.key(i)[1] for i in range(len(reader))] == ["2", "5", "17"]
  assert [reader[i].num_atoms for i in range(3)] == [4, 2, 3]


def test_reader_refuses_foreign_pickles(tmp_path):
  import os
  _write_lmdb(tmp_path / "bad.lmdb", {0: pickle.dumps(os.getcwd)})
  reader = LmdbReader(str(tmp_path / "bad.lmdb"))
  with pytest.raises(DataError,
                     match=r"bad.lmdb, entry '0'.*refusing to load global"):
    reader[0]


def test_ase_database_and_trajectory_files(tmp_path):
  import ase.db
  import ase.io
  from ase.build import bulk
  from ase.calculators.emt import EMT
  frames = []
  for k in range(3):
    atoms = bulk("Cu", "fcc", a=3.6 + 0.02 * k) * (2, 1, 1)
    atoms.calc = EMT()
    atoms.get_forces()
    frames.append(atoms)
  ase.io.write(tmp_path / "f.traj", frames)
  with ase.db.connect(str(tmp_path / "f.db")) as db:
    for k, atoms in enumerate(frames):
      db.write(atoms, sid=100 + k)
  for name in ("f.traj", "f.db"):
    (reader,) = open_readers(str(tmp_path / name))
    assert len(reader) == 3
    for k in range(3):
      s = reader[k]
      assert s.num_atoms == 2
      assert abs(s.energy - frames[k].get_potential_energy()) < 1e-9
      np.testing.assert_allclose(s.forces, frames[k].get_forces(), atol=1e-12)
  assert [reader[k].sid for k in range(3)] == [100, 101, 102]  # From the db.


def test_fields_beyond_the_structure_bounds_are_refused(tmp_path, monkeypatch):
  from matsci_jax.data import lmdb_reader
  monkeypatch.setattr(lmdb_reader, "MAX_ATOMS", 10)
  monkeypatch.setattr(lmdb_reader, "MAX_EDGES", 20)
  edges = np.zeros((2, 21), np.int64)
  _write_lmdb(tmp_path / "a.lmdb", {
      0: _entry(10, edge_index=edges[:, :20]), 1: _entry(11),
      2: _entry(4, pos=np.zeros((11, 3), np.float32)),
      3: _entry(4, edge_index=edges)})
  reader = LmdbReader(str(tmp_path / "a.lmdb"))
  assert reader[0].num_atoms == 10
  with pytest.raises(DataError, match=r"a.lmdb, entry '1': field "
                     r"'atomic_numbers' has 11 values, more than a structure "
                     r"of 10 atoms \(structure.MAX_ATOMS\) holds"):
    reader[1]
  with pytest.raises(DataError, match=r"entry '2': field 'pos' has 33 values"):
    reader[2]
  with pytest.raises(DataError, match=r"entry '3': field 'edge_index' has 42 "
                     r"values, more than a structure of 20 edges"):
    reader[3]


def test_nested_lists_sharing_sublists_are_not_expanded(tmp_path):
  # About 1 kB of pickle standing for 2 million positions.
  row = [0.5] * 10
  bomb = [[[row] * 100] * 100] * 20
  value = _entry(3, pos=bomb)
  assert len(value) < 2000
  _write_lmdb(tmp_path / "a.lmdb", {0: value,
                                    1: _entry(3, pos=[[0.0, 0, 0], [1, 0, 0],
                                                      [0, 1.0, 0]])})
  reader = LmdbReader(str(tmp_path / "a.lmdb"))
  with pytest.raises(DataError, match=r"entry '0': field 'pos' is a nested "
                     r"list of more than 1,000,000 values"):
    reader[0]
  assert reader[1].positions.shape == (3, 3)  # Small lists still decode.


@pytest.mark.parametrize("overrides,problem", [
    ({"sid": np.float64(np.nan)}, r"sid nan is not an integer id"),
    ({"fid": b"frame\xff"}, r"fid is not text"),
    ({"atomic_numbers": np.array([29, 1e10, 29])},
     r"atomic number 1e\+10 of atom 1 is outside 1..118"),
    ({"pbc": [[True], [True, False]]}, r"field 'pbc' is not numeric"),
    ({"forces": "abc"}, r"field 'forces' is not numeric"),
])
def test_uninterpretable_fields_name_the_entry(tmp_path, overrides, problem):
  _write_lmdb(tmp_path / "a.lmdb", {5: _entry(3, **overrides)})
  with pytest.raises(DataError, match=r"a.lmdb, entry '5': " + problem):
    LmdbReader(str(tmp_path / "a.lmdb"))[0]
