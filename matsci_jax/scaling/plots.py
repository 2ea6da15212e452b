"""Figures of a scaling sweep and its power-law fits, as PNG files.

`plot_directory(DIR, result)` draws, from DIR/runs.jsonl and the result of
`fit.fit_directory`:

* loss_vs_params.png, loss_vs_data.png: the fitted points (mean over seeds,
  with their standard deviation as error bars), the fit and its 95%
  bootstrap band, log-log;
* compute_frontier.png: every run's learning curve against training FLOPs,
  coloured by model size, with the lower envelope and its fit;
* learning_curves.png: the metric against step for every run.

Figures are drawn on matplotlib's Agg canvas without pyplot, so importing
this module changes no backend and needs no display.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import cm, colors, colormaps, ticker
from matplotlib.figure import Figure

from matsci_jax.scaling import fit as fit_lib

_SIZE = (5.5, 4.0)  # Inches: one column of a two-column paper, enlarged.
_DPI = 200
# Viridis without its pale yellow end, which vanishes on white.
_CMAP = colors.ListedColormap(colormaps["viridis"](np.linspace(0, 0.88, 256)))
# (label, unit) of the last part of a metric name; units as in metrics.py.
_METRICS = {"energy_mae": ("energy MAE", "eV"),
            "force_mae": ("force MAE", "eV/Å"),
            "stress_mae": ("stress MAE", "eV/Å$^3$"),
            "loss": ("loss", None)}
_SPLITS = {"val": "Validation", "train": "Training", "test": "Test"}


def metric_label(metric: str) -> str:
  """An axis label: "val/slabs/force_mae" -> "Validation force MAE, slabs
  (eV/Å)"."""
  parts = metric.split("/")
  what, unit = _METRICS.get(parts[-1], (parts[-1], None))
  split = _SPLITS.get(parts[0], parts[0]) if len(parts) > 1 else ""
  text = f"{split} {what}".strip()
  text = text[0].upper() + text[1:]
  if len(parts) > 2:
    text += ", " + "/".join(parts[1:-1])
  return text + (f" ({unit})" if unit else "")


def _figure():
  fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
  return fig, fig.add_subplot()


def _save(fig, path: str) -> str:
  fig.savefig(path)
  return path


def _size_colours(runs):
  """A log colour scale over parameters N and its colorbar mappable."""
  sizes = [r.params for r in runs]
  lo, hi = min(sizes), max(sizes)
  norm = colors.LogNorm(lo, hi if hi > lo else lo * 1.01)
  mappable = cm.ScalarMappable(norm=norm, cmap=_CMAP)
  return mappable, lambda run: mappable.to_rgba(run.params)


def _draw_fit(ax, fit: dict, label: str, colour="C3") -> None:
  """The fitted curve, its bootstrap band and the fitted l_inf."""
  band = fit["band"]
  if band["lo"] is not None:
    ax.fill_between(band["x"], band["lo"], band["hi"], color=colour,
                    alpha=0.2, lw=0, label="95% bootstrap band")
  ax.plot(band["x"], band["loss"], color=colour, lw=1.5,
          label=f"{label}, {fit_lib.exponent_text(fit)}")
  l_inf = fit["params"]["l_inf"]
  if l_inf > 0:
    ax.axhline(l_inf, color=colour, lw=0.8, ls=":",
               label="$L_\\infty$ = " + fit_lib.interval_text(
                   l_inf, fit["intervals"]["l_inf"]))


def plot_slice(path: str, fit: dict, metric: str) -> str:
  """Loss against parameters or data (`fit` from `fit_directory`)."""
  fig, ax = _figure()
  points = fit["points"]
  several = max(points["seeds"]) > 1
  ax.errorbar(points["x"], points["loss"],
              yerr=points["loss_std"] if several else None, fmt="o",
              color="k", ms=5, capsize=3, zorder=3,
              label="runs, mean ± s.d. over seeds" if several else "runs")
  symbol = "N" if fit["axis"] == "params" else "D"
  _draw_fit(ax, fit, f"$L_\\infty + a\\,{symbol}^{{-\\alpha}}$")
  (value,) = fit["fixed"].values()
  if fit["axis"] == "params":
    ax.set_xlabel("Parameters N")
    ax.set_title(f"At the largest data size, D = {value:,.0f} structures",
                 fontsize=9)
  else:
    ax.set_xlabel("Training set size D (structures)")
    ax.set_title(f"At the largest model, N = {value:,.0f} parameters",
                 fontsize=9)
  _finish(ax, metric)
  # A wide bootstrap band (few points) must not hide the points.
  low, high = min(points["loss"]), max(points["loss"])
  ax.set_ylim(low / 2, high * 2)
  if fit["axis"] == "data":
    _plain(ax.xaxis, ",.0f")  # After set_xscale, which resets formatters.
  return _save(fig, path)


