"""Converts OC20/matsciml LMDBs or ASE-readable files into graph datasets.

    from matsci_jax.data import converter
    from matsci_jax.data.graph_spec import GraphSpec

    converter.convert({"train": [PATH], "val": [PATH]}, DIR, task="s2ef",
                      graph_spec=GraphSpec(cutoff=6.0, max_neighbors=50))

(`python -m data_prep.convert` is its command line.) Inputs are LMDB files
or shard folders (OC20 S2EF/IS2RE, matsciml), ASE files (extxyz, traj, db,
...) or folders of them (OC20 `*.extxyz` + `*.txt` chunks). `split=PATH`
keeps the given splits; bare paths are split with a seeded permutation.

Every structure is stored as `GraphSpec.stored_example` builds it, one
example per structure, in a tensorflow-datasets ArrayRecord folder; see
`matsci_jax.data.dataset_io` for its layout and `matsci_jax.data.schema` for
the features. Targets (energy, forces, stress, ...) must agree within a
split; the metadata lists each split's `targets`, and a dataset stores a
`stress` feature only when some split has stress. It is written to a
temporary folder and moved into place only when complete. A bad entry stops
the run with an error naming the file, the entry and the problem, unless
`skip_bad` is given, which skips it and lists it in `skipped.jsonl`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import tqdm
from absl import logging

from matsci_jax.data import dataset_io, processes, schema
from matsci_jax.data import readers as readers_lib
from matsci_jax.data.graph_spec import GraphSpec
from matsci_jax.data.neighbors import NEIGHBOR_RULE
from matsci_jax.data.statistics import SplitStatistics, summarize
from matsci_jax.data.structure import DataError

# A split carries the targets of the majority of its first valid entries.
TARGETS_VOTE = 100
_CHUNK = 256  # Entries per work unit; ASE readers parse frames in such blocks.
# A worker process takes about as long to start (a fresh interpreter that
# imports numpy, ASE and tensorflow-datasets) as converting a few hundred
# entries, so each worker gets at least this many or is not started.
_MIN_ENTRIES_PER_WORKER = 1000
_DEFAULT_SPEC = GraphSpec()  # Frozen: one shared default is safe.


@dataclasses.dataclass(frozen=True)
class _Job:
  reader: int
  start: int
  splits: tuple  # The split of each entry start, start+1, ...


@dataclasses.dataclass
class Summary:
  """What a conversion wrote."""
  output: str
  counts: dict
  skipped: int
  seconds: float

  @property
  def structures_per_second(self) -> float:
    return sum(self.counts.values()) / max(self.seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class _Worker:
  """Converts chunks of entries; pickled once to each worker process.

  Attributes:
    readers: every input reader; a job names one by its index.
    task: "s2ef" or "is2re".
    graph_spec: how each structure becomes a stored example.
    serialize: writes a stored example's bytes.
    serialize_stress: the same for a structure with stress, which its
      record holds (the main process adds a NaN stress to the records of
      splits without it when another split has it).
  """
  readers: tuple
  task: str
  graph_spec: GraphSpec
  serialize: schema.Serializer
  serialize_stress: schema.Serializer

  def process(self, job: _Job) -> list[tuple]:
    """Converts one chunk of entries; never raises for a bad entry.

    Returns:
      Per entry, ("ok", split, (file, key), serialized, summary, flags) or
      ("bad", split, (file, key), problem).
    """
    reader = self.readers[job.reader]
    pc = self.graph_spec.point_cloud
    out = []
    for offset, split in enumerate(job.splits):
      i = job.start + offset
      where = reader.key(i)
      try:
        s = reader[i]
        # Seeded per entry, so that the bulk centres drawn do not depend on
        # the worker count or the order in which chunks are done.
        rng = (None if pc is None
               else np.random.default_rng([pc.seed, job.reader, i]))
        stress = s.stress is not None
        ex = self.graph_spec.stored_example(s, self.task, rng, stress)
        serialize = self.serialize_stress if stress else self.serialize
        out.append(("ok", split, where, serialize(ex),
                    summarize(ex), schema.target_flags(s, self.task)))
      except DataError as e:
        out.append(("bad", split, (e.path, e.key), e.problem))
      except Exception as e:  # Anything else still names the entry.
        out.append(("bad", split, where, f"{type(e).__name__}: {e}"))
    return out


_WORKER: Optional[_Worker] = None


def _init_worker(worker: _Worker) -> None:
  global _WORKER
  _WORKER = worker


def _process(job: _Job) -> list[tuple]:
  # Jobs name their reader by index: the worker, readers included, travels
  # to each process once, not with every job.
  return _WORKER.process(job)


def _plan_jobs(readers, inputs_split, val_fraction, test_fraction, seed):
  """Assigns every entry to a split and cuts the entries into chunks."""
  jobs = []
  unsplit = [r for r, s in zip(readers, inputs_split) if s is None]
  assigned = None
  if unsplit:
    total = sum(len(r) for r in unsplit)
    n_val = int(round(total * val_fraction))
    n_test = int(round(total * test_fraction))
    if n_val + n_test >= total and total:
      raise ValueError(f"--val-fraction {val_fraction} and --test-fraction "
                       f"{test_fraction} leave no training structures")
    assigned = np.full(total, "train", dtype=object)
    perm = np.random.default_rng(seed).permutation(total)
    assigned[perm[:n_val]] = "val"
    assigned[perm[n_val:n_val + n_test]] = "test"
  cursor = 0
  for ri, (reader, split) in enumerate(zip(readers, inputs_split)):
    n = len(reader)
    for start in range(0, n, _CHUNK):
      stop = min(start + _CHUNK, n)
      if split is None:
        splits = tuple(assigned[cursor + start:cursor + stop])
      else:
        splits = (split,) * (stop - start)
      jobs.append(_Job(ri, start, splits))
    if split is None:
      cursor += n
  return jobs


def _normalize_inputs(inputs) -> list[tuple[Optional[str], str]]:
  if isinstance(inputs, Mapping):
    return [(split, os.fspath(p)) for split, paths in inputs.items()
            for p in ([paths] if isinstance(paths, (str, os.PathLike))
                      else paths)]
  pairs = []
  for item in inputs:
    item = os.fspath(item)
    split, sep, path = item.partition("=")
    if sep and not os.path.exists(item):
      pairs.append((split, path))
    else:
      pairs.append((None, item))
  named = {s is None for s, _ in pairs}
  if len(named) > 1:
    raise ValueError("give either every input as SPLIT=PATH or none of them")
  return pairs


def _check_settings(task, workers, val_fraction, test_fraction,
                    examples_per_shard, ase_format) -> None:
  """Rejects impossible settings before any input is read (the graph
  settings check themselves in `GraphSpec`)."""
  if task not in schema.TASKS:
    raise ValueError(f"task must be one of {schema.TASKS}, got {task!r}")
  if workers is not None and workers < 0:
    raise ValueError(f"workers must be >= 0 (0: all cores), got {workers}")
  for flag, value in (("val", val_fraction), ("test", test_fraction)):
    if not 0 <= value < 1:
      raise ValueError(f"{flag} fraction must be in [0, 1), got {value}")
  if val_fraction + test_fraction >= 1:
    raise ValueError(f"val fraction {val_fraction} and test fraction "
                     f"{test_fraction} leave no training structures")
  if examples_per_shard < 1:
    raise ValueError(f"examples per shard must be at least 1, got "
                     f"{examples_per_shard}")
  if ase_format is not None:
    from ase.io.formats import ioformats
    if ase_format not in ioformats:
      raise ValueError(f"ASE has no file format {ase_format!r}")


def convert(inputs: Union[Mapping[str, Sequence[str]], Sequence[str]],
            output: str, *, task: str, graph_spec: GraphSpec = _DEFAULT_SPEC,
            workers: Optional[int] = None, val_fraction: float = 0.1,
            test_fraction: float = 0.0, split_seed: int = 0,
            skip_bad: bool = False, overwrite: bool = False,
            name: Optional[str] = None, subtract_reference: bool = False,
            ase_format: Optional[str] = None,
            examples_per_shard: int = 10_000,
            progress: bool = True) -> Summary:
  """Converts input files into a dataset folder; see the module docstring.

  Args:
    inputs: {split: [paths]} or a list of "split=path" / bare paths.
    output: dataset folder to create.
    task: "s2ef" or "is2re".
    graph_spec: graph edges and point-cloud slots to store (the point
      clouds' bulk centres are drawn per entry from its seed); written to
      the metadata.
    workers: processes (default: all cores, each with at least 1,000
      entries to convert; fewer entries are converted in this process).
    val_fraction, test_fraction, split_seed: seeded split of bare paths.
    skip_bad: skip bad entries (listed in skipped.jsonl) instead of stopping.
    overwrite: replace an existing output folder.
    name: dataset name used in file names (default: from `output`).
    subtract_reference: subtract OC20 `.txt` reference energies (extxyz).
    ase_format: ASE format for files whose suffix does not tell it.
    examples_per_shard: examples per ArrayRecord file.
    progress: show a progress bar.

  Returns:
    A `Summary`.

  Raises:
    DataError: a bad entry (without `skip_bad`).
    FileExistsError: `output` exists and `overwrite` is False.
    FileNotFoundError: an input path holds nothing readable.
    OutputError: the output cannot be written (a read-only folder, a full
      disk); checked before any input is read, and as shards grow.
    ValueError: bad settings, or a split left without valid structures.
  """
  t0 = time.time()
  _check_settings(task, workers, val_fraction, test_fraction,
                  examples_per_shard, ase_format)
  output = os.path.abspath(os.fspath(output))
  pairs = _normalize_inputs(inputs)
  # Before reading any input: the output folder must be writable.
  tmp = _temporary_folder(output, overwrite)
  automatic = not workers
  workers = max(1, workers or os.cpu_count() or 1)
  name = name or "".join(c if c.isalnum() else "_" for c in
                         os.path.basename(output).lower()).strip("_") or "data"
  if not name[0].isalpha():
    name = "d_" + name
  writers, stats, flags, skipped = {}, {}, {}, []
  restore_sigterm = _exit_on_sigterm()
  try:
    readers, input_splits = [], []
    for split, path in pairs:
      for r in readers_lib.open_readers(
          path, subtract_reference=subtract_reference, ase_format=ase_format):
        readers.append(r)
        input_splits.append(split)
    jobs = _plan_jobs(readers, input_splits, val_fraction, test_fraction,
                      split_seed)
    total = sum(len(j.splits) for j in jobs)
    has_point_cloud = graph_spec.point_cloud is not None
    worker = _Worker(tuple(readers), task, graph_spec,
                     schema.Serializer(task, has_point_cloud),
                     schema.Serializer(task, has_point_cloud, stress=True))
    if automatic:
      workers = min(workers, max(1, total // _MIN_ENTRIES_PER_WORKER))
    if workers == 1 or total <= _CHUNK:
      results = map(worker.process, jobs)
    else:
      results = processes.ordered_map(_process, jobs, workers, _init_worker,
                                      (worker,))
    bar = tqdm.tqdm(total=total, unit="struct", disable=not progress,
                    desc=f"convert {name}")
    vote = _TargetVote()

    def handle(item):
      split = item[1]
      if item[0] == "ok":
        _, _, where, serialized, summary, entry_flags = item
        if flags.setdefault(split, vote.targets[split]) != entry_flags:
          item = ("bad", split, where, _flag_problem(
              flags[split], entry_flags, split))
        else:
          writers[split].write(serialized)
          stats[split].add(summary)
      if item[0] == "bad":
        _, _, (path, key), problem = item
        if not skip_bad:
          raise DataError(path, key, problem + (
              " (pass --skip-bad to skip such entries)"))
        skipped.append({"file": path, "key": key, "split": split,
                        "problem": problem})

    try:
      for chunk in results:
        for item in chunk:
          split = item[1]
          if split not in writers:
            writers[split] = dataset_io.ShardedWriter(
                tmp, name, split, examples_per_shard, label=output)
            stats[split] = SplitStatistics()
          for ready in vote.add(item):
            handle(ready)
        bar.update(len(chunk))
      for ready in vote.finish():
        handle(ready)
    finally:
      bar.close()
      if hasattr(results, "close"):
        results.close()  # Stops the workers when the run ends early.

    # A dataset has a stress feature when a split has stress; the records
    # of its other splits, written without it, get a NaN one.
    has_stress = any(f.get("stress") for f in flags.values())
    if has_stress:
      for split, w in writers.items():
        if not flags.get(split, {}).get("stress"):
          w.rewrite(schema.add_missing_stress)
    split_infos = [w.close() for w in writers.values()]
    empty = [s for s, st in stats.items() if not st.n_atoms]
    if empty:
      raise ValueError(f"split(s) {empty} have no valid structures")
    settings = graph_spec.to_dict()
    metadata = {
        "name": name,
        # metadata.json keeps its keys in insertion order, and this order
        # (neighbor_rule after max_neighbors) predates GraphSpec: kept, so
        # that a conversion writes the same bytes as before.
        **{k: settings.pop(k) for k in ("cutoff", "max_neighbors")},
        "neighbor_rule": NEIGHBOR_RULE,
        **settings,
        "inputs": [{"split": s, "path": os.path.abspath(p)} for s, p in pairs],
        "split_seed": split_seed,
        "subtract_reference": subtract_reference,
        "skipped": len(skipped),
        "splits": {
            s: {"num_structures": len(stats[s].n_atoms),
                "targets": flags.get(s, {}),
                "statistics": stats[s].summary()}
            for s in writers},
    }
    try:
      dataset_io.write_metadata(
          tmp, task, has_point_cloud, split_infos, metadata,
          {s: st.sizes() for s, st in stats.items()}, stress=has_stress)
      if skipped:
        with open(os.path.join(tmp, dataset_io.SKIPPED_FILE), "w") as f:
          for row in skipped:
            f.write(json.dumps(row, default=str) + "\n")
      _move_into_place(tmp, output)
    except OSError as e:
      if isinstance(e, dataset_io.OutputError):
        raise
      raise dataset_io.output_error(output, e) from e
  except BaseException:
    for w in writers.values():
      w.abort()
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    restore_sigterm()
  return Summary(output=output,
                 counts={s: len(st.n_atoms) for s, st in stats.items()},
                 skipped=len(skipped), seconds=time.time() - t0)


def _temporary_folder(output: str, overwrite: bool) -> str:
  """Creates the folder that becomes `output` when the conversion is done.

  Raises:
    FileExistsError: `output` exists and `overwrite` is False.
    OutputError: the folder cannot be created (read-only parent, ...).
  """
  parent, base = os.path.split(output)
  try:
    _recover_interrupted_swap(output)
  except OSError as e:
    raise dataset_io.output_error(
        parent, e, "cannot clean up an interrupted conversion") from e
  if os.path.exists(output) and not overwrite:
    raise FileExistsError(f"{output} already exists; pass --overwrite to "
                          "replace it")
  tmp = os.path.join(parent, f".{base}.partial-{os.getpid()}")
  try:
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(parent, base)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  except OSError as e:
    raise dataset_io.output_error(
        parent, e, f"cannot create the output folder {base} there") from e
  return tmp


def _move_into_place(tmp: str, output: str) -> None:
  """Renames the finished `tmp` to `output`, replacing an older one."""
  if os.path.exists(output):
    parent, base = os.path.split(output)
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old)
  else:
    os.replace(tmp, output)


def _exit_on_sigterm():
  """Makes SIGTERM (what job schedulers send) raise SystemExit, so that a
  terminated conversion cleans up as after an error; returns the undo."""
  if threading.current_thread() is not threading.main_thread():
    return lambda: None

  def stop(signum, frame):
    del frame
    raise SystemExit(128 + signum)

  previous = signal.signal(signal.SIGTERM, stop)
  if previous is None:  # Installed outside Python: restore the default.
    previous = signal.SIG_DFL
  return lambda: signal.signal(signal.SIGTERM, previous)


def _leftovers(parent: str, prefix: str):
  """Names `prefix + PID` in `parent` whose process is gone."""
  for name in os.listdir(parent):
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
      continue
    pid = int(name[len(prefix):])
    try:
      os.kill(pid, 0)
      alive = pid != os.getpid()
    except ProcessLookupError:
      alive = False
    except PermissionError:
      alive = True
    if not alive:
      yield name


def _remove_stale_partials(parent: str, base: str) -> None:
  """Deletes temporary folders left by conversions that were killed."""
  for name in _leftovers(parent, f".{base}.partial-"):
    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _recover_interrupted_swap(output: str) -> None:
  """Finishes or undoes an `--overwrite` swap that a killed run left.

  The swap renames the old output to `.NAME.old-PID`, moves the new one
  into place and deletes the old one. Killed between the renames, the
  output is missing and the old data hidden: it is put back. Killed before
  the deletion, the old data is deleted.
  """
  parent, base = os.path.split(output)
  if not os.path.isdir(parent):
    return
  for name in _leftovers(parent, f".{base}.old-"):
    path = os.path.join(parent, name)
    if os.path.exists(output):
      shutil.rmtree(path, ignore_errors=True)
      logging.warning("removed %s, the old data of a finished --overwrite "
                      "of %s that was killed before deleting it", path,
                      output)
    else:
      os.replace(path, output)
      logging.warning("restored %s from %s: a conversion replacing it was "
                      "killed before it finished", output, path)


class _TargetVote:
  """Decides which targets each split carries: those of the majority of
  its first `size` valid entries (a tie goes to the earliest). Valid
  entries wait until their split is decided; bad ones pass at once.
  """

  def __init__(self, size: int = TARGETS_VOTE):
    self.size = size
    self.held: dict[str, list] = {}
    self.targets: dict[str, dict] = {}

  def add(self, item) -> list:
    """Items ready to handle, in input order within each split."""
    split = item[1]
    if item[0] != "ok" or split in self.targets:
      return [item]
    self.held.setdefault(split, []).append(item)
    return self._decide(split) if len(self.held[split]) >= self.size else []

  def finish(self) -> list:
    return [item for split in list(self.held) for item in
            self._decide(split)]

  def _decide(self, split: str) -> list:
    items = self.held.pop(split)
    key = lambda flags: tuple(sorted(flags.items()))  # noqa: E731
    votes = collections.Counter(key(item[5]) for item in items)
    top = max(votes.values())
    self.targets[split] = next(item[5] for item in items
                               if votes[key(item[5])] == top)
    return items


def _flag_problem(expected: dict, got: dict, split: str) -> str:
  have = sorted(k for k, v in got.items() if v)
  want = sorted(k for k, v in expected.items() if v)
  return (f"entry carries targets {have} but most entries of split "
          f"{split!r} carry {want}; a split must be consistent")
