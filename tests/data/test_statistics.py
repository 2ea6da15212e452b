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


class _PlainMoments(statistics._Moments):
  """The sums updated structure by structure, as they first were."""

  def add(self, value, composition, n_atoms, adsorbate_composition=None):
    if adsorbate_composition is not None:
      features = np.array(adsorbate_composition, np.float64)
      features[0] = 1.0
      self.n_tagged += 1
      self.ads_ctc += np.outer(features, features)
      self.ads_cty += features * value
    self.n += 1
    self.total += value
    self.total_sq += value * value
    self.per_atom += value / n_atoms
    self.per_atom_sq += (value / n_atoms) ** 2
    self.ctc += np.outer(composition, composition)
    self.cty += composition * value
    self.counts_sum += composition


def _plain_summarize(example):
  """`summarize` as it first was (with stress added)."""
  z = example["atomic_numbers"]
  energy = float(example["energy"])
  forces = example["forces"].astype(np.float64)
  free = ~example["fixed"]
  has_forces = bool(np.isfinite(forces).all())
  tags = example.get("tags")
  tagged = tags is not None and bool(np.all(np.isin(tags, (0, 1, 2))))
  n = statistics.NUM_ELEMENTS
  return {
      "n_atoms": int(z.shape[0]),
      "n_edges": int(example["senders"].shape[0]),
      "n_slots": None,
      "composition": np.bincount(z, minlength=n),
      "adsorbate_composition": (np.bincount(z[tags == 2], minlength=n)
                                if tagged else None),
      "energy": energy if np.isfinite(energy) else None,
      "energy_relaxed": None,
      "force_sq": float((forces ** 2).sum()) if has_forces else None,
      "free_force_sq": (float((forces[free] ** 2).sum()) if has_forces
                        else None),
      "n_free": int(free.sum()),
      "stress_sq": (float((example["stress"].astype(np.float64) ** 2).sum())
                    if "stress" in example
                    and np.isfinite(example["stress"]).all() else None),
  }


@pytest.mark.parametrize("batch", [7, statistics._BATCH])
def test_batched_sums_equal_structure_by_structure_sums(monkeypatch, batch):
  """Summing compositions a batch at a time gives bit-identical statistics
  (metadata.json is unchanged), with and without adsorbate fits, NaN
  forces and missing energies."""
  monkeypatch.setattr(statistics, "_BATCH", batch)
  rng = np.random.default_rng(0)
  fast, plain = statistics.SplitStatistics(), statistics.SplitStatistics()
  plain.energy = _PlainMoments()
  for k in range(2 * statistics._BATCH + 3):
    n = int(rng.integers(2, 30))
    z = rng.choice([1, 6, 8, 29, 78], n)
    tags = (rng.integers(0, 3, n) if k % 50 else np.full(n, TAG_UNKNOWN))
    forces = rng.normal(size=(n, 3)).astype(np.float32)
    if k % 37 == 5:
      forces[0, 1] = np.nan
    example = {"atomic_numbers": z.astype(np.int32),
               "tags": tags.astype(np.int32),
               "energy": np.float32(np.nan if k % 41 == 3
                                    else rng.normal() * 10),
               "forces": forces, "fixed": rng.random(n) < 0.3,
               "senders": np.zeros(int(rng.integers(0, 90)), np.int32)}
    got, want = statistics.summarize(example), _plain_summarize(example)
    assert got.keys() == want.keys()
    for key in got:
      assert np.array_equal(got[key], want[key]) if isinstance(
          got[key], np.ndarray) else got[key] == want[key], key
    fast.add(got)
    plain.add(want)
  assert fast.summary() == plain.summary()
  assert "adsorbate_fit" not in fast.summary()["energy"]
  # Only tagged structures: the adsorbate fit is made too.
  fast, plain = statistics.SplitStatistics(), statistics.SplitStatistics()
  plain.energy = _PlainMoments()
  for _ in range(statistics._BATCH + 5):
    z, tags, energy = _slab_with_adsorbate(rng, {1: -0.4, 8: -0.7}, -0.3)
    summary = _summary(z, tags, energy + rng.normal() * 1e-3)
    fast.add(summary)
    plain.add(summary)
  assert "adsorbate_fit" in fast.summary()["energy"]
  assert fast.summary() == plain.summary()


def test_stress_rms_over_structures_with_stress():
  """RMS of the 9 components over the structures that have stress; NaN
  (stress missing in a dataset with stress) and absent stress count not."""
  rng = np.random.default_rng(3)
  stats = statistics.SplitStatistics()
  stresses = [rng.normal(size=(3, 3)).astype(np.float32) for _ in range(4)]
  for k, stress in enumerate(stresses + [np.full((3, 3), np.nan)]):
    summary = _summary([29, 29], [0, 0], -1.0 - k)
    stats.add(dict(summary, stress_sq=statistics.summarize({
        "atomic_numbers": np.array([29]), "energy": 0.0,
        "forces": np.zeros((1, 3), np.float32), "fixed": np.zeros(1, bool),
        "senders": np.zeros(0, np.int32), "stress": stress})["stress_sq"]))
  stats.add(_summary([29], [0], 2.0))
  want = np.sqrt(np.mean(np.square(np.array(stresses, np.float64))))
  assert stats.summary()["stress_rms"] == pytest.approx(want, rel=1e-12)
  assert statistics.SplitStatistics().summary()["stress_rms"] is None
  without = statistics.SplitStatistics()
  without.add(_summary([29], [0], 2.0))
  assert without.summary()["stress_rms"] is None
