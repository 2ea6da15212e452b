"""Stress as the strain derivative of a model's energy: equal to finite
differences, a tensor under rotation, refused without a 3D cell, and a
training target whose loss a few optimiser steps reduce."""

import ase.build
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.calculators.fd import calculate_numerical_stress

from matsci_jax import checkpoints, models, tasks, testing, train_step
from matsci_jax.ase import Calculator
from matsci_jax.data import batching
from matsci_jax.data.ase_reader import structure_from_atoms
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.data.graphs import batch_examples
from matsci_jax.energy import Normalizer

CUTOFF = 4.0
K = 24  # Point-cloud slots: more than the 18 neighbours within CUTOFF.
# Finite-difference strain: the energy is float32, so smaller strains lose
# digits (5e-5 eV/Å^3 at 3e-3 on MegNet), and larger ones leave O(eps^2)
# errors (2e-4 eV/Å^3 at 1e-2 on GALA).
STRAIN = 4e-3
ATOL = 1e-4  # eV/Å^3

# name -> (model kwargs, graph spec, normaliser scale). A randomly
# initialised MegNet's energy varies little with geometry: a larger scale
# makes its stress as large as the others' (0.01 to 0.1 eV/Å^3).
CASES = {
    "egnn": (dict(name="egnn", hidden_dim=16, num_layers=2, num_radial=4,
                  readout_hidden=8), GraphSpec(CUTOFF, None), 10.0),
    "megnet": (dict(name="megnet", embed_dim=8, pre=(16,), block_mlp=(16, 16),
                    num_blocks=1, num_gaussians=8, readout_mlp=(16,)),
               GraphSpec(CUTOFF, None), 60.0),
    "gala": (dict(name="gala", hidden_dim=16, depth=2, num_neighbors=K),
             GraphSpec(CUTOFF, None, "point_cloud",
                       PointCloudSpec(CUTOFF, K)), 2.5),
}


def _normalizer(scale: float) -> Normalizer:
  refs = np.zeros(119, np.float32)
  refs[29], refs[79] = -3.7, -3.2
  return Normalizer(scale=jnp.float32(scale), shift=jnp.float32(-0.3),
                    element_energies=jnp.asarray(refs),
                    stress_scale=jnp.float32(0.1))


def _triclinic(seed: int = 0) -> ase.Atoms:
  """A sheared, rattled two-atom CuAu cell, untagged (every atom a
  point-cloud centre)."""
  atoms = ase.build.bulk("Cu", "fcc", a=3.7) * (2, 1, 1)
  atoms.set_chemical_symbols(["Cu", "Au"])
  strain = np.random.default_rng(seed).uniform(-0.08, 0.08, (3, 3))
  atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
  atoms.rattle(0.05, seed=seed + 1)
  atoms.arrays.pop("tags", None)
  return atoms


def _trained(case: str) -> checkpoints.Trained:
  """A randomly initialised model of `case` as a `Trained`."""
  kwargs, spec, scale = CASES[case]
  kwargs = dict(kwargs, cutoff=CUTOFF)
  model = models.get(kwargs.pop("name"), **kwargs)
  example = spec.example(structure_from_atoms(_triclinic(), "<atoms>", 0),
                         "s2ef")
  params = jax.jit(model.init)(jax.random.PRNGKey(0),
                               batch_examples([example]))
  return checkpoints.Trained(
      model=model, params=params, normalizer=_normalizer(scale),
      config=ml_collections.ConfigDict(), task=tasks.S2EF, step=0,
      graph_spec=spec, dataset="", workdir=f"<random {case}>")


@pytest.fixture(scope="module", params=sorted(CASES))
def calc(request):
  return Calculator(_trained(request.param))


def assert_stress_is_numerical_stress(atoms, atol=ATOL, strain=STRAIN):
  """Asserts that `atoms.calc`'s stress equals central finite differences
  of its energy under strain (ASE's `calculate_numerical_stress`).

  Returns:
    The calculator's stress, Voigt [6] in eV/Å^3.
  """
  stress = atoms.get_stress()
  numerical = calculate_numerical_stress(atoms, eps=strain)
  np.testing.assert_allclose(stress, numerical, rtol=0, atol=atol,
                             err_msg="stress is not dE/d(strain) / V")
  return stress


