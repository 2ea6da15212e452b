"""Writing and opening converted datasets (tfds ArrayRecord folders).

A converted dataset is a folder that `tfds.builder_from_directory(folder)`
opens, with no TensorFlow installed:

    dataset_info.json, features.json, metadata.json   (tfds metadata)
    <name>-<split>.array_record-00000-of-00002 ...      (examples)
    sizes.npz       atoms and edges per structure, per split (for budgets)
    skipped.jsonl   entries left out by `--skip-bad`, with reasons (if any)

`metadata.json` holds the conversion settings (task, cutoff, max_neighbors,
edge convention, sources) and, per split, its statistics and the targets it
carries (`targets`: energy, forces, stress, ...). A dataset with stress in
some split stores a `stress` feature in every record (`Dataset.has_stress`);
`Split.has_stress` (`targets["stress"]`, listed only when True) tells
whether a split's stresses are real (else NaN).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from matsci_jax.data import schema
from matsci_jax.data.graph_spec import GraphSpec

FORMAT_VERSION = 1
SIZES_FILE = "sizes.npz"
SKIPPED_FILE = "skipped.jsonl"


class DatasetError(ValueError):
  """A dataset folder that is missing, incomplete or not ours."""


class OutputError(OSError, ValueError):
  """An output folder that cannot be written: no permission, a full disk...

  An OSError, for code that handles I/O failures, and a ValueError, like
  the converter's other errors, which its command line reports in one line.
  """


_FULL = tuple(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None))
              if code is not None)
# Bytes ArrayRecord's file writer buffers before writing to disk: a full
# disk shows only when a buffer this size is flushed (or the shard closed).
WRITER_BUFFER = 16 << 20
# Checking the free space costs a system call (a round trip on network
# file systems): done at a shard's first example and once per this many
# bytes of examples.
_CHECK_EVERY = 4 << 20
# Room kept for a shard's index and the metadata files.
_RESERVE = 1 << 20


def _size(n: float) -> str:
  """A byte count in words: "293.0 KiB"."""
  units = ("bytes", "KiB", "MiB", "GiB", "TiB")
  power = 0
  while n >= 1024 and power < len(units) - 1:
    n, power = n / 1024, power + 1
  return f"{n:.0f} bytes" if not power else f"{n:.1f} {units[power]}"


def _free_space(folder: str) -> str:
  """The free space of `folder`'s file system, in words."""
  path = folder
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    usage = shutil.disk_usage(path)
  except OSError:
    return "free space unknown"
  return f"{_size(usage.free)} free of {_size(usage.total)}"


def is_disk_full(e: BaseException) -> bool:
  """Whether an error says that the disk (or a quota) is full.

  ArrayRecord reports write failures as RuntimeErrors whose message holds
  the system's error text.
  """
  if isinstance(e, OSError) and e.errno in _FULL:
    return True
  return any(os.strerror(code) in str(e) for code in _FULL)


def output_error(folder: str, e: BaseException,
                 doing: str = "cannot write") -> OutputError:
  """A one-line `OutputError` about `folder`, from the error `e`; a full
  disk is named as such, with the space left."""
  text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
  if is_disk_full(e):
    error = OutputError(f"{folder}: the disk is full ({_free_space(folder)}"
                        f"): {text}; free some space or write elsewhere")
    error.errno = errno.ENOSPC
  else:
    error = OutputError(f"{folder}: {doing}: {text}")
    error.errno = getattr(e, "errno", None)
  return error


