"""Training inputs from a config: the dataset, its splits and their batches.

This is where a training batch is made: `open_dataset` finds the converted
dataset (building the EMT dev set on first use), `graph_spec` picks the
representation the model reads and checks it against the model config,
`budget` sizes the padding of a split, and `batches` gives a split's padded
batches through the seeded, resumable grain pipeline
(`matsci_jax.data.pipeline`), one per local device and micro-batch, with
non-finite targets rejected.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from matsci_jax.config_checks import ConfigError
from matsci_jax.data import batching, dataset_io, devset, pipeline
from matsci_jax.data.graph_spec import GraphSpec
from matsci_jax.tasks import Task


def dataset_folder(config) -> str:
  """The converted dataset to train on (`config.data.path`); "devset"
  builds the EMT dev set in `config.data.devset_dir` unless it is there."""
  if config.data.path != "devset":
    return os.path.expanduser(config.data.path)
  root = os.path.expanduser(config.data.devset_dir)
  num_systems = config.data.devset_num_systems
  # Processes sharing a file system: process 0 builds, the others wait.
  if jax.process_index() == 0 and not devset.is_built(root, num_systems):
    logging.info("building the EMT dev set in %s (%d systems)", root,
                 num_systems)
    devset.build_devset(root, num_systems=num_systems, overwrite=True,
                        progress=config.train.progress_bar)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("matsci_jax devset")
  return os.path.join(root, config.data.task)


def open_dataset(config, task: Task) -> dataset_io.Dataset:
  """The dataset of `config.data`, checked to hold `task`."""
  folder = dataset_folder(config)
  data = dataset_io.Dataset(folder)
  if data.task != task.name:
    raise ConfigError(f"{folder} is a {data.task} dataset but "
                      f"config.data.task is {task.name!r}")
  return data


def graph_spec(data: dataset_io.Dataset, model, model_config) -> GraphSpec:
  """The dataset's graph settings in the representation `model` reads.

  Raises:
    DatasetError: the dataset lacks that representation.
    ConfigError: the model's cutoff or slot count does not fit the data.
  """
  try:
    spec = data.graph_spec.select(model.representation)
  except ValueError as e:
    raise dataset_io.DatasetError(f"{data.folder}: {e}") from e
  if spec.point_cloud is not None:
    k = model_config.get("num_neighbors")
    if k != spec.point_cloud.num_neighbors:
      raise ConfigError(
          f"config.model.num_neighbors is {k} but {data.folder} stores "
          f"point clouds with {spec.point_cloud.num_neighbors} slots per "
          "centre")
  if model_config.get("cutoff", 0) > spec.edge_cutoff + 1e-9:
    raise ConfigError(
        f"config.model.cutoff {model_config.cutoff} exceeds the dataset's "
        f"{spec.representation} cutoff {spec.edge_cutoff}: neighbours "
        "beyond it are missing")
  return spec


def budget(data_config, sizes: np.ndarray,
           spec: GraphSpec) -> batching.Budget:
  """The padding budget of a split with per-structure `sizes`.

  From `data_config.batch_size` and the split's statistics, unless
  `max_nodes`, `max_edges` or `max_graphs` set it (a given node budget
  also sizes the edges and graphs). Point-cloud edges come in rows of K
  slots, so their budget is a multiple of K.
  """
  auto = batching.compute_budget(sizes, data_config.batch_size,
                                 seed=data_config.seed,
                                 n_node=data_config.max_nodes or None,
                                 edge_multiple=spec.edge_multiple)
  return batching.Budget(
      n_node=data_config.max_nodes or auto.n_node,
      n_edge=data_config.max_edges or auto.n_edge,
      n_graph=data_config.max_graphs or auto.n_graph)


@dataclasses.dataclass
class Batches:
  """A split's padded batches.

  Attributes:
    split: the opened split.
    budget: the padding budget of each batch.
    dataset: grain dataset of batches; `iter(dataset)` yields one
      `jraph.GraphsTuple` of numpy arrays (stacked [per_step, ...] when a
      step takes more than one), with `get_state`/`set_state`.
    plan: the `pipeline.BatchPlan` (batch k's structures).
  """
  split: dataset_io.Split
  budget: batching.Budget
  dataset: object
  plan: pipeline.BatchPlan

  def first(self):
    """The first batch alone (unstacked), e.g. to initialise a model."""
    indices = self.plan[0]
    if isinstance(indices, tuple):
      indices = indices[0]
    return batching.collate([self.split.source[int(i)] for i in indices],
                            self.budget, template=self.split.source[0])


def batches(split: dataset_io.Split, data_config, spec: GraphSpec,
            task: Task, *, train: bool, per_step: int) -> Batches:
  """A split's batches for training (shuffled per epoch, endless, loaded by
  `data_config.num_workers` workers) or evaluation (in order, one epoch).

  Each process takes its own share (`jax.process_index()`), `per_step`
  padded batches at a time.
  """
  split_budget = budget(data_config, split.sizes, spec)
  ds, plan = pipeline.batch_dataset(
      split, split_budget, shuffle=train, seed=data_config.seed,
      num_epochs=None if train else 1,
      worker_count=data_config.num_workers if train else 0,
      prefetch=data_config.prefetch, per_step=per_step,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  return Batches(split, split_budget, ds.map(task.target_check(split.name)),
                 plan)
