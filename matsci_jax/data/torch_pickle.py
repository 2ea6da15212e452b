"""Reads pickled torch tensors and PyG `Data` objects with numpy only.

OC20 and matsciml LMDB values are `pickle.dumps` of torch_geometric `Data`
objects or of dicts of torch tensors. Plain `pickle.loads` would need torch and
PyG installed, and would run whatever code a file names. `loads` here uses a
restricted unpickler: the handful of globals such files contain map to small
numpy decoders, and any other global is refused.

Torch pickles a storage as `torch.storage._load_from_bytes(b)`, where `b` is a
legacy (non-zip) `torch.save` stream: three header pickles (magic number,
protocol version, system info), the storage's own pickle with a persistent id
`('storage', <StorageClass>, key, location, numel, view_metadata)`, a pickled
list of keys, then per key an int64 element count and the raw little-endian
bytes. A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks[, metadata])`.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Newer torch pickles name a dtype instead of a typed storage class.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global that a data file has no reason to contain."""


class PygData:
  """Stand-in for torch_geometric `Data` objects and their storages.

  The pickled state is kept as `__dict__`; `fields()` returns the data fields
  of both the PyG 1.x layout (fields directly in `__dict__`, None-valued slots
  included) and the PyG 2.x layout (fields in `_store._mapping`).
  """

  def __setstate__(self, state):
    if isinstance(state, tuple):  # (dict, slots) form of some subclasses.
      state = {k: v for part in state if isinstance(part, dict)
               for k, v in part.items()}
    self.__dict__.update(state)

  def fields(self) -> dict[str, Any]:
    store = self.__dict__.get("_store")
    if store is not None:
      mapping = store.__dict__.get("_mapping", {})
    else:
      mapping = self.__dict__
    return {k: v for k, v in mapping.items()
            if v is not None and not k.startswith("_")}


def _storage_dtype(name: str):
  return _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False,
                    hooks=None, metadata=None):
  del requires_grad, hooks, metadata
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise pickle.UnpicklingError("tensor storage is not a decoded storage")
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  if (offset < 0 or len(size) != len(stride) or any(s < 0 for s in size)
      or any(s < 0 for s in stride)):
    raise pickle.UnpicklingError(
        f"invalid tensor layout: offset {offset}, size {size}, stride "
        f"{stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  # Bounds check before as_strided, which would read outside the buffer.
  last = offset + sum((s - 1) * st for s, st in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(
        f"tensor of size {size}, stride {stride} and offset {offset} "
        f"overruns its storage of {storage.size} elements")
  # Saved tensors hold their own elements: a layout that needs more than
  # the storage has (stride 0 repeating a few bytes 1e8 times) is crafted.
  if math.prod(size) > storage.size - offset:
    raise pickle.UnpicklingError(
        f"tensor of size {size} needs {math.prod(size)} elements but its "
        f"storage holds {max(storage.size - offset, 0)} after offset "
        f"{offset}")
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size,
      strides=[s * itemsize for s in stride]).copy()


class _StorageRef:

  def __init__(self, dtype, key, numel):
    self.dtype, self.key, self.numel = np.dtype(dtype), key, numel


class _LegacyStorageUnpickler(pickle.Unpickler):
  """Unpickles the storage record inside a legacy `torch.save` stream."""

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return name
    if module == "torch" and name in _TORCH_DTYPES:
      return name
    if module == "collections" and name == "OrderedDict":
      return dict
    raise UnsafePickleError(
        f"storage stream names global {module}.{name}, which a tensor "
        "storage never contains")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    if storage_type in _STORAGE_DTYPES:
      dtype = _STORAGE_DTYPES[storage_type]
    elif storage_type in _TORCH_DTYPES:
      dtype = _TORCH_DTYPES[storage_type]
    else:
      raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
    return _StorageRef(dtype, key, numel)


def _load_from_bytes(data: bytes) -> np.ndarray:
  """Decodes `torch.storage._load_from_bytes` payloads into a flat array."""
  if data[:2] == b"PK":
    raise pickle.UnpicklingError(
        "storage uses torch's zip serialization; only the legacy stream that "
        "torch uses when pickling storages is supported")
  f = io.BytesIO(data)
  safe = _LegacyStorageUnpickler
  magic = safe(f).load()
  if magic != _LEGACY_MAGIC:
    raise pickle.UnpicklingError("storage stream has a wrong magic number")
  safe(f).load()  # Protocol version.
  sys_info = safe(f).load()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise pickle.UnpicklingError("big-endian torch storages are not supported")
  ref = safe(f).load()
  if not isinstance(ref, _StorageRef):
    raise pickle.UnpicklingError("storage stream does not hold one storage")
  keys = safe(f).load()
  if list(keys) != [ref.key]:
    raise pickle.UnpicklingError(f"storage keys {keys!r} != [{ref.key!r}]")
  (numel,) = struct.unpack("<q", f.read(8))
  nbytes = numel * ref.dtype.itemsize
  raw = f.read(nbytes)
  if len(raw) != nbytes:
    raise pickle.UnpicklingError(
        f"storage stream is truncated: {len(raw)} of {nbytes} bytes")
  return np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<")).astype(
      ref.dtype, copy=True)


def _numpy_scalar(dtype, raw=None):
  if raw is None:  # Object scalars are never data in these files.
    raise UnsafePickleError("object-dtype numpy scalars are not allowed")
  if isinstance(raw, str):  # Python-2 era pickles store bytes as latin-1.
    raw = raw.encode("latin-1")
  return np.frombuffer(raw, dtype=dtype)[0]


def _numpy_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise UnsafePickleError(f"numpy subtype {subtype!r} is not allowed")
  return np.ndarray.__new__(np.ndarray, shape, dtype)


def _torch_size(*args):
  return tuple(args[0]) if len(args) == 1 else tuple(args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): dict,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


class _DataUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if module.startswith("torch_geometric."):
      return PygData
    if module == "torch" and name in _STORAGE_DTYPES:
      return _storage_dtype(name)
    fn = _ALLOWED.get((module, name))
    if fn is None:
      raise UnsafePickleError(
          f"refusing to load global {module}.{name}: only torch tensors, "
          "numpy arrays and torch_geometric Data objects are read")
    return fn

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(
        f"unexpected persistent id {pid!r} outside a storage stream")


def loads(data: bytes) -> Any:
  """Unpickles an LMDB value without torch, running no foreign code.

  Args:
    data: bytes of `pickle.dumps(obj)` where obj is a torch_geometric `Data`,
      a dict of torch tensors / numpy arrays / scalars, or nested containers.

  Returns:
    The object with every torch tensor replaced by a numpy array, numpy
    scalars kept, and PyG objects as `PygData` (see `PygData.fields`).

  Raises:
    UnsafePickleError: the pickle names a global outside the allowed set.
    pickle.UnpicklingError: the bytes are not a valid pickle of that kind.
  """
  return _DataUnpickler(io.BytesIO(data)).load()


def fields_of(obj: Any) -> dict[str, Any]:
  """Returns the field dict of a decoded LMDB value (PyG object or dict)."""
  if isinstance(obj, PygData):
    return obj.fields()
  if isinstance(obj, dict):
    return {k: v for k, v in obj.items() if v is not None}
  raise pickle.UnpicklingError(
      f"expected a torch_geometric Data object or a dict, got "
      f"{type(obj).__name__}")
