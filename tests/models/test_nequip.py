"""NequIP: its tensor product, equivariant hidden features, the cutoff,
periodic images, edge chunks, compilation, precision and short training
runs (the shared model tests run it too: tests/models/test_models.py)."""

import csv
import os
import re

import ase
import ase.io
import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

from configs import models as model_configs
from configs import test as test_config
from matsci_jax import checkpoints, monitoring, testing, train
from matsci_jax.data import batching
from matsci_jax.data.graphs import batch_examples, graph_from_atoms
from matsci_jax.energy import Normalizer, make_energy_and_forces_fn
from matsci_jax.models import nequip
from tests.models.test_models import CASES, CUTOFF, _model, _structures

NORM = Normalizer(scale=jnp.float32(1.0), shift=jnp.float32(0.1),
                  element_energies=jnp.zeros(119, jnp.float32))


def _graph(structures, cutoff=CUTOFF):
  return batch_examples([graph_from_atoms(a, cutoff, None)
                         for a in structures])


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny():
  """The shared tiny model, its parameters (perturbed, as after training)
  and the three shared structures' batch."""
  model = _model("nequip")
  graph = _graph(_structures())
  params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
  params = jax.tree_util.tree_map(
      lambda x: x + 0.2 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
      params)
  return model, params, graph


def test_tensor_product_is_e3nns_with_one_weight_per_path_and_channel():
  irreps = e3nn.Irreps("3x0e + 2x0o + 3x1o + 2x1e + 2x2e + 1x2o")
  x = e3nn.normal(irreps, jax.random.PRNGKey(0), (7,))
  sh = e3nn.spherical_harmonics([0, 1, 2], e3nn.normal(
      "1o", jax.random.PRNGKey(1), (7,)), True, "component")

  def products(x, sh, weights, out):
    blocks = nequip.product_blocks(str(irreps), 2, out)
    return nequip.weighted_products(blocks, x, sh, weights)

  products = jax.jit(products, static_argnums=3)
  for out in ("0e + 1o + 2e", "0o + 1e + 2o", "0e"):
    blocks = nequip.product_blocks(str(irreps), 2, out)
    expected = e3nn.tensor_product(x, sh, filter_ir_out=e3nn.Irreps(out))
    num_weights = sum(b.mul * len(b.paths) for b in blocks)
    assert num_weights == expected.irreps.num_irreps
    got = nequip.assemble(blocks, products(x.array, sh.array,
                                           jnp.ones((7, num_weights)), out))
    assert got.irreps == expected.irreps
    np.testing.assert_allclose(got.array, expected.array, atol=1e-5)
  # A single weight scales one path of one channel, and nothing else.
  out = "0e + 1o + 2e"
  blocks = nequip.product_blocks(str(irreps), 2, out)
  num_weights = sum(blk.mul * len(blk.paths) for blk in blocks)
  b = 1  # 3x1o (0o has no path to these irreps): channel 1, path 2.
  assert blocks[b].mul == 3 and blocks[b].dim == 3
  offset = sum(blk.mul * len(blk.paths) for blk in blocks[:b])
  w = jnp.zeros((7, num_weights)).at[:, offset + 1 * len(blocks[b].paths)
                                     + 2].set(1.0)
  full = np.asarray(products(x.array, sh.array, jnp.ones((7, num_weights)),
                             out))
  one = np.asarray(products(x.array, sh.array, w, out))
  start = sum(blk.mul * blk.width for blk in blocks[:b])
  _, begin, end = blocks[b].paths[2]
  cols = start + 1 * blocks[b].width + np.arange(begin, end)
  np.testing.assert_array_equal(one[:, cols], full[:, cols])
  assert np.abs(full[:, cols]).max() > 0.1
  np.testing.assert_array_equal(np.delete(one, cols, 1), 0.0)


@pytest.fixture(scope="module")
def three_layers():
  """A model whose middle layer has vectors, pseudovectors and rank-2
  tensors, its parameters and its intermediates function."""
  model = _model("nequip", hidden_irreps="8x0e + 4x1o + 2x1e + 2x2e",
                 num_layers=3)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), _graph(_structures()))
  apply = jax.jit(lambda g: model.apply(params, g,
                                        mutable=["intermediates"])[1])
  return model, apply


