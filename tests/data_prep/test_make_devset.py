"""Tests for the EMT dev-set generator (raw extended-XYZ output)."""

import ase.io
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from matsci_jax.data import devset
from matsci_jax.data.devset import RAW_FILES, generate_raw

NUM_SYSTEMS = 6
ADSORBATE_NUMBERS = (1, 6, 7, 8)  # H, C, N, O


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  """Tiny dev sets: seed 0 with one and two workers, and seed 1."""
  out = {}
  for seed, workers in ((0, 1), (0, 2), (1, 2)):
    raw_dir = tmp_path_factory.mktemp(f"seed{seed}_w{workers}") / "raw"
    counts = generate_raw(raw_dir, seed=seed, num_systems=NUM_SYSTEMS,
                          workers=workers, progress=False)
    out[seed, workers] = raw_dir, counts
  return out


def read(raw_dir, name):
  return ase.io.read(raw_dir / f"{name}.extxyz", ":", format="extxyz")


@pytest.fixture(scope="module")
def raw(builds):
  raw_dir, counts = builds[0, 1]
  stems = [name.removesuffix(".extxyz") for name in RAW_FILES]
  data = {stem: read(raw_dir, stem) for stem in stems}
  return data, counts, raw_dir


def test_files_and_counts(raw):
  data, counts, raw_dir = raw
  assert sorted(p.name for p in raw_dir.iterdir()) == sorted(RAW_FILES)
  assert not any(p.name.startswith(".") for p in raw_dir.parent.iterdir())
  for key, images in data.items():
    assert len(images) == counts[key]
  assert counts["is2re_train"] + counts["is2re_val"] == NUM_SYSTEMS
  assert counts["is2re_val"] >= 1
  assert counts["s2ef_train"] > 0 and counts["s2ef_val"] > 0
  assert counts["seconds"] > 0


def test_round_trip_fields(raw):
  data, _, _ = raw
  for key, images in data.items():
    for atoms in images:
      n = len(atoms)
      assert atoms.pbc.all()
      assert isinstance(atoms.get_potential_energy(), float)
      assert atoms.get_forces(apply_constraint=False).shape == (n, 3)
      assert isinstance(atoms.info["sid"], (int, np.integer))
      tags = atoms.get_tags()
      assert set(tags) == {0, 1, 2}
      is_ads = np.isin(atoms.numbers, ADSORBATE_NUMBERS)
      np.testing.assert_array_equal(tags == 2, is_ads)
      (constraint,) = atoms.constraints
      assert isinstance(constraint, FixAtoms)
      np.testing.assert_array_equal(np.sort(constraint.index),
                                    np.flatnonzero(tags == 0))
      if key.startswith("s2ef"):
        assert isinstance(atoms.info["fid"], (int, np.integer))
      else:
        assert isinstance(atoms.info["energy_relaxed"], float)
        relaxed = atoms.arrays["positions_relaxed"]
        assert relaxed.dtype == np.float64 and relaxed.shape == (n, 3)
        np.testing.assert_allclose(relaxed[tags == 0],
                                   atoms.positions[tags == 0])


def emt(atoms, positions=None):
  probe = atoms.copy()
  probe.calc = EMT()
  if positions is not None:
    probe.positions = positions
  return probe.get_potential_energy(), probe.get_forces(
      apply_constraint=False)


def test_energies_and_forces_match_emt(raw):
  data, _, _ = raw
  for images in data.values():
    for atoms in images:
      energy, forces = emt(atoms)
      reference = atoms.info["energy_reference"]
      assert atoms.get_potential_energy() == pytest.approx(
          energy - reference, abs=1e-6)
      np.testing.assert_allclose(
          atoms.get_forces(apply_constraint=False), forces, atol=1e-6)


