"""The ASE calculator: the training path's numbers, for any Atoms."""

import dataclasses
import os

import ase.build
import ase.io
import ase.optimize
import jax
import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from ase.filters import FrechetCellFilter

from matsci_jax import checkpoints, monitoring, tasks
from matsci_jax.ase import Calculator
from matsci_jax.data import batching, dataset_io
from matsci_jax.energy import Normalizer


@pytest.fixture(scope="module")
def trained(trained_s2ef):
  return checkpoints.load(trained_s2ef)


def _val_atoms(trained):
  raw = os.path.join(os.path.dirname(trained.dataset), "raw", "s2ef_val.extxyz")
  return ase.io.read(raw, ":")


def test_calculator_gives_the_training_path_energy_and_forces(trained):
  """Converted dataset, dataset budget, training energy function: the same
  numbers as the calculator on the raw frames."""
  split = dataset_io.Dataset(trained.dataset).split("val")
  by_id = {(int(split.source[i]["sid"]), int(split.source[i]["fid"])): i
           for i in range(len(split))}
  budget = batching.compute_budget(split.sizes, 4)
  fn = jax.jit(trained.energy_and_forces)
  calc = Calculator(trained)
  frames = _val_atoms(trained)[:4]
  for atoms in frames:
    example = split.source[by_id[atoms.info["sid"], atoms.info["fid"]]]
    energies, forces = fn(trained.params, batching.collate([example], budget))
    n = len(atoms)
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_potential_energy(), energies[0],
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(atoms.get_forces(apply_constraint=False),
                               forces[:n], atol=2e-5)
    assert np.abs(forces[:n]).max() > 1e-3  # Not trivially zero.


def test_molecule_without_cell_and_ase_relaxation_compile_rarely(trained):
  atoms = ase.build.molecule("CH3OH")
  atoms.center(vacuum=1.0)
  calc = Calculator(trained)
  atoms.calc = calc
  forces = atoms.get_forces()
  assert forces.shape == (6, 3) and np.isfinite(forces).all()
  slab = _val_atoms(trained)[0]
  slab.rattle(0.15, seed=0)  # Constraints keep the fixed atoms in place.
  slab.calc = calc
  fixed = slab.constraints[0].get_indices()
  before = slab.positions[fixed].copy()
  compiles = monitoring.compile_count()
  opt = ase.optimize.FIRE(slab, logfile=None)
  opt.run(fmax=0.01, steps=30)
  assert opt.nsteps > 5
  # One compilation per padding bucket met, a handful for the run.
  assert monitoring.compile_count() - compiles <= 2 * len(calc.budgets)
  assert len(calc.budgets) <= 3
  np.testing.assert_array_equal(slab.positions[fixed], before)


def test_is2re_model_has_no_forces(trained):
  calc = Calculator(dataclasses.replace(trained, task=tasks.IS2RE))
  atoms = _val_atoms(trained)[0]
  atoms.calc = calc
  assert np.isfinite(atoms.get_potential_energy())
  with pytest.raises(PropertyNotImplementedError, match="IS2RE"):
    atoms.get_forces()
  with pytest.raises(PropertyNotImplementedError, match="IS2RE"):
    atoms.get_stress()


def test_cell_relaxation_with_frechet_cell_filter(trained):
  """Positions and cell relax together on the model's stress; one
  compilation per bucket."""
  atoms = ase.build.bulk("Cu", "fcc", a=3.8, cubic=True)
  strain = np.random.default_rng(0).uniform(-0.04, 0.04, (3, 3))
  atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
  atoms.rattle(0.05, seed=0)
  calc = Calculator(trained)
  atoms.calc = calc
  cell, energy = atoms.cell.array.copy(), atoms.get_potential_energy()
  stress = atoms.get_stress()
  assert stress.shape == (6,) and np.abs(stress).max() > 1e-3
  compiles = monitoring.compile_count()
  opt = ase.optimize.FIRE(FrechetCellFilter(atoms), logfile=None)
  opt.run(fmax=1e-4, steps=8)
  assert opt.nsteps == 8
  assert np.abs(atoms.cell.array - cell).max() > 1e-2
  assert atoms.get_potential_energy() < energy - 1e-2
  assert np.abs(atoms.get_stress()).max() < np.abs(stress).max()
  assert monitoring.compile_count() - compiles <= 2 * len(calc.budgets)


def test_source_picks_a_multi_source_models_energy_zero(trained):
  norm = trained.normalizer
  shifted = norm.replace(element_energies=norm.element_energies + 0.5)
  multi = dataclasses.replace(trained, sources=("dft", "emt"),
                              normalizer=Normalizer.stack([norm, shifted]))
  atoms = _val_atoms(trained)[0]
  results = {}
  for source in (None, "dft", "emt"):
    atoms.calc = Calculator(multi, source=source)
    results[source] = (atoms.get_potential_energy(),
                       atoms.get_forces(apply_constraint=False))
  # The first source by default.
  np.testing.assert_allclose(results[None][0], results["dft"][0], rtol=1e-6)
  np.testing.assert_allclose(results["emt"][0] - results["dft"][0],
                             0.5 * len(atoms), rtol=1e-4)
  np.testing.assert_allclose(results["emt"][1], results["dft"][1],
                             atol=1e-5)
  with pytest.raises(ValueError, match="no data source 'pbe'.*'dft', 'emt'"):
    Calculator(multi, source="pbe")
  with pytest.raises(ValueError, match="one dataset"):
    Calculator(trained, source="dft")


def test_edges_over_a_mesh_and_in_chunks_give_the_same_results(trained):
  from matsci_jax import parallel
  atoms = _val_atoms(trained)[0]
  results = []
  for kwargs in ({}, dict(mesh=parallel.make_mesh(data=1), edge_chunk=256)):
    atoms.calc = Calculator(trained, **kwargs)
    results.append((atoms.get_potential_energy(),
                    atoms.get_forces(apply_constraint=False)))
  assert atoms.calc.trained.mesh is not None
  assert atoms.calc.trained.model.edge_chunk == 256
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  np.testing.assert_allclose(results[1][1], results[0][1], atol=1e-5)
  assert np.abs(results[0][1]).max() > 1e-3
