"""Batched FIRE relaxation: ASE's FIRE path, fmax reached, fixed atoms kept."""

import os

import ase.io
import ase.optimize
import numpy as np
import pytest

from matsci_jax import checkpoints, monitoring, relax
from matsci_jax.ase import Calculator


@pytest.fixture(scope="module")
def trained(trained_s2ef):
  return checkpoints.load(trained_s2ef)


def _initial_structures(trained, n):
  raw = os.path.join(os.path.dirname(trained.dataset), "raw",
                     "is2re_val.extxyz")
  frames = ase.io.read(raw, ":") + ase.io.read(
      raw.replace("val", "train"), ":")
  return frames[:n]


def test_batched_fire_follows_ase_fire(trained):
  structures = _initial_structures(trained, 3)
  steps = 12
  batched = relax.relax(trained, structures, fmax=1e-6, steps=steps)
  for atoms, result in zip(structures, batched):
    ref = atoms.copy()
    ref.calc = Calculator(trained)
    ase.optimize.FIRE(ref, logfile=None).run(fmax=1e-6, steps=steps)
    assert result.steps == steps and not result.converged
    moved = np.abs(ref.positions - atoms.positions).max()
    assert moved > 1e-2  # The path is long enough to tell apart.
    np.testing.assert_allclose(result.atoms.positions, ref.positions,
                               atol=2e-4)


def test_relaxation_reaches_fmax_and_keeps_fixed_atoms(trained):
  structures = _initial_structures(trained, 4)
  results = relax.relax(trained, structures, fmax=0.05, steps=400)
  # A second call on the same model reuses the compiled functions.
  compiles = monitoring.compile_count()
  relax.relax(trained, structures, fmax=0.05, steps=3)
  assert monitoring.compile_count() == compiles
  for atoms, r in zip(structures, results):
    assert r.converged and r.fmax < 0.05, r
    fixed = atoms.constraints[0].get_indices()
    assert len(fixed) > 0
    np.testing.assert_array_equal(r.atoms.positions[fixed],
                                  atoms.positions[fixed])
    free = np.setdiff1d(np.arange(len(atoms)), fixed)
    assert np.abs(r.atoms.positions[free] - atoms.positions[free]).max() > 1e-3
    forces = r.atoms.get_forces()
    assert np.linalg.norm(forces[free], axis=1).max() == pytest.approx(
        r.fmax, rel=1e-5)
    assert r.energy == pytest.approx(r.atoms.get_potential_energy())
    # The model's energy fell along the way.
    start = atoms.copy()
    start.calc = Calculator(trained)
    assert r.energy < start.get_potential_energy()
