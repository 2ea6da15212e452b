"""The restricted unpickler decodes tensors and refuses everything else."""

import io
import pickle
import pickletools
import struct

import numpy as np
import pytest

from matsci_jax.data import torch_pickle


class _Global:
  """Pickles as an arbitrary global call, like a malicious file would."""

  def __init__(self, module, name, args=()):
    self.module, self.name, self.args = module, name, args

  def __reduce__(self):
    import importlib
    return getattr(importlib.import_module(self.module), self.name), self.args


def test_numpy_arrays_and_scalars_roundtrip():
  obj = {"a": np.arange(6, dtype=np.int64).reshape(2, 3),
         "e": np.float64(-1.5), "n": 3, "s": "x", "l": [1.0, None]}
  out = torch_pickle.loads(pickle.dumps(obj, protocol=4))
  assert np.array_equal(out["a"], obj["a"]) and out["a"].dtype == np.int64
  assert out["e"] == -1.5 and out["l"] == [1.0, None]


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"),
                                         ("subprocess", "Popen"),
                                         ("posix", "getcwd")])
def test_foreign_globals_are_refused(module, name):
  import importlib
  try:
    importlib.import_module(module)
  except ImportError:
    pytest.skip(f"{module} not importable here")
  payload = pickle.dumps(_Global(module, name, ()))
  with pytest.raises(torch_pickle.UnsafePickleError, match="refusing"):
    torch_pickle.loads(payload)


def test_fixture_tensors_match_their_raw_storage(shared_data):
  from matsci_jax.data.lmdb_reader import LmdbReader
  reader = LmdbReader(str(shared_data / "oc20_s2ef_toy/edges/data.0000.lmdb"))
  assert reader.key(3)[1] == "3"
  obj = torch_pickle.loads(reader.raw(3))
  fields = torch_pickle.fields_of(obj)
  assert fields["pos"].dtype == np.float32 and fields["pos"].shape == (38, 3)
  assert fields["edge_index"].dtype == np.int64
  assert fields["edge_index"].shape[0] == 2
  assert fields["cell"].shape == (1, 3, 3)
  assert isinstance(fields["y"], np.float64) and fields["fid"] == 3
  # PyG 2 objects keep fields in _store; internal keys are not fields.
  assert not any(k.startswith("_") for k in fields)


def test_strided_tensor_rebuild():
  storage = np.arange(12, dtype=np.float32)
  t = torch_pickle._rebuild_tensor(storage, 1, (3, 2), (4, 1))
  assert np.array_equal(t, [[1, 2], [5, 6], [9, 10]])
  with pytest.raises(pickle.UnpicklingError, match="overruns"):
    torch_pickle._rebuild_tensor(storage, 4, (3, 4), (4, 1))
  # Crafted layouts must never read outside the storage.
  for offset, size, stride in [(0, (2,), (-10**11,)), (-2, (2,), (1,)),
                               (0, (2, 2), (10**12, 1)), (0, (-1,), (1,))]:
    with pytest.raises(pickle.UnpicklingError):
      torch_pickle._rebuild_tensor(storage, offset, size, stride)
  # Stride 0 would repeat 12 elements into 10**8 (a 696-byte pickle once
  # became a 6 GB structure): more elements than the storage holds.
  with pytest.raises(pickle.UnpicklingError, match="needs 100000000"):
    torch_pickle._rebuild_tensor(storage, 0, (10**8, 1), (0, 0))
  with pytest.raises(pickle.UnpicklingError, match="needs 12 elements"):
    torch_pickle._rebuild_tensor(storage, 1, (12,), (0,))
  empty = torch_pickle._rebuild_tensor(storage, 0, (0, 3), (3, 1))
  assert empty.shape == (0, 3)


