"""`python -m matsci_jax.predict`: tables and OC20 submission files."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tracemalloc

import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from matsci_jax import checkpoints, predict
from matsci_jax.ase import Calculator
from matsci_jax.data import readers
from matsci_jax.data.lmdb_reader import LmdbReader
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


def _lmdb_with_a_bad_entry(shared_data, tmp_path):
  """A copy of the OC20 S2EF toy LMDB whose entry "50" is not a pickle."""
  folder = tmp_path / "input"
  folder.mkdir()
  shard = folder / "data.0000.lmdb"
  # A plain copy: the fixture files are read-only.
  shutil.copyfile(shared_data / "oc20_s2ef_toy" / "noedges" / shard.name,
                  shard)
  env = lmdb.open(str(shard), subdir=False, lock=False)
  with env.begin(write=True) as txn:
    assert txn.replace(b"50", b"not a pickle") is not None
  env.close()
  return folder, shard


def _run_predict(*args):
  return subprocess.run([sys.executable, "-m", "matsci_jax.predict", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_bad_entry_stops_the_command_and_leaves_no_output(
    trained_s2ef, shared_data, tmp_path):
  folder, shard = _lmdb_with_a_bad_entry(shared_data, tmp_path)
  run = _run_predict(f"--checkpoint={trained_s2ef}", f"--input={folder}",
                     f"--output={tmp_path / 'pred.csv'}",
                     f"--submission={tmp_path / 'sub.npz'}", "--batch_size=8")
  assert run.returncode != 0
  error = run.stderr.strip().splitlines()[-1]
  assert error.startswith(f"bad input: {shard}, entry '50': cannot decode "
                          "value"), error
  assert "--skip-bad" in error
  # Neither the outputs nor their temporary files remain.
  assert sorted(os.listdir(tmp_path)) == ["input"]


def test_skip_bad_predicts_every_other_entry_and_lists_the_bad_one(
    trained_s2ef, shared_data, tmp_path):
  folder, shard = _lmdb_with_a_bad_entry(shared_data, tmp_path)
  out, sub = tmp_path / "pred.csv", tmp_path / "sub.npz"
  run = _run_predict(f"--checkpoint={trained_s2ef}", f"--input={folder}",
                     f"--output={out}", f"--submission={sub}",
                     "--batch_size=8", "--skip-bad")
  assert run.returncode == 0, run.stderr[-3000:]
  skipped_file = tmp_path / "pred.skipped.jsonl"
  assert f"skipped 1 bad entry, listed in {skipped_file}" in run.stdout
  assert sorted(os.listdir(tmp_path)) == [
      "input", "pred.csv", "pred.skipped.jsonl", "sub.npz"]
  skipped = [json.loads(line) for line in open(skipped_file)]
  assert len(skipped) == 1
  assert skipped[0]["file"] == str(shard) and skipped[0]["key"] == "50"
  assert skipped[0]["problem"].startswith("cannot decode value")
  reader = readers.open_readers(str(folder))[0]
  good = [reader[i] for i in range(len(reader)) if reader.key(i)[1] != "50"]
  rows = list(csv.DictReader(open(out)))
  assert len(rows) == len(good) == 100
  assert [r["id"] for r in rows] == [f"{s.sid}_{s.fid}" for s in good]
  assert [r["entry"] for r in rows] == [str(s.source[1]) for s in good]
  arrays = dict(np.load(sub))
  check_s2ef_submission(arrays, [s.fixed for s in good])
  assert list(arrays["ids"]) == [r["id"] for r in rows]


def _cu_cells(n, unseen_at=()):
  """n 4-atom Cu cells (OC20 ids k_0); Fe in place of one Cu at the
  positions in `unseen_at`."""
  from ase.build import bulk

  from matsci_jax.data.ase_reader import structure_from_atoms
  for k in range(n):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.02, seed=k)
    if k in unseen_at:
      atoms.numbers[0] = 26
    yield structure_from_atoms(atoms, "cells.extxyz", k, sid=k, fid=0)


def test_streamed_outputs_equal_the_in_memory_predictions(
    trained_s2ef, tmp_path, monkeypatch):
  trained = checkpoints.load(trained_s2ef)
  # Several Parquet row groups, the last one short.
  monkeypatch.setattr(predict, "_ROWS_PER_GROUP", 16)
  out, sub = str(tmp_path / "pred.parquet"), str(tmp_path / "sub.npz")
  summary = predict.predict_to_files(
      trained, _cu_cells(45, unseen_at=(7, 30)), out, sub, batch_size=8,
      strict=True, skip_bad=True)
  good = [s for s in _cu_cells(45) if s.sid not in (7, 30)]
  rows, arrays = predict.predict(trained, good, batch_size=8)
  assert summary == {"predicted": 43, "skipped": 2,
                     "skipped_file": str(tmp_path / "pred.skipped.jsonl")}
  skipped = [json.loads(line) for line in open(summary["skipped_file"])]
  assert [(s["file"], s["key"]) for s in skipped] == [
      ("cells.extxyz", 7), ("cells.extxyz", 30)]
  assert all("Z=[26]" in s["problem"] for s in skipped)
  assert pq.ParquetFile(out).num_row_groups == 3
  table = pq.read_table(out).to_pydict()
  assert list(table) == list(rows[0])
  for key, column in table.items():  # NaN targets: compared as equal.
    np.testing.assert_array_equal(column, [r[key] for r in rows], key)
  streamed = dict(np.load(sub))
  assert list(streamed) == list(arrays) == ["ids", "energy", "forces",
                                            "chunk_idx"]
  for key, value in arrays.items():
    assert streamed[key].dtype == value.dtype, key
    np.testing.assert_array_equal(streamed[key], value, err_msg=key)
  assert sorted(os.listdir(tmp_path)) == ["pred.parquet",
                                          "pred.skipped.jsonl", "sub.npz"]


def test_prediction_memory_does_not_grow_with_the_structures(
    trained_s2ef, tmp_path, monkeypatch):
  """The streaming loop holds no per-structure state: the traced peak for
  1280 structures is that for 64, within 50 bytes a structure (holding
  the rows and arrays, as the command did, costs about 400)."""
  trained = checkpoints.load(trained_s2ef)
  # Blocks that both sizes fill: assembling the .npz reads its temporary
  # files in blocks, whose memory grows with the input up to their size.
  monkeypatch.setattr(predict, "_BLOCK", 16)
  out, sub = str(tmp_path / "pred.csv"), str(tmp_path / "sub.npz")
  # Same-sized cells in full batches: one shape, compiled here.
  predict.predict_to_files(trained, _cu_cells(32), out, sub)
  peaks = {}
  for n in (64, 1280):
    tracemalloc.start()
    try:
      base = tracemalloc.get_traced_memory()[0]
      predict.predict_to_files(trained, _cu_cells(n), out, sub)
      peaks[n] = tracemalloc.get_traced_memory()[1] - base
    finally:
      tracemalloc.stop()
  assert len(np.load(sub)["ids"]) == 1280
  assert peaks[1280] - peaks[64] < 50 * (1280 - 64), peaks


def test_a_model_of_several_sources_predicts_the_chosen_one(
    trained_multi, shared_data, tmp_path):
  lips = shared_data / "matsciml_lips_devset"
  run = _run_predict(f"--checkpoint={trained_multi}", f"--input={lips}",
                     f"--output={tmp_path / 'none.csv'}")
  assert run.returncode != 0
  assert "pass --source to choose one" in run.stderr
  outputs = {}
  for source in ("lips", "slabs"):
    out = tmp_path / f"{source}.csv"
    run = _run_predict(f"--checkpoint={trained_multi}", f"--input={lips}",
                       f"--output={out}", f"--source={source}")
    assert run.returncode == 0, run.stderr
    outputs[source] = np.array([float(r["energy"]) for r in
                                csv.DictReader(open(out))])
  # Each source's energies have their own zero (LiPS: DFT, about -2,000
  # eV per cell, which only the LiPS references give).
  reader = LmdbReader(str(lips))
  truth = np.array([reader[i].energy for i in range(len(reader))])
  assert (np.abs(outputs["lips"] - truth).mean()
          < np.abs(outputs["slabs"] - truth).mean())


def test_edges_split_over_two_devices_predict_the_same(trained_s2ef,
                                                       tmp_path):
  """`--devices 2 --edge-chunk`: each batch's edges over two (simulated)
  devices, in chunks; the same numbers as one device, one pass."""
  trained = checkpoints.load(trained_s2ef)
  raw = os.path.join(os.path.dirname(trained.dataset), "raw",
                     "s2ef_val.extxyz")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  tables = {}
  for name, extra in (("one", []), ("split", ["--devices=2",
                                              "--edge-chunk=300"]),
                      ("too_many", ["--devices=3"])):
    out = tmp_path / f"{name}.csv"
    run = subprocess.run(
        [sys.executable, "-m", "matsci_jax.predict",
         f"--checkpoint={trained_s2ef}", f"--input={raw}", f"--output={out}",
         f"--submission={tmp_path / name}.npz", "--batch_size=4", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    if name == "too_many":
      assert run.returncode != 0
      assert "--devices=3, but 2 CPU device(s) are present" in run.stderr
      continue
    assert run.returncode == 0, run.stderr[-3000:]
    tables[name] = ([float(r["energy"]) for r in csv.DictReader(open(out))],
                    np.load(tmp_path / f"{name}.npz")["forces"])
  (e1, f1), (e2, f2) = tables["one"], tables["split"]
  assert len(e1) >= 8
  np.testing.assert_allclose(e2, e1, rtol=1e-5)
  assert np.linalg.norm(f2 - f1) < 1e-5 * np.linalg.norm(f1)
