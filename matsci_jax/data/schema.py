"""On-disk schema of converted datasets: one example per structure.

Arrays are stored as raw bytes (tfds `Encoding.BYTES`), which serialises and
parses about 30x faster than protobuf number lists. Missing targets (test
splits) are stored as NaN and flagged in the split metadata.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from matsci_jax.data.neighbors import Edges
from matsci_jax.data.structure import DataError, Structure

TASKS = ("s2ef", "is2re")

# Sign convention of `cell_shifts`, recorded in every dataset's metadata.
EDGE_CONVENTION = (
    "messages flow senders -> receivers; "
    "vec = positions[senders] - positions[receivers] + cell_shifts @ cell "
    "(neighbour image minus centre; OC20 edge_index[0] = senders, "
    "edge_index[1] = receivers, cell_offsets = cell_shifts)")

_F = tfds.features
_BYTES = _F.Encoding.BYTES


def _tensor(shape, dtype):
  return _F.Tensor(shape=shape, dtype=dtype, encoding=_BYTES)


REPRESENTATIONS = ("graph", "point_cloud", "both")


def features(task: str, point_cloud: bool = False) -> _F.FeaturesDict:
  """The tfds features of a converted dataset for `task`.

  With `point_cloud`, the point-cloud slots are stored too (`pc_*`, see
  `matsci_jax.data.point_cloud`).
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  spec = {
      "atomic_numbers": _tensor((None,), np.int32),
      "positions": _tensor((None, 3), np.float32),
      "cell": _tensor((3, 3), np.float32),
      "pbc": _tensor((3,), np.bool_),
      "tags": _tensor((None,), np.int32),
      "fixed": _tensor((None,), np.bool_),
      "senders": _tensor((None,), np.int32),
      "receivers": _tensor((None,), np.int32),
      "cell_shifts": _tensor((None, 3), np.int8),
      "energy": _F.Scalar(dtype=np.float32),
      "forces": _tensor((None, 3), np.float32),
      "sid": _F.Scalar(dtype=np.int64),
      "fid": _F.Scalar(dtype=np.int64),
  }
  if task == "is2re":
    spec["energy_relaxed"] = _F.Scalar(dtype=np.float32)
    spec["positions_relaxed"] = _tensor((None, 3), np.float32)
  if point_cloud:
    spec.update(pc_senders=_tensor((None,), np.int32),
                pc_receivers=_tensor((None,), np.int32),
                pc_shifts=_tensor((None, 3), np.int8),
                pc_mask=_tensor((None,), np.bool_))
  return _F.FeaturesDict(spec)


def slots_as_edges(ex: dict) -> dict:
  """A stored example with its point-cloud slots as its edges (GALA's
  input): `pc_senders`, `pc_receivers`, `pc_shifts` become the edges and
  `pc_mask` marks the filled slots as `slot_mask`."""
  ex = dict(ex)
  ex["senders"] = ex.pop("pc_senders")
  ex["receivers"] = ex.pop("pc_receivers")
  ex["cell_shifts"] = ex.pop("pc_shifts")
  ex["slot_mask"] = ex.pop("pc_mask")
  return ex


def target_flags(s: Structure, task: str) -> dict[str, bool]:
  """Which targets a structure carries (must agree within a split)."""
  flags = {"energy": s.energy is not None, "forces": s.forces is not None}
  if task == "is2re":
    flags["energy_relaxed"] = s.energy_relaxed is not None
    flags["positions_relaxed"] = s.positions_relaxed is not None
  return flags


def _check_shifts(s: Structure, shifts: np.ndarray):
  if shifts.size and np.abs(shifts).max() > 127:
    raise DataError(*s.source, "a cell shift exceeds 127 images: the cell is "
                    "far smaller than the cutoff")


def to_example(s: Structure, edges: Edges, task: str,
               point_cloud=None) -> dict[str, np.ndarray]:
  """Builds the stored example of one structure, its edges and point cloud."""
  n = s.num_atoms
  _check_shifts(s, edges.cell_shifts)
  nan_vec = np.full((n, 3), np.nan, np.float32)
  ex = {
      "atomic_numbers": s.atomic_numbers.astype(np.int32),
      "positions": s.positions.astype(np.float32),
      "cell": s.cell.astype(np.float32),
      "pbc": s.pbc.astype(np.bool_),
      "tags": s.tags.astype(np.int32),
      "fixed": s.fixed.astype(np.bool_),
      "senders": edges.senders.astype(np.int32),
      "receivers": edges.receivers.astype(np.int32),
      "cell_shifts": edges.cell_shifts.astype(np.int8),
      "energy": np.float32(np.nan if s.energy is None else s.energy),
      "forces": (nan_vec if s.forces is None
                 else s.forces.astype(np.float32)),
      "sid": np.int64(s.sid),
      "fid": np.int64(s.fid),
  }
  if task == "is2re":
    ex["energy_relaxed"] = np.float32(
        np.nan if s.energy_relaxed is None else s.energy_relaxed)
    ex["positions_relaxed"] = (
        nan_vec if s.positions_relaxed is None
        else s.positions_relaxed.astype(np.float32))
  if point_cloud is not None:
    _check_shifts(s, point_cloud.cell_shifts)
    ex.update(pc_senders=point_cloud.senders.astype(np.int32),
              pc_receivers=point_cloud.receivers.astype(np.int32),
              pc_shifts=point_cloud.cell_shifts.astype(np.int8),
              pc_mask=point_cloud.mask.astype(np.bool_))
  return ex
