"""Training inputs from a config: the datasets, their splits and batches.

This is where a training batch is made: `open_sources` finds the converted
datasets (`config.data.path`, or several named `config.data.sources`),
building the EMT dev sets on first use; `sources_graph_spec` picks the
representation the model reads and checks it against the model config and
across sources; `training_split` joins the sources' training splits, each
structure tagged with its source, and draws them by their weights
(`pipeline.MixtureSampler`); `budget` sizes the padding of a split, and
`batches` gives a split's padded batches through the seeded, resumable
grain pipeline (`matsci_jax.data.pipeline`), one per local device and
micro-batch, with non-finite targets rejected.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os

import jax
import numpy as np
from absl import logging

from matsci_jax.config_checks import ConfigError
from matsci_jax.data import batching, dataset_io, devset, pipeline
from matsci_jax.data.graph_spec import GraphSpec
from matsci_jax.tasks import Task

# Dataset paths that name a built-in dev set.
SLAB_DEVSET, BULK_DEVSET = "devset", "devset_bulk"
DEFAULT_BULK_DEVSET_DIR = "~/.cache/matsci_jax/devset_bulk"


def dataset_folder(config, path: str | None = None) -> str:
  """The converted dataset at `path` (default `config.data.path`).

  "devset" builds the EMT slab dev set in `config.data.devset_dir`, and
  "devset_bulk" the EMT bulk dev set in `config.data.bulk_devset_dir`,
  unless they are there.
  """
  path = config.data.path if path is None else path
  if path == SLAB_DEVSET:
    root = os.path.expanduser(config.data.devset_dir)
    size = config.data.devset_num_systems
    built, build = devset.is_built, functools.partial(
        devset.build_devset, num_systems=size)
    folder = os.path.join(root, config.data.task)
  elif path == BULK_DEVSET:
    from matsci_jax.data import bulk_devset
    root = os.path.expanduser(config.data.get("bulk_devset_dir",
                                              DEFAULT_BULK_DEVSET_DIR))
    size = config.data.get("bulk_devset_num_structures",
                           bulk_devset.DEFAULT_NUM_STRUCTURES)
    built, build = bulk_devset.is_built, functools.partial(
        bulk_devset.build_bulk_devset, num_structures=size)
    folder = os.path.join(root, "s2ef")
  else:
    return os.path.expanduser(path)
  # Processes sharing a file system: process 0 builds, the others wait.
  if jax.process_index() == 0 and not built(root, size):
    logging.info("building the EMT %s in %s (%d)", path, root, size)
    build(root, overwrite=True, progress=config.train.progress_bar)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"matsci_jax {path}")
  return folder


@dataclasses.dataclass
class Source:
  """One converted dataset a run trains on.

  Attributes:
    name: its name in metrics ("val/<name>/force_mae"); "" when the run has
      one source (`config.data.path`), whose metrics keep plain names.
    dataset: the opened dataset.
    weight: its sampling weight (see `pipeline.MixtureSampler`).
  """
  name: str
  dataset: dataset_io.Dataset
  weight: float = 1.0

  @property
  def label(self) -> str:
    """How errors name it."""
    return (f"source {self.name!r} ({self.dataset.folder})" if self.name
            else self.dataset.folder)

  def has(self, target: str, split: str) -> bool:
    """Whether `split` of this source carries `target` ("forces",
    "stress")."""
    info = self.dataset.metadata["splits"].get(split) or {}
    return bool((info.get("targets") or {}).get(target))

  def task(self, task: Task, split: str) -> Task:
    """`task` as this source's `split` supports it (stress where it has
    stress; energies only where it has no forces)."""
    if not self.has(task.energy_target, split):  # Unlabelled: a test split.
      return task
    return task.for_data(forces=self.has("forces", split),
                         stress=self.has("stress", split))


def source_settings(data_config) -> list[tuple[str, str, float]]:
  """(name, path, weight) of each source: `data_config.sources` (in the
  order of their names, as a ConfigDict keeps them), or the one unnamed
  source `data_config.path`."""
  sources = data_config.get("sources")
  if not sources:
    return [("", data_config.path, 1.0)]
  return [(name, s.path, float(s.get("weight", 1.0)))
          for name, s in sources.items()]


def open_sources(config, task: Task) -> list[Source]:
  """The sources of `config.data`, each checked to hold `task`.

  Raises:
    DatasetError: a source folder is not a converted dataset (named with
      its source).
    ConfigError: a source holds another task.
  """
  out = []
  for name, path, weight in source_settings(config.data):
    folder = dataset_folder(config, path)
    try:
      data = dataset_io.Dataset(folder)
    except dataset_io.DatasetError as e:
      if not name:
        raise
      raise dataset_io.DatasetError(f"source {name!r}: {e}") from e
    source = Source(name, data, weight)
    if data.task != task.name:
      raise ConfigError(f"{source.label} is a {data.task} dataset but "
                        f"config.data.task is {task.name!r}")
    out.append(source)
  return out


def training_task(sources: list[Source], task: Task, config) -> Task:
  """`task` with the targets the sources' training splits carry: forces
  where any has them, stress where any has it.

  Raises:
    ConfigError: `config.loss.stress_weight` is set but no source has
      stress.
  """
  split = config.data.train_split
  with_forces = any(s.has("forces", split) for s in sources)
  with_stress = any(s.has("stress", split) for s in sources)
  if config.loss.get("stress_weight", 0.0) > 0 and not with_stress:
    raise ConfigError(
        f"config.loss.stress_weight is {config.loss.stress_weight} but no "
        f"training data has stress ({', '.join(s.label for s in sources)}); "
        "set it to 0 or convert data with stress")
  labelled = any(s.has(task.energy_target, split) for s in sources)
  # Unlabelled (test) splits keep every target, for the error that names
  # what they lack.
  return task.for_data(forces=with_forces or not labelled,
                       stress=with_stress)


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


def sources_graph_spec(sources: list[Source], model,
                       model_config) -> GraphSpec:
  """The graph settings all sources share, in the representation `model`
  reads (see `graph_spec`).

  Raises:
    ConfigError: two sources were built with different settings (a batch
      mixes them, so they must agree), both named.
  """
  first = sources[0]
  spec = graph_spec(first.dataset, model, model_config)
  for other in sources[1:]:
    theirs = graph_spec(other.dataset, model, model_config)
    if theirs != spec:
      raise ConfigError(
          f"{first.label} and {other.label} have different graph settings "
          f"({spec.to_dict()} and {theirs.to_dict()}); convert them with "
          "the same --cutoff, --max-neighbors and --representation")
  return spec


class TaggedSource:
  """A split's examples with the per-structure fields of a run with several
  sources: `source` (its index), `has_forces` and, when any source has
  stress, `has_stress`, with zeros standing in for targets it lacks (the
  loss masks them), so that every batch has the same fields."""

  def __init__(self, source, index: int, has_forces: bool,
               has_stress: bool | None):
    self.source = source
    self.index = np.int32(index)
    self.has_forces = np.bool_(has_forces)
    self.has_stress = None if has_stress is None else np.bool_(has_stress)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    ex = dict(self.source[i], source=self.index, has_forces=self.has_forces)
    if not self.has_forces:
      ex["forces"] = np.zeros_like(ex["forces"])
    if self.has_stress is not None:
      ex["has_stress"] = self.has_stress
      if not self.has_stress:
        ex["stress"] = np.zeros((3, 3), np.float32)
    return ex


class MixedSource:
  """Several data sources read as one: index i runs through source 0's
  structures, then source 1's, and so on."""

  def __init__(self, sources: list):
    self.sources = sources
    self.offsets = np.cumsum([0] + [len(s) for s in sources]).tolist()

  def __len__(self) -> int:
    return self.offsets[-1]

  def __getitem__(self, i: int) -> dict:
    s = bisect.bisect_right(self.offsets, i) - 1
    return self.sources[s][i - self.offsets[s]]


