"""The converter: round trip, splits, statistics, and every bad-input error."""

import errno
import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import lmdb
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ase.build import add_adsorbate, fcc100
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from data_prep import convert as convert_cli
from matsci_jax.data import converter
from matsci_jax.data.dataset_io import Dataset, DatasetError
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.data.lmdb_reader import LmdbReader
from matsci_jax.data.neighbors import neighbor_list
from matsci_jax.data.structure import DataError


def test_round_trip_of_oc20_lmdb(shared_data, tmp_path):
  src = shared_data / "oc20_s2ef_toy/edges"
  out = tmp_path / "ds"
  summary = converter.convert([f"train={src}"], out, task="s2ef", workers=2,
                              progress=False)
  assert summary.counts == {"train": 101} and summary.skipped == 0
  # tfds itself opens it, with no TensorFlow.
  source = tfds.builder_from_directory(str(out)).as_data_source("train")
  assert len(source) == 101
  reader = LmdbReader(str(src))
  for i in (0, 50, 100):
    ex, s = source[i], reader[i]
    assert np.array_equal(ex["positions"], s.positions.astype(np.float32))
    assert np.array_equal(ex["forces"], s.forces.astype(np.float32))
    assert ex["energy"] == np.float32(s.energy)
    assert np.array_equal(ex["atomic_numbers"], s.atomic_numbers)
    assert (np.array_equal(ex["fixed"], s.fixed)
            and np.array_equal(ex["tags"], s.tags))
    assert (ex["sid"], ex["fid"]) == (s.sid, s.fid)
    edges = neighbor_list(s.positions, s.cell, s.pbc, 6.0, 50)
    assert np.array_equal(ex["senders"], edges.senders)
    assert np.array_equal(ex["cell_shifts"], edges.cell_shifts)
    assert ex["cell_shifts"].dtype == np.int8
  assert "tensorflow" not in sys.modules


