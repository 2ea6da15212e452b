"""Writing and opening converted datasets (tfds ArrayRecord folders).

A converted dataset is a folder that `tfds.builder_from_directory(folder)`
opens, with no TensorFlow installed:

    dataset_info.json, features.json, metadata.json   (tfds metadata)
    <name>-<split>.array_record-00000-of-00002 ...      (examples)
    sizes.npz       atoms and edges per structure, per split (for budgets)
    skipped.jsonl   entries left out by `--skip-bad`, with reasons (if any)

`metadata.json` holds the conversion settings (task, cutoff, max_neighbors,
edge convention, sources) and the statistics of every split.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

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


class ShardedWriter:
  """Writes serialized examples of one split into ArrayRecord shards.

  Shard file names need the final shard count, which is only known at the
  end, so shards are written under temporary names and renamed by `close`.
  """

  def __init__(self, folder: str, name: str, split: str,
               examples_per_shard: int = 10_000):
    self.folder, self.name, self.split = folder, name, split
    self.examples_per_shard = examples_per_shard
    self.shard_lengths: list[int] = []
    self.num_bytes = 0
    self._writer = None
    self._paths: list[str] = []

  def write(self, serialized: bytes):
    if self._writer is None or (self.shard_lengths[-1]
                                >= self.examples_per_shard):
      self._roll()
    self._writer.write(serialized)
    self.shard_lengths[-1] += 1
    self.num_bytes += len(serialized)

  def _roll(self):
    if self._writer is not None:
      self._writer.close()
    path = os.path.join(self.folder,
                        f".{self.split}.{len(self._paths):05d}.partial")
    # group_size:1 makes every record independently seekable (random access).
    self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    self._paths.append(path)
    self.shard_lengths.append(0)

  def close(self) -> tfds.core.SplitInfo:
    if self._writer is not None:
      self._writer.close()
    total = len(self._paths)
    for i, path in enumerate(self._paths):
      final = (f"{self.name}-{self.split}.array_record-"
               f"{i:05d}-of-{total:05d}")
      os.replace(path, os.path.join(self.folder, final))
    return tfds.core.SplitInfo(name=self.split,
                               shard_lengths=list(self.shard_lengths),
                               num_bytes=self.num_bytes)


def write_metadata(folder: str, task: str, point_cloud: bool, split_infos,
                   metadata: dict, sizes: dict[str, np.ndarray],
                   description: str = ""):
  """Writes the tfds metadata, our metadata and the size arrays."""
  metadata = dict(metadata, format_version=FORMAT_VERSION, task=task,
                  edge_convention=schema.EDGE_CONVENTION)
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=schema.features(task, point_cloud),
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
    statistics: the split's statistics from the metadata.
    targets: which targets the split carries (False for test splits).
  """
  name: str
  source: Any
  sizes: np.ndarray
  statistics: dict
  targets: dict

  def __len__(self) -> int:
    return len(self.source)


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
    return Split(name=name, source=source, sizes=sizes,
                 statistics=info["statistics"], targets=info["targets"])
