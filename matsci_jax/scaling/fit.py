"""Power-law fits of a scaling sweep: loss against model, data and compute.

The sweep (`python -m matsci_jax.scaling sweep`) writes one JSON record per
finished run to `DIR/runs.jsonl`. `fit_directory` fits

* L(N) = l_inf + a * N^-alpha over parameters N, at the largest data size;
* L(D) = l_inf + a * D^-alpha over training structures D, at the largest
  model;
* L(C) = l_inf + a * C^-alpha over training FLOPs C, along the lower envelope
  of all learning curves (the lowest loss any run reached by that compute);
* L(N, D) = l_inf + a * N^-alpha + b * D^-beta over all runs,

by least squares on log L: errors of a loss are relative, so the small losses
of large models weigh as much as the large losses of small ones. Intervals are
95% percentile bootstraps over the fitted points. Seeds at equal sizes are
averaged before fitting; their spread is kept for error bars.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from scipy import optimize

DEFAULT_METRICS = ("val/force_mae", "val/energy_mae")
# Higher is better: a decaying power law does not describe them.
_SCORES = ("force_cos", "efwt", "ewt")
MIN_SIZES = 3  # Three parameters per power law; messages say "three".
# With l_inf free, the exponent runs away when the points flatten out.
_ALPHA_MAX = 10.0
_BAND_POINTS = 64
AXES = {"params": "parameters N", "data": "training structures D",
        "compute": "training FLOPs C"}


class FitError(ValueError):
  """Records that cannot be fitted: too few sizes, bad losses, bad file."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run of the sweep.

  Attributes:
    name: the run's name ("w64_l2_f0.5_s0").
    where: where it was read, for messages ("DIR/runs.jsonl, line 3").
    params: model parameters N.
    structures: training structures D.
    record: the whole JSON record.
  """
  name: str
  where: str
  params: float
  structures: float
  record: dict


def power_law(x, l_inf, a, alpha):
  """L(x) = l_inf + a * x^-alpha.

  Args:
    x: sizes (> 0), any shape.
    l_inf: the loss of an infinite size.
    a, alpha: coefficient and exponent.

  Returns:
    Losses, the shape of `x`.
  """
  return l_inf + a * np.power(np.asarray(x, float), -alpha)


def joint_law(n, d, l_inf, a, alpha, b, beta):
  """L(N, D) = l_inf + a * N^-alpha + b * D^-beta; `n`, `d` broadcast."""
  return power_law(n, l_inf, a, alpha) + b * np.power(np.asarray(d, float),
                                                      -beta)


def _number(value, where: str, field: str, allow_zero=False) -> float:
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and (value > 0 or allow_zero and value == 0))
  if not ok:
    need = "non-negative" if allow_zero else "positive"
    raise FitError(f"{where}: {field} is {value!r}; a power law needs "
                   f"{need}, finite values")
  return float(value)


def load_runs(path: str) -> list[Run]:
  """Reads a sweep's runs.jsonl (one JSON record a line; blank lines skipped).

  Raises:
    FitError: the file is missing, empty, or a line is not a run record;
      the message names the file and line.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise FitError(f"{path}: cannot read the sweep's runs ({e})") from e
  runs = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}, line {i}"
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise FitError(f"{where}: not a JSON record ({e.msg} at column "
                     f"{e.colno})") from e
    if not isinstance(rec, dict):
      raise FitError(f"{where}: expected a JSON object, got "
                     f"{type(rec).__name__}")
    name = str(rec.get("name", f"line {i}"))
    where = f"{where} ({name})"
    for key in ("params", "train_structures"):
      if key not in rec:
        raise FitError(f"{where}: the field {key!r} is missing")
    runs.append(Run(name, where, _number(rec["params"], where, "params"),
                    _number(rec["train_structures"], where,
                            "train_structures"), rec))
  if not runs:
    raise FitError(f"{path}: no runs in the file (it is empty); has the "
                   "sweep finished a run?")
  return runs


