"""Checks of a training config before anything runs (see configs/s2ef.py).

`check_config` finds missing fields, unknown names and numbers outside the
range a field allows, and names the field and that range, e.g.
"config.data.batch_size = -4: must be an integer >= 1". Without it such
values fail far from their cause (a cutoff of 0 as a division by zero deep
in a model) or not at all (a negative batch size trains on one structure
per batch).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Optional

import ml_collections

from matsci_jax import tasks
from matsci_jax.models.precision import PRECISIONS
from matsci_jax.models.registry import HEADS

# Fields every config must have (section -> fields); see configs/s2ef.py.
REQUIRED_FIELDS = {
    "data": ("path", "task", "train_split", "eval_splits", "batch_size",
             "max_nodes", "max_edges", "max_graphs", "num_workers", "prefetch",
             "seed", "devset_dir", "devset_num_systems"),
    "model": ("name",),
    "loss": ("energy_weight", "force_weight", "energy_loss", "energy_per_atom",
             "force_loss", "free_atoms_only"),
    "optimizer": ("learning_rate", "end_lr_factor", "warmup_steps",
                  "weight_decay", "b1", "b2", "clip_norm", "ema_decay"),
    "train": ("num_steps", "seed", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints", "best_metric",
              "progress_bar", "eval_at_start", "grad_accum_steps",
              "plots"),
    "mesh": ("data", "fsdp"),
    "parallel": ("strategy", "fsdp_min_size"),
}
STRATEGIES = ("jit", "pmap")


@dataclasses.dataclass(frozen=True)
class Range:
  """The numbers a field allows.

  Attributes:
    integer: whether only integers are allowed.
    low: smallest value (None: unbounded).
    high: largest value (None: unbounded).
    low_open: whether `low` itself is excluded.
    high_open: whether `high` itself is excluded.
    also: further values allowed outside the range (-1: "infer").
  """
  integer: bool
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  also: tuple = ()

  def allows(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    if self.integer and not isinstance(value, numbers.Integral):
      return False
    if value in self.also:
      return True
    if not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low or (
        self.low_open and value == self.low)):
      return False
    return self.high is None or not (value > self.high or (
        self.high_open and value == self.high))

  def describe(self) -> str:
    bounds = []
    if self.low is not None:
      bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
    if self.high is not None:
      bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
    text = ("an integer" if self.integer else "a finite number")
    if bounds:
      text += " " + " and ".join(bounds)
    return text + "".join(f", or {v}" for v in self.also)


def _integer(low=None, **kw) -> Range:
  return Range(True, low, **kw)


def _real(low=None, high=None, **kw) -> Range:
  return Range(False, low, high, **kw)


_COUNT = _integer(1)       # Sizes, steps and intervals.
_OPTIONAL = _integer(0)    # 0: off, or taken from elsewhere.
_FRACTION = _real(0, 1, high_open=True)
_WEIGHT = _real(0)

# Numeric fields of each section and their ranges. Model fields are checked
# where the model config has them (models differ in their fields).
NUMERIC_FIELDS = {
    "data": {
        "batch_size": _COUNT,
        "max_nodes": _OPTIONAL, "max_edges": _OPTIONAL, "max_graphs": _OPTIONAL,
        "num_workers": _OPTIONAL, "prefetch": _OPTIONAL, "seed": _OPTIONAL,
        # The dev set needs a train and a val system.
        "devset_num_systems": _integer(2),
        "bulk_devset_num_structures": _integer(2),
        "sampling_temperature": _real(0),
        "train_fraction": _real(0, 1, low_open=True),
    },
    "model": {
        "cutoff": _real(0, low_open=True),
        "hidden_dim": _COUNT, "num_layers": _COUNT, "num_radial": _COUNT,
        "readout_hidden": _COUNT, "embed_dim": _COUNT, "num_blocks": _COUNT,
        "num_gaussians": _COUNT, "set2set_steps": _COUNT, "depth": _COUNT,
        "num_neighbors": _COUNT, "nearest_neighbors": _OPTIONAL,
        "pairs_per_chunk": _OPTIONAL,
        "avg_num_neighbors": _real(0, low_open=True),
        "gaussian_width": _real(0, low_open=True),
        "dilation": _real(0, low_open=True),
        # Embeddings are indexed by atomic number, up to 118.
        "num_species": _integer(119),
    },
    "loss": {"energy_weight": _WEIGHT, "force_weight": _WEIGHT,
             "stress_weight": _WEIGHT},
    "optimizer": {
        "learning_rate": _real(0, low_open=True),
        "end_lr_factor": _real(0, 1),
        "warmup_steps": _OPTIONAL,
        "weight_decay": _WEIGHT,
        "b1": _FRACTION, "b2": _FRACTION,
        "clip_norm": _WEIGHT,  # 0: no clipping.
        "ema_decay": _FRACTION,
    },
    "train": {
        "num_steps": _COUNT, "seed": _OPTIONAL, "log_every": _COUNT,
        "eval_every": _COUNT, "checkpoint_every": _COUNT,
        "keep_checkpoints": _COUNT, "grad_accum_steps": _COUNT,
    },
    "mesh": {"data": _integer(1, also=(-1,)), "fsdp": _integer(1, also=(-1,))},
    "parallel": {"fsdp_min_size": _OPTIONAL},
    "distributed": {"num_processes": _OPTIONAL,
                    "process_id": _integer(0, also=(-1,))},
}
# Layer widths of the model configs (field -> fewest layers), each an
# integer >= 1.
WIDTH_FIELDS = {"pre": 1, "block_mlp": 1, "readout_mlp": 0}


class ConfigError(ValueError):
  """A config that lacks a field or holds an impossible value."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first missing or impossible field."""
  for section, fields in REQUIRED_FIELDS.items():
    if section not in config:
      raise ConfigError(f"config has no section '{section}'; start from "
                        "configs/s2ef.py")
    for field in fields:
      if field not in config[section]:
        raise ConfigError(f"config is missing field '{section}.{field}'; "
                          "see configs/s2ef.py for its meaning and default")
  if config.data.task not in tasks.TASKS:
    raise ConfigError(f"config.data.task must be one of "
                      f"{tuple(tasks.TASKS)}, got {config.data.task!r}")
  _check_numbers(config)
  if not isinstance(config.train.plots, bool):
    raise ConfigError(f"config.train.plots = {config.train.plots!r}: must be "
                      "True or False")
  if config.get("precision", "float32") not in PRECISIONS:
    raise ConfigError(f"config.precision must be one of {PRECISIONS}, got "
                      f"{config.precision!r}")
  if config.parallel.strategy not in STRATEGIES:
    raise ConfigError(f"config.parallel.strategy must be one of "
                      f"{STRATEGIES}, got {config.parallel.strategy!r}")
  if config.parallel.strategy == "pmap" and config.mesh.fsdp != 1:
    raise ConfigError("config.parallel.strategy 'pmap' replicates the state "
                      "on every device; FSDP (config.mesh.fsdp > 1) needs "
                      "strategy 'jit'")
  sources = _check_sources(config)
  _check_best_metric(config, sources)
  heads = config.model.get("heads", "shared")
  if heads not in HEADS:
    raise ConfigError(f"config.model.heads must be one of {HEADS}, got "
                      f"{heads!r}")
  for pattern in (config.get("init") or {}).get("freeze", ()):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(f"config.init.freeze: {pattern!r} is not a regular "
                        f"expression ({e})") from e


