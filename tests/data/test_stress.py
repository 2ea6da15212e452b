"""Stress: read from ASE files and LMDBs as ASE gives it, validated, stored
only in datasets that have it."""

import json
import os
import pickle
import re

import ase.db
import ase.io
import lmdb
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from matsci_jax.data import converter, schema
from matsci_jax.data.ase_reader import AseReader
from matsci_jax.data.dataset_io import Dataset
from matsci_jax.data.graph_spec import GraphSpec
from matsci_jax.data.lmdb_reader import LmdbReader
from matsci_jax.data.structure import (DataError, StressIgnoredWarning,
                                       validate)


def _strained(seed=0, symbols=("Cu", "Au")):
  """A sheared, rattled CuAu cell with EMT results (stress included)."""
  rng = np.random.default_rng(seed)
  atoms = bulk("Cu", "fcc", a=3.8, cubic=True) * (2, 1, 1)
  atoms.set_chemical_symbols([symbols[k % 2] for k in range(len(atoms))])
  strain = rng.uniform(-0.03, 0.03, (3, 3))
  atoms.set_cell(atoms.cell.array @ (np.eye(3) + (strain + strain.T) / 2),
                 scale_atoms=True)
  atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
  atoms.calc = EMT()
  atoms.get_potential_energy()
  atoms.get_forces()
  atoms.get_stress()
  return atoms


def _voigt_text(text, key, voigt):
  """An extxyz frame's text with `stress=` replaced by `key=` holding 6
  Voigt values."""
  values = " ".join(repr(float(v)) for v in voigt)
  return re.sub(r'stress="[^"]*"', f'{key}="{values}"', text)


def test_extxyz_stress_equals_ase(tmp_path):
  frames = [_strained(seed) for seed in range(3)]
  ase.io.write(tmp_path / "a.extxyz", frames)
  reader = AseReader(str(tmp_path / "a.extxyz"))
  for s, atoms in zip(reader, frames):
    np.testing.assert_allclose(s.stress, atoms.get_stress(voigt=False),
                               rtol=1e-12, atol=0)
    assert s.stress.dtype == np.float64 and validate(s) is s
    np.testing.assert_array_equal(s.to_atoms().get_stress(voigt=False),
                                  s.stress)


def test_extxyz_voigt_stress_and_virial_equal_ase(tmp_path):
  """6 Voigt values (xx yy zz yz xz xy), which ASE refuses in extxyz, and
  a virial W = -stress * V."""
  atoms = _strained(1)
  path = tmp_path / "full.extxyz"
  ase.io.write(path, atoms)
  text = path.read_text()
  want = atoms.get_stress(voigt=False)
  volume = atoms.get_volume()
  cases = {
      "voigt": _voigt_text(text, "stress", atoms.get_stress()),
      "virial": _voigt_text(text, "virial", -atoms.get_stress() * volume),
  }
  full_virial = " ".join(repr(float(v)) for v in (-want * volume).ravel())
  cases["virial_3x3"] = re.sub(r'stress="[^"]*"',
                               f'virial="{full_virial}"', text)
  for name, case in cases.items():
    (tmp_path / f"{name}.extxyz").write_text(case)
    s = AseReader(str(tmp_path / f"{name}.extxyz"))[0]
    np.testing.assert_allclose(s.stress, want, rtol=1e-12, atol=1e-17,
                               err_msg=name)
  with pytest.raises(ValueError, match="9-long"):  # What ASE says to it.
    ase.io.read(tmp_path / "voigt.extxyz")


def test_ase_database_stress_equals_ase(tmp_path):
  frames = [_strained(seed) for seed in range(2)]
  with ase.db.connect(tmp_path / "a.db") as db:
    for atoms in frames:
      db.write(atoms)
  reader = AseReader(str(tmp_path / "a.db"))
  for s, atoms in zip(reader, frames):
    np.testing.assert_allclose(s.stress, atoms.get_stress(voigt=False),
                               rtol=1e-12, atol=0)


def _lmdb(path, values):
  env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
  with env.begin(write=True) as txn:
    for k, v in values.items():
      txn.put(str(k).encode(), pickle.dumps(v))
  env.close()
  return str(path)


def _fields(atoms, **targets):
  """A matsciml-style dict entry of `atoms` (positions, cell, pbc)."""
  fields = {"pos": atoms.positions.astype(np.float32),
            "atomic_numbers": atoms.numbers.astype(np.int64),
            "cell": atoms.cell.array.astype(np.float32),
            "pbc": atoms.pbc.copy(),
            "energy": np.float64(atoms.get_potential_energy()),
            "forces": atoms.get_forces().astype(np.float32)}
  fields.update(targets)
  return {k: v for k, v in fields.items() if v is not None}


