"""Scaling sweeps: records, skipping, resuming, budgets, FLOPs and errors.

One 2 x 2 sweep (EGNN widths 8 and 16, half and all of the small dev set's
training split, one epoch each) is shared by the tests; tests that change
its folder work on a copy.
"""

import json
import os
import shutil

import ml_collections
import pytest

from matsci_jax.scaling import __main__ as cli
from matsci_jax.scaling import sweep

RECORD_FIELDS = {
    "name", "overrides", "base", "budget", "params", "train_structures",
    "train_fraction", "flops_per_step", "total_flops", "steps",
    "structures_seen", "atoms_seen", "wall_s", "device_s", "device_kind",
    "device_count", "resumed_from_step", "final", "best", "curve"}


def _dotted(fields):
  return ml_collections.ConfigDict(fields, allow_dotted_keys=True,
                                   sort_keys=False)


def _sweep_config(data, widths=(8, 16), fractions=(0.5, 1.0),
                  budget=None, **overrides):
  config = ml_collections.ConfigDict()
  config.base = "configs/test.py"
  config.base_overrides = _dotted({"data.path": str(data), **overrides})
  config.grid = _dotted({"model.hidden_dim": widths,
                         "data.train_fraction": fractions})
  config.budget = ml_collections.ConfigDict(
      budget or dict(kind="epochs", value=1.0, evaluations=2))
  return config


