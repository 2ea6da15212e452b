"""Tests of the energy function's references and normaliser choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111

from matsci_jax import models
from matsci_jax.data.graphs import batch_examples, graph_from_atoms
from matsci_jax.energy import Normalizer, make_energy_fn

SET2SET = dict(embed_dim=8, pre=(16, 16), block_mlp=(16, 16, 16),
               num_blocks=1, num_gaussians=8, readout_mlp=(8,),
               readout="set2set")


def _tagged_slabs():
  """Two Cu slabs of different sizes, each under one O (OC20 tags)."""
  out = []
  for size in ((2, 2, 3), (3, 3, 3)):
    slab = fcc111("Cu", size, vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.set_tags([1] * (len(slab) - 1) + [2])
    slab.pbc = True
    out.append(slab)
  return out


def test_adsorbate_references_count_only_adsorbate_atoms():
  model = models.get("megnet", **SET2SET)
  graph = batch_examples([graph_from_atoms(a, 5.0) for a in _tagged_slabs()])
  params = model.init(jax.random.PRNGKey(0), graph)
  refs = np.zeros(119, np.float32)
  refs[8], refs[29] = -0.7, -5.0  # The Cu reference must not count.
  plain = Normalizer.identity()
  adsorbate = Normalizer(scale=jnp.float32(1.0), shift=jnp.float32(0.0),
                         element_energies=jnp.asarray(refs),
                         graph_scale=jnp.float32(1.0),
                         graph_shift=jnp.float32(0.3), reference_tag=2)
  e0 = make_energy_fn(model, plain)(params, graph)
  e1 = make_energy_fn(model, adsorbate)(params, graph)
  np.testing.assert_allclose(np.asarray(e1 - e0)[:2], [-0.4, -0.4],
                             atol=1e-5)
  assert float(e1[2]) == 0.0  # The padding graph stays empty.
  assert Normalizer.from_dict(adsorbate.to_dict()).reference_tag == 2


@pytest.mark.parametrize("per_graph", [False, True])
def test_adsorbate_fit_is_used_by_structure_level_models_only(per_graph):
  stats = {"mean_atoms": 25.0, "energy_relaxed": {
      "element_references": {"8": -0.1, "29": -0.01},
      "residual_mean": 0.0, "residual_std": 0.2,
      "adsorbate_fit": {"constant": -0.3, "element_references": {"8": -0.7},
                        "residual_mean": 0.05, "residual_std": 0.1}}}
  norm = Normalizer.from_statistics(stats, "energy_relaxed", per_graph)
  if per_graph:
    assert norm.reference_tag == 2
    assert float(norm.graph_shift) == pytest.approx(-0.25)
    assert float(norm.graph_scale) == pytest.approx(0.1)
    assert float(norm.element_energies[29]) == 0.0
  else:
    assert norm.reference_tag == -1
    assert float(norm.element_energies[29]) == pytest.approx(-0.01)


def test_structure_level_loss_unit_stays_the_force_rms_with_forces():
  fit = {"constant": 0.0, "element_references": {}, "residual_mean": 0.0,
         "residual_std": 0.1}
  stats = {"mean_atoms": 25.0, "force_rms": 1.3, "energy": {
      "element_references": {}, "residual_mean": 0.0, "residual_std": 0.2,
      "adsorbate_fit": fit}}
  norm = Normalizer.from_statistics(stats, "energy", per_graph=True)
  assert float(norm.scale) == pytest.approx(1.3)
  assert float(norm.graph_scale) == pytest.approx(0.1)