def test_lmdb_stress_and_virial_conventions(tmp_path):
  """`stress` is ASE's stress as stored (matsciml [3, 3], fairchem's
  [1, 3, 3], 6 Voigt values); `virial`/`virials` are W = -stress * V."""
  atoms = _strained(2)
  sigma = atoms.get_stress(voigt=False)
  volume = abs(np.linalg.det(atoms.cell.array.astype(np.float32)))
  virial = -sigma * volume
  path = _lmdb(tmp_path / "a.lmdb", {
      0: _fields(atoms, stress=sigma),
      1: _fields(atoms, stress=sigma[None].astype(np.float32)),
      2: _fields(atoms, stress=atoms.get_stress()),
      3: _fields(atoms, virial=virial),
      4: _fields(atoms, virials=virial[None]),
      5: _fields(atoms, stress=sigma, virial=np.zeros((3, 3))),
      6: _fields(atoms)})
  reader = LmdbReader(path)
  for i in range(6):
    s = validate(reader[i])
    np.testing.assert_allclose(s.stress, sigma, rtol=1e-6, atol=1e-9,
                               err_msg=str(i))
  # The sign: a compressed cell pushes outwards, a negative stress in ASE.
  squeezed = bulk("Cu", "fcc", a=3.4)
  squeezed.calc = EMT()
  assert np.all(np.diag(squeezed.get_stress(voigt=False)) < 0)
  assert reader[6].stress is None


def _entry_error(s):
  with pytest.raises(DataError) as info:
    validate(s)
  return str(info.value)


def test_bad_stress_is_named(tmp_path):
  atoms = _strained(3)
  slab = _strained(3)
  slab.pbc = (True, True, False)
  path = _lmdb(tmp_path / "bad.lmdb", {
      0: _fields(atoms, stress=np.zeros(4)),
      1: _fields(atoms, stress=np.full((3, 3), np.nan)),
      2: _fields(slab, stress=np.zeros((3, 3))),
      3: _fields(atoms, stress=np.zeros((2, 3, 3)))})
  reader = LmdbReader(path)
  assert re.search(r"bad.lmdb, entry '0': stress has shape \(4,\), "
                   r"expected \(3, 3\)", _entry_error(reader[0]))
  assert "entry '1': stress target contains NaN" in _entry_error(reader[1])
  # A slab's stress (ASE calculators give one) has no volume: left out,
  # with a warning naming the file.
  with pytest.warns(StressIgnoredWarning, match=r"bad.lmdb: stress left out"):
    assert reader[2].stress is None
  assert "entry '3': stress has shape (2, 3, 3)" in _entry_error(reader[3])
  virials = _lmdb(tmp_path / "virial.lmdb", {
      0: _fields(slab, virial=np.eye(3)),
      1: _fields(atoms, virial=np.eye(2))})
  with pytest.warns(StressIgnoredWarning, match=r"virial.lmdb: stress left"):
    assert LmdbReader(virials)[0].stress is None
  with pytest.raises(DataError, match=r"entry '1': virial has shape \(2, 2\)"):
    LmdbReader(virials)[1]
  # The converter stops on such an entry, naming it.
  with pytest.raises(DataError, match=r"bad.lmdb, entry '0': stress has "
                     r"shape \(4,\)"):
    converter.convert([f"train={path}"], tmp_path / "out", task="s2ef",
                      workers=1, progress=False)


def _records(folder, split):
  from array_record.python import array_record_module
  out = []
  for name in sorted(os.listdir(folder)):
    if f"-{split}.array_record-" in name:
      reader = array_record_module.ArrayRecordReader(str(folder / name))
      out += reader.read(list(range(reader.num_records())))
      reader.close()
  return out


