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

Bad bytes never make `loads` allocate much more than their own size, and
every decoding error is a `pickle.UnpicklingError`: each pickle's opcodes are
walked before it is loaded (`_check_opcodes`), so that a length field or memo
index claiming gigabytes is refused before the C unpickler would reserve that
memory; a tensor never holds more elements than its storage, and a storage
never more bytes than the stream carries.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
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


# How `_check_opcodes` skips the argument of each opcode byte: a width >= 0
# of fixed bytes, or one of these codes (None: no such opcode).
_STOP, _LONG_BINPUT, _PUT, _LINE, _TWO_LINES, _FRAME = -1, -2, -3, -4, -5, -6
# A 1-, 4- or 8-byte count (4S: signed), then that many bytes.
_COUNT1, _COUNT4, _COUNT4S, _COUNT8 = -11, -12, -13, -14
_COUNTED = {pickletools.TAKEN_FROM_ARGUMENT1: _COUNT1,
            pickletools.TAKEN_FROM_ARGUMENT4U: _COUNT4,
            pickletools.TAKEN_FROM_ARGUMENT4: _COUNT4S,
            pickletools.TAKEN_FROM_ARGUMENT8U: _COUNT8}


def _opcode_table() -> list:
  table = [None] * 256
  special = {"STOP": _STOP, "LONG_BINPUT": _LONG_BINPUT, "PUT": _PUT,
             "GLOBAL": _TWO_LINES, "INST": _TWO_LINES, "FRAME": _FRAME}
  for op in pickletools.opcodes:
    n = 0 if op.arg is None else op.arg.n
    if op.name in special:
      entry = special[op.name]
    elif n >= 0:
      entry = n
    elif n == pickletools.UP_TO_NEWLINE:
      entry = _LINE
    else:
      entry = _COUNTED[n]
    table[ord(op.code)] = entry
  return table