def test_is2re_relaxation(raw):
  data, _, _ = raw
  s2ef = {(a.info["sid"], a.info["fid"]): a
          for a in data["s2ef_train"] + data["s2ef_val"]}
  for atoms in data["is2re_train"] + data["is2re_val"]:
    e_relaxed = atoms.info["energy_relaxed"]
    assert e_relaxed < atoms.get_potential_energy()
    energy, _ = emt(atoms, atoms.arrays["positions_relaxed"])
    assert e_relaxed == pytest.approx(
        energy - atoms.info["energy_reference"], abs=1e-6)
    # The first S2EF frame of a system is its initial structure.
    first = s2ef[atoms.info["sid"], 0]
    np.testing.assert_allclose(first.positions, atoms.positions)


def test_energies_are_referenced_as_in_oc20(raw):
  """Adsorption energies: total minus relaxed clean slab and gas refs."""
  data, _, _ = raw
  gas = devset.gas_references()
  # OC20's recipe from EMT molecules, recomputed here from the molecules.
  molecules = {}
  for name in ("H2", "H2O", "CO", "N2"):
    m = molecule(name)
    m.center(vacuum=8.0)
    m.calc = EMT()
    LBFGS(m, logfile=None).run(fmax=0.01, steps=200)
    molecules[name] = m.get_potential_energy()
  o = molecules["H2O"] - molecules["H2"]
  assert gas == pytest.approx({"H": molecules["H2"] / 2, "O": o,
                               "C": molecules["CO"] - o,
                               "N": molecules["N2"] / 2}, abs=1e-9)
  for atoms in data["is2re_train"] + data["is2re_val"]:
    sid = atoms.info["sid"]
    slab = atoms[atoms.get_tags() != 2]
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    slab.calc = EMT()
    LBFGS(slab, logfile=None).run(fmax=0.01, steps=200)
    ads = atoms[atoms.get_tags() == 2].get_chemical_symbols()
    expected = slab.get_potential_energy() + sum(gas[s] for s in ads)
    assert atoms.info["energy_reference"] == pytest.approx(expected, abs=1e-3)
    assert devset.slab_energy(sid) == pytest.approx(
        slab.get_potential_energy(), abs=1e-3)
    # Adsorption energies of small species on metals: a few eV at most.
    assert -8.0 < atoms.info["energy_relaxed"] < 4.0


def test_frames_and_splits(raw):
  data, _, _ = raw
  sids = {}
  for split in ("train", "val"):
    s2ef_sids = {a.info["sid"] for a in data[f"s2ef_{split}"]}
    is2re_sids = [a.info["sid"] for a in data[f"is2re_{split}"]]
    assert s2ef_sids == set(is2re_sids)
    assert len(is2re_sids) == len(set(is2re_sids))
    sids[split] = s2ef_sids
  assert not sids["train"] & sids["val"]
  assert sids["train"] | sids["val"] == set(range(NUM_SYSTEMS))

  frames = data["s2ef_train"] + data["s2ef_val"]
  for sid in range(NUM_SYSTEMS):
    fids = [a.info["fid"] for a in frames if a.info["sid"] == sid]
    assert fids[0] == 0
    assert fids == sorted(set(fids))


def test_deterministic_across_workers(builds):
  (dir_a, counts_a), (dir_b, counts_b) = builds[0, 1], builds[0, 2]
  counts_a, counts_b = dict(counts_a), dict(counts_b)
  del counts_a["seconds"], counts_b["seconds"]
  assert counts_a == counts_b
  for name in RAW_FILES:
    assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes()


def test_seed_changes_output(builds):
  dir_a, dir_b = builds[0, 2][0], builds[1, 2][0]
  for name in ("s2ef_train", "is2re_train"):
    a, b = read(dir_a, name), read(dir_b, name)
    assert len(a) != len(b) or any(
        len(x) != len(y) or not np.allclose(x.positions, y.positions)
        for x, y in zip(a, b))


def test_overwrites_existing_raw_dir(tmp_path):
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  (raw_dir / "s2ef_train.extxyz").write_text("stale")
  (raw_dir / "notes.txt").write_text("keep me")
  generate_raw(raw_dir, seed=0, num_systems=2, workers=1, progress=False)
  assert (raw_dir / "notes.txt").read_text() == "keep me"
  assert len(read(raw_dir, "s2ef_train")) > 0
  assert [p.name for p in tmp_path.iterdir()] == ["raw"]
