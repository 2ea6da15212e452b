"""Power-law fits and figures of a scaling sweep (synthetic runs.jsonl)."""

import json
import os

import numpy as np
import pytest
from matplotlib import image
from scipy import optimize

from matsci_jax.scaling import fit, plots

TRUE = {"l_inf": 0.05, "a": 30.0, "alpha": 0.3, "b": 20.0, "beta": 0.5}
METRIC = "val/force_mae"


def _record(width, fraction, seed, loss, steps=1000, every=200):
  """One run record as the sweep writes it; the curve decays to `loss`."""
  params = 40 * width ** 2
  structures = int(4000 * fraction)
  flops_per_step = 6.0 * params * 32
  curve = [{"step": s, "flops": s * flops_per_step,
            "metrics": {METRIC: loss * (1 + 4 * (s / steps) ** -0.5 - 4),
                        "val/loss": 2 * loss}}
           for s in range(every, steps + 1, every)]
  # A point before training: zero FLOPs, left out of the frontier.
  curve.insert(0, {"step": 0, "flops": 0.0, "metrics": {METRIC: 3.0}})
  final = {METRIC: loss, "val/energy_mae": 3 * loss, "val/loss": 2 * loss,
           "val/efwt": 0.1}
  return {"name": f"w{width}_l2_f{fraction}_s{seed}",
          "overrides": {"model.hidden_dim": width},
          "params": params, "train_structures": structures,
          "train_fraction": fraction, "flops_per_step": flops_per_step,
          "total_flops": steps * flops_per_step, "steps": steps,
          "structures_seen": 32 * steps, "atoms_seen": 900 * steps,
          "wall_s": 10.0, "device_s": 9.0, "device_kind": "cpu",
          "device_count": 1, "final": final,
          "best": {k: 0.9 * v for k, v in final.items()}, "curve": curve}


def _write_sweep(folder, widths=(16, 32, 64, 128), fractions=(0.125, 0.25,
                 0.5, 1.0), seeds=(0, 1), noise=0.03, curves=True):
  """runs.jsonl with losses from the joint law times lognormal noise."""
  rng = np.random.default_rng(0)
  lines = []
  for w in widths:
    for f in fractions:
      for s in seeds:
        loss = fit.joint_law(40 * w ** 2, int(4000 * f), **TRUE)
        loss *= np.exp(noise * rng.standard_normal())
        record = _record(w, f, s, float(loss))
        record["curve"] = record["curve"] if curves else []
        lines.append(json.dumps(record))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "runs.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(folder)


def test_power_law_recovers_the_exponent_within_its_interval():
  rng = np.random.default_rng(0)
  n = np.geomspace(1e3, 1e6, 6)
  y = fit.power_law(n, 0.05, 2.0, 0.3) * np.exp(0.03 * rng.standard_normal(6))
  result = fit.fit_power_law(n, y, bootstrap=300, seed=0)
  lo, hi = result["intervals"]["alpha"]
  assert lo <= 0.3 <= hi
  assert abs(result["params"]["alpha"] - 0.3) < 0.05
  # Informative: the interval rules out exponents far from the truth.
  assert hi - lo < 0.3 and not lo <= 0.6 <= hi
  lo, hi = result["intervals"]["l_inf"]
  assert lo <= 0.05 <= hi
  assert result["bootstrap"]["fitted"] > 250
  band = result["band"]
  assert np.all(np.array(band["lo"]) <= np.array(band["hi"]))
  assert band["x"][0] < n[0] and band["x"][-1] > n[-1]


def test_fit_minimises_relative_not_absolute_errors():
  rng = np.random.default_rng(2)
  n = np.geomspace(1e2, 1e8, 8)
  y = fit.power_law(n, 0.01, 50.0, 0.5) * np.exp(0.2 * rng.standard_normal(8))
  ours = fit.fit_power_law(n, y, bootstrap=0)
  # A fit of absolute errors is led by the largest losses.
  linear, _ = optimize.curve_fit(fit.power_law, n, y, p0=[0.01, 50, 0.5],
                                 bounds=([0, 0, 0], np.inf))
  log_rms = np.sqrt(np.mean(np.log(fit.power_law(n, *linear) / y) ** 2))
  assert ours["rms_log_residual"] < 0.9 * log_rms
  assert ours["intervals"]["alpha"] is None  # bootstrap=0


