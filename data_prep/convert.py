r"""Converts OC20/matsciml LMDBs or ASE-readable files into graph datasets.

    python -m data_prep.convert --input train=PATH --input val=PATH \
        --output DIR --task s2ef [--cutoff 6.0] [--max-neighbors 50] \
        [--workers N] [--skip-bad] [--overwrite]

Inputs are LMDB files or shard folders (OC20 S2EF/IS2RE, matsciml), ASE
files (extxyz, traj, db, ...) or folders of them (OC20 `*.extxyz` + `*.txt`
chunks). `split=PATH` keeps the given splits; bare paths are split with a
seeded permutation (`--val-fraction`, `--test-fraction`, `--split-seed`).

The output folder is a tensorflow-datasets ArrayRecord dataset, one example
per structure, with periodic edges computed by vesin; see
`matsci_jax.data.dataset_io` for its layout and `matsci_jax.data.schema` for
the features. It is written to a temporary folder and moved into place only
when complete. A bad entry stops the run with an error naming the file, the
entry and the problem, unless `--skip-bad` is given, which skips it and lists
it in `skipped.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import tqdm

from matsci_jax.data import dataset_io, processes, readers as readers_lib, schema
from matsci_jax.data.neighbors import NEIGHBOR_RULE, Edges, neighbor_list
from matsci_jax.data.point_cloud import point_cloud
from matsci_jax.data.statistics import SplitStatistics, summarize
from matsci_jax.data.structure import DataError, validate

_CHUNK = 256  # Entries per work unit; ASE readers parse frames in such blocks.
_NO_EDGES = Edges(np.zeros(0, np.int32), np.zeros(0, np.int32),
                  np.zeros((0, 3), np.int32), np.zeros(0))


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


_STATE: dict = {}


@dataclasses.dataclass(frozen=True)
class PointCloudOptions:
  """How point clouds are built (see matsci_jax.data.point_cloud)."""
  cutoff: float
  num_neighbors: int
  bulk_samples: int
  seed: int


def _init_worker(readers, task, cutoff, max_neighbors, representation,
                 pc_options):
  _STATE.update(readers=readers, task=task, cutoff=cutoff,
                max_neighbors=max_neighbors, representation=representation,
                pc=pc_options,
                features=schema.features(task, pc_options is not None))


def _process(job: _Job) -> list[tuple]:
  """Converts one chunk of entries; never raises for a bad entry."""
  reader = _STATE["readers"][job.reader]
  task, features = _STATE["task"], _STATE["features"]
  pc_options = _STATE["pc"]
  out = []
  for offset, split in enumerate(job.splits):
    i = job.start + offset
    where = reader.key(i)
    try:
      s = validate(reader[i])
      if _STATE["representation"] == "point_cloud":
        edges = _NO_EDGES
      else:
        edges = neighbor_list(s.positions, s.cell, s.pbc, _STATE["cutoff"],
                              _STATE["max_neighbors"])
      pc = None
      if pc_options is not None:
        rng = np.random.default_rng([pc_options.seed, job.reader, i])
        pc = point_cloud(s, pc_options.cutoff, pc_options.num_neighbors,
                         pc_options.bulk_samples, rng)
      ex = schema.to_example(s, edges, task, pc)
      out.append(("ok", split, where, features.serialize_example(ex),
                  summarize(ex), schema.target_flags(s, task)))
    except DataError as e:
      out.append(("bad", split, (e.path, e.key), e.problem))
    except Exception as e:  # Anything else still names the entry.
      out.append(("bad", split, where, f"{type(e).__name__}: {e}"))
  return out


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


def convert(inputs: Union[Mapping[str, Sequence[str]], Sequence[str]],
            output: str, *, task: str, cutoff: float = 6.0,
            max_neighbors: Optional[int] = 50, workers: Optional[int] = None,
            val_fraction: float = 0.1, test_fraction: float = 0.0,
            split_seed: int = 0, skip_bad: bool = False,
            overwrite: bool = False, name: Optional[str] = None,
            subtract_reference: bool = False, ase_format: Optional[str] = None,
            examples_per_shard: int = 10_000, progress: bool = True,
            representation: str = "graph", pc_cutoff: Optional[float] = None,
            pc_neighbors: int = 16, pc_bulk_samples: int = 8) -> Summary:
  """Converts input files into a dataset folder; see the module docstring.

  Args:
    inputs: {split: [paths]} or a list of "split=path" / bare paths.
    output: dataset folder to create.
    task: "s2ef" or "is2re".
    cutoff: neighbour radius in Å.
    max_neighbors: nearest neighbours kept per atom (None or 0: all).
    workers: processes (default: all cores).
    val_fraction, test_fraction, split_seed: seeded split of bare paths.
    skip_bad: skip bad entries (listed in skipped.jsonl) instead of stopping.
    overwrite: replace an existing output folder.
    name: dataset name used in file names (default: from `output`).
    subtract_reference: subtract OC20 `.txt` reference energies (extxyz).
    ase_format: ASE format for files whose suffix does not tell it.
    examples_per_shard: examples per ArrayRecord file.
    progress: show a progress bar.
    representation: "graph", "point_cloud" or "both".
    pc_cutoff: point-cloud neighbour radius in Å (default: `cutoff`).
    pc_neighbors: neighbour slots per point-cloud centre.
    pc_bulk_samples: bulk atoms sampled as extra centres per structure
      (seeded by `split_seed`).

  Returns:
    A `Summary`.

  Raises:
    DataError: a bad entry (without `skip_bad`).
    FileExistsError: `output` exists and `overwrite` is False.
  """
  t0 = time.time()
  if task not in schema.TASKS:
    raise ValueError(f"task must be one of {schema.TASKS}, got {task!r}")
  if representation not in schema.REPRESENTATIONS:
    raise ValueError(f"representation must be one of "
                     f"{schema.REPRESENTATIONS}, got {representation!r}")
  pc_options = None
  if representation != "graph":
    pc_options = PointCloudOptions(
        cutoff=float(pc_cutoff or cutoff), num_neighbors=int(pc_neighbors),
        bulk_samples=int(pc_bulk_samples), seed=split_seed)
  output = os.path.abspath(os.fspath(output))
  if os.path.exists(output) and not overwrite:
    raise FileExistsError(f"{output} already exists; pass --overwrite to "
                          "replace it")
  max_neighbors = max_neighbors or None
  workers = max(1, workers or os.cpu_count() or 1)
  name = name or "".join(c if c.isalnum() else "_" for c in
                         os.path.basename(output).lower()).strip("_") or "data"
  if not name[0].isalpha():
    name = "d_" + name

  pairs = _normalize_inputs(inputs)
  readers, input_splits = [], []
  for split, path in pairs:
    for r in readers_lib.open_readers(path,
                                      subtract_reference=subtract_reference,
                                      ase_format=ase_format):
      readers.append(r)
      input_splits.append(split)
  jobs = _plan_jobs(readers, input_splits, val_fraction, test_fraction,
                    split_seed)
  total = sum(len(j.splits) for j in jobs)

  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_partials(parent, os.path.basename(output))
  tmp = os.path.join(parent, f".{os.path.basename(output)}.partial-"
                     f"{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  writers, stats, flags, skipped = {}, {}, {}, []
  try:
    _init_worker(readers, task, cutoff, max_neighbors, representation,
                 pc_options)
    if workers == 1 or total <= _CHUNK:
      results = map(_process, jobs)
    else:
      results = processes.ordered_map(
          _process, jobs, workers, _init_worker,
          (readers, task, cutoff, max_neighbors, representation, pc_options))
    bar = tqdm.tqdm(total=total, unit="struct", disable=not progress,
                    desc=f"convert {name}")
    try:
      for chunk in results:
        for item in chunk:
          split = item[1]
          if split not in writers:
            writers[split] = dataset_io.ShardedWriter(tmp, name, split,
                                                      examples_per_shard)
            stats[split] = SplitStatistics()
          if item[0] == "ok":
            _, _, where, serialized, summary, entry_flags = item
            if flags.setdefault(split, entry_flags) != entry_flags:
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
        bar.update(len(chunk))
    finally:
      bar.close()
      if hasattr(results, "close"):
        results.close()  # Stops the workers when the run ends early.

    split_infos = [w.close() for w in writers.values()]
    empty = [s for s, st in stats.items() if not st.n_atoms]
    if empty:
      raise ValueError(f"split(s) {empty} have no valid structures")
    metadata = {
        "name": name,
        "cutoff": float(cutoff),
        "max_neighbors": max_neighbors,
        "neighbor_rule": NEIGHBOR_RULE,
        "representation": representation,
        "point_cloud": (None if pc_options is None
                        else dataclasses.asdict(pc_options)),
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
    dataset_io.write_metadata(
        tmp, task, pc_options is not None, split_infos, metadata,
        {s: st.sizes() for s, st in stats.items()})
    if skipped:
      with open(os.path.join(tmp, dataset_io.SKIPPED_FILE), "w") as f:
        for row in skipped:
          f.write(json.dumps(row, default=str) + "\n")
    if os.path.exists(output):
      old = os.path.join(parent, f".{os.path.basename(output)}.old-"
                         f"{os.getpid()}")
      os.replace(output, old)
      os.replace(tmp, output)
      shutil.rmtree(old)
    else:
      os.replace(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return Summary(output=output,
                 counts={s: len(st.n_atoms) for s, st in stats.items()},
                 skipped=len(skipped), seconds=time.time() - t0)


def _remove_stale_partials(parent: str, base: str) -> None:
  """Deletes temporary folders left by conversions that were killed."""
  prefix = f".{base}.partial-"
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
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _flag_problem(expected: dict, got: dict, split: str) -> str:
  have = sorted(k for k, v in got.items() if v)
  want = sorted(k for k, v in expected.items() if v)
  return (f"entry carries targets {have} but earlier entries of split "
          f"{split!r} carry {want}; a split must be consistent")


def _parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m data_prep.convert",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", nargs="+", action="extend", required=True,
                 metavar="[SPLIT=]PATH",
                 help="LMDB file/folder or ASE-readable file/folder; "
                      "prefix SPLIT= to keep a given split")
  p.add_argument("--output", required=True, help="dataset folder to create")
  p.add_argument("--task", required=True, choices=schema.TASKS)
  p.add_argument("--cutoff", type=float, default=6.0,
                 help="neighbour radius in Å (default 6.0)")
  p.add_argument("--max-neighbors", type=int, default=50,
                 help="nearest neighbours kept per atom, 0 = all (default 50)")
  p.add_argument("--workers", type=int, default=None,
                 help="worker processes (default: all cores)")
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--test-fraction", type=float, default=0.0)
  p.add_argument("--split-seed", type=int, default=0)
  p.add_argument("--skip-bad", action="store_true",
                 help="skip bad entries and list them in skipped.jsonl")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output folder")
  p.add_argument("--name", default=None, help="dataset name in file names")
  p.add_argument("--oc20-ref-energy", action="store_true",
                 help="subtract the reference energies of OC20 .txt files")
  p.add_argument("--ase-format", default=None,
                 help="ASE format name for files with unusual suffixes")
  p.add_argument("--examples-per-shard", type=int, default=10_000)
  p.add_argument("--representation", default="graph",
                 choices=schema.REPRESENTATIONS,
                 help="graph edges, point clouds, or both (default graph)")
  p.add_argument("--pc-cutoff", type=float, default=None,
                 help="point-cloud radius in Å (default: --cutoff)")
  p.add_argument("--pc-neighbors", type=int, default=16,
                 help="neighbour slots per point-cloud centre (default 16)")
  p.add_argument("--pc-bulk-samples", type=int, default=8,
                 help="bulk atoms sampled as extra centres (default 8)")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  try:
    summary = convert(
        args.input, args.output, task=args.task, cutoff=args.cutoff,
        max_neighbors=args.max_neighbors, workers=args.workers,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, skip_bad=args.skip_bad,
        overwrite=args.overwrite, name=args.name,
        subtract_reference=args.oc20_ref_energy, ase_format=args.ase_format,
        examples_per_shard=args.examples_per_shard,
        progress=not args.no_progress, representation=args.representation,
        pc_cutoff=args.pc_cutoff, pc_neighbors=args.pc_neighbors,
        pc_bulk_samples=args.pc_bulk_samples)
  except (DataError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = ", ".join(f"{s}: {n}" for s, n in summary.counts.items())
  print(f"wrote {summary.output} ({counts}; skipped {summary.skipped}) in "
        f"{summary.seconds:.1f} s, "
        f"{summary.structures_per_second:.0f} structures/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
