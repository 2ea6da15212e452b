"""Every model: symmetries, forces as gradients, padding, ordering, cutoff."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc111, molecule

from matsci_jax import models, testing
from matsci_jax.data import batching
from matsci_jax.data.graphs import batch_examples, graph_from_atoms
from matsci_jax.energy import Normalizer, make_energy_and_forces_fn

CUTOFF = 4.0


K = 24  # Point-cloud slots: more than any atom's neighbours within CUTOFF
        # (at most 19 in these structures).
POINT_CLOUD = dict(representation="point_cloud", num_neighbors=K)

CASES = {
    "egnn": (dict(name="egnn", hidden_dim=16, num_layers=2, num_radial=4,
                  readout_hidden=8), {}),
    "egnn_coords": (dict(name="egnn", hidden_dim=16, num_layers=2,
                         num_radial=4, readout_hidden=8,
                         coordinate_update=True), {}),
    "megnet": (dict(name="megnet", embed_dim=8, pre=(16, 16),
                    block_mlp=(16, 16, 16), num_blocks=2, num_gaussians=16,
                    readout_mlp=(16,)), {}),
    "megnet_set2set": (dict(name="megnet", embed_dim=8, pre=(16, 16),
                            block_mlp=(16, 16, 16), num_blocks=2,
                            num_gaussians=16, readout_mlp=(16,),
                            readout="set2set"), {}),
    "gala": (dict(name="gala", hidden_dim=16, depth=2, num_neighbors=K),
             POINT_CLOUD),
    "nequip": (dict(name="nequip", hidden_irreps="8x0e + 4x1o + 2x2e",
                    num_layers=2, num_radial=4, radial_hidden=8,
                    readout_hidden=8), {}),
}


def _structures():
  slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
  add_adsorbate(slab, "O", 1.4, "fcc")
  slab.pbc = True
  slab.rattle(0.05, seed=0)
  cell = bulk("Pt", "fcc", a=3.9, cubic=True)
  cell.rattle(0.05, seed=1)
  mol = molecule("CH3OH")
  mol.pbc = False
  structures = [slab, cell, mol]
  for atoms in structures:  # Untagged: every atom is a point-cloud centre.
    atoms.arrays.pop("tags", None)
  return structures


def _model(case, **overrides):
  kwargs = dict(CASES[case][0], cutoff=CUTOFF, **overrides)
  name = kwargs.pop("name")
  return models.get(name, **kwargs)


@pytest.fixture(scope="module", params=sorted(CASES))
def setup(request):
  model = _model(request.param)
  graph_kwargs = CASES[request.param][1]
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None, **graph_kwargs)
                          for a in _structures()])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
  # Random-ish output bias so energies are not trivially zero.
  norm = Normalizer(scale=jnp.float32(1.0), shift=jnp.float32(0.1),
                    element_energies=jnp.zeros(119, jnp.float32))
  fn = jax.jit(make_energy_and_forces_fn(model, norm))
  return fn, params, graph_kwargs


def test_energy_invariance_and_force_equivariance(setup):
  fn, params, graph_kwargs = setup
  testing.check_symmetries(fn, params, _structures(), CUTOFF, **graph_kwargs)


def test_forces_equal_finite_differences(setup):
  fn, params, graph_kwargs = setup
  for atoms in _structures():
    testing.check_forces_are_gradients(fn, params, atoms, CUTOFF, delta=1e-2,
                                       atoms_to_check=(0, len(atoms) - 1),
                                       **graph_kwargs)


def test_forces_are_nonzero_and_finite_with_padding(setup):
  fn, params, graph_kwargs = setup
  examples = [graph_from_atoms(a, CUTOFF, None, **graph_kwargs)
              for a in _structures()]
  graph = batch_examples(examples, extra_graphs=3)
  energies, forces = fn(params, graph)
  assert np.isfinite(np.asarray(forces)).all()
  n = sum(len(e["atomic_numbers"]) for e in examples)
  assert np.abs(np.asarray(forces)[:n]).max() > 1e-4
  assert np.all(np.asarray(forces)[n:] == 0)
  assert np.all(np.asarray(energies)[3:] == 0)


def test_padding_and_order_do_not_change_outputs(setup):
  fn, params, graph_kwargs = setup
  examples = [graph_from_atoms(a, CUTOFF, None, **graph_kwargs)
              for a in _structures()]
  sizes = [len(e["atomic_numbers"]) for e in examples]
  e1, f1 = testing.predict(fn, params, _structures(), CUTOFF, **graph_kwargs)
  # Much larger budget: more padding nodes, edges and graphs.
  big = batching.Budget(n_node=sum(sizes) + 57, n_edge=K * 200, n_graph=9)
  e2, f2 = fn(params, batch_examples(examples, big))
  np.testing.assert_allclose(np.asarray(e2)[:3], e1, rtol=1e-6, atol=1e-6)
  # Reversed order within the batch.
  e3, f3 = fn(params, batch_examples(examples[::-1]))
  np.testing.assert_allclose(np.asarray(e3)[:3][::-1], e1, rtol=1e-6, atol=1e-6)
  f3 = np.asarray(f3)
  start = 0
  for k in (2, 1, 0):
    np.testing.assert_allclose(f3[start:start + sizes[k]], f1[k], atol=1e-6)
    start += sizes[k]
  # Each structure alone gives the same as in the batch.
  for k, ex in enumerate(examples):
    e4, f4 = fn(params, batch_examples([ex]))
    np.testing.assert_allclose(np.asarray(e4)[0], e1[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_smooth_at_the_cutoff(case):
  """Energy is continuous as an atom crosses the cutoff, even with non-zero
  biases (as after training)."""
  import ase
  model = _model(case)
  graph_kwargs = dict(CASES[case][1])

  def trimer(d):
    return ase.Atoms("CuOH", positions=[[0, 0, 0], [1.2, 0, 0], [-d, 0, 0]],
                     pbc=False)

  # Edges a little beyond the model's cutoff, so the envelope decides.
  graphs = [batch_examples([graph_from_atoms(trimer(d), CUTOFF + 1, None,
                                             **graph_kwargs)])
            for d in (CUTOFF - 1e-4, CUTOFF + 1e-4, CUTOFF + 0.5)]
  params = jax.jit(model.init)(jax.random.PRNGKey(2), graphs[0])
  params = jax.tree_util.tree_map(
      lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(3), x.shape),
      params)
  fn = jax.jit(make_energy_and_forces_fn(model, Normalizer.identity()))
  (e_in, _), (e_out, _), (e_far, _) = [fn(params, g) for g in graphs]
  scale = max(1.0, abs(float(e_out[0])))  # float32 resolution of the sum
  assert abs(float(e_in[0] - e_out[0])) < 2e-6 * scale
  assert abs(float(e_out[0] - e_far[0])) < 4e-6 * scale


def test_gala_nearest_neighbors_equals_fewer_stored_slots():
  """Using the nearest k of K stored slots is the model on k slots."""
  k = 6
  structures = _structures()
  full = batch_examples([graph_from_atoms(a, CUTOFF, None, **POINT_CLOUD)
                         for a in structures])
  few = batch_examples([graph_from_atoms(a, CUTOFF, None,
                                         representation="point_cloud",
                                         num_neighbors=k)
                        for a in structures])
  model_full = _model("gala", nearest_neighbors=k)
  model_few = _model("gala", num_neighbors=k)
  params = jax.jit(model_few.init)(jax.random.PRNGKey(0), few)
  norm = Normalizer.identity()
  e_full, f_full = jax.jit(make_energy_and_forces_fn(model_full, norm))(
      params, full)
  e_few, f_few = jax.jit(make_energy_and_forces_fn(model_few, norm))(
      params, few)
  np.testing.assert_allclose(e_full, e_few, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f_full, f_few, rtol=1e-4, atol=1e-5)
  # Fewer slots is a different model: the comparison can fail.
  e_all, _ = jax.jit(make_energy_and_forces_fn(_model("gala"), norm))(
      params, full)
  assert np.abs(np.asarray(e_all) - np.asarray(e_few)).max() > 1e-3
  with pytest.raises(ValueError, match="nearest_neighbors"):
    _model("gala", nearest_neighbors=K + 1).init(jax.random.PRNGKey(0), full)


def test_gala_chunks_of_rows_change_nothing_but_memory():
  """Chunked pair attention: same parameters, energies, forces, gradients."""
  k = 8
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None,
                                           representation="point_cloud",
                                           num_neighbors=k)
                          for a in _structures()])
  rows = graph.senders.shape[0] // k
  norm = Normalizer.identity()
  results = {}
  # All rows at once, and chunks of 5 rows, which do not divide them.
  for pairs in (0, 5 * k * k):
    model = _model("gala", num_neighbors=k, depth=1, pairs_per_chunk=pairs)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
    energy_and_forces = make_energy_and_forces_fn(model, norm)

    def force_loss(p):
      e, f = energy_and_forces(p, graph)
      return jnp.sum(e) + jnp.sum(f * f), (e, f)

    grads, outputs = jax.jit(jax.grad(force_loss, has_aux=True))(params)
    results[pairs] = (params, outputs, grads)
  assert rows % 5 and rows > 5
  reference = results[0]
  for pairs in results:
    params, (e, f), grads = results[pairs]
    assert (jax.tree_util.tree_structure(params)
            == jax.tree_util.tree_structure(reference[0]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference[0])
    np.testing.assert_allclose(e, reference[1][0], rtol=1e-5)
    np.testing.assert_allclose(f, reference[1][1], atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
        grads, reference[2])
  # One row per chunk with many slots: XLA:CPU once fused the pair dot
  # products of a single row of 40+ slots wrongly.
  many = 48
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None,
                                           representation="point_cloud",
                                           num_neighbors=many)
                          for a in _structures()])
  params = jax.jit(_model("gala", num_neighbors=many).init)(
      jax.random.PRNGKey(0), graph)
  e_all, e_rows = (jax.jit(_model("gala", num_neighbors=many,
                                  pairs_per_chunk=pairs).apply)(params, graph)
                   for pairs in (0, many * many))
  np.testing.assert_allclose(e_rows, e_all, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["egnn", "megnet", "gala"])
def test_remat_gives_the_same_gradients(case):
  """Rematerialised layers: same parameters, energies and force-loss
  gradients (GALA with all rows at once, where `remat` applies)."""
  graph_kwargs, extra = {}, {}
  if case == "gala":  # 8 slots keep the pair tensors small.
    graph_kwargs = dict(representation="point_cloud", num_neighbors=8)
    extra = dict(pairs_per_chunk=0, num_neighbors=8, depth=1)
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None, **graph_kwargs)
                          for a in _structures()])
  norm = Normalizer.identity()
  policies = ("", "full", "dots_no_batch") if case == "egnn" else ("", "full")
  results = []
  for policy in policies:
    model = _model(case, remat=policy, **extra)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
    energy_and_forces = make_energy_and_forces_fn(model, norm)

    def force_loss(p):
      e, f = energy_and_forces(p, graph)
      return jnp.sum(e) + jnp.sum(f * f)

    results.append((params, jax.jit(jax.value_and_grad(force_loss))(params)))
  (params, (loss, grads)), rest = results[0], results[1:]
  for other_params, (other_loss, other_grads) in rest:
    jax.tree_util.tree_map(np.testing.assert_array_equal, other_params,
                           params)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        other_grads, grads)
  with pytest.raises(ValueError, match="remat"):
    _model(case, remat="some", **extra).init(jax.random.PRNGKey(0), graph)


@pytest.mark.parametrize("case,remat", [("egnn", ""),
                                         ("egnn_coords", "full")])
def test_egnn_scanned_layers_equal_unrolled_ones(case, remat):
  """`scan_layers` runs the same layers: with the unrolled parameters
  stacked, energies, forces and force-loss gradients agree."""
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None)
                          for a in _structures()])
  norm = Normalizer.identity()
  unrolled = _model(case, remat=remat, num_layers=3)
  scanned = unrolled.clone(scan_layers=True)
  params = jax.jit(unrolled.init)(jax.random.PRNGKey(0), graph)
  inner = dict(params["params"])
  layers = [inner.pop(f"layer_{i}") for i in range(3)]
  stacked = {"params": dict(inner, layers=jax.tree_util.tree_map(
      lambda *a: jnp.stack(a), *layers))}
  shapes = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), graph)
  assert jax.tree_util.tree_structure(shapes) == (
      jax.tree_util.tree_structure(stacked))

  def force_loss(model, p):
    e, f = make_energy_and_forces_fn(model, norm)(p, graph)
    return jnp.sum(e) + jnp.sum(f * f), (e, f)

  (loss, (e, f)), grads = jax.jit(jax.value_and_grad(
      lambda p: force_loss(unrolled, p), has_aux=True))(params)
  (loss_s, (e_s, f_s)), grads_s = jax.jit(jax.value_and_grad(
      lambda p: force_loss(scanned, p), has_aux=True))(stacked)
  np.testing.assert_allclose(e_s, e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f_s, f, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(f)).max() > 1e-3
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  for i in range(3):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4,
                                                atol=1e-6),
        grads_s["params"]["layers"], grads["params"][f"layer_{i}"])


@pytest.mark.parametrize("case", ["egnn", "megnet", "gala"])
def test_bf16_matmuls_keep_float32_parameters_energies_and_forces(case):
  graph_kwargs, extra = {}, {}
  if case == "gala":  # 8 slots keep the pair tensors small.
    graph_kwargs = dict(representation="point_cloud", num_neighbors=8)
    extra = dict(num_neighbors=8, depth=1)
  graph = batch_examples([graph_from_atoms(a, CUTOFF, None, **graph_kwargs)
                          for a in _structures()])
  norm = Normalizer.identity()
  model = _model(case, **extra)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
  fn32 = make_energy_and_forces_fn(model, norm)
  fn16 = make_energy_and_forces_fn(model.clone(dtype=jnp.bfloat16), norm)
  e32, f32 = jax.jit(fn32)(params, graph)
  e16, f16 = jax.jit(fn16)(params, graph)
  assert e16.dtype == f16.dtype == jnp.float32
  # The matrix products run in bf16 ...
  jaxpr = str(jax.make_jaxpr(fn16)(params, graph))
  assert re.search(r":bf16\[[^\]]*\] = dot_general", jaxpr)
  # ... and bf16's 8-bit mantissa gives errors of a few parts in a thousand
  # of the outputs' size, not more.
  assert np.abs(np.asarray(e16 - e32)).max() < 2e-2 * (
      np.abs(np.asarray(e32)).max() + 1.0)
  assert np.abs(np.asarray(f16 - f32)).max() < 3e-2 * (
      np.abs(np.asarray(f32)).max() + 1e-2)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(fn16(p, graph)[0])))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_registry_from_config_rejects_unknown_fields():
  import ml_collections
  cfg = ml_collections.ConfigDict({"name": "egnn", "hidden_dim": 8,
                                   "width": 3})
  with pytest.raises(ValueError, match=r"\['width'\]"):
    models.from_config(cfg)
  with pytest.raises(KeyError, match="unknown model"):
    models.get("nope")
  assert {"egnn", "megnet", "gala"} <= set(models.names())


def test_register_takes_only_energy_models():
  import flax.linen as nn

  from matsci_jax.models import registry

  class Plain(nn.Module):
    def __call__(self, graph, positions=None):
      return graph.nodes["mask"].astype(jnp.float32)

  with pytest.raises(TypeError, match=r"Plain.*matsci_jax\.models\."
                     r"EnergyModel"):
    models.register("test_plain_module")(Plain)
  assert "test_plain_module" not in models.names()

  # Subclass fields, even without defaults, come before the base's dtype.
  class Pairs(models.EnergyModel):
    cutoff: float

    def __call__(self, graph, positions=None):
      return graph.nodes["mask"].astype(jnp.float32)

  try:
    assert models.register("test_pairs")(Pairs) is Pairs
    model = models.get("test_pairs", cutoff=3.0)
    assert model == Pairs(3.0)
    assert model.clone(dtype=jnp.bfloat16).dtype == jnp.bfloat16
    assert not model.per_graph_output and model.representation == "graph"
  finally:
    registry._MODELS.pop("test_pairs", None)


def test_model_class_states_representation_and_per_graph_output():
  assert models.model_class("gala").representation == "point_cloud"
  assert models.model_class("egnn").representation == "graph"
  assert models.model_class("megnet").representation == "graph"
  with pytest.raises(KeyError, match="unknown model.*egnn"):
    models.model_class("nope")
  assert not models.get("egnn").per_graph_output
  assert not models.get("gala").per_graph_output
  assert not models.get("megnet", readout="per_atom").per_graph_output
  assert models.get("megnet", readout="set2set").per_graph_output
  for name in ("egnn", "megnet", "gala"):
    model = models.get(name)
    assert isinstance(model, models.EnergyModel)
    assert model.dtype == jnp.float32
    assert model.clone(dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_edge_geometry_equals_the_inline_computation():
  import e3nn_jax as e3nn

  from matsci_jax.models import geometry

  atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
  atoms.positions[3] += [0.11, -0.07, 0.05]
  example = graph_from_atoms(atoms, 4.0, None)
  n_edge = len(example["senders"])
  graph = batch_examples([example], batching.Budget(
      n_node=len(atoms) + 3, n_edge=n_edge + 9, n_graph=2))
  positions = jnp.asarray(graph.nodes["positions"])
  # Below the neighbour-list radius: some real edges lie beyond it.
  cutoff = 3.0

  def inline(x):
    edge_mask = graph.edges["mask"]
    vectors = geometry.edge_vectors(x, graph)
    d2, d = geometry.safe_lengths(vectors, edge_mask, fill=cutoff / 2)
    envelope = e3nn.poly_envelope(5, 2)(d / cutoff)
    envelope = jnp.where(edge_mask & (d < cutoff), envelope, 0.0)
    return vectors, d2, d, envelope

  for run in (lambda f: f(positions), lambda f: jax.jit(f)(positions)):
    new = run(lambda x: tuple(geometry.edge_geometry(x, graph, cutoff)))
    for a, b in zip(new, run(inline), strict=True):
      np.testing.assert_array_equal(a, b)
  edge = geometry.edge_geometry(positions, graph, cutoff)
  assert edge.vectors.shape == (n_edge + 9, 3)
  mask = np.asarray(graph.edges["mask"])
  envelope, d = np.asarray(edge.envelope), np.asarray(edge.d)
  assert mask.sum() == n_edge
  assert np.all(envelope[~mask] == 0) and np.all(d[~mask] == cutoff / 2)
  assert np.all(envelope[mask & (d >= cutoff)] == 0)
  assert (mask & (d >= cutoff)).any()
  assert np.all(envelope[mask & (d < cutoff)] > 0)
