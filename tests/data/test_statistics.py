"""Tests of the streaming dataset statistics and reference-energy fits."""

import numpy as np
import pytest

from matsci_jax.data import statistics
from matsci_jax.data.structure import TAG_UNKNOWN


def _summary(z, tags, energy):
  z = np.asarray(z)
  n = z.size
  return statistics.summarize({
      "atomic_numbers": z, "tags": np.asarray(tags), "energy": energy,
      "forces": np.zeros((n, 3), np.float32), "fixed": np.zeros(n, bool),
      "senders": np.zeros(0, np.int32)})


def _slab_with_adsorbate(rng, refs, constant):
  """A random-size Cu slab under an adsorbate whose energy ignores the slab."""
  n_slab = int(rng.integers(8, 40))
  ads = [z for z in refs for _ in range(int(rng.integers(0, 3)))]
  z = [29] * n_slab + ads
  tags = [1] * n_slab + [2] * len(ads)
  return z, tags, constant + sum(refs[a] for a in ads)


def test_adsorbate_fit_recovers_constant_and_references():
  refs, constant = {1: -0.4, 8: -0.7, 6: 0.2}, -0.3
  rng = np.random.default_rng(0)
  stats = statistics.SplitStatistics()
  for _ in range(40):
    stats.add(_summary(*_slab_with_adsorbate(rng, refs, constant)))
  fit = stats.summary()["energy"]["adsorbate_fit"]
  assert fit["constant"] == pytest.approx(constant, abs=1e-6)
  for z, r in refs.items():
    assert fit["element_references"][z] == pytest.approx(r, abs=1e-6)
  assert fit["residual_std"] < 1e-6
  assert abs(fit["residual_mean"]) < 1e-6
  # The all-atom fit needs a slab reference and cannot fit the constant.
  assert stats.summary()["energy"]["residual_std"] > 1e-3


def test_no_adsorbate_fit_unless_every_structure_is_tagged():
  rng = np.random.default_rng(1)
  stats = statistics.SplitStatistics()
  for _ in range(5):
    stats.add(_summary(*_slab_with_adsorbate(rng, {8: -0.7}, 0.0)))
  z, _, energy = _slab_with_adsorbate(rng, {8: -0.7}, 0.0)
  stats.add(_summary(z, [TAG_UNKNOWN] * len(z), energy))
  assert "adsorbate_fit" not in stats.summary()["energy"]


def test_slab_layer_numbers_are_not_oc20_tags():
  """ase.build numbers slab layers 1..L: tag 2 there is not an adsorbate."""
  stats = statistics.SplitStatistics()
  stats.add(_summary([29] * 6, [1, 1, 2, 2, 3, 3], -1.0))
  assert "adsorbate_fit" not in stats.summary()["energy"]