def choose_metric(runs: list[Run], metric: str | None = None,
                  which: str = "final") -> str:
  """The metric to fit: `metric`, else the first of DEFAULT_METRICS present.

  Raises:
    FitError: `which` is not "final" or "best", the metric is in no run
      (the message lists those available), or it is a score, not a loss.
  """
  if which not in ("final", "best"):
    raise FitError(f"which={which!r}; expected 'final' or 'best'")
  available = sorted(set().union(*(r.record.get(which) or {} for r in runs)))
  if metric is None:
    metric = next((m for m in DEFAULT_METRICS if m in available), None)
    if metric is None:
      raise FitError(f"none of {', '.join(DEFAULT_METRICS)} is in the runs' "
                     f"{which!r} metrics; choose one of: "
                     f"{', '.join(available) or '(none)'}")
  elif metric not in available:
    raise FitError(f"metric {metric!r} is in no run's {which!r} metrics; "
                   f"available: {', '.join(available) or '(none)'}")
  if metric.rsplit("/", 1)[-1] in _SCORES:
    raise FitError(f"metric {metric!r} is a score (higher is better); fit a "
                   "loss or an error such as val/force_mae")
  return metric


def run_losses(runs: list[Run], metric: str, which: str = "final"):
  """The metric of every run, shape (runs,); FitError names a bad run."""
  out = []
  for r in runs:
    values = r.record.get(which) or {}
    if metric not in values:
      raise FitError(f"{r.where}: no {metric!r} in {which!r}; it has: "
                     f"{', '.join(sorted(values)) or '(none)'}")
    out.append(_number(values[metric], r.where, f"{which}[{metric!r}]"))
  return np.array(out)