@pytest.mark.parametrize("improper", [False, True])
def test_hidden_features_transform_with_wigner_matrices(three_layers,
                                                        improper):
  """Every layer's features of the rotated (or rotated and inverted)
  structures are D(R) times those of the original ones: vectors (1o) and
  pseudovectors (1e) differ under inversion."""
  model, apply = three_layers
  rot = testing.random_rotation(7) * (-1.0 if improper else 1.0)
  moved = []
  for atoms in _structures():
    other = atoms.copy()
    other.positions = atoms.positions @ rot.T
    other.cell = atoms.cell.array @ rot.T
    moved.append(other)
  graph = _graph(_structures())
  before = apply(graph)["intermediates"]
  after = apply(_graph(moved))["intermediates"]
  irreps = model.feature_irreps()
  assert irreps[1] == e3nn.Irreps("8x0e + 4x1o + 2x2e")
  assert irreps[2] == e3nn.Irreps("8x0e + 4x1o + 2x1e + 2x2e")
  assert irreps[3] == e3nn.Irreps("8x0e")
  n = int(np.asarray(graph.nodes["mask"]).sum())
  for i in range(model.num_layers):
    (h,), (h_moved,) = before[f"features_{i}"], after[f"features_{i}"]
    h = e3nn.IrrepsArray(irreps[i + 1], np.asarray(h)[:n])
    h_moved = e3nn.IrrepsArray(irreps[i + 1], np.asarray(h_moved)[:n])
    np.testing.assert_allclose(h_moved.array,
                               h.transform_by_matrix(rot).array, atol=1e-5)
    # Not trivially equal: every irrep is there and moves.
    for _, ir in irreps[i + 1]:
      part = np.asarray(h.filter(keep=[ir]).array)
      assert np.abs(part).max() > 1e-3, (i, ir)
      if ir.l > 0:
        moved_part = np.asarray(h_moved.filter(keep=[ir]).array)
        assert np.abs(part - moved_part).max() > 1e-3, (i, ir)


def test_forces_vanish_smoothly_as_an_atom_leaves_the_cutoff(tiny):
  """The envelope's first two derivatives are zero at the cutoff: the
  leaving atom's force goes to zero quadratically."""
  model, params, _ = tiny

  def trimer(d):
    return ase.Atoms("CuOH", positions=[[0, 0, 0], [1.2, 0, 0], [-d, 0, 0]],
                     pbc=False)

  fn = jax.jit(make_energy_and_forces_fn(model, Normalizer.identity()))
  forces = {}
  for gap in (0.3, 3e-2, 3e-3, -1e-3):
    graph = batch_examples([graph_from_atoms(trimer(CUTOFF - gap),
                                             CUTOFF + 1, None)])
    forces[gap] = float(np.abs(np.asarray(fn(params, graph)[1])[2]).max())
  assert forces[0.3] > 1e-5, forces
  # Ten times closer, a hundred times smaller (up to the polynomial's
  # higher terms).
  assert forces[3e-2] < 0.05 * forces[0.3], forces
  assert forces[3e-3] < 0.02 * forces[3e-2], forces
  assert forces[-1e-3] == 0.0, forces


def test_periodic_images_are_neighbours_like_any_other_atom(tiny):
  """A rattled two-atom cell, whose atoms see many images of themselves
  within the cutoff, has an eighth of the energy of its 2x2x2 repetition,
  and the same forces on each image; atoms moved by lattice vectors change
  nothing."""
  model, params, _ = tiny
  cell = bulk("NaCl", "rocksalt", a=4.2)
  cell.rattle(0.1, seed=3)
  big = cell.repeat((2, 2, 2))
  wrapped = cell.copy()
  wrapped.positions += np.array([[1, -2, 0], [0, 1, 3]]) @ cell.cell.array
  fn = jax.jit(make_energy_and_forces_fn(model, Normalizer.identity()))
  (e_cell, e_wrapped, e_big), (f_cell, f_wrapped, f_big) = testing.predict(
      fn, params, [cell, wrapped, big], CUTOFF)
  np.testing.assert_allclose(e_big, 8 * e_cell, rtol=1e-5)
  np.testing.assert_allclose(f_big, np.tile(f_cell, (8, 1)), atol=1e-5)
  np.testing.assert_allclose(e_wrapped, e_cell, rtol=1e-6)
  np.testing.assert_allclose(f_wrapped, f_cell, atol=1e-6)
  assert np.abs(f_cell).max() > 1e-3


