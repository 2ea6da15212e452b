"""Figures of a training run, in `<workdir>/plots/`:

* learning_curve.png, redrawn at every evaluation: the training loss and
  every evaluation split's loss, energy, force and stress MAE against step
  (log scale), from the run's metrics.csv, one line per split ("val", or
  "val/<source>" with several data sources);
* parity_<split>.png for each evaluation split ("/" in a label becomes
  "_"), at the end of training: predicted against reference energies per
  structure (eV, as `energy_mae` counts them), force components of the
  atoms the metrics count (S2EF) and stress components (data with stress),
  each panel titled with its MAE, with the line y = x on equal axes.

Parity predictions come from the EMA parameters, by the job's own loss
function (so the job's energy functions and normaliser), on the split's
padded evaluation batches, up to the batch that reaches `MAX_STRUCTURES`
structures or `MAX_ATOMS` atoms; on a split within those, the energy and
force MAEs equal its `energy_mae` and `force_mae`. At most `MAX_POINTS`
components are drawn per panel (a seeded subsample); the MAE in the title
counts all of them. With several processes, process 0 draws, from its
share of each split; parameters sharded over other processes' devices
leave the parity figures out.

Figures are drawn on matplotlib's Agg canvas without pyplot (as in
`matsci_jax.scaling.plots`), so no backend changes and no display is
needed. matplotlib is imported on the first figure, not with this module,
and every file is written whole (a temporary file, then a rename).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from matsci_jax import losses

PLOTS_DIR = "plots"
LEARNING_CURVE = "learning_curve.png"
# Per split, bounding time and memory: predictions stop after the batch
# that reaches either.
MAX_STRUCTURES = 5000
MAX_ATOMS = 500_000
MAX_POINTS = 50_000  # Drawn per panel; more only blurs the cloud.
_DPI = 110
# (metric, panel title, unit) of the learning curve, in panel order.
_CURVE_PANELS = (("loss", "Loss", "normalised"),
                 ("energy_mae", "Energy MAE", "eV"),
                 ("force_mae", "Force MAE", "eV/Å"),
                 ("stress_mae", "Stress MAE", "eV/Å$^3$"))


def plot_path(workdir: str, name: str) -> str:
  """`<workdir>/plots/<name>`."""
  return os.path.join(workdir, PLOTS_DIR, name)


def parity_name(label: str) -> str:
  """The parity figure's file name of evaluation split `label`
  ("val/slabs" -> "parity_val_slabs.png")."""
  return f"parity_{label.replace('/', '_')}.png"


def read_metrics(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Each metric of a metrics.csv (columns step, metric, value) as (steps,
  values) sorted by step; a step logged twice keeps its last value."""
  series: dict[str, dict[int, float]] = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      try:
        step, value = int(row["step"]), float(row["value"])
      except (KeyError, TypeError, ValueError):
        continue  # A header repeated by a resumed run, or a torn last line.
      series.setdefault(row["metric"], {})[step] = value
  return {name: (np.array(sorted(points), np.int64),
                 np.array([points[s] for s in sorted(points)], np.float64))
          for name, points in series.items()}


def eval_labels(metrics: dict) -> list[str]:
  """The evaluation splits of a run's metrics ("val", "val/slabs", ...):
  the prefixes of their `loss`, which every split logs."""
  return sorted(name[:-len("/loss")] for name in metrics
                if name.endswith("/loss") and name != "train/loss"
                and not name.startswith("perf/"))