def _mean_by_size(keys, losses, names) -> dict:
  """Averages losses at equal sizes (rows of `keys`, shape (runs, axes))."""
  keys = np.asarray(keys, float).reshape(len(losses), -1)
  sizes, inverse = np.unique(keys, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  groups = [losses[inverse == i] for i in range(len(sizes))]
  return {"sizes": sizes,
          "loss": np.array([g.mean() for g in groups]),
          "loss_std": np.array([g.std(ddof=1) if len(g) > 1 else 0.0
                                for g in groups]),
          "seeds": np.array([len(g) for g in groups]),
          "runs": [[n for n, j in zip(names, inverse) if j == i]
                   for i in range(len(sizes))]}


def compute_frontier(runs: list[Run], metric: str) -> dict:
  """The lower envelope of every run's learning curve over training FLOPs.

  A curve point is (cumulative FLOPs, metric) at an evaluation; FLOPs fall
  back to step * flops_per_step. Evaluations at zero FLOPs (before training)
  are left out: they have no place on a log axis.

  Returns:
    {"flops": (k,), "loss": (k,), "runs": k names}, sorted by FLOPs, each
    loss lower than that of every curve point at fewer or equal FLOPs.
  """
  points = []
  for r in runs:
    for p in r.record.get("curve") or []:
      value = (p.get("metrics") or {}).get(metric)
      if value is None:
        continue
      where = f"{r.where}, curve step {p.get('step')}"
      flops = p.get("flops")
      if flops is None:
        if "step" not in p or "flops_per_step" not in r.record:
          raise FitError(f"{where}: the point has no 'flops', and no "
                         "step * flops_per_step to count them")
        flops = p["step"] * r.record["flops_per_step"]
      if _number(flops, where, "flops", allow_zero=True) == 0:
        continue
      points.append((flops, _number(value, where, metric), r.name))
  points.sort(key=lambda t: t[:2])
  frontier, best = [], math.inf
  for point in points:
    if point[1] < best:
      frontier.append(point)
      best = point[1]
  return {"flops": np.array([p[0] for p in frontier]),
          "loss": np.array([p[1] for p in frontier]),
          "runs": [p[2] for p in frontier]}


def size_problem(sizes, what: str, labels=None) -> str | None:
  """Why `sizes` (any shape) cannot be fitted, or None when they can."""
  distinct = np.unique(np.asarray(sizes, float))
  if len(distinct) >= MIN_SIZES:
    return None
  labels = labels or {}
  text = ", ".join(f"{s:.6g}" + (f" ({labels[s]})" if s in labels else "")
                   for s in distinct)
  return (f"a fit needs at least three sizes; got {len(distinct)} "
          f"{what}: {text or '(none)'}")


def _model(theta, logu):
  """l_inf + sum_j c_j u_j^-alpha_j and its Jacobian in theta.

  Args:
    theta: (1 + 2t,) = l_inf, then (log c_j, alpha_j) per term.
    logu: (t, k) log of the normalised sizes of each term.

  Returns:
    Model losses (k,) and d model / d theta (k, 1 + 2t).
  """
  logc, alpha = theta[1::2, None], theta[2::2, None]
  terms = np.exp(logc - alpha * logu)
  jac = np.empty((logu.shape[1], len(theta)))
  jac[:, 0] = 1.0
  jac[:, 1::2] = terms.T
  jac[:, 2::2] = -(terms * logu).T
  return theta[0] + terms.sum(0), jac


def _least_squares(logu, y, starts):
  """The best of local log-space fits from several starts; theta (1 + 2t,)."""
  logy = np.log(y)
  t = logu.shape[0]
  lower = np.r_[0.0, [-np.inf, 1e-6] * t]
  upper = np.r_[np.inf, [np.inf, _ALPHA_MAX] * t]

  def residual(theta):
    return np.log(_model(theta, logu)[0]) - logy

  def jacobian(theta):
    m, jac = _model(theta, logu)
    return jac / m[:, None]

  best = None
  for start in starts:
    start = np.clip(start, lower, upper)
    fit = optimize.least_squares(residual, start, jac=jacobian,
                                 bounds=(lower, upper), method="trf")
    if best is None or fit.cost < best.cost:
      best = fit
  return best.x


def _starts(logu, y):
  """Starting points: log-log lines of y - l0 over each axis, a few l0."""
  starts = []
  for l0 in (0.0, 0.5 * y.min(), 0.9 * y.min()):
    rest = np.log(y - l0)
    theta = [l0]
    for row in logu:
      slope, icpt = np.polyfit(row, rest, 1) if np.ptp(row) else (0, 0)
      theta += [icpt - np.log(len(logu)),
                float(np.clip(-slope, 0.05, _ALPHA_MAX - 0.05))]
    starts.append(theta)
    for alpha in (0.2, 0.5, 1.0):
      starts.append([l0] + [np.log(np.exp(rest).mean() / len(logu)), alpha]
                    * len(logu))
  return starts


def _fit(xs, y, names, bootstrap: int, seed: int, band: bool) -> dict:
  """Fits l_inf + sum_j a_j x_j^-alpha_j; xs (t, k) sizes, y (k,) losses."""
  xs, y = np.asarray(xs, float), np.asarray(y, float)
  if not np.all(np.isfinite(y) & (y > 0)):
    raise FitError(f"losses must be positive and finite; got {y.tolist()}")
  if not np.all(np.isfinite(xs) & (xs > 0)):
    raise FitError(f"sizes must be positive and finite; got {xs.tolist()}")
  # Sizes span many decades: normalising keeps the problem well scaled.
  ref = np.exp(np.log(xs).mean(1, keepdims=True))
  logu = np.log(xs / ref)
  theta = _least_squares(logu, y, _starts(logu, y))

  def public(th):
    out = [th[0]]
    for j in range(len(xs)):
      out += [np.exp(th[1 + 2 * j]) * ref[j, 0] ** th[2 + 2 * j],
              th[2 + 2 * j]]
    return np.array(out)

  rng = np.random.default_rng(seed)
  samples = []
  # As many points as parameters: every resample of them is fitted exactly,
  # by the same curve, and would show a zero-width interval.
  distinct = len(np.unique(xs.T, axis=0))
  exact = distinct <= len(names)
  for _ in range(0 if exact else bootstrap):
    idx = rng.integers(0, len(y), len(y))
    if all(len(np.unique(row[idx])) >= MIN_SIZES for row in xs):
      samples.append(public(_least_squares(logu[:, idx], y[idx], [theta])))
  samples = np.array(samples).reshape(-1, len(theta))
  best = public(theta)
  residual = np.log(_model(theta, logu)[0]) - np.log(y)
  out = {"params": dict(zip(names, best.tolist())),
         "intervals": {n: (np.percentile(samples[:, i], [2.5, 97.5]).tolist()
                           if len(samples) else None)
                       for i, n in enumerate(names)},
         "bootstrap": {"resamples": bootstrap, "fitted": len(samples),
                       "seed": seed},
         "rms_log_residual": float(np.sqrt(np.mean(residual ** 2)))}
  if exact and bootstrap:
    out["bootstrap"]["note"] = (
        f"{distinct} points for {len(names)} parameters: the curve passes "
        "through every point, so resampling cannot measure its uncertainty; "
        "no intervals (add sizes)")
  if band:
    grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, _BAND_POINTS)
    curves = np.array([power_law(grid, *s) for s in samples])
    out["band"] = {
        "x": grid.tolist(), "loss": power_law(grid, *best).tolist(),
        "lo": (np.percentile(curves, 2.5, 0).tolist() if len(curves)
               else None),
        "hi": (np.percentile(curves, 97.5, 0).tolist() if len(curves)
               else None)}
  return out


