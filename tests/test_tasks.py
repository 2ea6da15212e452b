"""Tasks own their targets, checks, losses, metrics and baselines."""

import numpy as np
import pytest

from matsci_jax import models, tasks
from matsci_jax.data import batching, dataset_io
from matsci_jax.data.dataset_io import DatasetError


def test_tasks_name_their_targets_and_metrics():
  assert tasks.get("s2ef") is tasks.S2EF and tasks.get("is2re") is tasks.IS2RE
  assert tasks.S2EF.targets == ("energy", "forces")
  assert tasks.IS2RE.targets == ("energy_relaxed",)
  assert {"force_mae", "force_cos", "efwt"} <= set(tasks.S2EF.metrics)
  assert not {"force_mae", "force_cos", "efwt"} & set(tasks.IS2RE.metrics)
  with pytest.raises(ValueError, match="unknown task 'oc22'"):
    tasks.get("oc22")


def test_nan_target_is_a_clear_error(small_devset):
  check = tasks.S2EF.target_check("train")
  split = dataset_io.Dataset(str(small_devset / "s2ef")).split("train")
  examples = [split.source[i] for i in range(3)]
  examples[1] = dict(examples[1], energy=np.float32(np.nan))
  batch = batching.collate(examples, batching.Budget(200, 8000, 5))
  with pytest.raises(DatasetError,
                     match=r"sid=\d+ fid=\d+ has a NaN or infinite energy"):
    check(batch)
  examples[1] = dict(examples[1], energy=np.float32(1.0))
  forces = examples[2]["forces"].copy()
  forces[3, 1] = np.inf
  examples[2] = dict(examples[2], forces=forces)
  bad = batching.collate(examples, batching.Budget(200, 8000, 5))
  with pytest.raises(DatasetError, match="infinite forces"):
    check(bad)
  # IS2RE does not read forces: the same batch passes its check.
  relaxed = [dict(ex, energy_relaxed=np.float32(0.0)) for ex in examples]
  tasks.IS2RE.target_check("train")(
      batching.collate(relaxed, batching.Budget(200, 8000, 5)))


def test_baselines_are_the_trivial_predictors(small_devset):
  data = dataset_io.Dataset(str(small_devset / "s2ef"))
  train, val = data.split("train"), data.split("val")
  out = tasks.S2EF.baselines(val, train.statistics, free_atoms_only=True)
  examples = [val.source[i] for i in range(len(val))]
  mean = train.statistics["energy"]["mean"]
  assert out["mean_energy_mae"] == pytest.approx(
      np.mean([abs(float(e["energy"]) - mean) for e in examples]))
  free = np.concatenate([e["forces"][~e["fixed"]] for e in examples])
  assert out["zero_force_mae"] == pytest.approx(np.abs(free).mean(),
                                                rel=1e-6)
  relaxed = dataset_io.Dataset(str(small_devset / "is2re")).split("val")
  assert set(tasks.IS2RE.baselines(relaxed, {}, True)) == {"mean_energy_mae"}


def test_normalizer_follows_the_models_output(small_devset):
  stats = dataset_io.Dataset(str(small_devset / "is2re")).split(
      "train").statistics
  per_atom = tasks.IS2RE.normalizer(stats, models.get("megnet"))
  per_graph = tasks.IS2RE.normalizer(
      stats, models.get("megnet", readout="set2set"))
  # Tagged dev-set data: a structure-level readout references adsorbates.
  assert per_atom.reference_tag == -1 and per_graph.reference_tag == 2
