r"""Predictions of a trained model for OC20 LMDBs or ASE-readable files.

    python -m matsci_jax.predict --checkpoint=runs/my_run \
        --input=data/s2ef_val_id --output=predictions.csv \
        [--submission=s2ef_val_id.npz] [--relax --fmax=0.05 --steps=300] \
        [--skip-bad] [--devices=8] [--edge-chunk=200000]

Inputs are whatever the converter reads (OC20 LMDBs as published, folders
of OC20 extxyz chunks, any ASE-readable file). The table (`.csv`, or
`.parquet` through pyarrow) has one row per structure: id (OC20's
"<sid>_<fid>" for S2EF frames, "<sid>" for IS2RE systems and for
relaxations; the entry's position in the inputs where they have no OC20
ids), source file and
entry, atom count, predicted energy and, where the input has it, the
target. `--submission` writes the arrays of OC20's evaluation submissions
(as fairchem's `predict` writes them, in float32): S2EF `ids`, `energy`,
`forces` (free atoms only, concatenated) and `chunk_idx` (where each
structure's rows start, after the first); IS2RE `ids` and `energy`. With
`--relax` (an S2EF model), every structure is relaxed with batched FIRE
(`matsci_jax.relax`); the table adds the relaxed energy, steps, final fmax
and convergence, and the submission holds IS2RE `ids` and relaxed `energy`
with IS2RS `positions` (all atoms) and `chunk_idx`.

Predictions stream to the outputs batch by batch, so that memory does not
grow with the number of structures: table rows go to a temporary file
(Parquet in row groups of a few thousand rows), submission arrays to
temporary per-array files beside the `.npz`, which are assembled into it
block by block at the end. Every output appears under its final name only
when the run is complete. A bad entry (unreadable, or, with `--strict`, an
element the model never saw) stops the run with an error naming the file,
the entry and the problem, and leaves no output; with `--skip-bad` it is
skipped and listed, one JSON object (file, key, problem) a line, in
`<output stem>.skipped.jsonl` beside the table.

For structures whose edges do not fit one device, `--devices N` splits each
batch's edges over N devices (atoms replicated on each), and
`--edge-chunk M` runs each layer's edge work M edges at a time, bounding
memory on a device; results equal one-device ones up to rounding (see
`matsci_jax.models.edge_sums`).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import shutil
import signal
import sys
import zipfile
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import app, flags

from matsci_jax import checkpoints, parallel, relax
from matsci_jax.data import batching, lmdb_reader, readers
from matsci_jax.data.structure import DataError, Structure

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir or checkpoint folder.")
_WHICH = flags.DEFINE_string(
    "which", "best", "For a workdir: 'best', 'latest' or a step number.")
_INPUT = flags.DEFINE_multi_string(
    "input", None, "LMDB file or folder, or ASE-readable file or folder "
    "(repeatable).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Table of predictions: .csv or .parquet.")
_SUBMISSION = flags.DEFINE_string(
    "submission", None, "Optional .npz in OC20's submission layout.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Structures per batch.")
_RELAX = flags.DEFINE_bool("relax", False, "Relax every structure (FIRE).")
_FMAX = flags.DEFINE_float("fmax", 0.05, "Relaxation threshold, eV/Å.")
_STEPS = flags.DEFINE_integer("steps", 300, "Most FIRE steps.")
_STRICT = flags.DEFINE_bool(
    "strict", False, "Stop at a structure with an element the model never "
    "saw in training (default: warn once per element).")
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad", False, "Skip bad entries and list them in "
    "<output stem>.skipped.jsonl instead of stopping at the first.")
flags.DEFINE_alias("skip-bad", "skip_bad")  # The converter's spelling.
_SOURCE = flags.DEFINE_string(
    "source", None, "For a model trained on several data sources: the "
    "source whose energies (reference energies, head) to predict; required "
    "there.")
_DEVICES = flags.DEFINE_integer(
    "devices", 1, "Split each batch's edges over this many devices (atoms "
    "replicated): for structures too large for one device.")
_EDGE_CHUNK = flags.DEFINE_integer(
    "edge_chunk", 0, "Edges per chunk of each layer's edge work on a "
    "device (0: all at once); bounds memory for large structures.")
flags.DEFINE_alias("edge-chunk", "edge_chunk")

# Parquet rows buffered per row group: bounded memory, and a footer (which
# the writer holds until it closes) that grows with row groups, not rows.
_ROWS_PER_GROUP = 4096
# Elements per block when the .npz is assembled from its temporary files
# (8192 ids take about 0.5 MB as Python strings).
_BLOCK = 1 << 13


def _open_readers_lazily(path: str) -> Iterator[readers.Reader]:
  """The readers of one input path, each opened when the previous one is
  done: a folder of LMDB shards opens shard by shard, so that only one
  shard's key index is held at a time."""
  files = [path]
  if os.path.isdir(path):
    try:
      files = lmdb_reader.find_lmdb_files(path)
    except FileNotFoundError:  # A folder of ASE-readable files.
      pass
  for f in files:
    yield from readers.open_readers(f)