def fit_power_law(x, y, *, bootstrap: int = 500, seed: int = 0,
                  what: str = "sizes") -> dict:
  """Fits L(x) = l_inf + a * x^-alpha by least squares on log L.

  Args:
    x: sizes (k,), positive (parameters, structures or FLOPs).
    y: losses (k,), positive.
    bootstrap: resamples of the points for the intervals (0: none).
    seed: seeds the resampling.
    what: names the sizes in errors ("parameters N").

  Returns:
    {"params": {"l_inf", "a", "alpha"}, "intervals": {name: [lo, hi]} (95%),
    "bootstrap": {"resamples", "fitted", "seed"} (and "note" when the
    intervals are None: too few points to resample), "rms_log_residual",
    "band": {"x", "loss", "lo", "hi"} (64 sizes spanning x, 1.5x beyond)}.

  Raises:
    FitError: fewer than three distinct sizes, or a non-positive value.
  """
  problem = size_problem(x, what)
  if problem:
    raise FitError(problem)
  return _fit([x], y, ("l_inf", "a", "alpha"), bootstrap, seed, band=True)


def fit_joint(n, d, y, *, bootstrap: int = 500, seed: int = 0) -> dict:
  """Fits L(N, D) = l_inf + a * N^-alpha + b * D^-beta on log L.

  Args:
    n: parameters (k,); d: training structures (k,); y: losses (k,).
    bootstrap, seed: as in `fit_power_law`.

  Returns:
    As `fit_power_law` without "band"; params l_inf, a, alpha, b, beta.
  """
  for sizes, what in ((n, AXES["params"]), (d, AXES["data"])):
    problem = size_problem(sizes, what)
    if problem:
      raise FitError(problem)
  return _fit([n, d], y, ("l_inf", "a", "alpha", "b", "beta"), bootstrap,
              seed, band=False)


def _slice_fit(runs, losses, axis, bootstrap, seed):
  """The 1-D fit along params (at the largest D) or data (at the largest N).

  Returns:
    The fit dict, or the reason it cannot be done (a string).
  """
  other = "data" if axis == "params" else "params"
  get = {"params": lambda r: r.params, "data": lambda r: r.structures}
  fixed = max(get[other](r) for r in runs)
  keep = [i for i, r in enumerate(runs) if get[other](r) == fixed]
  field = {"params": "params", "data": "train_structures"}
  x = [get[axis](runs[i]) for i in keep]
  group = _mean_by_size(x, losses[keep], [runs[i].name for i in keep])
  sizes = group["sizes"][:, 0]
  at = f"{AXES[axis]} at the largest {field[other]} = {fixed:.6g}"
  problem = size_problem(sizes, at, dict(zip(sizes, (
      ", ".join(g) for g in group["runs"]))))
  if problem:
    return problem
  out = {"axis": axis, "fixed": {field[other]: fixed},
         "points": {"x": sizes.tolist(), "loss": group["loss"].tolist(),
                    "loss_std": group["loss_std"].tolist(),
                    "seeds": group["seeds"].tolist(),
                    "runs": group["runs"]}}
  return out | fit_power_law(sizes, group["loss"], bootstrap=bootstrap,
                             seed=seed, what=at)


