"""Figures of a training run: learning curve and parity plots in plots/."""

import csv
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from matplotlib import image

from configs import test as test_config
from matsci_jax import checkpoints, plots, train
from matsci_jax.config_checks import ConfigError, check_config


def _read_png(path):
  """Pixels [height, width, channels] of a PNG, checked to be a figure."""
  pixels = image.imread(str(path))
  assert pixels.ndim == 3 and pixels.shape[2] in (3, 4), pixels.shape
  assert pixels.shape[0] >= 200 and pixels.shape[1] >= 200, pixels.shape
  assert pixels[..., :3].std() > 0.05  # Not blank.
  return pixels


def _aspect(path) -> float:
  height, width = _read_png(path).shape[:2]
  return width / height


def test_finished_run_has_its_figures(trained_s2ef):
  folder = trained_s2ef / "plots"
  assert sorted(os.listdir(folder)) == ["learning_curve.png",
                                        "parity_val.png"]  # No temp files.
  # Loss, energy and force MAE side by side; energy and force parity.
  assert 3.2 < _aspect(folder / "learning_curve.png") < 4.0
  assert 1.7 < _aspect(folder / "parity_val.png") < 2.1


def test_run_with_several_sources_draws_each(trained_multi):
  folder = trained_multi / "plots"
  assert sorted(os.listdir(folder)) == [
      "learning_curve.png", "parity_val_lips.png", "parity_val_slabs.png"]
  for name in os.listdir(folder):
    _read_png(folder / name)
  metrics = plots.read_metrics(str(trained_multi / "metrics.csv"))
  assert plots.eval_labels(metrics) == ["val/lips", "val/slabs"]


@pytest.fixture(scope="module")
def trained_job(trained_s2ef):
  """The trained run's job (data, model, batches), its EMA parameters and
  a prediction step."""
  trained = checkpoints.load(trained_s2ef, checkpoint="latest")
  job = train.build(trained.config)
  predict = plots.make_predict_fn(job.task.make_loss(
      job.model, job.normalizer, trained.config.loss))
  return job, trained, predict


def test_parity_errors_are_the_runs_metrics(trained_job, trained_s2ef):
  """The parity points reproduce the final evaluation's MAEs: the same
  parameters, structures and counted atoms."""
  job, trained, predict = trained_job
  parity = plots.parity_data(predict, trained.params, job.eval_data[0],
                             job.evals[0].task, job.task.energy_target)
  final = json.load(open(trained_s2ef / "metrics.json"))["metrics"]
  assert parity.structures == final["val/num_structures"]
  assert len(parity.energy) == parity.structures
  assert parity.stress is None
  np.testing.assert_allclose(parity.mae("energy"), final["val/energy_mae"],
                             rtol=1e-5)
  np.testing.assert_allclose(parity.mae("forces"), final["val/force_mae"],
                             rtol=1e-5)
  # A cap stops after the batch that reaches it.
  few = plots.parity_data(predict, trained.params, job.eval_data[0],
                          job.evals[0].task, job.task.energy_target,
                          max_structures=1)
  assert 1 <= few.structures < parity.structures


def test_parity_figure_follows_the_model(trained_job, tmp_path):
  job, trained, predict = trained_job

  def figure(params, name):
    parity = plots.parity_data(predict, params, job.eval_data[0],
                               job.evals[0].task, job.task.energy_target)
    return _read_png(plots.plot_parity(parity, str(tmp_path / name), 7))

  untrained = jax.device_get(job.strategy.host_state(job.state).ema_params)
  first = figure(trained.params, "a.png")
  assert np.array_equal(first, figure(trained.params, "b.png"))
  other = figure(untrained, "c.png")
  assert first.shape == other.shape and not np.array_equal(first, other)


def test_each_evaluation_redraws_the_parity_figure(trained_job, tmp_path):
  """A run's figures at two evaluations: the second overwrites the first
  with the new model's, and compiles nothing more."""
  from matsci_jax import monitoring
  job, trained, _ = trained_job
  loss_config = trained.config.loss
  figures = plots.RunPlots(str(tmp_path), job, loss_config)
  untrained = job.strategy.host_state(job.state).ema_params
  moved = jax.tree_util.tree_map(lambda x: x + 0.05, untrained)
  path = tmp_path / "plots" / "parity_val.png"
  assert figures.parity(20, untrained) == [str(path)]
  before, compiles = _read_png(path), monitoring.compile_count()
  assert figures.parity(40, moved) == [str(path)]
  assert monitoring.compile_count() == compiles
  after = _read_png(path)
  assert before.shape == after.shape and not np.array_equal(before, after)