def _check_sources(config) -> list[str]:
  """The names of `config.data.sources` (empty for one source), checked."""
  sources = config.data.get("sources") or {}
  for name, source in sources.items():
    if not name or "/" in name:
      raise ConfigError(f"config.data.sources: {name!r} is not a source "
                        "name (metrics are named '<split>/<source>/...', so "
                        "no '/')")
    if not isinstance(source, (dict, ml_collections.ConfigDict)) or not (
        isinstance(source.get("path"), str) and source.get("path")):
      raise ConfigError(f"config.data.sources.{name} needs a 'path' (a "
                        "converted dataset folder, 'devset' or "
                        "'devset_bulk')")
    weight = source.get("weight", 1.0)
    if not _WEIGHT.allows(weight):
      raise ConfigError(f"config.data.sources.{name}.weight = {weight!r}: "
                        f"must be {_WEIGHT.describe()}")
  if sources and not any(s.get("weight", 1.0) > 0 for s in sources.values()):
    raise ConfigError("config.data.sources: every weight is 0, so nothing "
                      "would be sampled")
  return list(sources)


def best_metric_terms(text: str) -> list[tuple[float, str]]:
  """(weight, metric name) of `config.train.best_metric`: one name
  ("val/force_mae", "val/lips/force_mae") or a weighted sum
  ("val/slabs/force_mae + 0.5 * val/lips/force_mae").

  Raises:
    ConfigError: a weight is not a number.
  """
  terms = []
  for part in text.split("+"):
    weight, star, name = part.strip().rpartition("*")
    try:
      terms.append((float(weight) if star else 1.0, name.strip()))
    except ValueError as e:
      raise ConfigError(f"config.train.best_metric {text!r}: {weight!r} is "
                        "not a weight") from e
  return terms


