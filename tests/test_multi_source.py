"""Several datasets in one run: sampling, per-source normalisers, heads and
metrics, energy-only sources, and the errors of mismatched sources."""

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from matsci_jax import checkpoints, inputs, losses, tasks, train
from matsci_jax.config_checks import ConfigError, check_config
from matsci_jax.data import batching, converter, dataset_io
from matsci_jax.data.graph_spec import GraphSpec
from matsci_jax.data.pipeline import MixtureSampler


def _config(sources: dict, **loss):
  config = test_config.get_config()
  config.data.sources = ml_collections.ConfigDict(
      {name: {"path": str(path), "weight": 1.0}
       for name, path in sources.items()})
  config.train.best_metric = " + ".join(
      f"val/{name}/force_mae" for name in sources)
  config.loss.update(loss)
  return config


def test_mixture_sampler_follows_weights_and_is_a_pure_function():
  sampler = MixtureSampler([10, 90], [3.0, 1.0], temperature=1.0, seed=4)
  # p ~ weight x size: 30 : 90.
  np.testing.assert_allclose(sampler.probabilities, [0.25, 0.75])
  epoch = sampler(0)
  assert len(epoch) == 100 and np.sum(epoch < 10) == 25
  np.testing.assert_array_equal(epoch, MixtureSampler(
      [10, 90], [3.0, 1.0], 1.0, seed=4)(0))
  assert not np.array_equal(epoch, sampler(1))
  # The small source repeats, each structure equally often over epochs.
  small = np.concatenate([sampler(e) for e in range(4)])
  counts = np.bincount(small[small < 10], minlength=10)
  assert counts.min() == counts.max() == 10
  # Temperature 0: the weights alone.
  np.testing.assert_allclose(
      MixtureSampler([10, 90], [1.0, 1.0], 0.0).probabilities, [0.5, 0.5])
  with pytest.raises(ValueError, match="positive share"):
    MixtureSampler([10, 90], [0.0, 0.0])


def test_two_sources_train_with_their_own_heads_and_metrics(
    trained_multi, lips_dataset):
  tmp_path = trained_multi
  result = json.load(open(tmp_path / "metrics.json"))
  m = result["metrics"]
  for name in ("slabs", "lips"):
    assert np.isfinite(m[f"val/{name}/force_mae"])
    assert m[f"val/{name}/num_structures"] > 0
    assert "zero_force_mae" in result["baselines"][f"val/{name}"]
  assert "val/force_mae" not in m
  assert result["recompiles_after_warmup"] == 0
  # The best checkpoint by the sum of both sources' force errors.
  assert len(os.listdir(tmp_path / "best")) == 1
  info = json.load(open(tmp_path / "model.json"))
  # Sources in name order (the order of config.data.sources' keys).
  assert [s["name"] for s in info["sources"]] == ["lips", "slabs"]
  # One normaliser per source: LiPS (Li, P, S) has its own references.
  refs = np.asarray(info["normalizer"]["element_energies"])
  assert refs.shape == (2, 119) and refs[0, 3] != 0 and refs[1, 3] == 0
  trained = checkpoints.load(tmp_path)
  assert trained.sources == ("lips", "slabs")
  assert trained.model.num_heads == 2
  # Each source's model predicts in its own energy zero.
  split = dataset_io.Dataset(str(lips_dataset)).split("val")
  ex = split.source[0]
  graph = batching.collate([ex], batching.bucket_budget([ex]))
  lips = float(trained.for_source("lips").energy_fn(trained.params,
                                                    graph)[0])
  slabs = float(trained.for_source("slabs").energy_fn(trained.params,
                                                      graph)[0])
  assert abs(lips - float(ex["energy"])) < abs(slabs - float(ex["energy"]))
  with pytest.raises(ValueError, match="no data source 'oc20'"):
    trained.for_source("oc20")


def test_sources_with_different_graph_settings_are_named(
    small_devset, shared_data, tmp_path):
  other = tmp_path / "lips40"
  converter.convert([str(shared_data / "matsciml_lips_devset")], str(other),
                    task="s2ef", workers=1, val_fraction=0.2, progress=False,
                    graph_spec=GraphSpec(cutoff=6.0, max_neighbors=40))
  config = _config({"slabs": small_devset / "s2ef", "lips": other})
  with pytest.raises(ConfigError, match=r"source 'lips' .* and source "
                     r"'slabs' .* different graph settings"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_source_that_is_not_a_dataset_is_named(small_devset, tmp_path):
  (tmp_path / "empty").mkdir()
  config = _config({"slabs": small_devset / "s2ef",
                    "mine": tmp_path / "empty"})
  with pytest.raises(dataset_io.DatasetError, match="source 'mine': .*empty"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_stress_weight_without_stress_data_is_an_error(small_devset,
                                                       tmp_path):
  config = _config({"slabs": small_devset / "s2ef"}, stress_weight=1.0)
  with pytest.raises(ConfigError, match="no training data has stress"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_source_names_and_best_metric_are_checked(small_devset):
  config = _config({"slabs": small_devset / "s2ef"})
  config.train.best_metric = "val/force_mae"
  with pytest.raises(ConfigError, match="<eval split>/<source>/<metric>"):
    check_config(config)
  config.train.best_metric = "val/slabs/force_mae + 0.5 * val/slabs/energy_mae"
  check_config(config)
  config.data.sources.slabs.weight = -1.0
  with pytest.raises(ConfigError, match="sources.slabs.weight"):
    check_config(config)


def test_energy_only_source_counts_no_forces(small_devset):
  data = dataset_io.Dataset(str(small_devset / "s2ef"))
  split = data.split("val")
  with_forces = inputs.TaggedSource(split.source, 0, True, None)
  energy_only = inputs.TaggedSource(split.source, 1, False, None)
  examples = [with_forces[0], energy_only[1]]
  assert np.all(energy_only[1]["forces"] == 0)
  graph = batching.collate(examples, batching.bucket_budget(examples))
  counted = losses.force_mask(graph, free_atoms_only=False)
  n0 = len(examples[0]["atomic_numbers"])
  assert counted[:n0].all() and not counted[n0:].any()
  # Its NaN forces would have been rejected; zeros stand in, masked.
  check = tasks.S2EF.target_check("val/mine")
  check(graph)


def test_an_energy_only_source_trains_on_its_energies(small_devset,
                                                      tmp_path):
  import ase.io
  from ase.calculators.singlepoint import SinglePointCalculator
  frames = ase.io.read(small_devset / "raw" / "s2ef_train.extxyz", ":40")
  for atoms in frames:
    energy = atoms.get_potential_energy()
    atoms.calc = SinglePointCalculator(atoms, energy=energy)
  raw = tmp_path / "energies.extxyz"
  ase.io.write(raw, frames)
  energies = tmp_path / "energies"
  converter.convert([str(raw)], str(energies), task="s2ef", workers=1,
                    val_fraction=0.25, progress=False)
  assert not dataset_io.Dataset(str(energies)).split("train").targets.get(
      "forces")
  config = _config({"slabs": small_devset / "s2ef",
                    "energies": energies})
  config.train.best_metric = "val/slabs/force_mae + val/energies/energy_mae"
  config.train.num_steps = 20
  config.train.eval_every = config.train.checkpoint_every = 20
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  m = result["metrics"]
  assert np.isfinite(m["val/energies/energy_mae"])
  assert "val/energies/force_mae" not in m
  assert np.isfinite(m["val/slabs/force_mae"])
  assert "zero_force_mae" not in result["baselines"]["val/energies"]
