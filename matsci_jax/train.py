"""`train_and_evaluate(config, workdir)`: the whole training job.

Reads a converted dataset (building the EMT dev set on first use), pads
every split to a fixed budget, trains with one jitted step, evaluates the
EMA parameters on the validation splits with OC20 metrics, checkpoints with
orbax (state and data-iterator position, so that a killed run resumes to the
same result), and logs losses, metrics, learning rate, throughput, padding
efficiency and the number of compilations to the console, `metrics.csv` and
TensorBoard. Final metrics go to `workdir/metrics.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from absl import logging

from matsci_jax import metrics as metrics_lib
from matsci_jax import (checkpoints, models, monitoring, parallel,
                        train_state, train_step)
from matsci_jax.data import batching, dataset_io, pipeline
from matsci_jax.energy import Normalizer

# Fields every config must have (section -> fields); see configs/s2ef.py.
REQUIRED_FIELDS = {
    "data": ("path", "task", "train_split", "eval_splits", "batch_size",
             "max_nodes", "max_edges", "max_graphs", "num_workers", "prefetch",
             "seed", "devset_dir", "devset_num_systems", "representation"),
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
# Fault injection for resume tests: SIGKILL this process after that step.
KILL_AT_STEP_ENV = "MATSCI_JAX_FAULT_KILL_AT_STEP"


class ConfigError(ValueError):
  """A config that lacks a field or holds an impossible value."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first missing field."""
  for section, fields in REQUIRED_FIELDS.items():
    if section not in config:
      raise ConfigError(f"config has no section '{section}'; start from "
                        "configs/s2ef.py")
    for field in fields:
      if field not in config[section]:
        raise ConfigError(f"config is missing field '{section}.{field}'; "
                          "see configs/s2ef.py for its meaning and default")
  if config.data.task not in ("s2ef", "is2re"):
    raise ConfigError(f"config.data.task must be 's2ef' or 'is2re', got "
                      f"{config.data.task!r}")
  if config.train.num_steps < 1:
    raise ConfigError("config.train.num_steps must be at least 1")
  if config.train.grad_accum_steps < 1:
    raise ConfigError("config.train.grad_accum_steps must be at least 1")
  if config.get("precision", "float32") not in ("float32", "bf16"):
    raise ConfigError(f"config.precision must be 'float32' or 'bf16', got "
                      f"{config.precision!r}")
  if config.parallel.strategy not in ("jit", "pmap"):
    raise ConfigError(f"config.parallel.strategy must be 'jit' or 'pmap', "
                      f"got {config.parallel.strategy!r}")
  if config.parallel.strategy == "pmap" and config.mesh.fsdp != 1:
    raise ConfigError("config.parallel.strategy 'pmap' replicates the state "
                      "on every device; FSDP (config.mesh.fsdp > 1) needs "
                      "strategy 'jit'")
  split, _, metric = config.train.best_metric.partition("/")
  known = (("energy_mae", "ewt", "loss", "force_mae", "force_cos", "efwt")
           if config.data.task == "s2ef" else ("energy_mae", "ewt", "loss"))
  if split not in config.data.eval_splits or metric not in known:
    raise ConfigError(
        f"config.train.best_metric {config.train.best_metric!r} must be "
        f"'<eval split>/<metric>' with a split of config.data.eval_splits "
        f"{tuple(config.data.eval_splits)} and a metric of {known}")


def dataset_folder(config) -> str:
  """The converted dataset to train on, building the dev set if asked."""
  if config.data.path != "devset":
    return os.path.expanduser(config.data.path)
  root = os.path.expanduser(config.data.devset_dir)
  from data_prep import make_devset
  marker = os.path.join(root, make_devset.MARKER)
  built = None
  if os.path.exists(marker):
    with open(marker) as f:
      record = json.load(f)
    built = (record.get("num_systems"), record.get("representation"),
             record.get("version"))
  stale = built != (config.data.devset_num_systems, "both",
                    make_devset.VERSION)
  # Processes sharing a file system: process 0 builds, the others wait.
  if stale and jax.process_index() == 0:
    logging.info("building the EMT dev set in %s (%d systems)", root,
                 config.data.devset_num_systems)
    make_devset.build_devset(root, num_systems=config.data.devset_num_systems,
                             overwrite=True,
                             progress=config.train.progress_bar)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("matsci_jax devset")
  return os.path.join(root, config.data.task)