def test_edge_chunks_give_the_same_parameters_and_results(tiny):
  model, params, graph = tiny
  n_edge = graph.senders.shape[0]
  chunk = 37  # Not a divisor of the edge count: the last chunk is shorter.
  assert n_edge % chunk and n_edge > 4 * chunk
  chunked = model.clone(edge_chunk=chunk)
  # The same parameters (names and shapes, so the same initial values).
  assert jax.tree_util.tree_map(jnp.shape, jax.eval_shape(
      chunked.init, jax.random.PRNGKey(0), graph)) == jax.tree_util.tree_map(
          jnp.shape, params)
  e0, f0 = jax.jit(make_energy_and_forces_fn(model, NORM))(params, graph)
  e1, f1 = jax.jit(make_energy_and_forces_fn(chunked, NORM))(params, graph)
  assert _relative_error(e1, e0) < 1e-5
  assert _relative_error(f1, f0) < 1e-5
  assert np.abs(np.asarray(f0)).max() > 1e-3


def test_edge_chunks_bound_the_memory_of_energy_and_forces(tiny):
  """Each chunk computes its own edge terms: memory is that of the atoms
  plus one chunk."""
  model, params, _ = tiny
  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(4)
  atoms.rattle(0.05, seed=0)
  graph = _graph([atoms], 6.0)
  n_edge = graph.senders.shape[0]
  assert n_edge > 15_000

  def temporaries(m):
    fn = jax.jit(make_energy_and_forces_fn(m.clone(cutoff=6.0), NORM))
    return fn.lower(params, graph).compile().memory_analysis(
    ).temp_size_in_bytes

  whole = temporaries(model)
  chunked = temporaries(model.clone(edge_chunk=n_edge // 16))
  # In one pass, the first layer's tensor products alone are [n_edge, 72]
  # float32.
  assert whole > 72 * 4 * n_edge
  assert chunked < whole / 8, (chunked, whole)


def test_remat_gives_the_same_forces_and_gradients(tiny):
  model, params, graph = tiny
  results = []
  for policy in ("", "full"):
    energy_and_forces = make_energy_and_forces_fn(
        model.clone(remat=policy), NORM)

    def outputs(p):
      return energy_and_forces(p, graph), jax.grad(
          lambda p: jnp.sum(energy_and_forces(p, graph)[0]))(p)

    results.append(jax.jit(outputs)(params))
  ((e0, f0), g0), ((e1, f1), g1) = results
  np.testing.assert_allclose(e1, e0, rtol=1e-6)
  np.testing.assert_allclose(f1, f0, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-6), g1, g0)


def test_batches_of_one_budget_compile_once(tiny):
  model, params, _ = tiny
  examples = [graph_from_atoms(a, CUTOFF, None) for a in _structures()]
  pairs = [examples[:2], examples[1:], examples[::2]]
  budget = batching.Budget(
      n_node=max(sum(len(e["atomic_numbers"]) for e in p) for p in pairs) + 1,
      n_edge=max(sum(len(e["senders"]) for e in p) for p in pairs),
      n_graph=3)
  fn = jax.jit(make_energy_and_forces_fn(model, NORM))
  batches = [batching.collate(p, budget) for p in pairs]
  jax.block_until_ready(fn(params, batches[0]))
  warm = monitoring.compile_count()
  for graph in batches[1:] + batches[:1]:
    jax.block_until_ready(fn(params, graph))
  assert monitoring.compile_count() == warm


def test_bf16_keeps_float32_tensor_products_and_equivariance(tiny):
  """bf16 matrix products in the radial MLPs and scalar channels; float32
  parameters and outputs. Forces differ from float32 ones by about 1%, but
  rotate with the structure to 1e-6 of their size here (as in float32);
  with the tensor products in bf16 too, only to 6e-3 to 8e-3."""
  model, params, graph = tiny
  model16 = model.clone(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
      jax.eval_shape(model16.init, jax.random.PRNGKey(0), graph)))
  fn16 = make_energy_and_forces_fn(model16, NORM)
  jaxpr = str(jax.make_jaxpr(fn16)(params, graph))
  assert re.search(r":bf16\[[^\]]*\] = dot_general", jaxpr)
  fn16, fn32 = jax.jit(fn16), jax.jit(make_energy_and_forces_fn(model, NORM))
  e32, f32 = fn32(params, graph)
  e16, f16 = fn16(params, graph)
  assert e16.dtype == f16.dtype == jnp.float32
  assert _relative_error(f16, f32) < 3e-2
  assert np.abs(np.asarray(e16 - e32)).max() < 2e-2 * (
      np.abs(np.asarray(e32)).max() + 1.0)
  rot = testing.random_rotation(5)
  moved = []
  for atoms in _structures():
    other = atoms.copy()
    other.positions = atoms.positions @ rot.T
    other.cell = atoms.cell.array @ rot.T
    moved.append(other)
  n = int(np.asarray(graph.nodes["mask"]).sum())
  errors = {}
  for name, fn in (("float32", fn32), ("bf16", fn16)):
    f = np.asarray(fn(params, graph)[1])[:n]
    f_moved = np.asarray(fn(params, _graph(moved))[1])[:n]
    errors[name] = _relative_error(f_moved, f @ rot.T)
  assert errors["float32"] < 1e-5, errors
  assert errors["bf16"] < 1e-3, errors