class SubsetSource:
  """The structures `indices` of a data source."""

  def __init__(self, source, indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.indices[i])]


def subset(split: dataset_io.Split, fraction: float,
           seed: int) -> dataset_io.Split:
  """A seeded `fraction` of a split's structures (at least one).

  Subsets are nested: for one seed, every structure of a smaller fraction
  is in every larger one (each takes a prefix of the same permutation),
  so a data-scaling study adds data rather than drawing new data. The
  split's statistics (its normaliser) stay those of the whole split.
  """
  if fraction >= 1.0:
    return split
  n = len(split)
  keep = max(1, int(round(fraction * n)))
  order = np.random.default_rng([seed, n]).permutation(n)
  indices = np.sort(order[:keep])
  return dataclasses.replace(split, source=SubsetSource(split.source,
                                                        indices),
                             sizes=split.sizes[indices])


def _tagged_split(sources: list[Source], index: int, name: str,
                  representation: str) -> dataset_io.Split:
  """Split `name` of source `index`, tagged when there are several."""
  source = sources[index]
  split = source.dataset.split(name, representation)
  if len(sources) == 1:
    return split
  any_stress = any(s.has("stress", name) for s in sources)
  tagged = TaggedSource(split.source, index, source.has("forces", name),
                        source.has("stress", name) if any_stress else None)
  return dataclasses.replace(split, source=tagged)