def test_metadata_and_statistics(shared_data, tmp_path):
  src = shared_data / "matsciml_lips_devset"
  out = tmp_path / "lips"
  spec = GraphSpec(cutoff=5.0, max_neighbors=0)
  converter.convert([str(src)], out, task="s2ef", workers=1, val_fraction=0.2,
                    split_seed=3, progress=False, graph_spec=spec)
  ds = Dataset(str(out))
  assert ds.task == "s2ef" and ds.cutoff == 5.0 and ds.max_neighbors is None
  assert sorted(ds.splits) == ["train", "val"]
  train, val = ds.split("train"), ds.split("val")
  assert len(train) == 160 and len(val) == 40
  stats = train.statistics
  energies = np.array([train.source[i]["energy"] for i in range(len(train))],
                      np.float64)
  np.testing.assert_allclose(stats["energy"]["mean"], energies.mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(stats["energy"]["std"], energies.std(), rtol=1e-4)
  forces = np.concatenate([train.source[i]["forces"]
                           for i in range(len(train))])
  np.testing.assert_allclose(stats["force_rms"],
                             np.sqrt((forces.astype(np.float64) ** 2).mean()),
                             rtol=1e-6)
  assert stats["atoms_histogram"] == {"values": [83], "counts": [160]}
  assert sum(stats["edges_histogram"]["counts"]) == 160
  assert train.sizes.shape == (160, 2) and (train.sizes[:, 0] == 83).all()
  assert train.targets == {"energy": True, "forces": True}
  # One stoichiometry: the elemental fit reproduces the mean energy.
  refs = stats["energy"]["element_references"]
  counts = {3: 27, 15: 12, 16: 44}
  fit = sum(refs[str(z)] * c for z, c in counts.items())
  assert abs(fit - energies.mean()) < 1e-3
  # Seeded split: the same seed gives the same split.
  out2 = tmp_path / "lips2"
  converter.convert([str(src)], out2, task="s2ef", workers=2,
                    val_fraction=0.2, split_seed=3, progress=False,
                    graph_spec=spec)
  val2 = Dataset(str(out2)).split("val")
  assert [float(val.source[i]["energy"]) for i in range(40)] == [
      float(val2.source[i]["energy"]) for i in range(40)]


def test_reference_energy_fit_recovers_known_references(tmp_path):
  """Energies built from known per-element references are fitted exactly."""
  refs = {1: -3.4, 8: -7.1, 29: -4.0}
  rng = np.random.default_rng(0)
  frames = []
  import ase
  for _ in range(30):
    counts = {z: int(rng.integers(1, 6)) for z in refs}
    numbers = [z for z, c in counts.items() for _ in range(c)]
    atoms = ase.Atoms(numbers=numbers,
                      positions=rng.uniform(0, 8, (len(numbers), 3)),
                      cell=np.eye(3) * 8, pbc=True)
    energy = sum(refs[z] * c for z, c in counts.items())
    from ase.calculators.singlepoint import SinglePointCalculator
    atoms.calc = SinglePointCalculator(atoms, energy=energy,
                                       forces=np.zeros((len(numbers), 3)))
    frames.append(atoms)
  import ase.io
  ase.io.write(tmp_path / "f.extxyz", frames)
  converter.convert([f"train={tmp_path / 'f.extxyz'}"], tmp_path / "ds",
                    task="s2ef", workers=1, progress=False)
  fit = Dataset(str(tmp_path / "ds")).split("train").statistics["energy"]
  for z, r in refs.items():
    assert abs(fit["element_references"][str(z)] - r) < 1e-6
  assert fit["residual_std"] < 1e-5


def test_is2re_conversion_keeps_relaxed_targets(shared_data, tmp_path):
  converter.convert([f"train={shared_data / 'oc20_is2re_toy'}"],
                    tmp_path / "is", task="is2re", workers=1, progress=False)
  split = Dataset(str(tmp_path / "is")).split("train")
  ex = split.source[3]
  assert ex["energy_relaxed"] == np.float32(-3.2182456713414496)
  assert ex["positions_relaxed"].shape == (38, 3)
  assert split.targets["energy_relaxed"] and split.targets["positions_relaxed"]
  assert "energy_relaxed" in split.statistics


def test_test_split_without_targets(tmp_path):
  atoms = fcc100("Cu", (2, 2, 2), vacuum=5.0)
  atoms.pbc = True
  import ase.io
  ase.io.write(tmp_path / "test.extxyz", [atoms, atoms])
  converter.convert([f"test={tmp_path / 'test.extxyz'}"], tmp_path / "ds",
                    task="s2ef", workers=1, progress=False)
  split = Dataset(str(tmp_path / "ds")).split("test")
  assert split.targets == {"energy": False, "forces": False}
  assert np.isnan(split.source[0]["energy"])
  assert split.statistics["energy"] is None


# --- bad input -------------------------------------------------------------


def _lmdb(path, values):
  env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
  with env.begin(write=True) as txn:
    for k, v in values.items():
      txn.put(str(k).encode(), v)
  env.close()
  return path


def _good(n=4, seed=0, **overrides):
  rng = np.random.default_rng(seed)
  fields = {"pos": rng.uniform(0, 6, (n, 3)).astype(np.float32),
            "atomic_numbers": np.full(n, 29, np.int64),
            "cell": (np.eye(3) * 6).astype(np.float32),
            "energy": np.float64(-1.0 - seed),
            "forces": np.zeros((n, 3), np.float32)}
  fields.update(overrides)
  return pickle.dumps({k: v for k, v in fields.items() if v is not None})


BAD_ENTRIES = {
    "undecodable": (b"\x80\x04not a pickle", r"cannot decode value"),
    "missing_field": (_good(atomic_numbers=None),
                      r"required field 'atomic_numbers' is missing"),
    "nan_positions": (_good(pos=np.full((4, 3), np.nan, np.float32)),
                      r"positions contain NaN or inf"),
    "inf_positions": (_good(pos=np.array([[0, 0, np.inf]] * 4, np.float32)),
                      r"positions contain NaN or inf"),
    "bad_atomic_number": (_good(atomic_numbers=np.array([29, 29, 0, 29])),
                          r"atomic number 0 of atom 2 is outside 1..118"),
    "huge_atomic_number": (_good(atomic_numbers=np.array([29, 119, 29, 29])),
                           r"atomic number 119 of atom 1 is outside 1..118"),
    "singular_cell": (_good(cell=np.array([[6, 0, 0], [12, 0, 0], [0, 0, 6]],
                                          np.float32)),
                      r"cell is singular"),
    "foreign_global": (pickle.dumps(os.getcwd), r"refusing to load global"),
    "nan_energy": (_good(energy=np.float64(np.nan)), r"energy target is nan"),
    "inf_forces": (_good(forces=np.full((4, 3), np.inf, np.float32)),
                   r"forces target contains NaN or inf"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES))
def test_bad_entry_stops_with_file_key_and_problem(tmp_path, kind):
  value, problem = BAD_ENTRIES[kind]
  path = _lmdb(tmp_path / "data.0000.lmdb", {0: _good(seed=0), 1: _good(seed=1),
                                              7: value, 9: _good(seed=2)})
  out = tmp_path / "out"
  with pytest.raises(DataError) as err:
    converter.convert([f"train={path}"], out, task="s2ef", workers=1,
                      progress=False)
  message = str(err.value)
  assert "data.0000.lmdb" in message and "entry '7'" in message
  assert __import__("re").search(problem, message), message
  assert "--skip-bad" in message
  # Nothing half-written.
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_skip_bad_skips_and_lists_entries(tmp_path):
  values = {i: _good(seed=i) for i in range(6)}
  values[2] = BAD_ENTRIES["nan_positions"][0]
  values[4] = BAD_ENTRIES["undecodable"][0]
  path = _lmdb(tmp_path / "data.lmdb", values)
  summary = converter.convert([f"train={path}"], tmp_path / "out",
                              task="s2ef", workers=1, skip_bad=True,
                              progress=False)
  assert summary.counts == {"train": 4} and summary.skipped == 2
  rows = [json.loads(line)
          for line in open(tmp_path / "out" / "skipped.jsonl")]
  assert [(r["key"], r["split"]) for r in rows] == [("2", "train"),
                                                    ("4", "train")]
  assert "NaN" in rows[0]["problem"] and "decode" in rows[1]["problem"]
  assert Dataset(str(tmp_path / "out")).metadata["skipped"] == 2


def test_inconsistent_targets_within_a_split(tmp_path):
  path = _lmdb(tmp_path / "data.lmdb", {0: _good(seed=0),
                                        1: _good(seed=1, forces=None)})
  with pytest.raises(DataError,
                     match=r"entry '1'.*carries targets \['energy'\]"):
    converter.convert([f"train={path}"], tmp_path / "out", task="s2ef",
                      workers=1, progress=False)


def test_majority_decides_a_splits_targets(tmp_path):
  """The first entry lacks forces, the five after it have them: the first
  is the odd one out, whatever its position."""
  values = {i: _good(seed=i) for i in range(1, 6)}
  values[0] = _good(seed=0, forces=None)
  path = _lmdb(tmp_path / "data.lmdb", values)
  with pytest.raises(DataError,
                     match=r"entry '0'.*carries targets \['energy'\]"):
    converter.convert([f"train={path}"], tmp_path / "out", task="s2ef",
                      workers=1, progress=False)
  summary = converter.convert([f"train={path}"], tmp_path / "out",
                              task="s2ef", workers=1, skip_bad=True,
                              progress=False)
  assert summary.counts == {"train": 5} and summary.skipped == 1
  targets = Dataset(str(tmp_path / "out")).metadata["splits"]["train"][
      "targets"]
  assert targets == {"energy": True, "forces": True}


def test_existing_output_needs_overwrite(shared_data, tmp_path):
  src = shared_data / "oc20_is2re_toy"
  out = tmp_path / "out"
  converter.convert([f"train={src}"], out, task="s2ef", workers=1,
                    progress=False)
  with pytest.raises(FileExistsError, match="--overwrite"):
    converter.convert([f"train={src}"], out, task="s2ef", workers=1,
                      progress=False)
  converter.convert([f"val={src}"], out, task="s2ef", workers=1,
                    progress=False, overwrite=True)
  assert Dataset(str(out)).splits == ["val"]
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
  path = _lmdb(tmp_path / "data.lmdb",
               {0: _good(), 3: BAD_ENTRIES["singular_cell"][0]})
  code = convert_cli.main(["--input", f"train={path}", "--output",
                           str(tmp_path / "out"), "--task", "s2ef",
                           "--workers", "1", "--no-progress"])
  assert code == 2
  err = capsys.readouterr().err
  assert (err.startswith("error: ")
          and "data.lmdb, entry '3': cell is singular" in err)


@pytest.mark.parametrize("flags,message", [
    (["--max-neighbors", "-5"], "max_neighbors must be >= 0"),
    (["--cutoff", "0"], "cutoff must be positive"),
    (["--cutoff", "-1"], "cutoff must be positive"),
    (["--representation", "point_cloud", "--pc-neighbors", "0"],
     "num_neighbors >= 1"),
    (["--val-fraction", "1.5"], r"val fraction must be in \[0, 1\)"),
    (["--val-fraction", "0.6", "--test-fraction", "0.4"],
     "leave no training structures"),
    (["--workers", "-1"], "workers must be >= 0"),
    (["--examples-per-shard", "0"], "examples per shard must be at least 1"),
    (["--ase-format", "xyzz"], "ASE has no file format 'xyzz'"),
])
def test_cli_checks_settings_before_reading_data(tmp_path, capsys, flags,
                                                 message):
  """The input does not exist: a settings error must come first."""
  code = convert_cli.main(["--input", str(tmp_path / "nothing.extxyz"),
                           "--output", str(tmp_path / "out"), "--task",
                           "s2ef", "--no-progress", *flags])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: "), err
  assert re.search(message, err), err
  assert not (tmp_path / "out").exists()


def test_corrupt_dataset_folder_is_reported(tmp_path):
  (tmp_path / "ds").mkdir()
  (tmp_path / "ds" / "metadata.json").write_text("{}")
  with pytest.raises(DatasetError, match="missing dataset_info.json"):
    Dataset(str(tmp_path / "ds"))
  with pytest.raises(DatasetError, match="no such dataset folder"):
    Dataset(str(tmp_path / "nope"))


def test_ase_inputs_with_constraints_and_tags(tmp_path):
  import ase.io
  frames = []
  for k in range(3):
    slab = fcc100("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.6 + 0.1 * k, "hollow")
    slab.pbc = True
    tags = np.where(slab.get_tags() == 0, 2,
                    np.where(slab.get_tags() == 1, 1, 0))
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.calc = EMT()
    slab.get_forces()
    frames.append(slab)
  ase.io.write(tmp_path / "frames.extxyz", frames)
  converter.convert([f"train={tmp_path / 'frames.extxyz'}"], tmp_path / "ds",
                    task="s2ef", workers=1, progress=False)
  split = Dataset(str(tmp_path / "ds")).split("train")
  for k in range(3):
    ex = split.source[k]
    assert np.array_equal(ex["fixed"], frames[k].get_tags() == 0)
    assert np.array_equal(ex["tags"], frames[k].get_tags())
    np.testing.assert_allclose(ex["energy"], frames[k].get_potential_energy(),
                               rtol=1e-6)
    np.testing.assert_allclose(
        ex["forces"], frames[k].get_forces(apply_constraint=False), atol=1e-5)


def test_bad_ase_frame_is_named_and_skipped_alone(tmp_path):
  import ase.io
  from ase.build import bulk
  frames = []
  for _ in range(10):
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    atoms.calc = EMT()
    atoms.get_forces()
    frames.append(atoms)
  path = tmp_path / "f.extxyz"
  ase.io.write(path, frames)
  lines = path.read_text().split("\n")
  lines[3 * 4 + 2] = "Cu 0.0 abc 0.0 0.0 0.0 0.0"  # Frame 3, first atom.
  path.write_text("\n".join(lines))
  with pytest.raises(DataError, match=r"f.extxyz, entry 3: ASE cannot read"):
    converter.convert([f"train={path}"], tmp_path / "a", task="s2ef",
                      workers=1, progress=False)
  summary = converter.convert([f"train={path}"], tmp_path / "b", task="s2ef",
                              workers=1, progress=False, skip_bad=True)
  assert summary.counts == {"train": 9} and summary.skipped == 1


def test_damaged_lmdb_names_the_file(tmp_path):
  path = _lmdb(tmp_path / "data.0000.lmdb",
               {i: _good(seed=i) for i in range(50)})
  data = bytearray(path.read_bytes())
  for k in range(8192, len(data), 4096):  # Wreck every page header.
    data[k:k + 16] = b"\xff" * 16
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match=r"data.0000.lmdb.*damaged|"
                     r"data.0000.lmdb.*cannot"):
    converter.convert([f"train={path}"], tmp_path / "out", task="s2ef",
                      workers=1, progress=False)


def test_truncated_lmdb_is_named_not_a_crash(shared_data, tmp_path):
  """An interrupted copy: the process must survive (a bus error killed it)
  and the error must name the file, from the command line too."""
  src = shared_data / "oc20_s2ef_toy" / "noedges"
  shard = sorted(src.glob("*.lmdb"))[0]
  cut = tmp_path / "s2ef" / shard.name
  cut.parent.mkdir()
  cut.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  code = subprocess.run(
      [sys.executable, "-m", "data_prep.convert", "--input",
       f"train={cut.parent}", "--output", str(tmp_path / "out"), "--task",
       "s2ef", "--workers", "1", "--no-progress"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert code.returncode == 2, code.stderr[-2000:]
  assert re.search(rf"error: {re.escape(str(cut))}.*truncated", code.stderr)
  assert not (tmp_path / "out").exists()


def _descendants(pid):
  found, todo = [], [pid]
  while todo:
    p = todo.pop()
    for task in glob.glob(f"/proc/{p}/task/*/children"):
      try:
        kids = [int(k) for k in open(task).read().split()]
      except OSError:
        continue
      found += kids
      todo += kids
  return found


def _alive(pid):
  try:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] \
        != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_conversion_leaves_no_workers_or_partial_folder(tmp_path,
                                                               sig):
  import ase.io
  from ase.build import bulk
  rng = np.random.default_rng(0)
  frames = []
  for _ in range(3000):  # About 10 s of work: killed well before the end.
    atoms = bulk("Cu", "fcc", a=3.6) * (4, 4, 4)
    atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
    frames.append(atoms)
  ase.io.write(tmp_path / "big.extxyz", frames)
  proc = subprocess.Popen(
      [sys.executable, "-m", "data_prep.convert", "--input",
       f"train={tmp_path / 'big.extxyz'}", "--output", str(tmp_path / "out"),
       "--task", "s2ef", "--workers", "2", "--no-progress"],
      cwd=REPO, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  workers = []
  while time.time() < deadline and len(workers) < 2:
    time.sleep(0.2)
    workers = [p for p in _descendants(proc.pid) if _alive(p)]
  assert len(workers) >= 2, "the workers never started"
  time.sleep(1.0)
  os.kill(proc.pid, sig)
  assert proc.wait(timeout=120) != 0
  deadline = time.time() + 30
  while time.time() < deadline and any(_alive(p) for p in workers):
    time.sleep(0.2)
  assert not any(_alive(p) for p in workers), "workers outlived the run"
  if sig == signal.SIGTERM:  # Cleaned up like an error.
    assert sorted(os.listdir(tmp_path)) == ["big.extxyz"]


def test_stale_partial_folders_are_removed(shared_data, tmp_path):
  stale = tmp_path / ".out.partial-999999999"
  stale.mkdir()
  (stale / "junk").write_text("x")
  converter.convert([f"train={shared_data / 'oc20_is2re_toy'}"],
                    tmp_path / "out", task="s2ef", workers=1, progress=False)
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_interrupted_overwrite_is_recovered(shared_data, tmp_path, caplog):
  """A run killed between the two renames of --overwrite hid the old data
  as .out.old-PID and left no output; the next run puts it back."""
  src = shared_data / "oc20_is2re_toy"
  out = tmp_path / "out"
  converter.convert([f"train={src}"], out, task="s2ef", workers=1,
                    progress=False)
  before = Dataset(str(out)).split("train").sizes
  os.replace(out, tmp_path / ".out.old-999999999")  # The kill's state.
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    converter.convert([f"val={src}"], out, task="s2ef", workers=1,
                      progress=False)
  assert "restored" in caplog.text and sorted(os.listdir(tmp_path)) == ["out"]
  np.testing.assert_array_equal(Dataset(str(out)).split("train").sizes,
                                before)
  # Killed after the swap, before deleting the old data: it is deleted.
  (tmp_path / ".out.old-999999999").mkdir()
  converter.convert([f"val={src}"], out, task="s2ef", workers=1,
                    progress=False, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"]
  assert Dataset(str(out)).splits == ["val"]


# --- the command line and the package boundary ------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _slab_frames(path, n=3):
  import ase.io
  frames = []
  for k in range(n):
    slab = fcc100("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.6 + 0.1 * k, "hollow")
    slab.pbc = True
    del slab.info["adsorbate_info"]  # Not writable to extxyz.
    slab.calc = EMT()
    slab.get_forces()
    frames.append(slab)
  ase.io.write(path, frames)
  return path


@pytest.mark.parametrize("flags, spec", [
    ([], GraphSpec()),
    (["--cutoff", "5", "--max-neighbors", "0", "--representation", "both",
      "--pc-neighbors", "12", "--pc-bulk-samples", "2", "--split-seed", "3"],
     GraphSpec(5.0, None, "both", PointCloudSpec(5.0, 12, 2, seed=3))),
    (["--representation", "point_cloud", "--pc-cutoff", "4.5"],
     GraphSpec(representation="point_cloud",
               point_cloud=PointCloudSpec(4.5))),
], ids=["defaults", "both", "point_cloud"])
def test_cli_writes_the_graph_spec_of_its_flags(tmp_path, flags, spec):
  src = _slab_frames(tmp_path / "frames.extxyz")
  out = tmp_path / "ds"
  run = subprocess.run(
      [sys.executable, "-m", "data_prep.convert", "--input", f"train={src}",
       "--output", str(out), "--task", "s2ef", "--workers", "1",
       "--no-progress", *flags],
      cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert run.stdout.startswith(f"wrote {out} (train: 3; skipped 0)")
  metadata = Dataset(str(out)).metadata
  assert {k: metadata[k] for k in spec.to_dict()} == spec.to_dict()
  assert Dataset(str(out)).graph_spec == spec


def test_the_package_imports_no_scripts(tmp_path):
  """The library runs without data_prep/ and configs/ (not installed)."""
  src = _slab_frames(tmp_path / "frames.extxyz", n=1)
  code = (
      "import sys\n"
      "from matsci_jax.data import converter, devset\n"
      f"converter.convert([{str(src)!r}], {str(tmp_path / 'ds')!r}, "
      "task='s2ef', workers=1, val_fraction=0, progress=False)\n"
      f"devset.is_built({str(tmp_path)!r}, 1)\n"
      "print(sorted(m for m in sys.modules\n"
      "             if m.split('.')[0] in ('data_prep', 'configs')))\n")
  # From the repository root, where both would be importable.
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == "[]"


# --- stored examples against a plain reference -------------------------------


def _slab_file(path, n=24):
  """OC20-like slab frames: tags, fixed atoms, energies and forces."""
  import ase.io
  from ase.calculators.singlepoint import SinglePointCalculator
  rng = np.random.default_rng(0)
  frames = []
  for k in range(n):
    slab = fcc100("Cu", (3, 3, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.5 + 0.3 * rng.uniform(), "hollow")
    slab.rattle(0.05, seed=k)
    slab.pbc = True
    layer = slab.get_tags()
    tags = np.where(layer == 0, 2, np.where(layer == 1, 1, 0))
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    del slab.info["adsorbate_info"]
    slab.calc = SinglePointCalculator(slab, energy=float(rng.normal()),
                                      forces=rng.normal(size=(len(slab), 3)))
    frames.append(slab)
  ase.io.write(path, frames)
  return path


def _reference_example(s, spec, task, rng):
  """The stored example built the plain way: a sort on all keys for the
  edges, slots from their own neighbour list, tfds' serializer."""
  from matsci_jax.data import schema
  from matsci_jax.data.point_cloud import PointCloud, select_centers
  from matsci_jax.data.structure import validate
  from tests.data.test_neighbors import reference_neighbor_list
  s = validate(s)
  edges = (reference_neighbor_list(s.positions, s.cell, s.pbc, spec.cutoff,
                                   spec.max_neighbors)
           if spec.representation != "point_cloud" else
           neighbor_list(s.positions[:0], s.cell, s.pbc, 1.0))
  slots = None
  if spec.point_cloud is not None:
    pc, n = spec.point_cloud, s.num_atoms
    k = pc.num_neighbors
    centers = select_centers(s.tags, pc.bulk_samples, rng)
    e = reference_neighbor_list(s.positions, s.cell, s.pbc, pc.cutoff, k)
    first = np.searchsorted(e.receivers, np.arange(n))
    rank = np.arange(len(e.receivers)) - first[e.receivers]
    slots_j = np.repeat(np.arange(n, dtype=np.int32)[:, None], k, 1)
    slots_s = np.zeros((n, k, 3), np.int32)
    slots_m = np.zeros((n, k), bool)
    slots_j[e.receivers, rank] = e.senders
    slots_s[e.receivers, rank] = e.cell_shifts
    slots_m[e.receivers, rank] = True
    slots = PointCloud(slots_j[centers].reshape(-1),
                       np.repeat(centers, k).astype(np.int32),
                       slots_s[centers].reshape(-1, 3),
                       slots_m[centers].reshape(-1), centers)
  return schema.to_example(s, edges, task, slots)


def _records(folder, name, split):
  from array_record.python import array_record_module
  out = []
  for path in sorted(glob.glob(f"{folder}/{name}-{split}.array_record-*")):
    reader = array_record_module.ArrayRecordReader(path)
    out += reader.read(list(range(reader.num_records())))
    reader.close()
  return out


@pytest.mark.parametrize("spec", [
    GraphSpec(),
    GraphSpec(5.0, 30, "both", PointCloudSpec(5.0, 12, 3, seed=4)),
    GraphSpec(6.0, 8, "both", PointCloudSpec(6.0, 12, 2)),
    GraphSpec(6.0, None, "both", PointCloudSpec(4.0, 6, 2)),
    GraphSpec(representation="point_cloud", point_cloud=PointCloudSpec(6.0)),
], ids=["graph", "both_shared", "both_capped", "both_other_cutoff",
        "point_cloud"])
def test_stored_examples_match_a_plain_reference(shared_data, tmp_path, spec):
  """Every stored record has the bytes of the example built entry by entry
  with ASE's reader, a plain sort for edges and tfds' serializer (in
  protobuf's deterministic order), and the statistics match too."""
  import ase.io
  from tensorflow_datasets.core import example_serializer

  from matsci_jax.data import schema
  from matsci_jax.data.ase_reader import structure_from_atoms
  from tests.data.test_statistics import _PlainMoments, _plain_summarize
  slabs = _slab_file(tmp_path / "slabs.extxyz")
  lmdb = shared_data / "oc20_is2re_toy"
  converter.convert([f"train={slabs}", f"train={lmdb}"], tmp_path / "ds",
                    task="s2ef", graph_spec=spec, workers=1, progress=False,
                    examples_per_shard=10)
  records = _records(tmp_path / "ds", "ds", "train")
  features = schema.features("s2ef", spec.point_cloud is not None)
  serializer = example_serializer.ExampleSerializer(
      features.get_serialized_info())
  structures = [structure_from_atoms(a, str(slabs), i, fid=i) for i, a in
                enumerate(ase.io.read(slabs, index=":"))]
  reader = LmdbReader(str(lmdb))
  structures += [reader[i] for i in range(len(reader))]
  assert len(records) == len(structures) == 34
  plain = converter.SplitStatistics()
  plain.energy = _PlainMoments()
  for k, s in enumerate(structures):
    pc = spec.point_cloud
    reader_index, entry = (0, k) if k < 24 else (1, k - 24)
    rng = (None if pc is None else
           np.random.default_rng([pc.seed, reader_index, entry]))
    example = _reference_example(s, spec, "s2ef", rng)
    want = serializer.get_tf_example(features.encode_example(
        example)).SerializeToString(deterministic=True)
    assert records[k] == want, k
    summary = _plain_summarize(example)
    if "pc_senders" in example:
      summary["n_slots"] = int(example["pc_senders"].shape[0])
    plain.add(summary)
  metadata = Dataset(str(tmp_path / "ds")).metadata
  assert metadata["splits"]["train"]["statistics"] == json.loads(
      json.dumps(plain.summary()))


# --- an output that cannot be written ----------------------------------------


def _cli(tmp_path, src, out, capsys):
  code = convert_cli.main(["--input", f"train={src}", "--output", str(out),
                           "--task", "s2ef", "--workers", "1",
                           "--no-progress"])
  err = capsys.readouterr().err
  return code, err


def test_read_only_output_folder_is_one_error_line(shared_data, tmp_path,
                                                   capsys, monkeypatch):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  if os.geteuid() == 0:  # chmod does not stop root: refuse as the OS would.
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
      if os.fspath(path).startswith(str(locked)):
        raise PermissionError(13, "Permission denied", os.fspath(path))
      return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
  try:
    code, err = _cli(tmp_path, shared_data / "oc20_is2re_toy",
                     locked / "out", capsys)
  finally:
    locked.chmod(0o755)
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"error: {locked}: cannot create the output folder "
                        "out there: Permission denied"), err
  assert os.listdir(locked) == []


class _Disk:
  """Stands in for ArrayRecord's writer on a disk with room for `room`
  records: the write after them fails as the system's write does."""

  def __init__(self, room):
    self.room, self.writes, self.closed = room, 0, 0

  def writer(self, path, options):
    del options
    open(path, "wb").close()
    disk = self

    class Writer:

      def write(self, record):
        disk.writes += 1
        if disk.writes > disk.room:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

      def close(self):
        disk.closed += 1

    return Writer()


def test_full_disk_stops_at_the_failing_write(shared_data, tmp_path, capsys,
                                              monkeypatch):
  from matsci_jax.data import dataset_io
  disk = _Disk(room=3)
  monkeypatch.setattr(dataset_io.array_record_module, "ArrayRecordWriter",
                      disk.writer)
  out = tmp_path / "out"
  code, err = _cli(tmp_path, shared_data / "oc20_s2ef_toy" / "noedges", out,
                   capsys)
  assert code == 2 and err.count("\n") == 1, err
  assert re.match(rf"error: {re.escape(str(out))}: the disk is full "
                  r"\([\d.]+ \w+ free of [\d.]+ \w+\)", err), err
  # Noticed at the fourth record, not when the shard is closed.
  assert disk.writes == 4
  assert sorted(os.listdir(tmp_path)) == []


def test_full_disk_is_noticed_before_the_writer_flushes(tmp_path,
                                                        monkeypatch):
  """ArrayRecord buffers 16 MiB before writing to disk: too little free
  space must stop the conversion at once, not when the buffer is flushed
  or the shard closed."""
  import collections

  from matsci_jax.data import dataset_io
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda path: usage(1 << 30, (1 << 30) - 300_000,
                                         300_000))
  disk = _Disk(room=10**6)
  monkeypatch.setattr(dataset_io.array_record_module, "ArrayRecordWriter",
                      disk.writer)
  out = tmp_path / "out"
  with pytest.raises(OSError, match=rf"{re.escape(str(out))}: the disk is "
                     r"full \(293.0 KiB free of 1.0 GiB\)") as error:
    converter.convert([f"train={_slab_frames(tmp_path / 'f.extxyz')}"], out,
                      task="s2ef", workers=1, progress=False)
  assert error.value.errno == errno.ENOSPC
  assert disk.writes == 0  # Stopped before the first record.
  assert sorted(os.listdir(tmp_path)) == ["f.extxyz"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_disk_seen_by_array_record_is_one_error_line(shared_data,
                                                          tmp_path, capsys,
                                                          monkeypatch):
  """ArrayRecord's own report of a failed write (a RuntimeError, here at
  the shard's close) names the folder too."""
  from matsci_jax.data import dataset_io
  real = dataset_io.array_record_module.ArrayRecordWriter

  def to_full(path, options):
    open(path, "wb").close()
    return real("/dev/full", options)

  monkeypatch.setattr(dataset_io.array_record_module, "ArrayRecordWriter",
                      to_full)
  out = tmp_path / "out"
  code, err = _cli(tmp_path, shared_data / "oc20_is2re_toy", out, capsys)
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"error: {out}: the disk is full ("), err
  assert "No space left on device" in err
  assert sorted(os.listdir(tmp_path)) == []