def best_metric_value(text: str, metrics: dict) -> float:
  """The value of `config.train.best_metric` `text` in `metrics`."""
  return sum(w * float(metrics[name]) for w, name in best_metric_terms(text))


def _check_best_metric(config, sources: list[str]) -> None:
  task = tasks.get(config.data.task)
  known = task.for_data(stress=True).metrics
  form = "<eval split>/<source>/<metric>" if sources else (
      "<eval split>/<metric>")
  for _, name in best_metric_terms(config.train.best_metric):
    parts = name.split("/")
    if len(parts) != (3 if sources else 2) or (
        parts[0] not in config.data.eval_splits or parts[-1] not in known
        or (sources and parts[1] not in sources)):
      raise ConfigError(
          f"config.train.best_metric {config.train.best_metric!r} must be "
          f"'{form}' or a weighted sum of such names, with a split of "
          f"config.data.eval_splits {tuple(config.data.eval_splits)}"
          + (f", a source of {tuple(sources)}" if sources else "")
          + f" and a metric of {known}")


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Each numeric field within its range, then the ranges fields set for
  each other."""
  for section, ranges in NUMERIC_FIELDS.items():
    values = config.get(section)
    if values is None:  # Only `distributed` is optional.
      continue
    for field, allowed in ranges.items():
      if field in values and not allowed.allows(values[field]):
        raise ConfigError(f"config.{section}.{field} = {values[field]!r}: "
                          f"must be {allowed.describe()}")
  model = config.model
  for field, least in WIDTH_FIELDS.items():
    widths = model.get(field)
    if widths is not None and (
        isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__")
        or len(widths) < least or not all(_COUNT.allows(w) for w in widths)):
      raise ConfigError(
          f"config.model.{field} = {widths!r}: must be a "
          f"{'non-empty ' if least else ''}sequence of integers >= 1")
  if model.get("nearest_neighbors", 0) > model.get("num_neighbors", math.inf):
    raise ConfigError(
        f"config.model.nearest_neighbors = {model.nearest_neighbors}: must "
        f"be at most config.model.num_neighbors ({model.num_neighbors}), or "
        "0 for all of them")
  if "dilation" in model and "hidden_dim" in model and (
      int(model.hidden_dim * model.dilation) < 1):
    raise ConfigError(
        f"config.model.dilation = {model.dilation}: must make "
        f"hidden_dim x dilation at least 1 (hidden_dim is "
        f"{model.hidden_dim})")
  if config.mesh.data == -1 and config.mesh.fsdp == -1:
    raise ConfigError("config.mesh.data and config.mesh.fsdp are both -1: "
                      "at most one of them may be inferred")
  loss = config.loss
  if tasks.get(config.data.task).forces:
    if loss.energy_weight == 0 and loss.force_weight == 0:
      raise ConfigError("config.loss.energy_weight and "
                        "config.loss.force_weight are both 0: nothing would "
                        "be trained; make at least one of them > 0")
  elif loss.energy_weight == 0:
    raise ConfigError(f"config.loss.energy_weight = 0: must be > 0 for task "
                      f"{config.data.task!r}, whose only target is the "
                      "energy")