def _short_run(small_devset, tmp_path, spec="egnn", **train_fields):
  config = test_config.get_config(spec)
  task = "is2re" if spec.startswith("is2re") else "s2ef"
  config.data.path = str(small_devset / task)
  config.train.update(num_steps=2, log_every=1, eval_every=2,
                      checkpoint_every=2, **train_fields)
  return train.train_and_evaluate(config, str(tmp_path))


def test_switched_off_run_draws_nothing(trained_s2ef, tmp_path):
  """The finished run started again (it only evaluates) with plots off."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_s2ef, workdir)
  shutil.rmtree(workdir / "plots")
  config = checkpoints.RunFolder(str(workdir)).read_config()
  config.train.plots = False
  result = train.train_and_evaluate(config, str(workdir))
  assert result["resumed_from_step"] == 100
  assert not (workdir / "plots").exists()


def test_is2re_run_draws_energy_parity_only(small_devset, tmp_path):
  result = _short_run(small_devset, tmp_path, "is2re,egnn")
  assert result["recompiles_after_warmup"] == 0
  folder = tmp_path / "plots"
  assert sorted(os.listdir(folder)) == ["learning_curve.png",
                                        "parity_val.png"]
  # One parity panel (energy); loss and energy MAE curves.
  assert 0.8 < _aspect(folder / "parity_val.png") < 1.1
  assert 2.0 < _aspect(folder / "learning_curve.png") < 2.6


def _write_metrics(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["step", "metric", "value"])
    writer.writerows(rows)


def test_learning_curve_of_several_sources(tmp_path):
  """One line per split and source; a panel per metric logged; a step
  logged again (a resumed run) keeps its last value."""
  rows = []
  for step in (10, 20, 30):
    rows += [(step, "train/loss", 1.0 / step), (step, "perf/compiles", 3),
             (step, "train/learning_rate", 1e-3)]
  for step in (20, 30):
    for source in ("slabs", "bulk"):
      rows += [(step, f"val/{source}/loss", 2.0 / step),
               (step, f"val/{source}/energy_mae", 0.5),
               (step, f"val/{source}/force_mae", 0.1),
               (step, f"val/{source}/num_structures", 13)]
    rows.append((step, "val/bulk/stress_mae", 0.01))
  rows.append((30, "train/loss", 0.5))
  _write_metrics(tmp_path / "metrics.csv", rows)
  metrics = plots.read_metrics(str(tmp_path / "metrics.csv"))
  assert plots.eval_labels(metrics) == ["val/bulk", "val/slabs"]
  steps, values = metrics["train/loss"]
  assert steps.tolist() == [10, 20, 30] and values[-1] == 0.5
  path = plots.plot_learning_curve(str(tmp_path / "metrics.csv"),
                                   str(tmp_path / "plots" / "curve.png"))
  assert 4.3 < _aspect(path) < 5.3  # Loss, energy, force, stress.
  assert os.listdir(tmp_path / "plots") == ["curve.png"]
  assert plots.parity_name("val/bulk") == "parity_val_bulk.png"


def test_empty_metrics_draw_no_curve(tmp_path):
  _write_metrics(tmp_path / "metrics.csv", [])
  assert plots.plot_learning_curve(str(tmp_path / "metrics.csv"),
                                   str(tmp_path / "curve.png")) is None
  assert not (tmp_path / "curve.png").exists()


def test_subsample_is_bounded_and_seeded():
  pairs = np.arange(240_000, dtype=float).reshape(-1, 2)
  drawn = plots.subsample(pairs, 50_000)
  assert drawn.shape == (50_000, 2)
  assert np.array_equal(drawn, plots.subsample(pairs, 50_000))
  assert np.all(np.diff(drawn[:, 0]) > 0)  # Rows of `pairs`, in order.
  assert np.array_equal(plots.subsample(pairs[:10], 50_000), pairs[:10])


def test_a_failing_figure_does_not_stop_the_run(tmp_path):
  figures = plots.RunPlots(str(tmp_path), job=None, loss_config=None)
  assert figures.learning_curve(5) == []  # No metrics.csv: logged.
  _write_metrics(tmp_path / "metrics.csv", [(5, "train/loss", 1.0)])
  off = plots.RunPlots(str(tmp_path), None, None, enabled=False)
  assert off.learning_curve(5) == [] and not (tmp_path / "plots").exists()
  assert figures.learning_curve(5) == [
      str(tmp_path / "plots" / "learning_curve.png")]


def test_plots_switch_is_checked():
  config = test_config.get_config()
  assert config.train.plots is True
  settings = config.to_dict()
  settings["train"]["plots"] = "no"
  with pytest.raises(ConfigError, match=r"config.train.plots = 'no': must "
                     "be True or False"):
    check_config(ml_collections.ConfigDict(settings))
  del settings["train"]["plots"]
  with pytest.raises(ConfigError, match="train.plots"):
    check_config(ml_collections.ConfigDict(settings))
