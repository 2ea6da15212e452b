"""`train_and_evaluate(config, workdir)`: the whole training job.

Reads a converted dataset (building the EMT dev set on first use), pads
every split to a fixed budget, trains with one jitted step, evaluates the
EMA parameters on the validation splits with OC20 metrics, checkpoints with
orbax (state and data-iterator position, so that a killed run resumes to the
same result), and logs losses, metrics, learning rate, throughput, padding
efficiency and the number of compilations to the console, `metrics.csv` and
TensorBoard; it redraws the learning curve and the parity figures at each
evaluation, into `workdir/plots/` (`matsci_jax.plots`).
Final metrics go to `workdir/metrics.json`.

The pieces it calls, one decision each: `tasks` (targets, loss, metrics),
`inputs` (dataset, graph settings, padded batches), `strategies` (devices),
`checkpoints` (the run folder) and `monitoring` (logs).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from matsci_jax import (accelerators, checkpoints, energy, finetune, inputs,
                        metrics, models, monitoring, parallel, plots,
                        strategies, tasks, train_state)
from matsci_jax.config_checks import ConfigError, check_config  # noqa: F401
from matsci_jax.data import dataset_io, pipeline
from matsci_jax.models import precision
from matsci_jax.monitoring import NonFiniteLossError  # noqa: F401

# Fault injection for resume tests: SIGKILL this process after that step.
KILL_AT_STEP_ENV = "MATSCI_JAX_FAULT_KILL_AT_STEP"


def evaluate(eval_step, params, batches: inputs.Batches,
             strategy: strategies.Strategy) -> dict[str, float]:
  """OC20 metrics and the mean loss of `params` on one split."""
  total = None
  for batch in batches.dataset:
    total = metrics.accumulate(total, jax.device_get(
        eval_step(params, strategy.place_eval(batch))))
  out = metrics.finalize(total)
  out["loss"] = float(total["loss"]) / max(float(total["graphs"]), 1.0)
  return out


def _resume(ckpt: checkpoints.Checkpoints, strategy: strategies.Strategy,
            state, train_iter, workdir: str):
  """(state, step) of the latest checkpoint that restores, with the data
  iterator moved to its position; (state, None) when there is none.

  Newer checkpoints that do not restore are skipped with a warning
  (`Checkpoints.restore_latest`); none restoring is a `CheckpointError`.
  """
  found = ckpt.restore_latest(strategy.host_state(state))
  if found is None:
    return state, None
  step, host, position = found
  state = strategy.from_host_state(host)
  train_iter.set_state(position)
  monitoring.drop_rows_after(workdir, step)  # About to be redone.
  return state, step


def _train_loop(train_config, state, train_iter, train_step,
                strategy: strategies.Strategy, log: monitoring.TrainLog,
                ckpt: checkpoints.Checkpoints, run_evaluation):
  """Steps from the state's step to `train_config.num_steps`, logging,
  evaluating and checkpointing on schedule.

  Returns:
    (state, the last evaluation's metrics, the compile count after the
    first evaluation, or None).
  """
  start = int(strategy.host_state(state).step)
  last_step = train_config.num_steps
  eval_results, warm_compiles = {}, None
  if start == 0 and train_config.eval_at_start:
    run_evaluation(0, state.ema_params)
  kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
  for step in range(start, last_step):
    batch = next(train_iter)
    graphs, atoms = (int(batch.globals["mask"].sum()),
                     int(batch.nodes["mask"].sum()))
    state, step_metrics = train_step(state, strategy.place_train(batch))
    done = step + 1
    if step == start:  # Compilation: keep its metrics, do not time it.
      jax.block_until_ready(step_metrics)
      log.add(step, step_metrics, None, None)
      log.restart_clock()
    else:
      log.add(step, step_metrics, graphs, atoms)
    if done % train_config.log_every == 0 or done == last_step:
      log.flush(done)
    evaluated = done % train_config.eval_every == 0 or done == last_step
    if evaluated:
      log.flush(done)
      eval_results = run_evaluation(done, state.ema_params)
      if warm_compiles is None:
        warm_compiles = monitoring.compile_count()
      log.restart_clock()
    if done % train_config.checkpoint_every == 0 or done == last_step:
      log.flush(done)
      ckpt.save(done, strategy.host_state(state), train_iter.get_state(),
                eval_results if evaluated else None)
    if done == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
  return state, eval_results, warm_compiles


def _normalizer(sources: list[inputs.Source],
                evals: list[inputs.EvalSplit], task: tasks.Task, model,
                train_split: str):
  """The normaliser (one per source, stacked when there are several) and
  each source's training statistics, after checking that every split holds
  what its source's task needs."""
  normalizers, statistics = [], []
  for source in sources:
    info = source.dataset.metadata["splits"].get(train_split)
    if info is None:  # Opening it names the splits there are.
      source.dataset.split(train_split)
    stats = info["statistics"]
    own = source.task(task, train_split)
    own.check_split(dataset_io.Split(train_split, None, None, stats,
                                     info.get("targets") or {}),
                    source.label)
    normalizer = task.normalizer(stats, model)
    mine = [e.split for e in evals if e.source is source]
    for split in mine:
      source.task(task, split.name).check_split(split, source.label)
    task.check_references(normalizer, mine, source.label)
    normalizers.append(normalizer)
    statistics.append(stats)
  if len(normalizers) == 1:
    return normalizers[0], statistics
  try:
    return energy.Normalizer.stack(normalizers), statistics
  except ValueError as e:
    raise ConfigError(f"{', '.join(s.label for s in sources)}: {e}") from e


