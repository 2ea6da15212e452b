"""Checks of a training config before anything runs (see configs/s2ef.py)."""

from __future__ import annotations

import ml_collections

from matsci_jax import tasks
from matsci_jax.models.precision import PRECISIONS

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
              "progress_bar", "eval_at_start", "grad_accum_steps"),
    "mesh": ("data", "fsdp"),
    "parallel": ("strategy", "fsdp_min_size"),
}
STRATEGIES = ("jit", "pmap")


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
  if config.train.num_steps < 1:
    raise ConfigError("config.train.num_steps must be at least 1")
  if config.train.grad_accum_steps < 1:
    raise ConfigError("config.train.grad_accum_steps must be at least 1")
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
  split, _, metric = config.train.best_metric.partition("/")
  known = tasks.get(config.data.task).metrics
  if split not in config.data.eval_splits or metric not in known:
    raise ConfigError(
        f"config.train.best_metric {config.train.best_metric!r} must be "
        f"'<eval split>/<metric>' with a split of config.data.eval_splits "
        f"{tuple(config.data.eval_splits)} and a metric of {known}")
