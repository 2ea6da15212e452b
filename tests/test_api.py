"""`import matsci_jax as mj`: the documented functional surface."""

import re

import ase.build
import ase.constraints
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import matsci_jax as mj
from tests.conftest import REPO


def _readme_blocks(section: str) -> list[str]:
  text = (REPO / "README.md").read_text()
  body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_library_examples_run(small_devset):
  blocks = _readme_blocks("Library use")
  assert len(blocks) == 3
  namespace = {}
  exec(blocks[0], namespace)  # noqa: S102  (the README's own example)
  energies, forces = namespace["energies"], namespace["forces"]
  n = len(namespace["atoms"])
  assert energies.shape == (2,) and forces.shape[1] == 3
  assert np.isfinite(forces[:n]).all() and np.abs(forces[:n]).max() > 0
  np.testing.assert_allclose(
      namespace["per_atom"].sum(), energies.sum(), rtol=1e-5)

  # The loop, on dev-set batches.
  from configs import s2ef
  split = mj.data.Dataset(str(small_devset / "s2ef")).split("train")
  budget = mj.data.bucket_budget([split.source[i] for i in range(8)],
                                 n_graph=5)  # Holds any 4 of them.
  batches = [mj.data.collate([split.source[i] for i in range(k, k + 4)],
                             budget) for k in (0, 4, 0, 4)]
  norm = mj.Normalizer.from_statistics(split.statistics)
  params = jax.jit(namespace["model"].init)(jax.random.PRNGKey(0), batches[0])
  namespace.update(config=s2ef.get_config(), batches=batches, norm=norm,
                   params=params)
  exec(blocks[1], namespace)  # noqa: S102
  assert namespace["state"].step == 4
  assert bool(namespace["metrics"]["finite"])

  exec(blocks[2], namespace)  # noqa: S102
  assert "pair_sum" in mj.models.names()
  model = mj.models.get("pair_sum")
  p = jax.jit(model.init)(jax.random.PRNGKey(0), batches[0])
  e, f = jax.jit(mj.make_energy_and_forces_fn(model, norm))(p, batches[0])
  assert np.isfinite(e).all() and np.abs(f).max() > 0


@pytest.fixture(scope="module")
def setup():
  atoms = [ase.build.fcc111("Cu", (2, 2, 3), vacuum=6.0),
           ase.build.fcc100("Pt", (2, 2, 3), vacuum=6.0)]
  ase.build.add_adsorbate(atoms[0], "O", 1.5, "fcc")
  ase.build.add_adsorbate(atoms[1], ase.build.molecule("CO"), 1.8, "ontop")
  examples = [mj.data.graph_from_atoms(a, cutoff=5.0) for a in atoms]
  budget = mj.data.bucket_budget(examples, n_graph=3)
  graphs = [mj.data.collate([ex], budget) for ex in examples]
  model = mj.models.get("egnn", hidden_dim=16, num_layers=2, cutoff=5.0)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), graphs[0])
  return model, params, graphs


def test_energy_functions_vmap_over_batches_of_one_shape(setup):
  model, params, graphs = setup
  fn = jax.jit(mj.make_energy_and_forces_fn(model, mj.Normalizer.identity()))
  stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *graphs)
  e_all, f_all = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(params, stacked)
  for k, g in enumerate(graphs):
    e, f = fn(params, g)
    np.testing.assert_allclose(e_all[k], e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f_all[k], f, atol=1e-5)


def test_parameter_gradient_of_a_custom_loss(setup):
  model, params, graphs = setup
  energy_fn = mj.make_energy_fn(model, mj.Normalizer.identity())
  atoms_fn = mj.make_atom_energies_fn(model, mj.Normalizer.identity())

  def loss(p):  # A force-free custom objective: per-atom energy spread.
    return jnp.var(atoms_fn(p, graphs[0])) + energy_fn(p, graphs[0])[0] ** 2

  grads = jax.jit(jax.grad(loss))(params)
  norms = [float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0
  per_atom = atoms_fn(params, graphs[0])
  np.testing.assert_allclose(per_atom.sum(), energy_fn(params, graphs[0]).sum(),
                             rtol=1e-5)
  assert float(jnp.abs(per_atom[~graphs[0].nodes["mask"]]).max()) == 0.0


def test_registry_takes_a_redefined_class_but_not_a_name_clash():
  def define():
    @mj.models.register("api_test_model")
    class ApiTestModel(mj.models.EnergyModel):
      def __call__(self, graph, positions=None):
        return graph.nodes["mask"].astype(jnp.float32)
    return ApiTestModel

  first, second = define(), define()  # A re-run cell.
  assert mj.models.get("api_test_model").__class__ is second is not first
  with pytest.raises(ValueError, match="already registered"):
    mj.models.register("egnn")(define())


def test_public_names_resolve():
  for name in mj.__all__:
    assert getattr(mj, name) is not None, name
  for name in mj.data.__all__:
    assert getattr(mj.data, name) is not None, name


def test_graph_from_arrays_equals_graph_from_atoms():
  atoms = ase.build.fcc100("Pt", (2, 2, 3), vacuum=6.0)
  ase.build.add_adsorbate(atoms, "O", 1.5, "hollow")
  fixed = atoms.positions[:, 2] < atoms.positions[:, 2].min() + 0.5
  atoms.set_constraint(ase.constraints.FixAtoms(mask=fixed))
  a = mj.data.graph_from_atoms(atoms, cutoff=5.0)
  b = mj.data.graph_from_arrays(atoms.numbers, atoms.positions,
                                atoms.cell.array, atoms.pbc, cutoff=5.0,
                                fixed=fixed, tags=atoms.get_tags())
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  molecule = mj.data.graph_from_arrays([8, 1, 1], [[0, 0, 0], [0.96, 0, 0],
                                                   [-0.24, 0.93, 0]])
  assert len(molecule["senders"]) == 6  # Every pair, both ways, no images.