def test_joint_fit_recovers_both_exponents():
  rng = np.random.default_rng(1)
  n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e4, 1e6, 4),
                                         np.geomspace(300, 5000, 4)))
  y = fit.joint_law(n, d, 0.05, 3.0, 0.3, 5.0, 0.5)
  y = y * np.exp(0.03 * rng.standard_normal(len(y)))
  result = fit.fit_joint(n, d, y, bootstrap=200, seed=0)
  for name, true in (("alpha", 0.3), ("beta", 0.5)):
    lo, hi = result["intervals"][name]
    assert lo <= true <= hi, (name, lo, hi)
    assert abs(result["params"][name] - true) < 0.1
    assert hi - lo < 0.5


def test_three_sizes_fit_exactly_and_get_no_intervals(tmp_path):
  n = np.array([1e3, 1e4, 1e5])
  y = fit.power_law(n, 0.05, 2.0, 0.3)
  result = fit.fit_power_law(n, y, bootstrap=50)
  assert result["params"]["alpha"] == pytest.approx(0.3, abs=1e-3)
  # Each resample would be the same three points: no interval, a note.
  assert result["intervals"] == {"l_inf": None, "a": None, "alpha": None}
  assert "3 points for 3 parameters" in result["bootstrap"]["note"]
  assert result["band"]["lo"] is None
  assert fit.exponent_text(result) == "alpha = 0.3"
  # A fourth size brings intervals back.
  n4, y4 = np.append(n, 1e6), np.append(y, fit.power_law(1e6, 0.05, 2, 0.3))
  result = fit.fit_power_law(n4, y4 * [1, 1.02, 0.98, 1], bootstrap=50)
  assert result["intervals"]["alpha"] is not None
  assert "note" not in result["bootstrap"]
  exact = {"axis": "params", "fixed": {"train_structures": 100},
           "points": {"x": n.tolist(), "loss": y.tolist(),
                      "loss_std": [0.0] * 3, "seeds": [1] * 3}}
  exact |= fit.fit_power_law(n, y, bootstrap=50)
  path = plots.plot_slice(str(tmp_path / "exact.png"), exact, METRIC)
  assert image.imread(path).shape[0] > 0


def test_fewer_than_three_sizes_names_the_axis_and_sizes(tmp_path):
  with pytest.raises(fit.FitError, match=r"at least three sizes; got 2 "
                     r"parameters N: 1000, 10000"):
    fit.fit_power_law([1e3, 1e3, 1e4], [1.0, 1.1, 0.5], what="parameters N")
  with pytest.raises(fit.FitError, match="training structures D: 500"):
    fit.fit_joint([1, 2, 3], [500, 500, 500], [3.0, 2.0, 1.0])
  # Two widths: the model-size and joint fits are skipped, the rest fitted.
  folder = _write_sweep(tmp_path / "two", widths=(32, 64), seeds=(0,))
  result = fit.fit_directory(folder, bootstrap=20)
  assert set(result["fits"]) == {"data", "compute"}
  reason = result["skipped"]["params"]
  assert "got 2 parameters N at the largest train_structures = 4000" in reason
  assert "40960 (w32_l2_f1.0_s0)" in reason
  assert "got 2 parameters N" in result["skipped"]["joint"]
  # One model, one data size, no curves: nothing can be fitted.
  folder = _write_sweep(tmp_path / "one", widths=(32,), fractions=(1.0,),
                        curves=False)
  with pytest.raises(fit.FitError, match=r"no scaling law can be fitted "
                     r"from 2 runs:\n  params: .*\n  data: .*\n  compute: "
                     r"a fit needs at least three sizes; got 0 frontier"):
    fit.fit_directory(folder, bootstrap=0)