def test_stress_equals_numerical_stress(calc):
  atoms = _triclinic()
  atoms.calc = calc
  stress = assert_stress_is_numerical_stress(atoms)
  # Large against the tolerance, with shear: the comparison can fail.
  assert np.abs(stress[:3]).min() > 20 * ATOL
  assert np.abs(stress[3:]).min() > 10 * ATOL


def test_stress_rotates_as_a_tensor(calc):
  atoms = _triclinic()
  atoms.calc = calc
  sigma = atoms.get_stress(voigt=False)
  for seed in (1, 2):
    rot = testing.random_rotation(seed)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rot.T
    rotated.cell = atoms.cell.array @ rot.T
    rotated.calc = calc
    np.testing.assert_allclose(rotated.get_stress(voigt=False),
                               rot @ sigma @ rot.T, rtol=0, atol=2e-5,
                               err_msg=f"rotation {seed}")


def test_stress_needs_a_cell_periodic_in_three_directions():
  calc = Calculator(_trained("egnn"))
  molecule = ase.build.molecule("CH3OH")
  molecule.calc = calc
  with pytest.raises(PropertyNotImplementedError,
                     match=r"CH4O.*periodic in all three.*rank 0"):
    molecule.get_stress()
  assert np.isfinite(molecule.get_forces()).all()  # Forces still work.
  slab = ase.build.fcc111("Cu", (2, 2, 3), vacuum=5.0)
  slab.pbc = (True, True, False)
  slab.calc = calc
  with pytest.raises(PropertyNotImplementedError,
                     match=r"pbc=\[True, True, False\]"):
    slab.get_stress()
  slab.pbc = True  # The same cell, periodic in 3D, has a stress.
  assert np.isfinite(slab.get_stress()).all()


def _labelled_batch():
  """Two EMT-labelled triclinic cells (energy, forces, stress) and a
  padding graph."""
  examples = []
  for seed in (0, 3):
    atoms = _triclinic(seed) * (1, 2, 1)
    atoms.calc = EMT()
    atoms.get_forces()  # Results the example takes its targets from.
    example = GraphSpec(CUTOFF, None).example(
        structure_from_atoms(atoms, "<emt>", seed), "s2ef")
    example["stress"] = atoms.get_stress(voigt=False).astype(np.float32)
    examples.append(example)
  return batching.collate(examples, batching.bucket_budget(examples))


def test_stress_loss_has_a_gradient_and_descends():
  batch = _labelled_batch()
  assert np.abs(batch.globals["stress"][:2]).max() > 1e-3
  model = models.get("egnn", hidden_dim=16, num_layers=2, num_radial=4,
                     readout_hidden=8, cutoff=CUTOFF)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  config = ml_collections.ConfigDict(dict(
      energy_weight=0.01, force_weight=0.01, stress_weight=1.0,
      energy_loss="mae", energy_per_atom=True, force_loss="l2mae",
      free_atoms_only=False))
  loss_fn = train_step.make_s2ef_loss(model, _normalizer(2.5), config,
                                      stress=True)
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params,
                                                                 batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux, grads

  opt_state = optimizer.init(params)
  params, opt_state, aux, grads = step(params, opt_state)
  grads = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(
      grads)])
  assert np.isfinite(grads).all() and np.abs(grads).max() > 0
  first = float(aux["stress_loss"])
  for _ in range(15):
    params, opt_state, aux, _ = step(params, opt_state)
  # Small energy and force weights: the stress term's own gradient, not
  # theirs, has to bring it down.
  assert float(aux["stress_loss"]) < 0.75 * first, (first,
                                                    aux["stress_loss"])
  assert np.all(np.asarray(aux["stress"])[2] == 0)  # The padding graph.