class InputFileError(DataError):
  """An input file that cannot be opened at all: no entry of it is read,
  even with `--skip-bad`."""


def _readers(paths: Sequence[str]) -> Iterator[readers.Reader]:
  """The readers of every input path, in order, opened lazily.

  Raises:
    InputFileError: a file that cannot be opened.
  """
  for path in paths:
    opened = _open_readers_lazily(path)
    while True:
      try:
        reader = next(opened)
      except StopIteration:
        break
      except DataError as e:
        raise InputFileError(e.path, e.key, e.problem) from e
      yield reader


def _entries(paths: Sequence[str]) -> Iterator[Structure | DataError]:
  """Every entry of every input path, in order: its `Structure`, or the
  `DataError` that names why it cannot be read.

  Raises:
    InputFileError: an input file that cannot be opened.
    FileNotFoundError: an input path holds nothing readable.
  """
  for reader in _readers(paths):
    for i in range(len(reader)):
      try:
        item = reader[i]
      except DataError as e:
        item = e
      except Exception as e:  # Anything else still names the entry.
        item = DataError(*reader.key(i), f"{type(e).__name__}: {e}")
        item.__cause__ = e
      yield item


def read_structures(paths: Sequence[str]) -> Iterator[Structure]:
  """Every structure of every input path, in order.

  Raises:
    DataError: an entry that cannot be read (naming its file and key).
  """
  for item in _entries(paths):
    if isinstance(item, DataError):
      raise item
    yield item


def _structure_id(s: Structure, per_frame: bool, index: int) -> str:
  """OC20 ids: "<sid>_<fid>" for S2EF frames, "<sid>" for systems."""
  if s.sid < 0:  # Inputs without OC20 ids: the position in the inputs.
    return str(index)
  return f"{s.sid}_{s.fid}" if per_frame and s.fid >= 0 else str(s.sid)


def _example(trained, item, strict: bool) -> dict:
  """The model's input for one entry; raises for a bad entry.

  Raises:
    DataError: the entry could not be read or turned into a graph.
    checkpoints.UnseenElementError: with `strict`, an unseen element.
  """
  if isinstance(item, DataError):
    raise item
  try:
    return trained.example(item, strict)
  except (DataError, checkpoints.UnseenElementError):
    raise
  except Exception as e:  # Anything else still names the entry.
    raise DataError(*item.source, f"{type(e).__name__}: {e}") from e


