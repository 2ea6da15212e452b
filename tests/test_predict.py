"""`python -m matsci_jax.predict`: tables and OC20 submission files."""

import csv
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from matsci_jax import checkpoints, predict
from matsci_jax.ase import Calculator
from matsci_jax.data import readers
from tests.conftest import REPO


def check_s2ef_submission(arrays, fixed_per_structure):
  """OC20 S2EF layout: ids, energy, free-atom forces, chunk boundaries."""
  assert set(arrays) == {"ids", "energy", "forces", "chunk_idx"}
  n = len(arrays["ids"])
  assert arrays["energy"].shape == (n,)
  free = [int((~fixed).sum()) for fixed in fixed_per_structure]
  assert arrays["forces"].shape == (sum(free), 3)
  np.testing.assert_array_equal(arrays["chunk_idx"], np.cumsum(free)[:-1])
  assert len(np.split(arrays["forces"], arrays["chunk_idx"])) == n
  assert np.isfinite(arrays["energy"]).all()
  assert np.isfinite(arrays["forces"]).all()


def test_predict_command_on_an_oc20_lmdb(trained_s2ef, shared_data,
                                         tmp_path):
  lmdb = shared_data / "oc20_s2ef_toy" / "noedges"
  out, sub = tmp_path / "pred.csv", tmp_path / "sub.npz"
  run = subprocess.run(
      [sys.executable, "-m", "matsci_jax.predict",
       f"--checkpoint={trained_s2ef}", f"--input={lmdb}", f"--output={out}",
       f"--submission={sub}", "--batch_size=8"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = list(csv.DictReader(open(out)))
  structures = [s for r in readers.open_readers(str(lmdb))
                for s in (r[i] for i in range(len(r)))]
  assert len(rows) == len(structures) == 101
  assert [r["id"] for r in rows] == [f"{s.sid}_{s.fid}" for s in structures]
  assert [int(r["num_atoms"]) for r in rows] == [s.num_atoms
                                                  for s in structures]
  np.testing.assert_allclose([float(r["target_energy"]) for r in rows],
                             [s.energy for s in structures], rtol=1e-6)
  arrays = dict(np.load(sub))
  check_s2ef_submission(arrays, [s.fixed for s in structures])
  assert list(arrays["ids"]) == [r["id"] for r in rows]
  # The batched predictions equal the calculator's on single structures.
  calc = Calculator(checkpoints.load(trained_s2ef))
  for i in (0, 57):
    atoms = structures[i].to_atoms()
    atoms.calc = calc
    assert float(rows[i]["energy"]) == pytest.approx(
        atoms.get_potential_energy(), abs=1e-4)
    free = ~structures[i].fixed
    start = int(np.concatenate([[0], arrays["chunk_idx"]])[i])
    np.testing.assert_allclose(
        arrays["forces"][start:start + free.sum()],
        atoms.get_forces(apply_constraint=False)[free], atol=1e-4)


def test_predict_with_relaxation_to_parquet(trained_s2ef, tmp_path):
  trained = checkpoints.load(trained_s2ef)
  raw = os.path.join(os.path.dirname(trained.dataset), "raw",
                     "is2re_train.extxyz")
  structures = list(predict.read_structures([raw]))[:3]
  rows, arrays = predict.predict(trained, structures, batch_size=2,
                                 relaxation=dict(fmax=0.05, steps=400))
  assert [r["id"] for r in rows] == [str(s.sid) for s in structures]
  assert all(r["converged"] and r["relaxed_fmax"] < 0.05 for r in rows)
  assert all(r["relaxed_energy"] < r["energy"] for r in rows)
  assert set(arrays) == {"ids", "energy", "positions", "chunk_idx"}
  counts = [s.num_atoms for s in structures]
  assert arrays["positions"].shape == (sum(counts), 3)
  np.testing.assert_array_equal(arrays["chunk_idx"], np.cumsum(counts)[:-1])
  for s, pos in zip(structures, np.split(arrays["positions"],
                                         arrays["chunk_idx"])):
    np.testing.assert_allclose(pos[s.fixed], s.positions[s.fixed], atol=1e-5)
  path = str(tmp_path / "relaxed.parquet")
  predict.write_table(rows, path)
  table = pq.read_table(path).to_pylist()
  assert [r["id"] for r in table] == [r["id"] for r in rows]
  assert not os.path.exists(path + ".partial")
  with pytest.raises(ValueError, match=".csv or .parquet"):
    predict.write_table(rows, str(tmp_path / "x.txt"))


def test_strict_stops_at_an_unseen_element(trained_s2ef):
  from ase.build import bulk

  from matsci_jax.data.ase_reader import structure_from_atoms
  trained = checkpoints.load(trained_s2ef)
  atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
  atoms.numbers[0] = 26
  structures = [structure_from_atoms(atoms, "fe.extxyz", 3)]
  with pytest.raises(checkpoints.UnseenElementError,
                     match=r"Z=\[26\] in fe.extxyz, entry 3"):
    predict.predict(trained, structures, strict=True)
  with pytest.warns(checkpoints.UnseenElementWarning):
    rows, _ = predict.predict(trained, structures)
  assert len(rows) == 1 and np.isfinite(rows[0]["energy"])