def test_dataset_with_stress(tmp_path):
  """Metadata, features, stored values and statistics of a dataset with
  stress; its test split, without targets, stores NaN stress."""
  frames = [_strained(seed) for seed in range(6)]
  ase.io.write(tmp_path / "train.extxyz", frames)
  plain = [bulk("Ni", "fcc", a=3.5 + 0.01 * k) * (2, 1, 1) for k in range(3)]
  ase.io.write(tmp_path / "test.extxyz", plain)
  # Two shards per split: the test split's are rewritten one by one.
  converter.convert([f"train={tmp_path / 'train.extxyz'}",
                     f"test={tmp_path / 'test.extxyz'}"], tmp_path / "ds",
                    task="s2ef", workers=1, progress=False,
                    examples_per_shard=2)
  data = Dataset(str(tmp_path / "ds"))
  assert data.has_stress
  splits = data.metadata["splits"]
  assert splits["train"]["targets"] == {"energy": True, "forces": True,
                                        "stress": True}
  assert splits["test"]["targets"] == {"energy": False, "forces": False}
  train, test = data.split("train"), data.split("test")
  assert train.has_stress and not test.has_stress
  features = json.loads((tmp_path / "ds" / "features.json").read_text())
  assert "stress" in json.dumps(features)
  sigma = np.array([a.get_stress(voigt=False) for a in frames])
  for i in range(len(frames)):
    ex = train.source[i]
    assert ex["stress"].dtype == np.float32 and ex["stress"].shape == (3, 3)
    np.testing.assert_array_equal(ex["stress"], sigma[i].astype(np.float32))
  assert train.statistics["stress_rms"] == pytest.approx(
      np.sqrt(np.mean(sigma.astype(np.float32).astype(np.float64) ** 2)),
      rel=1e-12)
  assert test.statistics["stress_rms"] is None
  assert all(np.isnan(test.source[i]["stress"]).all() for i in range(3))
  # The test split's records, written without stress and given a NaN one,
  # are what a serializer with stress writes.
  serialize = schema.Serializer("s2ef", stress=True)
  want = [serialize(GraphSpec().stored_example(s, "s2ef", stress=True))
          for s in AseReader(str(tmp_path / "test.extxyz"))]
  assert _records(tmp_path / "ds", "test") == want
  assert data.builder.info.splits["test"].num_bytes == sum(map(len, want))
  assert data.builder.info.splits["test"].shard_lengths == [2, 1]
  assert [len(r) for r in _records(tmp_path / "ds", "train")] == [
      len(schema.Serializer("s2ef", stress=True)(
          GraphSpec().stored_example(t, "s2ef", stress=True)))
      for t in AseReader(str(tmp_path / "train.extxyz"))]


def test_dataset_without_stress_is_unchanged(tmp_path):
  """No stress anywhere: records without a stress feature, byte for byte
  those of a serializer without it, and metadata without stress."""
  frames = [bulk("Cu", "fcc", a=3.6 + 0.01 * k) * (2, 1, 1)
            for k in range(4)]
  for atoms in frames:
    atoms.calc = EMT()
    atoms.calc = SinglePointCalculator(
        atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
  ase.io.write(tmp_path / "a.extxyz", frames)
  assert "stress" not in (tmp_path / "a.extxyz").read_text()
  converter.convert([f"train={tmp_path / 'a.extxyz'}"], tmp_path / "ds",
                    task="s2ef", workers=1, progress=False)
  serialize = schema.Serializer("s2ef")
  want = [serialize(GraphSpec().stored_example(s, "s2ef"))
          for s in AseReader(str(tmp_path / "a.extxyz"))]
  assert _records(tmp_path / "ds", "train") == want
  features = (tmp_path / "ds" / "features.json").read_text()
  assert "stress" not in features
  data = Dataset(str(tmp_path / "ds"))
  assert not data.has_stress
  assert data.metadata["splits"]["train"]["targets"] == {"energy": True,
                                                        "forces": True}
  split = data.split("train")
  assert split.has_stress is False and "stress" not in split.source[0]
  assert split.statistics["stress_rms"] is None
  # A dataset converted before stress existed lists no stress_rms.
  path = tmp_path / "ds" / "metadata.json"
  metadata = json.loads(path.read_text())
  del metadata["splits"]["train"]["statistics"]["stress_rms"]
  path.write_text(json.dumps(metadata))
  split = Dataset(str(tmp_path / "ds")).split("train")
  assert split.statistics["stress_rms"] is None and not split.has_stress


def test_stress_must_agree_within_a_split(tmp_path):
  atoms = [_strained(seed) for seed in range(5)]
  values = {i: _fields(a, stress=a.get_stress(voigt=False))
            for i, a in enumerate(atoms)}
  values[2] = _fields(atoms[2])
  path = _lmdb(tmp_path / "a.lmdb", values)
  with pytest.raises(DataError, match=r"entry '2'.*carries targets "
                     r"\['energy', 'forces'\] but most entries of split "
                     r"'train' carry \['energy', 'forces', 'stress'\]"):
    converter.convert([f"train={path}"], tmp_path / "out", task="s2ef",
                      workers=1, progress=False)
  summary = converter.convert([f"train={path}"], tmp_path / "out",
                              task="s2ef", workers=1, skip_bad=True,
                              progress=False)
  assert summary.counts == {"train": 4} and summary.skipped == 1
  split = Dataset(str(tmp_path / "out")).split("train")
  assert split.has_stress and split.targets["stress"]
  assert np.isfinite(split.source[2]["stress"]).all()