def predict_batches(trained: checkpoints.Trained, entries, *,
                    batch_size: int = 16, relaxation: dict | None = None,
                    strict: bool = False,
                    on_bad: Callable[[DataError], None] | None = None
                    ) -> Iterator[tuple[list[dict], dict]]:
  """Predicts entries one batch at a time, holding nothing across batches.

  Args:
    trained: a loaded model.
    entries: iterable of `Structure`s, or of `DataError`s standing for
      entries that could not be read.
    batch_size: structures per padded batch (the node and edge budgets are
      bucketed, so that few shapes compile).
    relaxation: None, or `relax.relax` keywords (fmax, steps) to relax the
      structures first.
    strict: an element absent from the model's training data makes the
      entry bad (`checkpoints.UnseenElementError`), not a warning.
    on_bad: None to raise at the first bad entry, or a function given the
      `DataError` of each bad entry, which is then left out.

  Yields:
    (rows, arrays) per batch: one dict per structure for the table, and
    the batch's submission arrays: "ids", "energy" and, for S2EF, "forces"
    (free atoms) or, when relaxing, "positions" (all atoms), with "counts"
    (their rows per structure).

  Raises:
    DataError, checkpoints.UnseenElementError: a bad entry, without
      `on_bad`.
  """
  s2ef = trained.task.forces
  if relaxation is not None and not s2ef:
    raise ValueError(f"--relax needs an S2EF model (forces); "
                     f"{trained.workdir} was trained on {trained.task.name}")
  fn = jax.jit(trained.energy_and_forces if s2ef
               else lambda p, g: (trained.energy_fn(p, g), None))
  group = []
  for index, item in enumerate(entries):
    try:
      example = _example(trained, item, strict)
    except (DataError, checkpoints.UnseenElementError) as e:
      if on_bad is None:
        raise
      on_bad(e if isinstance(e, DataError)
             else DataError(*item.source, str(e)))
      continue
    group.append((index, item, example))
    if len(group) == batch_size:
      yield _predict_group(trained, fn, group, batch_size, relaxation)
      group = []
  if group:
    yield _predict_group(trained, fn, group, batch_size, relaxation)


def _predict_group(trained, fn, group, batch_size, relaxation):
  """(rows, arrays) of one batch of (index, structure, example)."""
  s2ef = trained.task.forces
  examples = [ex for _, _, ex in group]
  if relaxation is not None:
    results = relax.relax(trained, [s.to_atoms() for _, s, _ in group],
                          **relaxation)
  budget = batching.bucket_budget(examples, n_graph=batch_size + 1)
  graph = trained.place(batching.collate(examples, budget))
  e, f = jax.device_get(fn(trained.params, graph))
  rows, energies, rows_of, counts = [], [], [], []
  start = 0
  for k, (index, s, _) in enumerate(group):
    n = s.num_atoms
    target = s.energy if s2ef else s.energy_relaxed
    row = {"id": _structure_id(s, s2ef and relaxation is None, index),
           "source": str(s.source[0]), "entry": str(s.source[1]),
           "num_atoms": n, "energy": float(e[k]),
           "target_energy": math.nan if target is None else float(target)}
    energies.append(float(e[k]))
    if s2ef:
      free = ~s.fixed
      row["fmax"] = float(np.linalg.norm(f[start:start + n][free],
                                         axis=1).max(initial=0.0))
      if relaxation is None:
        rows_of.append(f[start:start + n][free])
        counts.append(int(free.sum()))
    if relaxation is not None:
      r = results[k]
      row.update(relaxed_energy=r.energy, relax_steps=r.steps,
                 relaxed_fmax=r.fmax, converged=r.converged)
      energies[-1] = r.energy
      rows_of.append(r.atoms.positions)
      counts.append(n)
    rows.append(row)
    start += n
  arrays = {"ids": np.array([r["id"] for r in rows]),
            "energy": np.array(energies, np.float32)}
  if s2ef:
    key = "forces" if relaxation is None else "positions"
    arrays[key] = np.concatenate(rows_of).astype(np.float32).reshape(-1, 3)
    arrays["counts"] = np.array(counts, np.int64)
  return rows, arrays