def test_configs_build_the_model_for_both_tasks():
  from configs import is2re, s2ef
  for task in ("s2ef", "is2re"):
    for name in ("nequip", "nequip_reference"):
      config = model_configs.model_config(name, task)
      assert config.name == "nequip" and config.remat == ""
  assert s2ef.get_config("nequip").model == model_configs.model_config(
      "nequip", "s2ef")
  assert is2re.get_config("nequip").model == model_configs.model_config(
      "nequip", "is2re")


def _metric(workdir, name):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
            if r["metric"] == name}


def _run(devset, workdir, task, steps, **overrides):
  """A short run of the tiny model on the dev set (configs/test.py's
  settings), evaluated before and after."""
  config = test_config.get_config("is2re,nequip" if task == "is2re"
                                  else "nequip")
  assert all(config.model[k] == v for k, v in CASES["nequip"][0].items())
  config.data.path = str(devset / task)
  config.train.num_steps = steps
  config.train.eval_every = config.train.checkpoint_every = steps
  config.train.eval_at_start = True
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  result = train.train_and_evaluate(config, str(workdir))
  assert result["recompiles_after_warmup"] == 0
  return result


def test_short_s2ef_run_learns_forces(devset, tmp_path):
  """60 steps lower the validation force MAE below the zero-force one and
  turn the forces towards the true ones; the trained model serves the ASE
  calculator (also in bf16, and with edges on a mesh and in chunks).

  A mean-squared force loss that outweighs the energy's: the default
  L2-MAE, a median-like loss, keeps a briefly trained model's forces near
  zero (most dev-set atoms are near equilibrium).
  """
  from matsci_jax import parallel
  from matsci_jax.ase import Calculator
  _run(devset, tmp_path, "s2ef", 60, **{
      "loss.force_loss": "mse", "loss.energy_weight": 0.1,
      "optimizer.learning_rate": 1e-2, "optimizer.clip_norm": 1.0})
  force, cos = (_metric(tmp_path, f"val/force_{m}") for m in ("mae", "cos"))
  assert sorted(force) == [0, 60]
  assert force[60] < 0.92 * force[0], force
  assert cos[60] > 0.2, cos
  trained = checkpoints.load(tmp_path, checkpoint="latest")
  raw = os.path.join(os.path.dirname(trained.dataset), "raw",
                     "s2ef_val.extxyz")
  atoms = ase.io.read(raw, "0")
  results = {}
  for name, calc in (
      ("float32", Calculator(trained)),
      ("bf16", Calculator(tmp_path, checkpoint="latest", precision="bf16")),
      ("mesh", Calculator(trained, mesh=parallel.make_mesh(data=1),
                          edge_chunk=256))):
    atoms.calc = calc
    results[name] = (atoms.get_potential_energy(),
                     atoms.get_forces(apply_constraint=False))
  energy, forces = results["float32"]
  assert np.isfinite(energy) and np.abs(forces).max() > 1e-2
  np.testing.assert_allclose(results["mesh"][0], energy, rtol=1e-6)
  np.testing.assert_allclose(results["mesh"][1], forces, atol=1e-5)
  # bf16: about 1% of each atom's share, a few meV per atom.
  assert abs(results["bf16"][0] - energy) < 5e-3 * len(atoms)
  assert _relative_error(results["bf16"][1], forces) < 5e-2


def test_short_is2re_run_lowers_the_validation_energy_error(devset, tmp_path):
  """60 steps of 32 structures (one target per structure is noisy)."""
  _run(devset, tmp_path, "is2re", 60, **{"data.batch_size": 32,
                                         "optimizer.learning_rate": 2e-3})
  energy = _metric(tmp_path, "val/energy_mae")
  assert sorted(energy) == [0, 60]
  assert energy[60] < 0.92 * energy[0], energy