def _budget(config, sizes: np.ndarray) -> batching.Budget:
  # A given node budget also sizes the edge and graph budgets. Point-cloud
  # edges come in rows of K slots, so their budget is a multiple of K.
  multiple = (config.model.num_neighbors
              if config.data.representation == "point_cloud" else 1)
  auto = batching.compute_budget(sizes, config.data.batch_size,
                                 seed=config.data.seed,
                                 n_node=config.data.max_nodes or None,
                                 edge_multiple=multiple)
  return batching.Budget(
      n_node=config.data.max_nodes or auto.n_node,
      n_edge=config.data.max_edges or auto.n_edge,
      n_graph=config.data.max_graphs or auto.n_graph)


def _check_targets(split: dataset_io.Split, task: str, folder: str):
  needed = (("energy", "forces") if task == "s2ef"
            else ("energy_relaxed",))
  missing = [t for t in needed if not split.targets.get(t)]
  if missing:
    raise dataset_io.DatasetError(
        f"{folder}: split {split.name!r} has no {' / '.join(missing)} "
        "targets (a test split?); train and evaluate on labelled splits")


class _TargetCheck:
  """Batch transform that rejects NaN targets with the structure named."""

  def __init__(self, task: str, split: str):
    self.keys = (("energy",), ("forces",)) if task == "s2ef" else (
        ("energy_relaxed",),)
    self.split = split

  def __call__(self, batch):
    g = batch.globals
    if g["mask"].ndim > 1:  # One batch per device (and micro-batch).
      for i in range(g["mask"].shape[0]):
        self(jax.tree_util.tree_map(lambda x, i=i: x[i], batch))
      return batch
    for (key,) in self.keys:
      values = g[key] if key in g else batch.nodes[key]
      if key in g:
        bad = g["mask"] & ~np.isfinite(values)
      else:
        per_atom = ~np.isfinite(values).all(axis=-1) & batch.nodes["mask"]
        bad = np.zeros_like(g["mask"])
        bad[np.unique(batch.nodes["graph"][per_atom])] = True
      if bad.any():
        i = int(np.argmax(bad))
        raise dataset_io.DatasetError(
            f"split {self.split!r}: structure sid={int(g['sid'][i])} "
            f"fid={int(g['fid'][i])} has a NaN or infinite {key} target")
    return batch


def _make_loss(config, model, normalizer):
  if config.data.task == "s2ef":
    return train_step.make_s2ef_loss(model, normalizer, config.loss)
  return train_step.make_energy_loss(model, normalizer, config.loss,
                                     target="energy_relaxed")


def _baselines(split: dataset_io.Split, train_stats: dict, task: str,
               free_atoms_only: bool) -> dict:
  """Errors of trivial predictors on a split, for comparison."""
  key = "energy" if task == "s2ef" else "energy_relaxed"
  mean = train_stats[key]["mean"] if train_stats.get(key) else 0.0
  e_err, f_abs, f_n = [], 0.0, 0
  for i in range(len(split)):
    ex = split.source[i]
    e_err.append(abs(float(ex[key]) - mean))
    if task == "s2ef":
      m = ~ex["fixed"] if free_atoms_only else np.ones(len(ex["fixed"]), bool)
      f_abs += float(np.abs(ex["forces"][m]).sum())
      f_n += 3 * int(m.sum())
  out = {"mean_energy_mae": float(np.mean(e_err))}
  if task == "s2ef":
    out["zero_force_mae"] = f_abs / max(f_n, 1)
  return out


def _evaluate(eval_step, params, loader, place) -> dict:
  total = None
  for batch in loader:
    total = metrics_lib.accumulate(total, jax.device_get(
        eval_step(params, place(batch))))
  out = metrics_lib.finalize(total)
  out["loss"] = float(total["loss"]) / max(float(total["graphs"]), 1.0)
  return out