class _PlainLog(ticker.LogFormatter):
  """Log-axis labels as plain numbers ("0.6", "2,000"), not 6 x 10^-1.

  The ticks labelled are LogFormatter's; only their text changes.
  """

  def __init__(self, spec: str, minor: bool):
    super().__init__(labelOnlyBase=False, minor_thresholds=(2, 0.5))
    self.spec, self.minor = spec, minor

  def __call__(self, x, pos=None):
    if self.minor and not super().__call__(x, pos):
      return ""
    return format(x, self.spec)


def _plain(axis, spec: str) -> None:
  axis.set_major_formatter(_PlainLog(spec, minor=False))
  axis.set_minor_formatter(_PlainLog(spec, minor=True))


def _log_y(ax, metric: str) -> None:
  ax.set_yscale("log")
  _plain(ax.yaxis, "g")
  ax.set_ylabel(metric_label(metric))


def _finish(ax, metric: str) -> None:
  ax.set_xscale("log")
  _log_y(ax, metric)
  ax.grid(True, which="both", alpha=0.25, lw=0.5)
  ax.legend(fontsize=7, loc="best")


def _curve(run, metric):
  """(steps, FLOPs, values) of a run's curve points that log `metric`."""
  rows = [(p.get("step", np.nan),
           p.get("flops", p.get("step", np.nan)
                 * run.record.get("flops_per_step", np.nan)),
           p["metrics"][metric])
          for p in run.record.get("curve") or []
          if (p.get("metrics") or {}).get(metric) is not None]
  return np.array(rows, float).reshape(-1, 3).T


def plot_compute(path: str, runs, metric: str, fit: dict | None) -> str:
  """Every learning curve against FLOPs, the frontier and its fit."""
  fig, ax = _figure()
  mappable, colour = _size_colours(runs)
  for run in runs:
    _, flops, values = _curve(run, metric)
    keep = flops > 0
    ax.plot(flops[keep], values[keep], color=colour(run), lw=0.8, alpha=0.45)
  frontier = fit_lib.compute_frontier(runs, metric)
  ax.plot(frontier["flops"], frontier["loss"], "o-", color="k", lw=1.2,
          ms=3, zorder=3, label="frontier (lowest loss at a compute)")
  if fit is not None:
    _draw_fit(ax, fit, "$L_\\infty + a\\,C^{-\\alpha}$")
  fig.colorbar(mappable, ax=ax, label="Parameters N")
  ax.set_xlabel("Training compute C (FLOPs)")
  _finish(ax, metric)
  return _save(fig, path)


def plot_learning_curves(path: str, runs, metric: str) -> str:
  """The metric against step, coloured by N, a line style per data size."""
  fig, ax = _figure()
  mappable, colour = _size_colours(runs)
  data_sizes = sorted({r.structures for r in runs}, reverse=True)
  styles = ["-", "--", ":", "-."]
  for run in runs:
    steps, _, values = _curve(run, metric)
    ax.plot(steps, values, color=colour(run), lw=1, alpha=0.8,
            ls=styles[data_sizes.index(run.structures) % len(styles)])
  if len(data_sizes) > 1:
    for i, d in enumerate(data_sizes[:len(styles)]):
      ax.plot([], [], color="grey", ls=styles[i], label=f"D = {d:,.0f}")
    ax.legend(fontsize=7, title="structures", title_fontsize=7)
  fig.colorbar(mappable, ax=ax, label="Parameters N")
  ax.set_xlabel("Training step")
  _log_y(ax, metric)
  ax.grid(True, which="both", alpha=0.25, lw=0.5)
  return _save(fig, path)


def plot_directory(directory: str, result: dict) -> list[str]:
  """Draws the figures of a sweep into `directory`.

  Args:
    directory: the sweep's folder, with runs.jsonl.
    result: what `fit.fit_directory` returned (or fit.json, loaded).

  Returns:
    Paths of the PNG files written. A skipped 1-D fit has no figure; the
    curve figures need runs whose curves log the metric.
  """
  runs = fit_lib.load_runs(os.path.join(directory, "runs.jsonl"))
  metric, fits = result["metric"], result["fits"]
  paths = []
  for axis, name in (("params", "loss_vs_params.png"),
                     ("data", "loss_vs_data.png")):
    if axis in fits:
      paths.append(plot_slice(os.path.join(directory, name), fits[axis],
                              metric))
  if any(_curve(r, metric).size for r in runs):
    paths.append(plot_compute(os.path.join(directory, "compute_frontier.png"),
                              runs, metric, fits.get("compute")))
    paths.append(plot_learning_curves(
        os.path.join(directory, "learning_curves.png"), runs, metric))
  return paths