class ShardedWriter:
  """Writes serialized examples of one split into ArrayRecord shards.

  Shard file names need the final shard count, which is only known at the
  end, so shards are written under temporary names and renamed by `close`.

  ArrayRecord buffers `WRITER_BUFFER` bytes before writing to disk, so a
  full disk would show only when that buffer is flushed; the free space is
  therefore checked as shards grow, against an upper estimate of what the
  buffer holds. Every failure to write (also one that this check did not
  foresee) is an `OutputError` naming the folder.
  """

  def __init__(self, folder: str, name: str, split: str,
               examples_per_shard: int = 10_000, label: str = ""):
    """`label` is the folder named in errors (default: `folder`), such as
    the output that a temporary folder becomes."""
    self.folder, self.name, self.split = folder, name, split
    self.label = label or folder
    self.examples_per_shard = examples_per_shard
    self.shard_lengths: list[int] = []
    self.num_bytes = 0
    self._writer = None
    self._paths: list[str] = []
    self._unchecked = 0  # Bytes written since the free space was checked.
    self._on_disk = 0  # Size of the current shard's file when checked.
    self._buffered = 0  # Bytes written since that file last grew.

  def write(self, serialized: bytes):
    if self._writer is None or (self.shard_lengths[-1]
                                >= self.examples_per_shard):
      self._roll()
    if not self._unchecked:
      self._check_space(len(serialized))
    try:
      self._writer.write(serialized)
    except (OSError, RuntimeError) as e:
      raise output_error(self.label, e) from e
    self.shard_lengths[-1] += 1
    self.num_bytes += len(serialized)
    self._buffered += len(serialized)
    self._unchecked += len(serialized)
    if self._unchecked >= _CHECK_EVERY:
      self._unchecked = 0

  def _check_space(self, next_bytes: int):
    """Raises an `OutputError` when the disk cannot take what the writer
    buffers (at most `WRITER_BUFFER` bytes) and the next example."""
    try:
      size = os.path.getsize(self._paths[-1])
      usage = shutil.disk_usage(self.folder)
    except OSError as e:
      raise output_error(self.label, e) from e
    if size > self._on_disk:  # The writer flushed its buffer.
      self._on_disk, self._buffered = size, 0
    need = min(self._buffered, WRITER_BUFFER) + next_bytes + _RESERVE
    # File systems that report no size (some FUSE mounts) are not checked.
    if usage.total and usage.free < need:
      raise output_error(self.label, OSError(
          errno.ENOSPC, f"{_size(need)} needed for the examples written "
          "so far"))

  def _roll(self):
    self._close_writer()
    path = os.path.join(self.folder,
                        f".{self.split}.{len(self._paths):05d}.partial")
    try:
      # group_size:1 makes every record independently seekable (random
      # access).
      self._writer = array_record_module.ArrayRecordWriter(path,
                                                           "group_size:1")
    except (OSError, RuntimeError) as e:
      raise output_error(self.label, e, "cannot create a shard") from e
    self._paths.append(path)
    self.shard_lengths.append(0)
    self._unchecked = self._on_disk = self._buffered = 0

  def _close_writer(self):
    writer, self._writer = self._writer, None
    if writer is not None:
      try:
        writer.close()
      except (OSError, RuntimeError) as e:
        raise output_error(self.label, e) from e

  def rewrite(self, transform: Callable[[bytes], bytes],
              chunk: int = 1000):
    """Replaces every record written so far by `transform(record)`.

    Shards are rewritten one at a time, `chunk` records at a time, so that
    this needs the disk space of one more shard and the memory of `chunk`
    records.
    """
    self._close_writer()
    total = 0
    for path in self._paths:
      new = path + ".rewrite"
      try:
        reader = array_record_module.ArrayRecordReader(path)
        writer = array_record_module.ArrayRecordWriter(new, "group_size:1")
        try:
          n = reader.num_records()
          for start in range(0, n, chunk):
            for record in reader.read(list(range(start,
                                                 min(start + chunk, n)))):
              record = transform(record)
              writer.write(record)
              total += len(record)
        finally:
          writer.close()
          reader.close()
        os.replace(new, path)
      except (OSError, RuntimeError) as e:
        raise output_error(self.label, e) from e
    self.num_bytes = total

  def abort(self):
    """Closes the current shard after a failure, ignoring further errors."""
    try:
      self._close_writer()
    except OutputError:
      pass

  def close(self) -> tfds.core.SplitInfo:
    self._close_writer()
    total = len(self._paths)
    for i, path in enumerate(self._paths):
      final = (f"{self.name}-{self.split}.array_record-"
               f"{i:05d}-of-{total:05d}")
      try:
        os.replace(path, os.path.join(self.folder, final))
      except OSError as e:
        raise output_error(self.label, e) from e
    return tfds.core.SplitInfo(name=self.split,
                               shard_lengths=list(self.shard_lengths),
                               num_bytes=self.num_bytes)


def write_metadata(folder: str, task: str, point_cloud: bool, split_infos,
                   metadata: dict, sizes: dict[str, np.ndarray],
                   description: str = "", stress: bool = False):
  """Writes the tfds metadata, our metadata and the size arrays; `stress`:
  the records hold a stress feature."""
  metadata = dict(metadata, format_version=FORMAT_VERSION, task=task,
                  edge_convention=schema.EDGE_CONVENTION)
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=schema.features(task, point_cloud, stress),
      split_infos=list(split_infos), check_data=False,
      description=description or f"matsci_jax {task} dataset",
      metadata=tfds.core.MetadataDict(metadata))
  np.savez(os.path.join(folder, SIZES_FILE), **sizes)