def fit_directory(directory: str, metric: str | None = None,
                  which: str = "final", bootstrap: int = 500,
                  seed: int = 0) -> dict:
  """Fits every scaling law that DIR/runs.jsonl allows; writes DIR/fit.json.

  A fit whose axis has fewer than three sizes is skipped, with the reason
  in "skipped"; bad records, or no possible fit at all, raise. The compute
  fit reads the learning curves, whatever `which` is.

  Args:
    directory: the sweep's output folder.
    metric: the metric to fit (default: val/force_mae, else val/energy_mae).
    which: "final" (the metric at the end of each run) or "best".
    bootstrap: resamples for the 95% intervals.
    seed: seeds the resampling.

  Returns:
    What fit.json holds: {"source", "metric", "which", "run_count",
    "fits": {"params" | "data" | "compute" | "joint": fit},
    "skipped": {name: reason}}; see `fit_power_law` for a fit's fields,
    plus "points" (the fitted data) and, for "params"/"data", "fixed".

  Raises:
    FitError: unreadable runs, a missing metric, a bad loss, or no fit.
  """
  path = os.path.join(directory, "runs.jsonl")
  runs = load_runs(path)
  metric = choose_metric(runs, metric, which)
  losses = run_losses(runs, metric, which)
  fits, skipped = {}, {}
  for axis in ("params", "data"):
    fit = _slice_fit(runs, losses, axis, bootstrap, seed)
    (fits if isinstance(fit, dict) else skipped)[axis] = fit
  frontier = compute_frontier(runs, metric)
  problem = size_problem(frontier["flops"], "frontier points (FLOPs)")
  if problem:
    skipped["compute"] = (problem + "; the runs' curves log "
                          f"{metric!r} too rarely, or not at all")
  else:
    fits["compute"] = {"axis": "compute", "points": {
        "x": frontier["flops"].tolist(), "loss": frontier["loss"].tolist(),
        "runs": frontier["runs"]}} | fit_power_law(
            frontier["flops"], frontier["loss"], bootstrap=bootstrap,
            seed=seed)
  group = _mean_by_size([[r.params, r.structures] for r in runs], losses,
                        [r.name for r in runs])
  n, d = group["sizes"].T
  problem = (size_problem(n, AXES["params"])
             or size_problem(d, AXES["data"]))
  if problem:
    skipped["joint"] = problem
  else:
    fits["joint"] = {"axis": "joint", "points": {
        "params": n.tolist(), "structures": d.tolist(),
        "loss": group["loss"].tolist(), "loss_std": group["loss_std"].tolist(),
        "seeds": group["seeds"].tolist()}} | fit_joint(
            n, d, group["loss"], bootstrap=bootstrap, seed=seed)
  if not fits:
    raise FitError(f"{path}: no scaling law can be fitted from "
                   f"{len(runs)} runs:\n" + "\n".join(
                       f"  {k}: {v}" for k, v in skipped.items()))
  result = {"source": path, "metric": metric, "which": which,
            "run_count": len(runs), "fits": fits, "skipped": skipped}
  tmp = os.path.join(directory, "fit.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, os.path.join(directory, "fit.json"))
  return result


def interval_text(value, interval) -> str:
  """"0.31 [0.25, 0.38]": a value with its interval (None: the value).

  Numbers below 1e-9 of the largest shown are at a bound of 0: shown as 0.
  """
  numbers = [value] + list(interval or [])
  scale = max(abs(v) for v in numbers)
  text = [f"{v:.3g}" if abs(v) > 1e-9 * scale else "0" for v in numbers]
  return text[0] + (f" [{text[1]}, {text[2]}]" if interval else "")


def exponent_text(fit: dict, name: str = "alpha") -> str:
  """"alpha = 0.31 [0.25, 0.38]": an exponent with its 95% interval."""
  return f"{name} = " + interval_text(fit["params"][name],
                                      fit["intervals"][name])


def format_table(result: dict) -> str:
  """The fits of `fit_directory` as a text table, exponents with intervals."""
  fits = result["fits"]
  resamples = next(iter(fits.values()))["bootstrap"]["resamples"]
  lines = [f"{result['metric']} ({result['which']}) over {result['run_count']} "
           f"runs; 95% bootstrap intervals ({resamples} resamples)",
           f"{'loss vs':<24}{'points':>7}  {'l_inf':<26}exponents"]
  for key, label in (("params", AXES["params"]), ("data", AXES["data"]),
                     ("compute", AXES["compute"]), ("joint", "N and D")):
    if key not in fits:
      continue
    fit = fits[key]
    exps = ", ".join(exponent_text(fit, e) for e in ("alpha", "beta")
                     if e in fit["params"])
    points = len(fit["points"]["loss"])
    l_inf = interval_text(fit["params"]["l_inf"], fit["intervals"]["l_inf"])
    lines.append(f"{label:<24}{points:>7}  {l_inf:<26}{exps}")
  lines += [f"no intervals for {k}: {f['bootstrap']['note']}"
            for k, f in fits.items() if "note" in f["bootstrap"]]
  lines += [f"skipped {k}: {v}" for k, v in result["skipped"].items()]
  return "\n".join(lines)
