"""On-disk schema of converted datasets: one example per structure.

Arrays are stored as raw bytes (tfds `Encoding.BYTES`), which serialises and
parses about 30x faster than protobuf number lists. Missing targets (test
splits) are stored as NaN and flagged in the split metadata. `Serializer`
writes the `tf.train.Example` bytes of these features directly.

`stress` (float32 [3, 3], eV/Å^3, ASE's sign) is a feature only of datasets
with stress in some split, so that datasets without it keep their records
byte for byte; there, splits without stress store it as NaN.
"""

from __future__ import annotations

import struct

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


def features(task: str, point_cloud: bool = False,
             stress: bool = False) -> _F.FeaturesDict:
  """The tfds features of a converted dataset for `task`.

  With `point_cloud`, the point-cloud slots are stored too (`pc_*`, see
  `matsci_jax.data.point_cloud`); with `stress`, the stress tensor.
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
  if stress:
    spec["stress"] = _tensor((3, 3), np.float32)
  if point_cloud:
    spec.update(pc_senders=_tensor((None,), np.int32),
                pc_receivers=_tensor((None,), np.int32),
                pc_shifts=_tensor((None, 3), np.int8),
                pc_mask=_tensor((None,), np.bool_))
  return _F.FeaturesDict(spec)


def _varint(value: int) -> bytes:
  if 0 <= value < 0x80:
    return _SMALL_VARINTS[value]
  value &= (1 << 64) - 1  # Negative int64s take ten bytes, as in protobuf.
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


_SMALL_VARINTS = [bytes([v]) for v in range(0x80)]


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _header(number: int, size: int) -> tuple[bytes, int]:
  """The tag and length of a length-delimited field holding `size` bytes,
  and the field's total size."""
  head = _SMALL_VARINTS[number << 3 | 2] + _varint(size)
  return head, len(head) + size


class Serializer:
  """Serializes examples of `features(task, point_cloud, stress)` to the
  bytes of a `tf.train.Example`, as `FeaturesDict.serialize_example` does.

  tfds builds a protobuf message per example, several times slower than
  writing the bytes; the wire format of these few feature kinds is simple
  enough to write directly. Map entries are written in the order of
  protobuf's `SerializeToString(deterministic=True)`, so equal examples give
  equal bytes in every process (protobuf's default map order differs from
  process to process). Any order parses to the same example.
  """

  def __init__(self, task: str, point_cloud: bool = False,
               stress: bool = False):
    self._fields = []
    specs = features(task, point_cloud, stress)
    for key in sorted(specs.keys(), key=_map_order):
      feature = specs[key]
      dtype = np.dtype(feature.np_dtype)
      if isinstance(feature, _F.Scalar):
        # Feature.float_list = 2, Feature.int64_list = 3.
        kind = 2 if dtype.kind == "f" else 3
        shape = ()
      else:  # A Tensor stored as bytes: Feature.bytes_list = 1.
        kind, shape = 1, tuple(feature.shape)
      self._fields.append((key, _field(1, key.encode()), kind, dtype, shape))

  def __call__(self, example: dict) -> bytes:
    """The serialized example.

    Raises:
      ValueError: a value of the wrong dtype or shape (as tfds raises).
    """
    parts = []
    total = 0
    for key, key_field, kind, dtype, shape in self._fields:
      value = example[key]
      if kind == 1:
        value = np.asarray(value)
        if value.dtype != dtype or not _shape_matches(value.shape, shape):
          raise ValueError(f"feature {key!r} must be {dtype} of shape "
                           f"{shape}, got {value.dtype} {value.shape}")
        entry, size = _bytes_entry(key_field, value.tobytes())
        parts += entry
      else:
        if kind == 2:  # FloatList{value: [x]} (packed) in float_list.
          feature = _field(2, _field(1, struct.pack("<f", np.float32(value))))
        else:  # Int64List{value: [x]} (packed) in int64_list.
          feature = _field(3, _field(1, _varint(int(np.int64(value)))))
        entry = _field(1, key_field + _field(2, feature))
        parts.append(entry)
        size = len(entry)
      total += size
    # Example.features = 1 holds Features, whose map `feature` = 1.
    parts.insert(0, _header(1, total)[0])
    return b"".join(parts)


def _map_order(key: str) -> bytes:
  """Protobuf's deterministic order of map keys, which puts a key before
  its prefixes ("cell_shifts" before "cell")."""
  return key.encode() + b"\xff"


def _bytes_entry(key_field: bytes, raw: bytes) -> tuple[tuple, int]:
  """The parts of the map entry holding `raw` as a bytes feature, and its
  size: Feature{bytes_list: BytesList{value: [raw]}}, two nested fields."""
  head1, size = _header(1, len(raw))
  head2, size = _header(1, size)
  value_head, size = _header(2, size)
  entry_head, size = _header(1, len(key_field) + size)
  return (entry_head, key_field, value_head, head2, head1, raw), size


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, pos


_NAN_STRESS = _bytes_entry(_field(1, b"stress"),
                           np.full((3, 3), np.nan, np.float32).tobytes())


def add_missing_stress(record: bytes) -> bytes:
  """A record serialized without `stress`, with a NaN stress added: the
  bytes `Serializer(..., stress=True)` writes for the same example with
  stress NaN (a split without stress in a dataset with it)."""
  entry, entry_size = _NAN_STRESS
  # Example{features = 1: Features{feature = 1: map entries}}: the tag and
  # length of `features`, then the entries, each a tag, a length and a
  # body that starts with the key (tag, length, bytes).
  _, start = _read_varint(record, 1)
  pos, after = start, _map_order("stress")
  while pos < len(record):
    size, body = _read_varint(record, pos + 1)
    key_size, key_start = _read_varint(record, body + 1)
    if _map_order(record[key_start:key_start + key_size].decode()) > after:
      break
    pos = body + size
  total = len(record) - start + entry_size
  return b"".join((_header(1, total)[0], record[start:pos], *entry,
                   record[pos:]))


def _shape_matches(shape: tuple, spec: tuple) -> bool:
  return len(shape) == len(spec) and all(
      want is None or got == want for got, want in zip(shape, spec))


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
  """Which targets a structure carries (must agree within a split).

  `stress` is listed only when present, so that the metadata of datasets
  without stress stays as it was (`Split.has_stress` reads it).
  """
  flags = {"energy": s.energy is not None, "forces": s.forces is not None}
  if s.stress is not None:
    flags["stress"] = True
  if task == "is2re":
    flags["energy_relaxed"] = s.energy_relaxed is not None
    flags["positions_relaxed"] = s.positions_relaxed is not None
  return flags


def _check_shifts(s: Structure, shifts: np.ndarray):
  if shifts.size and np.abs(shifts).max() > 127:
    raise DataError(*s.source, "a cell shift exceeds 127 images: the cell is "
                    "far smaller than the cutoff")


def to_example(s: Structure, edges: Edges, task: str, point_cloud=None,
               stress: bool = False) -> dict[str, np.ndarray]:
  """Builds the stored example of one structure, its edges and point cloud;
  with `stress`, its stress too (NaN when it has none)."""
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
  if stress:
    ex["stress"] = (np.full((3, 3), np.nan, np.float32) if s.stress is None
                    else s.stress.astype(np.float32))
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