def _lines(folder):
  with open(os.path.join(folder, sweep.RUNS_FILE)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(small_devset):
  return small_devset / "s2ef"


@pytest.fixture(scope="module")
def swept(data, tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep") / "out"
  outcome = sweep.run_sweep(_sweep_config(data), str(out), parallel=1)
  assert not outcome.failed and len(outcome.recorded) == 4
  return out


def _copy(swept, tmp_path):
  shutil.copytree(swept, tmp_path / "out")
  return tmp_path / "out"


def test_every_run_appends_one_complete_record(swept):
  records = _lines(swept)
  assert sorted(r["name"] for r in records) == [
      "hidden_dim=16,train_fraction=0.5", "hidden_dim=16,train_fraction=1.0",
      "hidden_dim=8,train_fraction=0.5", "hidden_dim=8,train_fraction=1.0"]
  by = {(r["overrides"]["model.hidden_dim"],
         r["overrides"]["data.train_fraction"]): r for r in records}
  full = by[8, 1.0]["train_structures"]
  for (_, fraction), r in by.items():
    assert set(r) == RECORD_FIELDS
    assert r["train_fraction"] == fraction
    assert r["train_structures"] == round(fraction * full)
    # One epoch: every training structure exactly once.
    assert r["structures_seen"] == r["train_structures"]
    assert r["atoms_seen"] > 10 * r["structures_seen"]
    assert r["total_flops"] == r["flops_per_step"] * r["steps"]
    assert r["device_count"] == 1 and r["device_kind"] == "cpu"
    assert 0 < r["device_s"] < r["wall_s"]
    # The curve: two evaluations, the last the final one.
    steps = [p["step"] for p in r["curve"]]
    assert steps == [(r["steps"] + 1) // 2, r["steps"]]
    for p in r["curve"]:
      assert p["flops"] == p["step"] * r["flops_per_step"]
    last = r["curve"][-1]["metrics"]
    assert set(last) == set(r["final"])
    for name, value in r["final"].items():
      assert last[name] == pytest.approx(value, rel=1e-6)
      values = [p["metrics"][name] for p in r["curve"]]
      better = max if name.endswith(("force_cos", "efwt", "ewt")) else min
      assert r["best"][name] == better(values)
  assert by[16, 1.0]["params"] > by[8, 1.0]["params"]
  assert by[16, 0.5]["params"] == by[16, 1.0]["params"]
  # Half the data, half the steps of an epoch (give or take a batch).
  assert abs(by[8, 0.5]["steps"] - by[8, 1.0]["steps"] / 2) <= 2


def test_started_again_it_skips_recorded_runs(swept, data, monkeypatch):
  before = (swept / sweep.RUNS_FILE).read_bytes()

  def fail(*args):
    raise AssertionError("a recorded run was trained again")
  monkeypatch.setattr(sweep, "execute", fail)
  outcome = sweep.run_sweep(_sweep_config(data), str(swept), parallel=1)
  assert len(outcome.skipped) == 4
  assert not outcome.recorded and not outcome.failed
  assert (swept / sweep.RUNS_FILE).read_bytes() == before


def test_unrecorded_runs_are_appended_or_resumed(swept, data, tmp_path,
                                                 monkeypatch):
  out = _copy(swept, tmp_path)
  records = _lines(out)
  kept, finished, killed = records[:2], records[2], records[3]
  # The sweep stopped before recording two finished runs, the last while
  # writing its line; one of them also lost its record file, as a run
  # killed after its last checkpoint would.
  (out / sweep.RUNS_FILE).write_text(
      "".join(json.dumps(r) + "\n" for r in kept) + '{"name": "hid')
  os.remove(out / sweep.RUNS_DIR / killed["name"] / sweep.RECORD_FILE)
  trained = []
  real = sweep.execute
  monkeypatch.setattr(sweep, "execute",
                      lambda run, workdir: trained.append(run.name)
                      or real(run, workdir))
  outcome = sweep.run_sweep(_sweep_config(data), str(out), parallel=1)
  assert trained == [killed["name"]]
  assert sorted(outcome.recorded) == sorted([finished["name"],
                                             killed["name"]])
  after = _lines(out)  # The cut line is gone; every line is a record.
  assert after[:3] == kept + [finished]
  resumed = after[3]
  assert resumed["resumed_from_step"] == killed["steps"] == resumed["steps"]
  assert resumed["params"] == killed["params"]
  assert resumed["final"] == pytest.approx(killed["final"])


def test_killed_subprocess_run_is_reported_and_resumes(data, tmp_path,
                                                       monkeypatch, capsys):
  config = tmp_path / "sweep_config.py"
  config.write_text(
      "import ml_collections\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.base = 'configs/test.py'\n"
      "  c.base_overrides = ml_collections.ConfigDict(\n"
      f"      {{'data.path': {str(data)!r}}}, allow_dotted_keys=True)\n"
      "  c.grid = ml_collections.ConfigDict(\n"
      "      {'model.hidden_dim': (8,)}, allow_dotted_keys=True)\n"
      "  c.budget = ml_collections.ConfigDict(\n"
      "      dict(kind='steps', value=20, evaluations=4))\n"
      "  return c\n")
  out = tmp_path / "out"
  args = ["sweep", f"--config={config}", "--out", str(out), "--parallel", "2"]
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  from matsci_jax import train
  monkeypatch.setenv(train.KILL_AT_STEP_ENV, "15")
  assert cli.main(args) == 1
  log = out / sweep.RUNS_DIR / "hidden_dim=8" / sweep.LOG_FILE
  err = capsys.readouterr().err
  assert "1 of 1 runs failed" in err and f"hidden_dim=8: {log}" in err
  assert log.exists() and not (out / sweep.RUNS_FILE).exists()

  monkeypatch.delenv(train.KILL_AT_STEP_ENV)
  assert cli.main(args) == 0
  (record,) = _lines(out)
  assert record["steps"] == 20 and record["resumed_from_step"] in (5, 10, 15)
  assert [p["step"] for p in record["curve"]] == [5, 10, 15, 20]


def test_flops_per_step_grow_with_width_as_dense_layers_do(swept, data):
  records = {r["overrides"]["model.hidden_dim"]: r for r in _lines(swept)
             if r["train_fraction"] == 1.0}
  run = sweep.plan(_sweep_config(data, widths=(16, 32), fractions=(1.0,)))
  probes = [sweep.measure(r.config()) for r in run]
  # The probe counts the step train.py runs.
  assert probes[0].flops_per_step == records[16]["flops_per_step"]
  f8, f16, f32 = (records[8]["flops_per_step"], probes[0].flops_per_step,
                  probes[1].flops_per_step)
  # FLOPs = a + b d + c d^2 in the width d: dense layers (c > 0) make the
  # second difference over d, 2d, 4d more than twice the first; terms
  # linear in d (b > 0: gathers, sums, activations) keep it under 4x.
  assert f8 < f16 < f32
  assert 2.2 < (f32 - f16) / (f16 - f8) < 4.0
  # A FLOPs budget: as many whole steps as it pays for.
  assert sweep.budget_steps(run[0].config(), {
      "kind": "flops", "value": 10.5 * f16}) == 10


def test_curve_and_best_keep_every_validation_metric(tmp_path):
  (tmp_path / "metrics.csv").write_text(
      "step,metric,value\n"
      "10,train/loss,5.0\n"
      "10,val/slabs/force_mae,0.3\n10,val/bulk/force_cos,0.2\n"
      "20,val/slabs/force_mae,0.1\n20,val/bulk/force_cos,0.6\n"
      "30,val/slabs/force_mae,0.2\n30,val/bulk/force_cos,0.4\n")
  curve = sweep.read_curve(str(tmp_path), 100.0)
  assert curve == [
      {"step": s, "flops": 100.0 * s, "metrics": {
          "val/slabs/force_mae": e, "val/bulk/force_cos": c}}
      for s, e, c in ((10, 0.3, 0.2), (20, 0.1, 0.6), (30, 0.2, 0.4))]
  assert sweep.best_metrics(curve) == {"val/slabs/force_mae": 0.1,
                                       "val/bulk/force_cos": 0.6}


@pytest.mark.parametrize("change,message", [
    ({"grid": {"model.hidden_dimm": (8,)}},
     "config.grid: 'model.hidden_dimm' is not a field of configs/test.py; "
     "did you mean 'model.hidden_dim'?"),
    ({"grid": {"data.train_fraction": (0.5, 1.5)}},
     r"config.grid: data.train_fraction = 1.5 is outside \(0, 1\]"),
    ({"grid": {"data.train_fraction": (0.0,)}},
     r"config.grid: data.train_fraction = 0.0 is outside \(0, 1\]"),
    ({"grid": {}}, "config.grid is empty"),
    ({"grid": {"model.hidden_dim": ()}},
     r"config.grid: 'model.hidden_dim' needs a non-empty tuple of values"),
    ({"budget": {"kind": "tokens", "value": 5}},
     "config.budget.kind: 'tokens' is not one of steps, epochs, flops"),
    ({"budget": {"kind": "steps", "value": 2.5}},
     "config.budget.value = 2.5: a 'steps' budget must be an integer >= 1"),
    ({"grid": {"model.hidden_dim": (8, 0)}},
     "run hidden_dim=0: config.model.hidden_dim = 0: must be an integer"),
    ({"grid": {"model.hidden_dim": (8.5,)}},
     "run hidden_dim=8.5: cannot set model.hidden_dim = 8.5"),
    ({"grid": {"model.hidden_dim,model.num_layers": ((8, 1), (16,))}},
     "names 2 fields, so each value must be a tuple of 2; got"),
])
def test_bad_sweep_configs_are_named(change, message):
  config = _sweep_config("unused")
  for key, value in change.items():
    config[key] = (_dotted(value) if key == "grid"
                   else ml_collections.ConfigDict(value))
  with pytest.raises(sweep.SweepError, match=message):
    sweep.plan(config)


def test_command_line_names_a_bad_sweep_config(tmp_path):
  config = tmp_path / "bad.py"
  config.write_text(
      "import ml_collections\n\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict(dict(\n"
      "      base='configs/test.py', budget=dict(kind='steps', value=5),\n"
      "      grid=ml_collections.ConfigDict({'model.hidden_dimm': (8,)},\n"
      "                                     allow_dotted_keys=True)))\n")
  with pytest.raises(SystemExit) as exit_:
    cli.main(["sweep", f"--config={config}", "--out", str(tmp_path / "o")])
  assert exit_.value.code == (
      "error: config.grid: 'model.hidden_dimm' is not a field of "
      "configs/test.py; did you mean 'model.hidden_dim'?")
  assert not (tmp_path / "o").exists()


def test_grid_of_tied_fields_names_runs_by_both():
  config = _sweep_config("unused")
  config.grid = _dotted({"model.hidden_dim,model.num_layers": ((8, 1),
                                                              (16, 3)),
                         "train.seed": (0, 1)})
  runs = sweep.plan(config)
  assert [r.name for r in runs] == [
      "hidden_dim=8,num_layers=1,seed=0", "hidden_dim=8,num_layers=1,seed=1",
      "hidden_dim=16,num_layers=3,seed=0",
      "hidden_dim=16,num_layers=3,seed=1"]
  assert runs[2].config().model.num_layers == 3


def test_a_folder_started_with_other_settings_is_an_error(swept, data,
                                                          tmp_path):
  out = _copy(swept, tmp_path)
  os.remove(out / sweep.RUNS_FILE)
  changed = _sweep_config(data, **{"optimizer.learning_rate": 1e-3})
  with pytest.raises(sweep.SweepError, match=(
      "runs/hidden_dim=8,train_fraction=0.5 holds run "
      "hidden_dim=8,train_fraction=0.5 started with another overrides")):
    sweep.run_sweep(changed, str(out), parallel=1)


def test_fit_reads_the_sweep_and_reports_what_it_cannot_fit(
    swept, data, tmp_path, capsys):
  out = _copy(swept, tmp_path)
  # Two sizes per axis: the learning curves may still give the compute
  # frontier three points; every other fit is skipped with its reason.
  try:
    cli.main(["fit", str(out), "--bootstrap", "20"])
    text = capsys.readouterr().out
    assert "skipped data: a fit needs at least three sizes" in text
  except SystemExit as e:
    text = str(e.code)
    assert text.startswith("error: ") and "from 4 runs" in text
  assert "params: a fit needs at least three sizes; got 2 parameters N" in (
      text)
  assert "joint: a fit needs at least three sizes" in text
  # A third width, at all the data, gives the parameters axis three sizes;
  # the runs already recorded are not trained again.
  outcome = sweep.run_sweep(
      _sweep_config(data, widths=(8, 16, 32), fractions=(1.0,)), str(out),
      parallel=1)
  assert outcome.recorded == ["hidden_dim=32,train_fraction=1.0"]
  assert len(outcome.skipped) == 2
  capsys.readouterr()
  assert cli.main(["fit", str(out), "--bootstrap", "20"]) == 0
  printed = capsys.readouterr().out
  assert "val/force_mae (final) over 5 runs" in printed
  assert "parameters N" in printed
  assert "skipped data: a fit needs at least three sizes" in printed
  fitted = json.load(open(out / "fit.json"))
  assert fitted["fits"]["params"]["points"]["x"] == sorted(
      r["params"] for r in _lines(out) if r["train_fraction"] == 1.0)
  for name in ("loss_vs_params.png", "learning_curves.png"):
    assert str(out / name) in printed
    assert (out / name).stat().st_size > 10_000