def _storage_stream(data: np.ndarray, count=None) -> bytes:
  """A minimal legacy stream: headers, the storage record, keys, count and
  the float32 elements of `data`."""
  out = io.BytesIO()
  for header in (torch_pickle._LEGACY_MAGIC, 1001, {"little_endian": True}):
    pickle.dump(header, out, protocol=2)
  record = (b"\x80\x02(X\x07\x00\x00\x00storagec" b"torch\nFloatStorage\n"
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04Ntq\x00Q.")
  out.write(record)
  pickle.dump(["0"], out, protocol=2)
  out.write(struct.pack("<q", len(data) if count is None else count))
  return out.getvalue() + data.tobytes()


def test_truncated_storage_stream_is_an_error():
  data = np.arange(4, dtype=np.float32)
  good = _storage_stream(data)
  assert np.array_equal(torch_pickle._load_from_bytes(good), data)
  with pytest.raises(pickle.UnpicklingError, match="truncated"):
    torch_pickle._load_from_bytes(good[:-3])


def _peak_bytes(fn) -> int:
  """Peak bytes that `fn()` allocates (it must raise UnpicklingError)."""
  import tracemalloc
  tracemalloc.start()
  try:
    with pytest.raises(pickle.UnpicklingError) as err:
      fn()
    return tracemalloc.get_traced_memory()[1], str(err.value)
  finally:
    tracemalloc.stop()


def test_memo_index_beyond_the_data_is_refused():
  # The C unpickler zero-fills its memo table up to twice the index: this
  # 9-byte pickle would touch 256 MB (and 64 GB with index 2**32 - 1).
  bomb = b"\x80\x02N" + b"r" + struct.pack("<I", 2**24) + b"."
  peak, message = _peak_bytes(lambda: torch_pickle.loads(bomb))
  assert "memo index 16777216" in message and peak < 1 << 20
  text_bomb = b"\x80\x02N" + b"p16777216\n."
  with pytest.raises(pickle.UnpicklingError, match="memo index"):
    torch_pickle.loads(text_bomb)


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x96"])
def test_lying_lengths_are_refused_before_any_allocation(opcode):
  # BINBYTES8 and BYTEARRAY8 claiming a terabyte, which the C unpickler
  # would reserve before reading.
  data = b"\x80\x05" + opcode + struct.pack("<Q", 2**40) + b"x."
  peak, message = _peak_bytes(lambda: torch_pickle.loads(data))
  assert "truncated" in message and peak < 1 << 20


def test_opcode_across_a_frame_end_is_refused():
  # An opcode that crosses the end of a protocol-4 frame makes the C
  # unpickler drop the frame's rest and read on after it: here it sees a
  # memo-index bomb where a straight walk sees BINBYTES of 10 bytes.
  after = b"\x00\x00\x00\x00r" + struct.pack("<I", 2**24) + b".\x00\x00."
  data = b"\x80\x04\x95" + struct.pack("<Q", 3) + b"B\x0a\x00" + after
  assert [op.name for op, _, _ in pickletools.genops(data)] == [
      "PROTO", "FRAME", "BINBYTES", "STOP"]
  peak, message = _peak_bytes(lambda: torch_pickle.loads(data))
  assert "crosses the end of its frame" in message and peak < 1 << 20


def test_calling_numpy_ndarray_allocates_nothing():
  args = pickle.dumps(((10**10,),), protocol=2)[2:-1]
  data = b"\x80\x02cnumpy\nndarray\n" + args + b"R."
  peak, _ = _peak_bytes(lambda: torch_pickle.loads(data))
  assert peak < 1 << 20
  # Arrays themselves still decode.
  a = np.arange(5.0)
  assert np.array_equal(torch_pickle.loads(pickle.dumps(a, protocol=4)), a)


def test_odd_but_valid_tensor_layouts_decode():
  storage = np.arange(6, dtype=np.int64)
  # torch leaves any stride on a length-1 dimension.
  t = torch_pickle._rebuild_tensor(storage, 0, (1, 6), (2**70, 1))
  assert np.array_equal(t, storage[None])
  with pytest.raises(pickle.UnpicklingError, match="not a decoded storage"):
    torch_pickle._rebuild_tensor(np.array([None] * 4), 0, (4,), (1,))


def _tensor_pickle(stream: bytes, offset, size, stride) -> bytes:
  """A pickle of `_rebuild_tensor_v2(_load_from_bytes(stream), ...)`."""
  def ops(obj):
    return pickletools.optimize(pickle.dumps(obj, protocol=2))[2:-1]
  return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
          b"ctorch.storage\n_load_from_bytes\n"
          + b"B" + struct.pack("<I", len(stream)) + stream + b"\x85R"
          + ops(offset) + ops(size) + ops(stride) + b"\x89NtR.")


def test_decoding_errors_are_unpickling_errors():
  stream = _storage_stream(np.arange(4, dtype=np.float32))
  t = torch_pickle.loads(_tensor_pickle(stream, 1, (3,), (1,)))
  assert np.array_equal(t, [1, 2, 3])
  # A zero-size tensor with a dimension numpy cannot hold (ValueError).
  with pytest.raises(pickle.UnpicklingError, match="ValueError"):
    torch_pickle.loads(_tensor_pickle(stream, 0, (0, 2**70), (1, 1)))
  with pytest.raises(pickle.UnpicklingError, match="element count"):
    torch_pickle._load_from_bytes(stream[:-19])
  huge_count = _storage_stream(np.arange(4, dtype=np.float32), count=2**62)
  with pytest.raises(pickle.UnpicklingError, match="counts 4611686018"):
    torch_pickle._load_from_bytes(huge_count)


def test_crafted_state_cannot_shadow_the_fields_method():
  obj = torch_pickle.PygData()
  obj.__setstate__({"pos": np.zeros((1, 3)), "fields": dict})
  assert list(torch_pickle.fields_of(obj)) == ["pos", "fields"]
  store = torch_pickle.PygData()
  store.__setstate__({"_mapping": {1: np.zeros(3)}})
  obj = torch_pickle.PygData()
  obj.__setstate__({"_store": store})
  with pytest.raises(pickle.UnpicklingError, match="string keys"):
    torch_pickle.fields_of(obj)