def _to_host_dict(d: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(d).items()}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains and evaluates a model; returns the final metrics.

  Args:
    config: see configs/s2ef.py.
    workdir: folder for checkpoints and logs; a run started again with the
      same workdir resumes from its latest checkpoint.

  Returns:
    The dict also written to `workdir/metrics.json`.

  Raises:
    ConfigError, DatasetError, NonFiniteLossError.
  """
  check_config(config)
  parallel.initialize_distributed(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  task = config.data.task
  compiles_at_start = monitoring.compile_count()

  folder = dataset_folder(config)
  data = dataset_io.Dataset(folder)
  if data.task != task:
    raise ConfigError(f"{folder} is a {data.task} dataset but "
                      f"config.data.task is {task!r}")
  representation = config.data.representation
  edge_cutoff = data.cutoff
  if representation == "point_cloud":
    pc = data.metadata.get("point_cloud") or {}
    edge_cutoff = pc.get("cutoff", data.cutoff)
    k = config.model.get("num_neighbors")
    if pc and k != pc["num_neighbors"]:
      raise ConfigError(
          f"config.model.num_neighbors is {k} but {folder} stores point "
          f"clouds with {pc['num_neighbors']} slots per centre")
  if config.model.get("cutoff", 0) > edge_cutoff + 1e-9:
    raise ConfigError(
        f"config.model.cutoff {config.model.cutoff} exceeds the dataset's "
        f"{representation} cutoff {edge_cutoff}: neighbours beyond it are "
        "missing")
  train_split = data.split(config.data.train_split, representation)
  eval_splits = [data.split(s, representation) for s in
                 config.data.eval_splits]
  for split in [train_split] + eval_splits:
    _check_targets(split, task, folder)
  stats = train_split.statistics
  model = models.from_config(config.model)
  if config.get("precision", "float32") == "bf16":
    model = model.clone(dtype=jnp.bfloat16)
  normalizer = Normalizer.from_statistics(
      stats, "energy" if task == "s2ef" else "energy_relaxed",
      per_graph=getattr(model, "per_graph_output", False))
  if normalizer.reference_tag >= 0:
    target = "energy" if task == "s2ef" else "energy_relaxed"
    untagged = [s.name for s in eval_splits
                if "adsorbate_fit" not in (s.statistics.get(target) or {})]
    if untagged:
      raise dataset_io.DatasetError(
          f"{folder}: the train split is OC20-tagged, so this structure-level "
          f"model adds reference energies for adsorbate atoms (tag 2) only, "
          f"but split(s) {', '.join(untagged)} have structures without OC20 "
          "tags (0, 1, 2), whose energies would lack those references; "
          "convert all splits with tags")

  # Devices: one padded batch per local device (and micro-batch) per step.
  strategy = config.parallel.strategy
  accum = int(config.train.grad_accum_steps)
  local_devices = jax.local_device_count()
  mesh = parallel.mesh_from_config(config) if strategy == "jit" else None
  per_step = local_devices * accum

  # Budgets and input pipelines: one padded shape per split.
  shard = dict(shard_index=jax.process_index(),
               shard_count=jax.process_count())
  train_budget = _budget(config, train_split.sizes)
  train_ds, train_plan = pipeline.batch_dataset(
      train_split, train_budget, shuffle=True, seed=config.data.seed,
      num_epochs=None, worker_count=config.data.num_workers,
      prefetch=config.data.prefetch, per_step=per_step, **shard)
  train_ds = train_ds.map(_TargetCheck(task, train_split.name))
  train_iter = iter(train_ds)
  eval_loaders = {}
  for split in eval_splits:
    budget = _budget(config, split.sizes)
    ds, _ = pipeline.batch_dataset(split, budget, shuffle=False,
                                   num_epochs=1, prefetch=config.data.prefetch,
                                   per_step=local_devices, **shard)
    eval_loaders[split.name] = ds.map(_TargetCheck(task, split.name))
  efficiency = train_plan.efficiency(0)
  logging.info("train budget %s per device, padding efficiency %s",
               train_budget, efficiency)

  # Loss, optimizer, steps.
  loss_fn = _make_loss(config, model, normalizer)
  optimizer = train_state.make_optimizer(config)
  schedule = train_state.learning_rate_schedule(config)
  eval_step = train_step.make_eval_step(
      loss_fn, config.loss.free_atoms_only,
      "energy" if task == "s2ef" else "energy_relaxed")

  first_indices = train_plan[0] if per_step == 1 else train_plan[0][0]
  first = batching.collate(
      [train_split.source[int(i)] for i in first_indices], train_budget,
      template=train_split.source[0])

  def create_state(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, first)
    return train_state.TrainState.create(params, optimizer, state_rng)

  rng = jax.random.PRNGKey(config.train.seed)
  if strategy == "jit":
    shardings = parallel.state_shardings(
        jax.eval_shape(create_state, rng), mesh,
        fsdp=mesh.shape["fsdp"] > 1,
        min_size=config.parallel.fsdp_min_size)
    # Created in place: with FSDP no device ever holds all of it.
    state = jax.jit(create_state, out_shardings=shardings)(rng)
    step_fn = parallel.make_sharded_train_step(
        loss_fn, optimizer, mesh, shardings, config.optimizer.ema_decay,
        accum)
    eval_fn = parallel.make_sharded_eval_step(eval_step, mesh,
                                              shardings.ema_params)
    place_batch = lambda b: parallel.to_global(b, mesh)  # noqa: E731
    place_eval = place_batch
  else:
    state = parallel.replicate(jax.jit(create_state)(rng))
    step_fn = parallel.make_pmap_train_step(
        loss_fn, optimizer, config.optimizer.ema_decay, accum)
    pmap_eval = parallel.make_pmap_eval_step(eval_step)
    eval_fn = lambda p, b: parallel.unreplicate(pmap_eval(p, b))  # noqa: E731
    place_batch = place_eval = lambda b: b  # noqa: E731
  if per_step > 1 and accum > 1:
    to_devices = place_batch
    place_batch = lambda b: to_devices(  # noqa: E731
        parallel.split_micro_batches(b, accum))
  elif per_step == 1:
    to_devices = place_batch
    place_batch = lambda b: to_devices(  # noqa: E731
        parallel.stack_batches([b]))
  if local_devices == 1:
    one = place_eval
    place_eval = lambda b: one(parallel.stack_batches([b]))  # noqa: E731
  host_state = ((lambda st: st) if strategy == "jit"
                else parallel.unreplicate)
  num_params = sum(int(np.prod(x.shape)) for x in
                   jax.tree_util.tree_leaves(host_state(state).params))

  if jax.process_index() == 0:  # One writer for shared files.
    with open(os.path.join(workdir, checkpoints.MODEL_FILE), "w") as f:
      json.dump({"model": config.model.to_dict(), "task": task,
                 "normalizer": normalizer.to_dict(), "dataset": folder,
                 "cutoff": data.cutoff, "max_neighbors": data.max_neighbors,
                 "representation": representation,
                 "point_cloud": data.metadata.get("point_cloud"),
                 "num_params": num_params}, f, indent=1)
    with open(os.path.join(workdir, checkpoints.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=1))

  # Checkpoints: the latest few, and the best by validation.
  ckpt = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.train.keep_checkpoints, create=True),
      item_names=("state", "data"))
  best_metric = config.train.best_metric
  best = ocp.CheckpointManager(
      os.path.join(workdir, "best"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m[best_metric],
          best_mode="min"),
      item_names=("state",))
  start = resumed_from = ckpt.latest_step()
  if start is not None:
    # Restoring into the current state's shardings reshards a checkpoint
    # written on another mesh or device count.
    restored = ckpt.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(host_state(state)),
        data=ocp.args.JsonRestore()))
    state = (restored.state if strategy == "jit"
             else parallel.replicate(restored.state))
    train_iter.set_state(restored.data)
    logging.info("resumed from step %d of %s", start, workdir)
    monitoring.drop_rows_after(workdir, start)  # Steps about to be redone.
  start = int(host_state(state).step)

  writer = monitoring.MetricWriter(workdir)
  baselines = {s.name: _baselines(s, stats, task, config.loss.free_atoms_only)
               for s in eval_splits}

  def evaluate(step):
    results = {}
    for name, loader in eval_loaders.items():
      m = _evaluate(eval_fn, state.ema_params, loader, place_eval)
      results.update({f"{name}/{k}": v for k, v in m.items()})
    writer.write(step, results)
    return results

  def save(step, eval_results=None):
    saved = host_state(state)
    ckpt.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(saved),
        data=ocp.args.JsonSave(train_iter.get_state())))
    if eval_results and best_metric in eval_results:
      best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(saved)), metrics=eval_results)

  pending: list[tuple[int, dict, int, int]] = []
  window_start = time.perf_counter()
  warm_compiles = None
  eval_results: dict = {}
  bar = tqdm.tqdm(total=config.train.num_steps, initial=start, unit="step",
                  disable=not config.train.progress_bar or
                  jax.process_index() != 0, dynamic_ncols=True)

  def flush(step):
    """Fetches pending step metrics, stops on a non-finite loss, logs."""
    nonlocal window_start
    if not pending:
      return
    fetched = jax.device_get([p[1] for p in pending])
    if strategy == "pmap":  # The same metrics on every device.
      fetched = [jax.tree_util.tree_map(lambda x: x[0], m) for m in fetched]
    for (s, _, _, _), m in zip(pending, fetched):
      if not bool(m["finite"]):
        raise NonFiniteLossError(
            f"loss or gradient is not finite at step {s + 1} "
            f"(loss={m['loss']}); "
            f"the run stops here and saves nothing from this step on. "
            f"Latest checkpoint: {ckpt.latest_step()} in {workdir}")
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    # Steps that include compilation (graphs = None) are not timed.
    timed = [p for p in pending if p[2] is not None]
    graphs = sum(p[2] for p in timed)
    atoms = sum(p[3] for p in timed)
    scalars = {f"train/{k}": float(np.mean([m[k] for m in fetched]))
               for k in fetched[0] if k != "finite"}
    scalars.update({
        "train/learning_rate": float(schedule(step - 1)),
        "perf/compiles": monitoring.compile_count() - compiles_at_start,
    })
    if timed:
      # This process's structures times the process count: processes take
      # equal numbers of batches from one shuffled sequence.
      procs = jax.process_count()
      scalars.update({
          "perf/structures_per_s": procs * graphs / elapsed,
          "perf/atoms_per_s": procs * atoms / elapsed,
          "perf/step_time_s": elapsed / len(timed),
          "perf/padding_efficiency_nodes": atoms / (
              len(timed) * per_step * train_budget.n_node),
      })
    writer.write(step, scalars)
    bar.set_postfix(loss=f"{scalars['train/loss']:.4g}",
                    struct_s=f"{scalars.get('perf/structures_per_s', 0):.1f}")
    pending.clear()
    window_start = time.perf_counter()

  if start == 0 and config.train.eval_at_start:
    evaluate(0)
  kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
  try:
    for step in range(start, config.train.num_steps):
      batch = next(train_iter)
      n_graphs = int(batch.globals["mask"].sum())
      n_atoms = int(batch.nodes["mask"].sum())
      state, step_metrics = step_fn(state, place_batch(batch))
      done = step + 1
      bar.update(1)
      last = done == config.train.num_steps
      if step == start:  # Compilation: keep its metrics, do not time it.
        jax.block_until_ready(step_metrics)
        pending.append((step, step_metrics, None, None))
        window_start = time.perf_counter()
      else:
        pending.append((step, step_metrics, n_graphs, n_atoms))
      if done % config.train.log_every == 0 or last:
        flush(done)
      if done % config.train.eval_every == 0 or last:
        flush(done)
        eval_results = evaluate(done)
        if warm_compiles is None:
          warm_compiles = monitoring.compile_count()
        window_start = time.perf_counter()
      if done % config.train.checkpoint_every == 0 or last:
        flush(done)
        save(done, eval_results if done % config.train.eval_every == 0
             or last else None)
      if done == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
  finally:
    bar.close()
    ckpt.wait_until_finished()
    best.wait_until_finished()

  final_step = int(host_state(state).step)
  if not eval_results or final_step != config.train.num_steps:
    eval_results = evaluate(final_step)
  compiles = monitoring.compile_count()
  result = {
      "step": final_step,
      "resumed_from_step": resumed_from,
      "num_params": num_params,
      "devices": {"strategy": strategy, "count": jax.device_count(),
                  "mesh": dict(mesh.shape) if mesh is not None else None,
                  "grad_accum_steps": accum},
      "metrics": eval_results,
      "baselines": baselines,
      "train_budget": dataclasses.asdict(train_budget),
      "padding_efficiency": efficiency,
      "compiles_total": compiles - compiles_at_start,
      "recompiles_after_warmup": (compiles - warm_compiles
                                  if warm_compiles is not None else None),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(result, f, indent=1)
  writer.close()
  ckpt.close()
  best.close()
  return result
