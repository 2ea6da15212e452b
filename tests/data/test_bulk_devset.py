"""The bulk dev set: strained fcc cells with EMT energy, forces and stress."""

import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT

from data_prep import make_devset
from matsci_jax.data import batching, bulk_devset, devset
from matsci_jax.data.dataset_io import Dataset

NUM = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A small bulk dev set, built with the command line."""
  out = tmp_path_factory.mktemp("bulk") / "bulk_devset"
  make_devset.main(["--kind", "bulk", "--output", str(out),
                    "--num-structures", str(NUM), "--workers", "1"])
  return out


def test_builds_and_opens(built, capsys):
  data = Dataset(str(built / "s2ef"))
  assert data.task == "s2ef" and data.has_stress
  assert data.graph_spec == devset.DEVSET_GRAPH_SPEC
  assert data.split("train").targets == {"energy": True, "forces": True,
                                         "stress": True}
  assert data.split("val").has_stress
  counts = {name: len(data.split(name)) for name in data.splits}
  assert counts == {"train": NUM - 2, "val": 2}
  stats = data.split("train").statistics
  assert stats["stress_rms"] > 1e-3 and stats["force_rms"] > 1e-2
  assert 8 <= min(stats["atoms_histogram"]["values"])
  assert max(stats["atoms_histogram"]["values"]) <= 32
  assert bulk_devset.is_built(built, NUM)
  assert not bulk_devset.is_built(built, NUM + 1)
  assert not devset.is_built(built, NUM)  # Not a slab dev set.
  with pytest.raises(FileExistsError, match="--overwrite"):
    bulk_devset.build_bulk_devset(built, num_structures=NUM)
  with pytest.raises(SystemExit):
    make_devset.main(["--kind", "bulk", "--output", str(built),
                      "--num-systems", "3"])
  assert "--num-systems counts slab systems" in capsys.readouterr().err


def test_stored_targets_are_emts(built):
  """Stored energy, forces and stress equal EMT's, recomputed with ASE on
  the structure rebuilt from its seed and index."""
  data = Dataset(str(built / "s2ef"))
  for name in data.splits:
    split = data.split(name)
    for i in range(0, len(split), 5):
      ex = split.source[i]
      atoms = bulk_devset.make_structure(0, int(ex["sid"]))
      np.testing.assert_allclose(ex["positions"], atoms.positions,
                                 atol=1e-5)
      atoms.calc = EMT()
      np.testing.assert_allclose(ex["stress"],
                                 atoms.get_stress(voigt=False),
                                 rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(ex["forces"], atoms.get_forces(),
                                 rtol=1e-5, atol=1e-5)
      assert ex["energy"] == pytest.approx(atoms.get_potential_energy(),
                                           rel=1e-6, abs=1e-6)
      assert (ex["tags"] == -1).all() and not ex["fixed"].any()
      assert ex["pbc"].all()


def test_structures_are_strained_alloys(built):
  frames = (ase.io.read(built / "raw" / "s2ef_train.extxyz", ":")
            + ase.io.read(built / "raw" / "s2ef_val.extxyz", ":"))
  assert sorted(a.info["sid"] for a in frames) == list(range(NUM))
  metals = bulk_devset.METALS
  seen = set()
  for atoms in frames:
    sid = atoms.info["sid"]
    symbols = set(atoms.get_chemical_symbols())
    # Pure metals and binary alloys alternate; the metal cycles.
    assert metals[(sid // 2) % len(metals)] in symbols
    assert len(symbols) == 1 + sid % 2 and symbols <= set(metals)
    seen |= symbols
    assert 8 <= len(atoms) <= 32 and atoms.pbc.all()
    # Sheared: the angles are not those of a cubic or primitive fcc cell.
    angles = atoms.cell.angles()
    assert not (np.allclose(angles, 90, atol=0.1)
                or np.allclose(angles, 60, atol=0.1)), angles
  assert seen == set(metals)


def test_deterministic_whatever_the_workers(tmp_path):
  """Two workers (jobs of 50 structures) write the files one does."""
  one = bulk_devset.generate_raw(tmp_path / "one", seed=3, num_structures=60,
                                 workers=1)
  two = bulk_devset.generate_raw(tmp_path / "two", seed=3, num_structures=60,
                                 workers=2)
  assert {k: v for k, v in one.items() if k != "seconds"} == {
      k: v for k, v in two.items() if k != "seconds"}
  for name in bulk_devset.RAW_FILES:
    assert (tmp_path / "one" / name).read_bytes() == (
        tmp_path / "two" / name).read_bytes()
  same = bulk_devset.make_structure(3, 7)
  assert np.array_equal(same.positions,
                        bulk_devset.make_structure(3, 7).positions)
  assert not np.array_equal(same.positions[:8],
                            bulk_devset.make_structure(4, 7).positions[:8])


def test_batches_carry_stress(built):
  split = Dataset(str(built / "s2ef")).split("train")
  examples = [split.source[i] for i in range(3)]
  budget = batching.Budget(n_node=200, n_edge=6000, n_graph=4)
  batch = batching.collate(examples, budget)
  assert batch.globals["stress"].shape == (4, 3, 3)
  np.testing.assert_array_equal(batch.globals["stress"][:3],
                                np.stack([ex["stress"] for ex in examples]))


def test_module_does_not_import_jax():
  code = ("import sys, matsci_jax.data.bulk_devset; "
          "assert 'jax' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