def _submission_arrays(parts: dict) -> dict:
  """The submission layout from lists of per-batch arrays."""
  arrays = {"ids": (np.concatenate(parts["ids"]) if parts["ids"]
                    else np.array([], "<U1")),
            "energy": np.concatenate(parts["energy"] or
                                     [np.zeros(0, np.float32)])}
  for key in ("forces", "positions"):
    if key in parts:
      arrays[key] = np.concatenate(parts[key])
      arrays["chunk_idx"] = np.cumsum(np.concatenate(parts["counts"]))[:-1]
  return arrays


def predict(trained: checkpoints.Trained, structures, *, batch_size: int = 16,
            relaxation: dict | None = None,
            strict: bool = False) -> tuple[list[dict], dict]:
  """Predicts every structure, in memory (see `predict_to_files` for inputs
  of any size).

  Args:
    trained: a loaded model.
    structures: iterable of `Structure`s.
    batch_size: structures per padded batch (the node and edge budgets are
      bucketed, so that few shapes compile).
    relaxation: None, or `relax.relax` keywords (fmax, steps) to relax the
      structures first.
    strict: an element absent from the model's training data is an error
      (`checkpoints.UnseenElementError`), not a warning.

  Returns:
    (rows, arrays): one dict per structure for the table, and the
    submission arrays (see the module docstring).
  """
  rows, parts = [], collections.defaultdict(list)
  for batch_rows, arrays in predict_batches(
      trained, structures, batch_size=batch_size, relaxation=relaxation,
      strict=strict):
    rows.extend(batch_rows)
    for key, value in arrays.items():
      parts[key].append(value)
  return rows, _submission_arrays(parts)


class _TableWriter:
  """Appends rows to a temporary file; `publish` gives it its final name."""

  def __init__(self, path: str):
    if not path.endswith((".csv", ".parquet")):
      raise ValueError(f"the table must be a .csv or .parquet file, got "
                       f"{path}")
    self.path, self.partial = path, path + ".partial"
    self._parquet = path.endswith(".parquet")
    self._file = self._writer = self._schema = None
    self._pending = []

  def write(self, rows: list[dict]) -> None:
    if self._parquet:
      self._pending.extend(rows)
      if len(self._pending) >= _ROWS_PER_GROUP:
        self._flush_parquet()
      return
    if self._writer is None:
      self._file = open(self.partial, "w", newline="")
      self._writer = csv.DictWriter(self._file, fieldnames=list(rows[0]))
      self._writer.writeheader()
    self._writer.writerows(rows)

  def _flush_parquet(self) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    # Later row groups take the first one's schema, so that a column
    # typed by its first values (NaN targets, say) stays one type.
    table = pa.Table.from_pylist(self._pending, schema=self._schema)
    if self._writer is None:
      self._schema = table.schema
      self._writer = pq.ParquetWriter(self.partial, self._schema)
    self._writer.write_table(table)
    self._pending = []

  def close(self) -> None:
    """Completes the temporary file."""
    if self._parquet and (self._pending or self._writer is None):
      self._flush_parquet()
    if self._writer is None:  # No rows: an empty CSV file.
      self._file = open(self.partial, "w", newline="")
    (self._writer if self._parquet else self._file).close()

  def publish(self) -> None:
    os.replace(self.partial, self.path)

  def abort(self) -> None:
    """Closes and removes the temporary file."""
    try:
      if self._parquet and self._writer is not None:
        self._writer.close()
      elif self._file is not None:
        self._file.close()
    finally:
      if os.path.exists(self.partial):
        os.remove(self.partial)


