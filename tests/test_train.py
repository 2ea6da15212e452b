"""The training job end to end on a tiny config (configs/test.py)."""

import csv
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from matsci_jax import checkpoints, inputs, tasks, train
from matsci_jax.data import dataset_io, pipeline
from matsci_jax.data.converter import convert
from matsci_jax.data.dataset_io import DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(small_devset, **overrides):
  config = test_config.get_config()
  config.data.path = str(small_devset / "s2ef")
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    rows = [r for r in csv.DictReader(f) if r["metric"] == "train/loss"]
  return [(int(r["step"]), float(r["value"])) for r in rows]


def test_test_config_lowers_the_loss(small_devset, tmp_path):
  result = train.train_and_evaluate(_config(small_devset), str(tmp_path))
  losses = _train_losses(tmp_path)
  assert losses[0][0] == 10 and losses[-1][0] == 40
  assert losses[-1][1] < 0.7 * losses[0][1], losses
  saved = json.load(open(tmp_path / "metrics.json"))
  assert saved["step"] == 40 and saved["recompiles_after_warmup"] == 0
  assert saved["compiles_total"] > 0  # The counter sees compilations.
  # What a scaling study records: XLA's FLOPs of the step (model FLOP/s in
  # the log) and the structures and atoms the 40 steps trained on.
  assert saved["flops_per_step"] > 1e6
  assert saved["seen"]["structures"] >= 40 and saved["seen"]["atoms"] > (
      10 * saved["seen"]["structures"])
  m = result["metrics"]
  assert m["val/num_structures"] > 0 and np.isfinite(m["val/force_mae"])
  assert {"val/energy_mae", "val/force_mae", "val/force_cos",
          "val/efwt"} <= set(m)
  assert os.listdir(tmp_path / "tensorboard")
  metrics = {r["metric"]
             for r in csv.DictReader(open(tmp_path / "metrics.csv"))}
  assert {"train/learning_rate", "perf/structures_per_s", "perf/atoms_per_s",
          "perf/padding_efficiency_nodes", "perf/compiles",
          "perf/model_flops_per_s"} <= metrics
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "40"]
  assert len(os.listdir(tmp_path / "best")) == 1
  # The loaded model reproduces the final evaluation (EMA parameters).
  trained = checkpoints.load(tmp_path, checkpoint="latest")
  assert trained.step == 40 and trained.task is tasks.S2EF
  assert abs(_val_energy_mae(trained) - m["val/energy_mae"]) < 1e-5
  assert checkpoints.load(tmp_path / "checkpoints" / "30").step == 30
  assert checkpoints.load(tmp_path).step in (20, 40)  # The best one.


def _val_energy_mae(trained):
  split = dataset_io.Dataset(trained.dataset).split("val")
  loader, _ = pipeline.batch_dataset(
      split, inputs.budget(trained.config.data, split.sizes,
                           trained.graph_spec), shuffle=False)
  fn = jax.jit(trained.energy_and_forces)
  errors = []
  for batch in loader:
    energies, _ = fn(trained.params, batch)
    real = batch.globals["mask"]
    errors.extend(np.abs(np.asarray(energies)[real]
                         - batch.globals["energy"][real]))
  return float(np.mean(errors))


def _params_at(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_names=("state", "data")) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  return restored.state


