"""The restricted unpickler decodes tensors and refuses everything else."""

import io
import pickle
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


def test_truncated_storage_stream_is_an_error():
  data = np.arange(4, dtype=np.float32)
  # A minimal stream: headers, the storage record, keys and truncated bytes.
  out = io.BytesIO()
  for header in (torch_pickle._LEGACY_MAGIC, 1001, {"little_endian": True}):
    pickle.dump(header, out, protocol=2)
  record = (b"\x80\x02(X\x07\x00\x00\x00storagec" b"torch\nFloatStorage\n"
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04Ntq\x00Q.")
  out.write(record)
  pickle.dump(["0"], out, protocol=2)
  out.write(struct.pack("<q", 4))
  good = out.getvalue() + data.tobytes()
  assert np.array_equal(torch_pickle._load_from_bytes(good), data)
  with pytest.raises(pickle.UnpicklingError, match="truncated"):
    torch_pickle._load_from_bytes(good[:-3])