def _save(fig, path: str) -> str:
  """Writes `fig` to `path` as PNG, whole or not at all."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return path


def plot_learning_curve(metrics_csv: str, path: str) -> str | None:
  """Draws a run's learning curve from its metrics.csv.

  Panels: loss (training and each evaluation split), then energy, force
  and stress MAE of each evaluation split where logged; log-scale y.

  Returns:
    `path`, or None when the file holds no loss yet.
  """
  from matplotlib import ticker
  from matplotlib.figure import Figure

  class PlainLog(ticker.LogFormatter):
    """Plain numbers ("0.07", not 7 x 10^-2) on the ticks LogFormatter
    labels (minor ones too where a panel spans less than a decade or
    two)."""

    def __init__(self):
      super().__init__(labelOnlyBase=False, minor_thresholds=(2, 0.5))

    def __call__(self, x, pos=None):
      return format(x, "g") if super().__call__(x, pos) else ""

  metrics = read_metrics(metrics_csv)
  labels = eval_labels(metrics)
  panels = [(metric, title, unit) for metric, title, unit in _CURVE_PANELS
            if (metric == "loss" and "train/loss" in metrics)
            or any(f"{label}/{metric}" in metrics for label in labels)]
  if not panels:
    return None
  fig = Figure(figsize=(4.0 * len(panels), 3.4), dpi=_DPI,
               layout="constrained")
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (metric, title, unit) in zip(axes, panels):
    lines = [(f"{label}", f"{label}/{metric}") for label in labels]
    if metric == "loss":
      lines.insert(0, ("train", "train/loss"))
    for name, key in lines:
      if key not in metrics:
        continue
      steps, values = metrics[key]
      keep = np.isfinite(values) & (values > 0)  # A log axis.
      ax.plot(steps[keep], values[keep], "-" if name == "train" else "o-",
              lw=1.0 if name == "train" else 1.4, ms=3, label=name,
              color="0.55" if name == "train" else None)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLog())
    ax.yaxis.set_minor_formatter(PlainLog())
    ax.set_xlabel("step")
    ax.set_ylabel(f"{title} ({unit})")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25, lw=0.5)
    ax.legend(fontsize=7)
  return _save(fig, path)


@dataclasses.dataclass
class Parity:
  """Reference and predicted values of one evaluation split.

  Attributes:
    label: the split's metric prefix ("val", "val/<source>").
    structures: how many structures the values come from.
    energy: float [structures, 2], (reference, predicted) energy per
      structure in eV.
    forces: float [components, 2], force components (eV/Å) of the atoms
      the metrics count, or None.
    stress: float [9 x structures with stress, 2] (eV/Å^3), or None.
  """
  label: str
  structures: int
  energy: np.ndarray
  forces: np.ndarray | None = None
  stress: np.ndarray | None = None

  def mae(self, name: str) -> float:
    """Mean absolute error of "energy", "forces" or "stress"."""
    pairs = getattr(self, name)
    return float(np.mean(np.abs(pairs[:, 1] - pairs[:, 0]),
                         dtype=np.float64))


def make_predict_fn(loss_fn: Callable) -> Callable:
  """`predict(params, batch) -> {"energy": [graphs], "forces": [nodes, 3],
  "stress": [graphs, 3, 3]}` (those the loss gives), jitted, from a task's
  `loss_fn(params, batch) -> (loss, aux)`."""

  def predict(params, batch):
    _, aux = loss_fn(params, batch)
    return {k: aux[k] for k in ("energy", "forces", "stress") if k in aux}

  return jax.jit(predict)


def _unstacked(batch):
  """The padded batches of one evaluation item (stacked [devices, ...]
  with several local devices)."""
  if batch.globals["mask"].ndim == 1:
    yield batch
    return
  for i in range(batch.globals["mask"].shape[0]):
    yield jax.tree_util.tree_map(lambda x, i=i: x[i], batch)


def parity_data(predict: Callable, params, batches, task, energy_target: str,
                free_atoms_only: bool = True,
                max_structures: int = MAX_STRUCTURES,
                max_atoms: int = MAX_ATOMS) -> Parity:
  """Predictions against references on one evaluation split.

  Args:
    predict: see `make_predict_fn`.
    params: the parameters, on one device (or host arrays).
    batches: the split's `inputs.Batches`.
    task: the split's task (which targets it has: forces, stress).
    energy_target: the batch field of the reference energy.
    free_atoms_only: count the forces of free atoms only (as the metrics).
    max_structures, max_atoms: stop after the batch that reaches this
      many structures or atoms.
  """
  energy, forces, stress, count, atoms = [], [], [], 0, 0
  for item in batches.dataset:
    for batch in _unstacked(item):
      out = jax.device_get(predict(params, batch))
      g = batch.globals["mask"]
      energy.append(np.stack([batch.globals[energy_target][g],
                              out["energy"][g]], -1))
      if task.forces and "forces" in out:
        m = losses.force_mask(batch, free_atoms_only)
        forces.append(np.stack([batch.nodes["forces"][m].ravel(),
                                out["forces"][m].ravel()], -1))
      if task.stress and "stress" in out:
        m = losses.stress_mask(batch)
        stress.append(np.stack([batch.globals["stress"][m].ravel(),
                                out["stress"][m].ravel()], -1))
      count += int(g.sum())
      atoms += int(batch.nodes["mask"].sum())
    if count >= max_structures or atoms >= max_atoms:
      break

  def join(parts):
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if parts else None

  energy = join(energy)
  return Parity(batches.label, count,
                np.zeros((0, 2)) if energy is None else energy,
                join(forces), join(stress))


def subsample(pairs: np.ndarray, max_points: int = MAX_POINTS,
              seed: int = 0) -> np.ndarray:
  """At most `max_points` rows of `pairs`, a seeded choice in order."""
  if len(pairs) <= max_points:
    return pairs
  keep = np.random.default_rng(seed).choice(len(pairs), max_points,
                                            replace=False)
  return pairs[np.sort(keep)]


def plot_parity(parity: Parity, path: str, step: int | None = None) -> str:
  """Draws `parity`'s panels (energy, then forces and stress where
  present) into `path`."""
  from matplotlib.figure import Figure
  panels = [(name, title, unit) for name, title, unit in (
      ("energy", "Energy per structure", "eV"),
      ("forces", "Force components", "eV/Å"),
      ("stress", "Stress components", "eV/Å$^3$"))
            if getattr(parity, name) is not None
            and len(getattr(parity, name))]
  fig = Figure(figsize=(3.8 * max(len(panels), 1), 4.0), dpi=_DPI,
               layout="constrained")
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
  for ax, (name, title, unit) in zip(axes, panels):
    pairs = getattr(parity, name)
    drawn = subsample(pairs)
    ax.plot(drawn[:, 0], drawn[:, 1], ".", ms=3 if name == "energy" else 1,
            alpha=0.5, rasterized=True)
    finite = pairs[np.isfinite(pairs)]
    low, high = ((float(finite.min()), float(finite.max())) if finite.size
                 else (-1.0, 1.0))
    pad = 0.03 * (high - low) or 1.0
    lim = (low - pad, high + pad)
    ax.plot(lim, lim, "-", color="0.3", lw=0.8)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title(f"{title}\nMAE {parity.mae(name):.4g} {unit}",
                 fontsize=9)
    ax.text(0.97, 0.03, f"{len(pairs):,} points" + (
        f", {len(drawn):,} drawn" if len(drawn) < len(pairs) else ""),
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    ax.grid(True, alpha=0.25, lw=0.5)
  if not panels:
    axes[0].set_axis_off()
    axes[0].text(0.5, 0.5, "no labelled structures", ha="center")
  fig.suptitle(f"{parity.label}" + (f", step {step}" if step is not None
                                    else "") +
               f", {parity.structures:,} structures", fontsize=10)
  return _save(fig, path)


def _on_one_device(params) -> Any:
  """`params` where one device can use them (fetched to the host when
  spread over several), or None when other processes hold parts."""
  leaves = jax.tree_util.tree_leaves(params)
  arrays = [x for x in leaves if isinstance(x, jax.Array)]
  if all(len(x.sharding.device_set) == 1 for x in arrays):
    return params
  if not all(x.is_fully_addressable or x.is_fully_replicated
             for x in arrays):
    return None
  return jax.device_get(params)


class RunPlots:
  """A training job's figures, drawn by process 0 at every evaluation,
  each overwriting the last: the learning curve and the parity figures.

  The prediction step of the parity figures is built and compiled once,
  at the first evaluation, and reused after it.

  Args:
    workdir: the run folder (figures go to its plots/).
    job: the `train.Job` (task, model, normaliser, strategy, evaluation
      splits and batches).
    loss_config: `config.loss`, as the job's loss was built with.
    enabled: `config.train.plots`.
  """

  def __init__(self, workdir: str, job, loss_config, enabled: bool = True):
    self.enabled = bool(enabled) and jax.process_index() == 0
    self.workdir, self.job, self.loss_config = workdir, job, loss_config
    self.seconds = 0.0  # Spent drawing, over the run.
    self._predict = None

  def _drawn(self, what: str, step: int, draw: Callable[[], list[str]]
             ) -> list[str]:
    """`draw()`'s paths, timed; a failure is logged, not raised: figures
    never stop a run."""
    if not self.enabled:
      return []
    started = time.perf_counter()
    written = []
    try:
      written = draw()
    except Exception as e:  # noqa: BLE001
      logging.warning("%s figures in %s at step %d failed: %s: %s", what,
                      plot_path(self.workdir, ""), step, type(e).__name__, e)
    took = time.perf_counter() - started
    self.seconds += took
    logging.info("plots: %d %s figure(s) in %.2f s", len(written), what,
                 took)
    return written

  def learning_curve(self, step: int) -> list[str]:
    """Redraws plots/learning_curve.png from metrics.csv."""
    def draw():
      path = plot_learning_curve(os.path.join(self.workdir, "metrics.csv"),
                                 plot_path(self.workdir, LEARNING_CURVE))
      return [path] if path else []
    return self._drawn("learning curve", step, draw)

  def parity(self, step: int, params) -> list[str]:
    """Draws every evaluation split's parity figure from `params` (the EMA
    parameters as the strategy lays them out)."""
    return self._drawn("parity", step, lambda: self._parity(step, params))

  def _parity(self, step: int, params) -> list[str]:
    job = self.job
    params = _on_one_device(job.strategy.host_state(params))
    if params is None:
      logging.info("plots: parameters are sharded over other processes; "
                   "no parity figures")
      return []
    if self._predict is None:
      self._predict = make_predict_fn(job.task.make_loss(
          job.model, job.normalizer, self.loss_config))
    return [plot_parity(parity_data(self._predict, params, batches,
                                    split.task,
                                    job.task.energy_target,
                                    self.loss_config.free_atoms_only),
                        plot_path(self.workdir, parity_name(batches.label)),
                        step)
            for split, batches in zip(job.evals, job.eval_data)]