class _SubmissionWriter:
  """Streams the submission arrays to an `.npz` with memory flat in the
  number of structures.

  Each batch's arrays are appended to raw files in a temporary folder
  beside the `.npz`; `close` assembles them into a temporary `.npz` block
  by block (the `.npy` header needs the final shapes, known only then) and
  `publish` gives it its final name.
  """

  def __init__(self, path: str):
    if not path.endswith(".npz"):
      raise ValueError(f"the submission must be an .npz file, got {path}")
    self.path = path
    self.partial = path[:-len(".npz")] + ".partial.npz"
    # A fixed name: a run killed before cleaning up leaves one folder,
    # which the next run replaces.
    self._parts = os.path.join(os.path.dirname(path),
                               f".{os.path.basename(path)}.parts")
    shutil.rmtree(self._parts, ignore_errors=True)
    os.makedirs(self._parts)
    self._files, self._shapes, self._dtypes = {}, {}, {}
    self._id_width = 1

  def write(self, arrays: dict) -> None:
    for key, value in arrays.items():
      if key not in self._files:
        self._files[key] = open(os.path.join(self._parts, key), "wb")
        self._shapes[key] = (0,) + value.shape[1:]
        # The .npy header names the byte order: little-endian throughout.
        self._dtypes[key] = value.dtype.newbyteorder("<")
      if key == "ids":  # Digits and "_" only: one a line.
        self._id_width = max([self._id_width] + [len(i) for i in value])
        self._files[key].write("".join(f"{i}\n" for i in value).encode())
      else:
        self._files[key].write(np.ascontiguousarray(
            value, self._dtypes[key]).tobytes())
      shape = self._shapes[key]
      self._shapes[key] = (shape[0] + len(value),) + shape[1:]

  def close(self) -> None:
    """Assembles the temporary `.npz`."""
    for f in self._files.values():
      f.close()
    with zipfile.ZipFile(self.partial, "w", zipfile.ZIP_DEFLATED,
                         allowZip64=True) as npz:
      for key in self._files:
        if key == "ids":
          self._write_ids(npz)
        elif key == "counts":
          self._write_chunk_idx(npz)
        else:
          with _npy_member(npz, key, self._dtypes[key],
                            self._shapes[key]) as out, \
              open(os.path.join(self._parts, key), "rb") as f:
            shutil.copyfileobj(f, out, _BLOCK * 4)

  def _write_ids(self, npz) -> None:
    dtype = f"<U{self._id_width}"
    with _npy_member(npz, "ids", dtype, self._shapes["ids"]) as out, \
        open(os.path.join(self._parts, "ids")) as f:
      block = []
      for line in f:
        block.append(line.rstrip("\n"))
        if len(block) == _BLOCK:
          out.write(np.array(block, dtype).tobytes())
          block = []
      out.write(np.array(block, dtype).tobytes())

  def _write_chunk_idx(self, npz) -> None:
    """chunk_idx: the running sum of the counts, all but the last."""
    n = max(self._shapes["counts"][0] - 1, 0)
    with _npy_member(npz, "chunk_idx", "<i8", (n,)) as out, \
        open(os.path.join(self._parts, "counts"), "rb") as f:
      total, written = 0, 0
      while written < n:
        counts = np.frombuffer(f.read(_BLOCK * 8), "<i8")
        sums = np.cumsum(counts) + total
        total = int(sums[-1])
        sums = sums[:n - written]
        out.write(sums.tobytes())
        written += len(sums)

  def publish(self) -> None:
    os.replace(self.partial, self.path)
    shutil.rmtree(self._parts, ignore_errors=True)

  def abort(self) -> None:
    """Removes every temporary file."""
    for f in self._files.values():
      f.close()
    shutil.rmtree(self._parts, ignore_errors=True)
    if os.path.exists(self.partial):
      os.remove(self.partial)


def _npy_member(npz: zipfile.ZipFile, key: str, dtype, shape: tuple):
  """Opens `key`.npy in the archive, its header written; the caller
  writes the C-order data."""
  out = npz.open(f"{key}.npy", "w", force_zip64=True)  # As np.savez does.
  np.lib.format.write_array_header_1_0(out, {
      "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
      "fortran_order": False, "shape": shape})
  return out