def test_bad_records_name_the_file_line_and_field(tmp_path):
  folder = _write_sweep(tmp_path, widths=(16, 32, 64), fractions=(1.0,),
                        seeds=(0,))
  path = os.path.join(folder, "runs.jsonl")
  good = open(path).read()
  with open(path, "a") as f:
    f.write('{"name": "w8_l2", "params": 10\n')
  with pytest.raises(fit.FitError, match=r"runs.jsonl, line 4: not a JSON"):
    fit.fit_directory(folder)
  with open(path, "w") as f:
    f.write(good + '{"name": "w8_l2", "train_structures": 4000}\n')
  with pytest.raises(fit.FitError, match=r"line 4 \(w8_l2\): the field "
                     "'params' is missing"):
    fit.fit_directory(folder)
  open(path, "w").close()
  with pytest.raises(fit.FitError, match="runs.jsonl: no runs"):
    fit.fit_directory(folder)
  with pytest.raises(fit.FitError, match="cannot read"):
    fit.fit_directory(str(tmp_path / "absent"))
  with open(path, "w") as f:
    f.write(good)
  with pytest.raises(fit.FitError, match=r"'val/stress_mae' is in no run.*"
                     r"available: val/efwt, val/energy_mae, val/force_mae"):
    fit.fit_directory(folder, metric="val/stress_mae")
  with pytest.raises(fit.FitError, match="is a score"):
    fit.fit_directory(folder, metric="val/efwt")
  records = [json.loads(line) for line in good.splitlines()]
  records[1]["final"][METRIC] = float("nan")
  records[2]["final"][METRIC] = -0.1
  for line, value in ((2, "nan"), (3, "-0.1")):
    with open(path, "w") as f:
      f.write("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(fit.FitError, match=rf"line {line} .*is {value}; a "
                       "power law needs positive, finite"):
      fit.fit_directory(folder)
    records[line - 1]["final"][METRIC] = 0.5


def test_compute_frontier_is_the_lower_envelope():
  run = fit.Run
  slow = run("slow", "x", 1, 1, {"curve": [
      {"step": 1, "flops": 10.0, "metrics": {"m": 5.0}},
      {"step": 2, "flops": 20.0, "metrics": {"m": 4.0}},
      {"step": 3, "flops": 30.0, "metrics": {"m": 3.5}}]})
  # No "flops": step * flops_per_step = 15, 30, 45.
  fast = run("fast", "x", 2, 1, {"flops_per_step": 15.0, "curve": [
      {"step": 1, "metrics": {"m": 6.0}},
      {"step": 2, "metrics": {"m": 3.0}},
      {"step": 3, "metrics": {"m": 2.0, "other": 1.0}}]})
  frontier = fit.compute_frontier([slow, fast], "m")
  assert frontier["flops"].tolist() == [10.0, 20.0, 30.0, 45.0]
  assert frontier["loss"].tolist() == [5.0, 4.0, 3.0, 2.0]
  assert frontier["runs"] == ["slow", "slow", "fast", "fast"]


def test_fit_directory_writes_fit_json_and_table(tmp_path):
  folder = _write_sweep(tmp_path)
  result = fit.fit_directory(folder, bootstrap=100, seed=3)
  with open(os.path.join(folder, "fit.json")) as f:
    saved = json.load(f)
  assert saved == result
  assert result["metric"] == METRIC and result["run_count"] == 32
  assert set(result["fits"]) == {"params", "data", "compute", "joint"}
  assert result["skipped"] == {}
  params = result["fits"]["params"]
  assert params["fixed"] == {"train_structures": 4000}
  assert params["points"]["seeds"] == [2, 2, 2, 2]
  assert result["fits"]["data"]["fixed"] == {"params": 40 * 128 ** 2}
  joint = result["fits"]["joint"]
  assert len(joint["points"]["loss"]) == 16
  for name in ("alpha", "beta"):
    lo, hi = joint["intervals"][name]
    assert lo <= TRUE[name] <= hi
  # Frontier points decrease with compute and skip the zero-FLOPs point.
  compute = result["fits"]["compute"]["points"]
  assert np.all(np.diff(compute["x"]) > 0)
  assert np.all(np.diff(compute["loss"]) < 0) and compute["x"][0] > 0
  table = fit.format_table(result)
  assert "val/force_mae (final) over 32 runs" in table
  assert "alpha = " in table and "beta = " in table
  best = fit.fit_directory(folder, metric="val/energy_mae", which="best",
                           bootstrap=10)
  ratio = (best["fits"]["params"]["points"]["loss"][0]
           / params["points"]["loss"][0])
  assert ratio == pytest.approx(2.7)


def test_plots_are_written_and_open_as_images(tmp_path):
  folder = _write_sweep(tmp_path, seeds=(0,))
  result = fit.fit_directory(folder, bootstrap=30)
  paths = plots.plot_directory(folder, result)
  names = ["loss_vs_params.png", "loss_vs_data.png", "compute_frontier.png",
           "learning_curves.png"]
  assert paths == [os.path.join(folder, n) for n in names]
  for path in paths:
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 500 and pixels.shape[1] > 500
    # Something is drawn: not one flat colour.
    assert pixels[..., :3].std() > 0.05
  assert (plots.metric_label("val/slabs/force_mae")
          == "Validation force MAE, slabs (eV/Å)")