def training_split(sources: list[Source], data_config, spec: GraphSpec
                   ) -> tuple[dataset_io.Split, pipeline.MixtureSampler |
                              None]:
  """The training split of all sources, and the sampler that draws it by
  the sources' weights (None for one source, which is shuffled whole).

  `data_config.train_fraction` (default 1) keeps a seeded, nested fraction
  of each source's training structures (see `subset`).

  With several sources, the split's structures run source by source
  (`MixedSource`), its statistics are empty (each source keeps its own,
  `Source.dataset`), and its targets are those any source has.
  """
  name = data_config.train_split
  fraction = data_config.get("train_fraction", 1.0)
  splits = [subset(_tagged_split(sources, i, name, spec.representation),
                   fraction, data_config.seed)
            for i in range(len(sources))]
  if len(sources) == 1:
    return splits[0], None
  targets = {}
  for split in splits:
    for key, present in split.targets.items():
      targets[key] = targets.get(key, False) or bool(present)
  mixed = dataset_io.Split(
      name=name, source=MixedSource([s.source for s in splits]),
      sizes=np.concatenate([s.sizes for s in splits]), statistics={},
      targets=targets)
  sampler = pipeline.MixtureSampler(
      [len(s) for s in splits], [s.weight for s in sources],
      data_config.get("sampling_temperature", 1.0), data_config.seed)
  return mixed, sampler


@dataclasses.dataclass
class EvalSplit:
  """An evaluation split of one source.

  Attributes:
    label: the prefix of its metrics ("val", or "val/<source>").
    source: the `Source` it belongs to.
    split: the opened split (tagged when the run has several sources).
    task: the task as the source supports it (for its baselines).
  """
  label: str
  source: Source
  split: dataset_io.Split
  task: Task


def eval_splits(sources: list[Source], data_config, spec: GraphSpec,
                task: Task) -> list[EvalSplit]:
  """Every evaluation split of every source."""
  out = []
  for i, source in enumerate(sources):
    for name in data_config.eval_splits:
      label = f"{name}/{source.name}" if source.name else name
      out.append(EvalSplit(label, source,
                           _tagged_split(sources, i, name,
                                         spec.representation),
                           source.task(task, name)))
  return out


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
    label: the prefix of its metrics (the split's name, or
      "<split>/<source>").
    budget: the padding budget of each batch.
    dataset: grain dataset of batches; `iter(dataset)` yields one
      `jraph.GraphsTuple` of numpy arrays (stacked [per_step, ...] when a
      step takes more than one), with `get_state`/`set_state`.
    plan: the `pipeline.BatchPlan` (batch k's structures).
  """
  split: dataset_io.Split
  label: str
  budget: batching.Budget
  dataset: object
  plan: pipeline.BatchPlan

  def seen(self, items: int) -> tuple[int, int]:
    """Structures and atoms that the first `items` items of the plan (steps
    of this process) hold, over all processes."""
    structures = atoms = 0
    for k in range(items):
      item = self.plan[k]
      for indices in (item if isinstance(item, tuple) else (item,)):
        structures += len(indices)
        atoms += int(self.split.sizes[indices, 0].sum())
    procs = jax.process_count()
    return structures * procs, atoms * procs

  def first(self):
    """The first batch alone (unstacked), e.g. to initialise a model."""
    indices = self.plan[0]
    if isinstance(indices, tuple):
      indices = indices[0]
    return batching.collate([self.split.source[int(i)] for i in indices],
                            self.budget, template=self.split.source[0])


def batches(split: dataset_io.Split, data_config, spec: GraphSpec,
            task: Task, *, train: bool, per_step: int, sampler=None,
            label: str | None = None) -> Batches:
  """A split's batches for training (shuffled per epoch, endless, loaded by
  `data_config.num_workers` workers) or evaluation (in order, one epoch).

  Each process takes its own share (`jax.process_index()`), `per_step`
  padded batches at a time. A `sampler` (several sources) draws each
  epoch's structures, and the budget follows what it draws.
  """
  sizes = split.sizes if sampler is None else split.sizes[sampler(0)]
  split_budget = budget(data_config, sizes, spec)
  label = label or split.name
  ds, plan = pipeline.batch_dataset(
      split, split_budget, shuffle=train, seed=data_config.seed,
      num_epochs=None if train else 1,
      worker_count=data_config.num_workers if train else 0,
      prefetch=data_config.prefetch, per_step=per_step,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      sampler=sampler)
  return Batches(split, label, split_budget,
                 ds.map(task.target_check(label)), plan)