@dataclasses.dataclass
class Job:
  """A training job's pieces, built once from a config (`build`).

  Attributes:
    task: the task with the targets the data carries.
    sources: the data sources.
    model: the Flax module (in the config's precision).
    spec: the graph settings batches are built with.
    normalizer: maps model outputs to energies (one entry per source).
    train_statistics: each source's training-split statistics.
    evals: every evaluation split of every source.
    strategy: the device strategy.
    train_data, eval_data: padded batches of the training split and of
      each evaluation split.
    transfer: what a fine-tuning run loads (None: fresh parameters).
    trainable, frozen: numbers of trainable and frozen parameter scalars.
    state: the initial training state, on the devices (shape structs when
      built `abstract`).
    train_step, eval_step: the strategy's jitted steps.
    flops_per_step: FLOPs of one training step over all devices (XLA's
      cost analysis, every iteration of the model's scans counted), or
      None.
  """
  task: tasks.Task
  sources: list
  model: Any
  spec: Any
  normalizer: energy.Normalizer
  train_statistics: list
  evals: list
  strategy: strategies.Strategy
  train_data: inputs.Batches
  eval_data: list
  transfer: Any
  trainable: int
  frozen: int
  state: Any
  train_step: Any
  eval_step: Any
  flops_per_step: float | None

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        self.strategy.host_state(self.state).params))