class _SkippedList:
  """Bad entries, one JSON object a line, in a temporary file first."""

  def __init__(self, path: str):
    self.path, self.partial = path, path + ".partial"
    self._file = open(self.partial, "w")
    self.count, self.first = 0, None

  def add(self, error: DataError) -> None:
    self._file.write(json.dumps({"file": error.path, "key": error.key,
                                 "problem": error.problem},
                                default=str) + "\n")
    self.count += 1
    self.first = self.first or error

  def close(self) -> None:
    self._file.close()

  def publish(self) -> None:
    os.replace(self.partial, self.path)

  def abort(self) -> None:
    self._file.close()
    if os.path.exists(self.partial):
      os.remove(self.partial)


def skipped_path(output: str) -> str:
  """Where `--skip-bad` lists the skipped entries: beside the table."""
  return os.path.splitext(output)[0] + ".skipped.jsonl"


class NothingPredictedError(ValueError):
  """The inputs hold no structure that could be predicted."""


def predict_to_files(trained: checkpoints.Trained, entries, output: str,
                     submission: str | None = None, *, batch_size: int = 16,
                     relaxation: dict | None = None, strict: bool = False,
                     skip_bad: bool = False) -> dict:
  """Streams predictions into the table and, optionally, the submission.

  Memory stays flat in the number of entries (see the module docstring);
  the outputs appear under their final names only when complete.

  Args:
    trained: a loaded model.
    entries: iterable of `Structure`s (or `DataError`s for unreadable
      entries), such as `read_structures` or `_entries` yield.
    output: the table, `.csv` or `.parquet`.
    submission: None, or the `.npz` of OC20's submission arrays.
    batch_size, relaxation, strict: as for `predict_batches`.
    skip_bad: skip bad entries and list them in `skipped_path(output)`
      (written even when empty, so that it never describes another run).

  Returns:
    {"predicted": structures predicted, "skipped": entries skipped,
     "skipped_file": the list of skipped entries, or None}.

  Raises:
    DataError, checkpoints.UnseenElementError: a bad entry, without
      `skip_bad`; no output is written.
    NothingPredictedError: no structure was predicted; no output is
      written (but the list of skipped entries).
  """
  table, sub, skipped = _TableWriter(output), None, None
  outputs = [table]  # Every one is removed if the run stops early.
  predicted = 0
  try:
    if submission:
      sub = _SubmissionWriter(submission)
      outputs.append(sub)
    if skip_bad:
      skipped = _SkippedList(skipped_path(output))
      outputs.append(skipped)
    for rows, arrays in predict_batches(
        trained, entries, batch_size=batch_size, relaxation=relaxation,
        strict=strict, on_bad=skipped.add if skipped else None):
      table.write(rows)
      if sub:
        sub.write(arrays)
      predicted += len(rows)
    if not predicted:
      raise NothingPredictedError(_nothing_predicted(skipped, outputs))
    for w in outputs:
      w.close()
    for w in outputs:  # Renamed only once every file is complete.
      w.publish()
  except BaseException:
    for w in outputs:
      w.abort()
    raise
  return {"predicted": predicted,
          "skipped": skipped.count if skipped else 0,
          "skipped_file": skipped.path if skipped else None}


def _nothing_predicted(skipped, outputs) -> str:
  """The error message; publishes the list of skipped entries, if any."""
  if not (skipped and skipped.count):
    return "no structures to predict"
  skipped.close()
  skipped.publish()
  outputs.remove(skipped)
  return (f"no structures to predict: all {skipped.count} entries were bad "
          f"(listed in {skipped.path}); the first: {skipped.first}")


def write_table(rows: list[dict], path: str) -> None:
  """Writes rows as CSV, or Parquet for a `.parquet` path (whole or not
  at all: a temporary file is renamed at the end)."""
  table = _TableWriter(path)
  try:
    table.write(rows)
    table.close()
    table.publish()
  except BaseException:
    table.abort()
    raise