def test_killed_run_resumes_and_reproduces(small_devset, tmp_path):
  config = _config(small_devset)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

  killed = tmp_path / "killed"
  env = dict(os.environ, **{train.KILL_AT_STEP_ENV: "25"})
  proc = subprocess.run(
      [sys.executable, "-m", "matsci_jax.main", "--config=configs/test.py",
       f"--config.data.path={small_devset / 's2ef'}", f"--workdir={killed}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert not (killed / "metrics.json").exists()
  # Step 20's checkpoint may have been cut off mid-write by the kill; only
  # complete ones count, and the resumed run starts from the latest of those.
  complete = [d for d in os.listdir(killed / "checkpoints") if d.isdigit()]
  assert complete and set(complete) <= {"10", "20"}

  resumed = train.train_and_evaluate(config, str(killed))
  assert resumed["metrics"] == straight["metrics"]
  a, b = _params_at(tmp_path / "straight", 40), _params_at(killed, 40)
  import jax
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The resumed run logged again from its checkpoint on: one row per step,
  # and the losses repeat the uninterrupted run's.
  straight_losses = _train_losses(tmp_path / "straight")
  resumed_losses = _train_losses(killed)
  assert [s for s, _ in resumed_losses] == [s for s, _ in straight_losses]
  for (_, a), (_, b) in zip(resumed_losses, straight_losses):
    assert a == pytest.approx(b, rel=1e-6)


def test_corrupt_dataset_folder_is_a_clear_error(small_devset, tmp_path):
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in os.listdir(small_devset / "s2ef"):
    if not name.startswith("dataset_info"):
      os.symlink(small_devset / "s2ef" / name, broken / name)
  with pytest.raises(DatasetError, match="missing dataset_info.json"):
    train.train_and_evaluate(
        _config(small_devset, **{"data.path": str(broken)}),
        str(tmp_path / "run"))


def test_bad_best_metric_is_a_clear_error(small_devset, tmp_path):
  config = _config(small_devset, **{"train.best_metric": "test/force_mae"})
  with pytest.raises(train.ConfigError, match="best_metric"):
    train.train_and_evaluate(config, str(tmp_path))


def test_node_budget_alone_sizes_edges_and_graphs(small_devset):
  data = dataset_io.Dataset(str(small_devset / "s2ef"))
  sizes, spec = data.split("train").sizes, data.graph_spec.select("graph")
  config = _config(small_devset, **{"data.max_nodes": 400})
  budget = inputs.budget(config.data, sizes, spec)
  auto = inputs.budget(_config(small_devset).data, sizes, spec)
  assert budget.n_node == 400 and budget.n_edge > 2 * auto.n_edge
  assert budget.n_graph > auto.n_graph


def test_missing_config_field_is_a_clear_error(small_devset, tmp_path):
  config = ml_collections.ConfigDict(_config(small_devset).to_dict())
  del config.loss["force_weight"]
  with pytest.raises(train.ConfigError, match=r"'loss.force_weight'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_split_without_targets_is_a_clear_error(tmp_path):
  from ase.build import fcc100
  import ase.io
  atoms = fcc100("Cu", (2, 2, 2), vacuum=4.0)
  atoms.pbc = True
  ase.io.write(tmp_path / "x.extxyz", [atoms] * 3)
  convert({"train": [str(tmp_path / "x.extxyz")],
           "val": [str(tmp_path / "x.extxyz")]}, tmp_path / "ds",
          task="s2ef", workers=1, progress=False)
  config = test_config.get_config()
  config.data.path = str(tmp_path / "ds")
  with pytest.raises(DatasetError,
                     match=r"split 'train' has no energy / forces"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_non_finite_loss_stops_and_names_the_step(small_devset, tmp_path):
  config = _config(small_devset, **{"loss.force_weight": 1e39})
  with pytest.raises(train.NonFiniteLossError, match="not finite at step 1 "):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(
      tmp_path / "checkpoints")


def test_devset_cache_is_rebuilt_when_its_size_changes(tmp_path):
  config = test_config.get_config()
  config.data.devset_dir = str(tmp_path / "cache")
  config.data.devset_num_systems = 3
  folder = inputs.dataset_folder(config)
  n3 = len(dataset_io.Dataset(folder).split("train"))
  assert inputs.dataset_folder(config) == folder  # Reused as it is.
  config.data.devset_num_systems = 5
  n5 = len(dataset_io.Dataset(inputs.dataset_folder(config)).split("train"))
  assert n5 > n3


def _metric(workdir, name):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
            if r["metric"] == name}


@pytest.mark.parametrize("task,model", [
    ("s2ef", "egnn"), ("s2ef", "megnet"), ("s2ef", "gala"),
    ("is2re", "egnn"), ("is2re", "megnet"), ("is2re", "gala")])
def test_every_model_and_task_learns(devset, tmp_path, task, model):
  """A short run on the dev set lowers the training loss and validation error.

  The full dev set's validation split (469 S2EF frames, 30 IS2RE systems)
  is evaluated before and after a short run of a small model: 60 steps of 4
  structures for S2EF, and 100 steps of 32 for IS2RE, whose one target per
  structure gives a much noisier gradient per structure (with batches of 4
  the models stay at the element-reference fit for hundreds of steps).
  """
  config = test_config.get_config(f"{task},{model}")
  config.data.path = str(devset / task)
  steps = 60 if task == "s2ef" else 100
  if task == "is2re":
    config.data.batch_size = 32
  config.train.num_steps = steps
  config.train.eval_every = steps
  config.train.eval_at_start = True
  result = train.train_and_evaluate(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert losses[-1][1] < 0.85 * losses[0][1], losses
  energy = _metric(tmp_path, "val/energy_mae")
  assert sorted(energy) == [0, steps]
  assert energy[steps] < 0.95 * energy[0], energy
  assert result["recompiles_after_warmup"] == 0


def test_structure_level_model_needs_tags_in_every_split(tmp_path):
  """Adsorbate-only references fitted on tagged train data need tagged val."""
  import ase.io
  from ase.build import add_adsorbate, fcc100
  from ase.calculators.emt import EMT
  frames = {"train": [], "val": []}
  for split, n in (("train", 4), ("val", 2)):
    for k in range(n):
      slab = fcc100("Cu", (2, 2, 3), vacuum=6.0)
      add_adsorbate(slab, "O", 1.6 + 0.1 * k, "hollow")
      slab.pbc = True
      if split == "train":
        slab.set_tags([1] * (len(slab) - 1) + [2])
      else:
        del slab.arrays["tags"]
      slab.calc = EMT()
      slab.get_forces()
      frames[split].append(slab)
    ase.io.write(tmp_path / f"{split}.extxyz", frames[split])
  convert([f"{s}={tmp_path / f'{s}.extxyz'}" for s in frames],
          tmp_path / "ds", task="s2ef", workers=1, progress=False)
  config = test_config.get_config("megnet")
  config.data.path = str(tmp_path / "ds")
  config.model.readout = "set2set"
  with pytest.raises(DatasetError, match=r"split\(s\) val have structures "
                     "without OC20 tags"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_train_fraction_keeps_nested_seeded_subsets(small_devset):
  data = dataset_io.Dataset(str(small_devset / "s2ef"))
  split = data.split("train")
  kept = {f: inputs.subset(split, f, seed=0) for f in (0.25, 0.5, 1.0)}
  assert kept[1.0] is split
  assert len(kept[0.25]) == round(0.25 * len(split))
  small, large = (set(kept[f].source.indices.tolist()) for f in (0.25, 0.5))
  assert small < large  # Nested.
  assert set(inputs.subset(split, 0.25, seed=1).source.indices.tolist()) != (
      small)
  i = int(kept[0.5].source.indices[3])
  np.testing.assert_array_equal(kept[0.5].source[3]["positions"],
                                split.source[i]["positions"])
  np.testing.assert_array_equal(kept[0.5].sizes[3], split.sizes[i])