def build(config: ml_collections.ConfigDict, abstract: bool = False,
          count_flops: bool = True) -> Job:
  """Everything a run of `config` trains with, before any step: data,
  model, normaliser, device strategy, initial state and steps (the state
  is created on the devices; nothing is compiled but its initialisation).

  With `abstract`, the state is shape structs with their shardings
  (`Strategy.abstract_state`) and nothing runs on the devices, so that the
  steps can be compiled ahead of time for models too large to create
  (`matsci_jax.plan`). Without `count_flops` (only the state is wanted),
  `flops_per_step` is None and the step is not lowered.

  Call after `check_config` and `parallel.initialize_distributed`.

  Raises:
    ConfigError, DatasetError.
  """
  # Data and model: the sources' datasets, the model's representation of
  # them, one padded shape per split, a normaliser per source from its
  # training statistics.
  task = tasks.get(config.data.task)
  sources = inputs.open_sources(config, task)
  task = inputs.training_task(sources, task, config)
  model = precision.apply(models.from_config(config.model, len(sources)),
                          config.get("precision", "float32"))
  spec = inputs.sources_graph_spec(sources, model, config.model)
  train_split, sampler = inputs.training_split(sources, config.data, spec)
  evals = inputs.eval_splits(sources, config.data, spec, task)
  normalizer, train_statistics = _normalizer(sources, evals, task, model,
                                             config.data.train_split)
  strategy = strategies.from_config(config)
  train_data = inputs.batches(train_split, config.data, spec, task,
                              train=True, per_step=strategy.batches_per_step,
                              sampler=sampler)
  eval_data = [inputs.batches(e.split, config.data, spec, task, train=False,
                              per_step=strategy.eval_batches_per_step,
                              label=e.label) for e in evals]

  # State and steps, built once.
  loss_fn = task.make_loss(model, normalizer, config.loss)
  optimizer = train_state.make_optimizer(config)
  first = train_data.first()

  # Fine-tuning and frozen parameters, checked from shapes before anything
  # runs (ConfigError).
  transfer = finetune.from_config(config, model, first)
  trainable, frozen = finetune.freeze_counts(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), first),
      train_state.freeze_patterns(config))

  def init(rng):
    init_rng, _ = jax.random.split(rng)  # A seed keeps its parameters.
    params = model.init(init_rng, first)
    if transfer is not None:
      params = transfer.merge(params)
    return train_state.TrainState.create(params, optimizer)

  make_state = strategy.abstract_state if abstract else strategy.create_state
  state = make_state(init, jax.random.PRNGKey(config.train.seed))
  def make_train_step():
    return strategy.make_train_step(loss_fn, optimizer,
                                    config.optimizer.ema_decay)

  train_step = make_train_step()
  if not count_flops:
    flops_per_step = None
  elif abstract:
    flops_per_step = strategy.step_flops(
        train_step, make_train_step, state,
        strategy.abstract_train_batch(first), placed=True)
  else:
    flops_per_step = strategy.step_flops(
        train_step, make_train_step, state,
        first if strategy.batches_per_step == 1
        else pipeline.stack([first] * strategy.batches_per_step))
  eval_step = strategy.make_eval_step(
      task.make_eval_step(loss_fn, config.loss.free_atoms_only))
  return Job(task, sources, model, spec, normalizer, train_statistics, evals,
             strategy, train_data, eval_data, transfer, trainable, frozen,
             state, train_step, eval_step, flops_per_step)


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
  compiles_at_start = monitoring.compile_count()
  run = checkpoints.RunFolder(workdir).create()
  job = build(config)
  strategy, train_data, sources = job.strategy, job.train_data, job.sources
  efficiency = train_data.plan.efficiency(0)
  num_params = job.num_params
  elements = set()
  for stats in job.train_statistics:
    elements.update(int(z) for z in stats.get("element_counts") or {})
  run.write_model(config.model, job.task, job.normalizer, job.spec,
                  sources[0].dataset.folder, num_params, elements,
                  sources=[(s.name, s.dataset.folder) for s in sources
                           if s.name])
  run.write_config(config)

  # Checkpoints (resuming from the latest, if any) and logs.
  ckpt = run.checkpoints(config.train.keep_checkpoints,
                         config.train.best_metric)
  train_iter = iter(train_data.dataset)
  state, resumed_from = _resume(ckpt, strategy, job.state, train_iter,
                                run.path)
  writer = monitoring.MetricWriter(run.path)
  if job.transfer is not None:
    logging.info("%s", job.transfer.describe())
  logging.info("parameters: %d trainable, %d frozen", job.trainable,
               job.frozen)
  log = monitoring.TrainLog(
      writer, train_state.learning_rate_schedule(config),
      strategy.batches_per_step * train_data.budget.n_node,
      config.train.num_steps, int(strategy.host_state(state).step),
      config.train.progress_bar,
      lambda: f"{ckpt.latest_step()} in {run.path}", strategy.host_metrics,
      compiles_at_start, job.flops_per_step,
      accelerators.mesh_peak_flops(config.get("precision", "float32")))

  figures = plots.RunPlots(run.path, job, config.loss, config.train.plots)

  def run_evaluation(step, params):
    results = {f"{d.label}/{k}": v for d in job.eval_data for k, v in
               evaluate(job.eval_step, params, d, strategy).items()}
    writer.write(step, results)
    figures.learning_curve(step)
    # The first draw compiles a prediction step, before the compile count
    # that later steps are checked against (after the first evaluation).
    figures.parity(step, params)
    return results

  started = time.perf_counter()
  try:
    state, eval_results, warm_compiles = _train_loop(
        config.train, state, train_iter, job.train_step, strategy, log, ckpt,
        run_evaluation)
  finally:
    log.close()
    ckpt.wait()

  train_seconds = time.perf_counter() - started
  final_step = int(strategy.host_state(state).step)
  if not eval_results or final_step != config.train.num_steps:
    eval_results = run_evaluation(final_step, state.ema_params)
  compiles = monitoring.compile_count()
  result = {
      "step": final_step,
      "resumed_from_step": resumed_from,
      "num_params": num_params,
      "trainable_params": job.trainable,
      "frozen_params": job.frozen,
      "init": job.transfer.summary() if job.transfer is not None else None,
      "devices": strategy.describe(),
      "metrics": eval_results,
      "baselines": {e.label: e.task.baselines(
          e.split, job.train_statistics[sources.index(e.source)],
          config.loss.free_atoms_only) for e in job.evals},
      "train_budget": dataclasses.asdict(train_data.budget),
      "train_structures": len(train_data.split),
      "flops_per_step": job.flops_per_step,
      "seen": dict(zip(("structures", "atoms"),
                       train_data.seen(final_step))),
      "train_seconds": train_seconds,
      "device_kind": jax.devices()[0].device_kind,
      "padding_efficiency": efficiency,
      "plots_seconds": round(figures.seconds, 2),
      "compiles_total": compiles - compiles_at_start,
      "recompiles_after_warmup": (compiles - warm_compiles
                                  if warm_compiles is not None else None),
  }
  run.write_result(result)
  writer.close()
  ckpt.close()
  return result