def write_submission(arrays: dict, path: str) -> None:
  """Writes the submission arrays to an .npz, whole or not at all."""
  if not path.endswith(".npz"):
    raise ValueError(f"the submission must be an .npz file, got {path}")
  partial = path[:-len(".npz")] + ".partial.npz"
  np.savez_compressed(partial, **arrays)
  os.replace(partial, path)


def _exit_on_sigterm() -> None:
  """Makes SIGTERM (what job schedulers send) raise SystemExit, so that a
  terminated run removes its temporary files as after an error."""
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _on_devices(trained: checkpoints.Trained, devices: int,
                edge_chunk: int) -> checkpoints.Trained:
  """`trained` with edges split over the first `devices` devices and in
  chunks of `edge_chunk` (`Trained.on_devices`)."""
  available = jax.devices()
  if not 1 <= devices <= len(available):
    raise app.UsageError(
        f"--devices={devices}, but {len(available)} "
        f"{available[0].platform.upper()} device(s) are present")
  if edge_chunk < 0:
    raise app.UsageError(f"--edge-chunk must be 0 or positive, got "
                         f"{edge_chunk}")
  if devices == 1 and not edge_chunk:
    return trained
  mesh = (parallel.make_mesh(data=devices, devices=available[:devices])
          if devices > 1 else None)
  return trained.on_devices(mesh, edge_chunk)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("checkpoint", "input", "output"):
    if not flags.FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  if not _OUTPUT.value.endswith((".csv", ".parquet")):
    raise app.UsageError(f"--output must end in .csv or .parquet, got "
                         f"{_OUTPUT.value}")
  if _SUBMISSION.value and not _SUBMISSION.value.endswith(".npz"):
    raise app.UsageError(f"--submission must end in .npz, got "
                         f"{_SUBMISSION.value}")
  which = _WHICH.value
  trained = checkpoints.load(_CHECKPOINT.value,
                             checkpoint=int(which) if which.isdigit()
                             else which)
  if trained.sources or _SOURCE.value:
    if not _SOURCE.value:
      raise app.UsageError(
          f"the model in {trained.workdir} was trained on several data "
          f"sources ({', '.join(trained.sources)}), whose energies have "
          "different zeros: pass --source to choose one")
    try:
      trained = trained.for_source(_SOURCE.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  trained = _on_devices(trained, _DEVICES.value, _EDGE_CHUNK.value)
  relaxation = (dict(fmax=_FMAX.value, steps=_STEPS.value) if _RELAX.value
                else None)
  output = os.path.abspath(_OUTPUT.value)
  submission = (os.path.abspath(_SUBMISSION.value) if _SUBMISSION.value
                else None)
  for path in (output, submission):
    if path:
      os.makedirs(os.path.dirname(path), exist_ok=True)
  _exit_on_sigterm()
  try:
    summary = predict_to_files(
        trained, _entries(_INPUT.value), output, submission,
        batch_size=_BATCH.value, relaxation=relaxation, strict=_STRICT.value,
        skip_bad=_SKIP_BAD.value)
  except (InputFileError, FileNotFoundError) as e:
    raise SystemExit(f"bad input: {e}; nothing was written") from e
  except (DataError, checkpoints.UnseenElementError) as e:
    raise SystemExit(f"bad input: {e} (pass --skip-bad to skip such "
                     "entries); nothing was written") from e
  except NothingPredictedError as e:
    raise SystemExit(f"{e} in {', '.join(_INPUT.value)}") from e
  skipped = ""
  if summary["skipped_file"]:
    n = summary["skipped"]
    skipped = (f"; skipped {n} bad {'entry' if n == 1 else 'entries'}, "
               f"listed in {summary['skipped_file']}")
  print(f"{summary['predicted']} structures from {trained.workdir} (step "
        f"{trained.step}) -> {output}{skipped}")


if __name__ == "__main__":
  app.run(main)