class PointCloudSource:
  """A data source whose examples carry point-cloud slots as their edges."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return schema.slots_as_edges(self.source[i])


@dataclasses.dataclass
class Split:
  """One split of an opened dataset.

  Attributes:
    name: split name.
    source: random-access data source; `source[i]` is a dict of numpy arrays.
    sizes: int32 [num_structures, 2]: atoms and edges of each structure in
      the representation the split was opened for.
    statistics: the split's statistics from the metadata (`stress_rms`
      None without stress, also in datasets converted before stress).
    targets: which targets the split carries (False for test splits):
      "energy", "forces", for IS2RE "energy_relaxed" and
      "positions_relaxed", and "stress" (True) when it has stress.
  """
  name: str
  source: Any
  sizes: np.ndarray
  statistics: dict
  targets: dict

  def __len__(self) -> int:
    return len(self.source)

  @property
  def has_stress(self) -> bool:
    """Whether the split's examples hold real stresses (not NaN)."""
    return bool(self.targets.get("stress", False))


class Dataset:
  """A converted dataset folder.

  Args:
    folder: output folder of `python -m data_prep.convert`.

  Raises:
    DatasetError: the folder is missing, incomplete or of another format.
  """

  def __init__(self, folder: str):
    self.folder = os.fspath(folder)
    needed = ("dataset_info.json", "features.json", "metadata.json",
              SIZES_FILE)
    if not os.path.isdir(self.folder):
      raise DatasetError(f"{self.folder}: no such dataset folder; create one "
                         "with `python -m data_prep.convert`")
    missing = [f for f in needed
               if not os.path.isfile(os.path.join(self.folder, f))]
    if missing:
      raise DatasetError(f"{self.folder}: not a complete converted dataset, "
                         f"missing {', '.join(missing)}; convert it again "
                         "with `python -m data_prep.convert`")
    try:
      with open(os.path.join(self.folder, "metadata.json")) as f:
        self.metadata = json.load(f)
      self.builder = tfds.builder_from_directory(self.folder)
      with np.load(os.path.join(self.folder, SIZES_FILE)) as z:
        self._sizes = {k: z[k] for k in z.files}
    except Exception as e:
      raise DatasetError(f"{self.folder}: cannot read dataset metadata: "
                         f"{e}") from e
    if self.metadata.get("format_version") != FORMAT_VERSION:
      raise DatasetError(
          f"{self.folder}: dataset format version "
          f"{self.metadata.get('format_version')} is not {FORMAT_VERSION}; "
          "convert it again")
    self.task = self.metadata["task"]
    try:
      self.graph_spec = GraphSpec.from_dict(self.metadata)
    except (KeyError, TypeError, ValueError) as e:
      raise DatasetError(f"{self.folder}: metadata.json has no valid graph "
                         f"settings ({type(e).__name__}: {e}); convert it "
                         "again") from e

  @property
  def cutoff(self) -> float:
    return self.graph_spec.cutoff

  @property
  def max_neighbors(self) -> int | None:
    return self.graph_spec.max_neighbors

  @property
  def splits(self) -> list[str]:
    return list(self.metadata["splits"])

  @property
  def representations(self) -> tuple[str, ...]:
    """Representations stored: ("graph",), ("point_cloud",) or both."""
    return self.graph_spec.representations

  @property
  def has_stress(self) -> bool:
    """Whether examples hold `stress` (float32 [3, 3], eV/Å^3, ASE's
    sign): some split has stress; `Split.has_stress` tells which."""
    return "stress" in self.builder.info.features.keys()

  def split(self, name: str, representation: str = "graph") -> Split:
    """Opens one split for random access (e.g. `name="train"`).

    `representation` picks the edges batches carry: graph edges, or the
    point-cloud slots (K per centre) as edges; the sizes follow it.

    Multi-process training reads all of a split's structures through the
    same source and divides whole batches between processes (see
    `batching.BatchPlan`), so every process sees its own share.
    """
    if name not in self.metadata["splits"]:
      raise DatasetError(f"{self.folder}: no split {name!r}; the dataset has "
                         f"{', '.join(self.splits)}")
    info = self.metadata["splits"][name]
    try:
      source = self.builder.as_data_source(name)
    except Exception as e:
      raise DatasetError(f"{self.folder}: cannot open split {name!r}: "
                         f"{e}") from e
    if representation not in self.representations:
      raise DatasetError(
          f"{self.folder}: has no {representation} representation (it has "
          f"{', '.join(self.representations)}); convert with "
          "--representation both")
    all_sizes = self._sizes[name]
    column = (2 if representation == "point_cloud" and all_sizes.shape[1] > 2
              else 1)
    sizes = np.ascontiguousarray(all_sizes[:, [0, column]])
    if len(source) != len(sizes):
      raise DatasetError(
          f"{self.folder}: split {name!r} has {len(source)} examples but "
          f"{SIZES_FILE} lists {len(sizes)}; the folder is corrupt")
    if representation == "point_cloud":
      source = PointCloudSource(source)
    # Datasets converted before stress was read have no stress_rms.
    return Split(name=name, source=source, sizes=sizes,
                 statistics={"stress_rms": None, **info["statistics"]},
                 targets=info["targets"])