_OPCODES = _opcode_table()


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global that a data file has no reason to contain."""


class _NdarrayClass:
  """What the global `numpy.ndarray` unpickles to.

  Array pickles only pass it to `_reconstruct`; the real class would let a
  pickle call `numpy.ndarray(shape)` and allocate any size.
  """


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
    if store is None:
      mapping = self.__dict__
    elif isinstance(store, PygData):
      mapping = store.__dict__.get("_mapping", {})
    else:
      raise pickle.UnpicklingError(
          f"PyG object's _store is a {type(store).__name__}, not a storage")
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) for k in mapping):
      raise pickle.UnpicklingError("PyG object's fields are not a dict with "
                                   "string keys")
    return {k: v for k, v in mapping.items()
            if v is not None and not k.startswith("_")}


def _storage_dtype(name: str):
  return _STORAGE_DTYPES[name]


_STORAGE_NUMPY_DTYPES = frozenset(np.dtype(d) for d in _STORAGE_DTYPES.values())


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False,
                    hooks=None, metadata=None):
  del requires_grad, hooks, metadata
  if (not isinstance(storage, np.ndarray) or storage.ndim != 1
      or storage.dtype not in _STORAGE_NUMPY_DTYPES):
    raise pickle.UnpicklingError("tensor storage is not a decoded storage")
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  if (offset < 0 or len(size) != len(stride) or any(s < 0 for s in size)
      or any(s < 0 for s in stride)):
    raise pickle.UnpicklingError(
        f"invalid tensor layout: offset {offset}, size {size}, stride "
        f"{stride}")
  # The stride of a length-1 dimension is never used; torch may leave any
  # value there, and numpy rejects one beyond its index range.
  stride = tuple(0 if n == 1 else st for n, st in zip(size, stride))
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


def _check_memo_index(index: int, limit: int, pos: int) -> None:
  if index > limit:
    raise pickle.UnpicklingError(
        f"memo index {index} at byte {pos} is beyond the {limit} bytes of "
        "the pickle")


def _check_opcodes(data: bytes, pos: int = 0, pickles: int = 1) -> int:
  """Walks the opcodes of the pickles at `data[pos:]` without running them.

  The C unpickler trusts length fields and memo indices: it reserves the
  bytes a length claims before reading them, and grows its memo table,
  zero-filled, to twice an index (a 9-byte pickle storing at index 2**32 - 1
  would make it touch 64 GB). This walk refuses such pickles first. It
  reads the opcodes one after the other, as the C unpickler does as long as
  no opcode crosses the end of a protocol-4 frame (there it drops the rest
  of the frame and reads on after it), so such pickles are refused too.

  Args:
    data: the bytes.
    pos: where the first pickle starts.
    pickles: how many pickles follow each other there.

  Returns:
    The position after the last pickle's STOP opcode.

  Raises:
    pickle.UnpicklingError: an unknown opcode, a length beyond the data, a
      memo index beyond what the data can fill, or no STOP opcode.
  """
  end = len(data)
  limit = end - pos  # Every memo entry takes at least one byte.
  table = _OPCODES
  frame_end = -1  # End of the current protocol-4 frame; -1 outside one.
  while pos < end:
    if pos >= frame_end >= 0:
      if pos > frame_end:
        raise pickle.UnpicklingError(
            f"an opcode crosses the end of its frame at byte {frame_end}")
      frame_end = -1
    skip = table[data[pos]]
    pos += 1
    if skip is None:
      raise pickle.UnpicklingError(
          f"unknown pickle opcode {data[pos - 1]:#04x} at byte {pos - 1}")
    # Ordered by frequency; a lying count moves `pos` past `end`.
    if skip >= 0:  # A fixed-size argument or none.
      pos += skip
    elif skip == _COUNT1:
      pos += 1 + data[pos] if pos < end else 1
    elif skip == _COUNT4:
      pos += 4 + int.from_bytes(data[pos:pos + 4], "little")
    elif skip == _STOP:
      if frame_end > pos:  # The unpickler would read the rest with it.
        raise pickle.UnpicklingError(
            f"the frame around the STOP opcode at byte {pos - 1} runs on")
      pickles -= 1
      if not pickles:
        return pos
    elif skip == _FRAME:
      if frame_end >= 0:
        raise pickle.UnpicklingError(
            f"a frame starts at byte {pos - 1}, inside the previous one")
      frame_end = pos + 8 + int.from_bytes(data[pos:pos + 8], "little")
      if frame_end > end:
        break
      pos += 8
    elif skip == _LONG_BINPUT:
      _check_memo_index(int.from_bytes(data[pos:pos + 4], "little"), limit,
                        pos)
      pos += 4
    elif skip == _COUNT8:
      pos += 8 + int.from_bytes(data[pos:pos + 8], "little")
    elif skip == _COUNT4S:
      count = int.from_bytes(data[pos:pos + 4], "little", signed=True)
      if count < 0:
        raise pickle.UnpicklingError(f"negative length at byte {pos}")
      pos += 4 + count
    else:
      for _ in range(2 if skip == _TWO_LINES else 1):
        newline = data.find(b"\n", pos)
        if newline < 0:
          pos = end + 1
          break
        if skip == _PUT:
          try:
            index = int(data[pos:newline])
          except ValueError:
            raise pickle.UnpicklingError(
                f"bad memo index at byte {pos}") from None
          _check_memo_index(index, limit, pos)
        pos = newline + 1
  raise pickle.UnpicklingError("pickle data was truncated")


def _load_from_bytes(data: bytes) -> np.ndarray:
  """Decodes `torch.storage._load_from_bytes` payloads into a flat array."""
  if not isinstance(data, bytes):
    raise pickle.UnpicklingError(
        f"storage payload is {type(data).__name__}, not bytes")
  if data[:2] == b"PK":
    raise pickle.UnpicklingError(
        "storage uses torch's zip serialization; only the legacy stream that "
        "torch uses when pickling storages is supported")
  # Five pickles (three headers, the storage record, its keys), then bytes.
  _check_opcodes(data, 0, pickles=5)
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
  if not isinstance(keys, list) or keys != [ref.key]:
    raise pickle.UnpicklingError(f"storage keys {keys!r} != [{ref.key!r}]")
  count = f.read(8)
  if len(count) != 8:
    raise pickle.UnpicklingError("storage stream is truncated before its "
                                 "element count")
  (numel,) = struct.unpack("<q", count)
  nbytes = numel * ref.dtype.itemsize
  left = len(data) - f.tell()
  if not 0 <= nbytes <= left:
    raise pickle.UnpicklingError(
        f"storage stream is truncated or damaged: it counts {numel} "
        f"elements ({nbytes} bytes) but holds {left} bytes")
  raw = f.read(nbytes)
  return np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<")).astype(
      ref.dtype, copy=True)


def _numpy_scalar(dtype, raw=None):
  if raw is None:  # Object scalars are never data in these files.
    raise UnsafePickleError("object-dtype numpy scalars are not allowed")
  if isinstance(raw, str):  # Python-2 era pickles store bytes as latin-1.
    raw = raw.encode("latin-1")
  return np.frombuffer(raw, dtype=dtype)[0]


def _numpy_reconstruct(subtype, shape, dtype):
  if subtype is not _NdarrayClass:
    raise UnsafePickleError(f"numpy subtype {subtype!r} is not allowed")
  # numpy pickles pass shape (0,) and set the real shape and data in
  # __setstate__, which checks them against the bytes it is given; another
  # shape here would allocate memory that no bytes back.
  del shape
  return np.ndarray.__new__(np.ndarray, (0,), dtype)


def _torch_size(*args):
  return tuple(args[0]) if len(args) == 1 else tuple(args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): dict,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): _NdarrayClass,
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
    pickle.UnpicklingError: the bytes are not a valid pickle of that kind
      (whatever the error deep inside, so that callers catch one class).
  """
  try:
    _check_opcodes(data)
    return _DataUnpickler(io.BytesIO(data)).load()
  except pickle.UnpicklingError:
    raise
  except (EOFError, ValueError, TypeError, AttributeError, IndexError,
          KeyError, OverflowError, struct.error) as e:
    raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from e


def fields_of(obj: Any) -> dict[str, Any]:
  """Returns the field dict of a decoded LMDB value (PyG object or dict)."""
  if isinstance(obj, PygData):
    # Not obj.fields(): a crafted state can shadow the method.
    return PygData.fields(obj)
  if isinstance(obj, dict):
    return {k: v for k, v in obj.items() if v is not None}
  raise pickle.UnpicklingError(
      f"expected a torch_geometric Data object or a dict, got "
      f"{type(obj).__name__}")
