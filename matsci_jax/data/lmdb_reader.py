"""Reads OC20 and matsciml LMDB datasets exactly as they are published.

Layouts handled (see `shared/data/README.md` of the test fixtures):
* S2EF: a folder of single-file shards `data.0000.lmdb, data.0001.lmdb, ...`
  with a pickled `b"length"` key; IS2RE: one `data.lmdb` without it;
  matsciml: single files or `data.mdb` folders, keys possibly non-contiguous.
* Values: PyG 1.x and 2.x pickles of `Data` objects, or plain dicts, decoded
  without torch by `torch_pickle.loads`.
* Field names of every writer generation (`y`/`energy`, `force`/`forces`,
  `y_init`/`y_relaxed`/`pos_relaxed`, float or uint8 atomic numbers, ...).
* Stress: `stress` in eV/Å^3 with ASE's sign (`atoms.get_stress(voigt=
  False)`, as fairchem's `AtomsToGraphs(r_stress=True)` stores it, [1, 3, 3],
  and matsciml dicts, [3, 3]; 9 values or 6 Voigt components xx yy zz yz xz
  xy), or else `virial`/`virials` in eV, W = -stress * V as in MACE and
  nequip data, read as stress = -W / V with V the cell's volume (see
  `structure.stress_target`).

Damaged or crafted entries raise `DataError` naming the file and entry, never
another exception: values are decoded by the restricted unpickler, fields
larger than a structure of `structure.MAX_ATOMS` atoms and
`structure.MAX_EDGES` edges can hold are refused before they are converted,
and a file shorter than its LMDB header says is refused on open.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Iterator

import lmdb
import numpy as np

from matsci_jax.data import torch_pickle
from matsci_jax.data.structure import (DataError, MAX_ATOMS, MAX_EDGES,
                                       Structure, TAG_UNKNOWN, stress_target)

_ENERGY_KEYS = ("y", "energy", "potential-energy", "potential_energy",
                "total_energy", "y_init")
_FORCE_KEYS = ("force", "forces")
_RELAXED_ENERGY_KEYS = ("y_relaxed", "energy_relaxed", "relaxed_energy")
_RELAXED_POS_KEYS = ("pos_relaxed", "positions_relaxed")
_STRESS_KEYS = ("stress",)
_VIRIAL_KEYS = ("virial", "virials")
# Values per atom or per edge of the fields that scale with them; any other
# field is a handful of numbers, held to the per-atom bound of 3.
_PER_ATOM = {"atomic_numbers": 1, "tags": 1, "fixed": 1}
_PER_EDGE = {"edge_index": 2, "cell_offsets": 3}
# Nested Python lists are counted by walking them, and shared sub-lists let
# a few bytes of pickle stand for billions of values; real files hold arrays.
_MAX_LIST_VALUES = 10**6


def _first(fields: dict, keys) -> Any:
  for k in keys:
    if k in fields:
      return fields[k]
  return None


def _list_values(value, limit: int) -> int:
  """Items in nested lists at all levels, counted up to just past `limit`."""
  count, stack = 0, [value]
  while stack:
    item = stack.pop()
    if isinstance(item, (list, tuple)):
      count += len(item)
      if count > limit:
        break
      stack.extend(item)
  return count


def _array(value, name: str, dtype, path, key) -> np.ndarray:
  """`value` as an array of `dtype` (None: its own), refusing more values
  than a field `name` of the largest allowed structure holds."""
  if name in _PER_EDGE:
    limit = _PER_EDGE[name] * MAX_EDGES
    bound = f"{MAX_EDGES:,} edges (structure.MAX_EDGES)"
  else:
    limit = _PER_ATOM.get(name, 3) * MAX_ATOMS
    bound = f"{MAX_ATOMS:,} atoms (structure.MAX_ATOMS)"
  if isinstance(value, (list, tuple)):
    size = _list_values(value, _MAX_LIST_VALUES)
    if size > _MAX_LIST_VALUES:
      raise DataError(path, key, f"field {name!r} is a nested list of more "
                      f"than {_MAX_LIST_VALUES:,} values; large fields must "
                      "be arrays")
  else:
    size = np.size(value) if isinstance(value, np.ndarray) else 1
  if size > limit:
    raise DataError(path, key, f"field {name!r} has {size:,} values, more "
                    f"than a structure of {bound} holds; the entry is "
                    "damaged")
  try:
    return np.asarray(value, dtype=dtype)
  except (TypeError, ValueError, OverflowError) as e:
    raise DataError(path, key,
                    f"field {name!r} is not numeric: {e}") from e


def _as_int_id(value, path, key, name) -> int:
  if value is None:
    return -1
  if isinstance(value, (str, bytes)):
    try:
      text = value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError as e:
      raise DataError(path, key, f"{name} is not text: {e}") from e
    match = re.search(r"(-?\d+)$", text)
    if match is None:
      raise DataError(path, key, f"{name} {text!r} is not an integer id")
    return int(match.group(1))
  arr = _array(value, name, None, path, key).reshape(-1)
  if arr.size != 1:
    raise DataError(path, key, f"{name} has {arr.size} values, expected one")
  try:
    return int(arr[0])
  except (TypeError, ValueError, OverflowError) as e:
    raise DataError(path, key, f"{name} {arr[0]} is not an integer id: "
                    f"{e}") from e


def _as_float(value, path, key, name):
  if value is None:
    return None
  arr = _array(value, name, np.float64, path, key).reshape(-1)
  if arr.size != 1:
    raise DataError(path, key, f"{name} has {arr.size} values, expected one")
  return float(arr[0])


def structure_from_fields(fields: dict, path: str, key) -> Structure:
  """Maps the fields of one OC20/matsciml entry onto a `Structure`.

  Args:
    fields: decoded field dict of one LMDB value.
    path: file the entry came from (for error messages).
    key: the entry's key.

  Raises:
    DataError: a required field (positions, atomic numbers) is missing, a
      field cannot be interpreted, or it holds more values than a structure
      of `MAX_ATOMS` atoms and `MAX_EDGES` edges can.
  """
  try:
    return _structure(fields, path, key)
  except DataError:
    raise
  except (TypeError, ValueError, OverflowError, IndexError, KeyError,
          AttributeError) as e:
    raise DataError(path, key, f"cannot interpret the fields: "
                    f"{type(e).__name__}: {e}") from e


def _structure(fields: dict, path: str, key) -> Structure:
  def array(name, dtype):
    return _array(fields[name], name, dtype, path, key)

  def optional(keys, dtype):
    name = next((k for k in keys if k in fields), None)
    return None if name is None else array(name, dtype)

  pos_key = "pos" if "pos" in fields else "positions"
  if pos_key not in fields:
    raise DataError(path, key, "required field 'pos' (positions) is missing; "
                    f"fields present: {sorted(fields)}")
  if "atomic_numbers" not in fields:
    raise DataError(path, key, "required field 'atomic_numbers' is missing; "
                    f"fields present: {sorted(fields)}")
  z = array("atomic_numbers", np.float64).reshape(-1)
  positions = array(pos_key, np.float64)
  if not np.all(np.isfinite(z)) or np.any(z != np.round(z)):
    raise DataError(path, key, "atomic_numbers are not integers")
  if np.any(np.abs(z) > 1000):  # Would wrap around in int32.
    bad = int(np.argmax(np.abs(z) > 1000))
    raise DataError(path, key, f"atomic number {z[bad]:g} of atom {bad} is "
                    "outside 1..118")
  n = z.shape[0]

  if "cell" in fields:
    cell = array("cell", np.float64)
    if cell.size != 9:
      raise DataError(path, key, f"cell has shape {cell.shape}, expected "
                      "(3, 3) or (1, 3, 3)")
    cell = cell.reshape(3, 3)
  else:
    cell = np.zeros((3, 3))
  if "pbc" in fields:
    pbc = array("pbc", None).reshape(-1).astype(bool)
  else:
    # OC20 entries carry no pbc flag; their slabs are periodic in 3D.
    pbc = np.full(3, bool(np.any(cell != 0)))

  tags = (array("tags", np.int64).astype(np.int32) if "tags" in fields
          else np.full(n, TAG_UNKNOWN, np.int32))
  fixed = (array("fixed", np.float64) > 0.5 if "fixed" in fields
           else np.zeros(n, bool))
  stress = stress_target(optional(_STRESS_KEYS, np.float64),
                         optional(_VIRIAL_KEYS, np.float64), cell, pbc, path,
                         key)

  return Structure(
      atomic_numbers=z.astype(np.int32),
      positions=positions,
      cell=cell,
      pbc=pbc,
      tags=tags.reshape(-1),
      fixed=fixed.reshape(-1),
      energy=_as_float(_first(fields, _ENERGY_KEYS), path, key, "energy"),
      forces=optional(_FORCE_KEYS, np.float64),
      stress=stress,
      energy_relaxed=_as_float(_first(fields, _RELAXED_ENERGY_KEYS), path,
                               key, "relaxed energy"),
      positions_relaxed=optional(_RELAXED_POS_KEYS, np.float64),
      sid=_as_int_id(fields.get("sid"), path, key, "sid"),
      fid=_as_int_id(fields.get("fid"), path, key, "fid"),
      edge_index=optional(("edge_index",), None),
      cell_offsets=optional(("cell_offsets",), None),
      source=(path, key),
  )


def natural_key(path: str):
  """Sorts "data.2.lmdb" before "data.10.lmdb" (numbers by value)."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def find_lmdb_files(path: str) -> list[str]:
  """Lists the LMDB files of a dataset path (file, shard folder, env folder)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such file or folder")
  if os.path.isfile(os.path.join(path, "data.mdb")):
    return [path]  # A classic LMDB environment folder.
  # `*.lmdb` skips the `*.lmdb-lock` and `data_log.*.txt` files beside shards.
  files = sorted((os.path.join(path, f) for f in os.listdir(path)
                  if f.endswith(".lmdb")), key=natural_key)
  if not files:
    raise FileNotFoundError(f"{path}: no *.lmdb files or data.mdb inside")
  return files


# py-lmdb allows one open environment per file and process, so every reader
# of a process shares them. LMDB environments must not be used across fork:
# a forked child closes its inherited copies and opens its own.
_ENVS: dict[str, lmdb.Environment] = {}


def _close_inherited_envs():
  for env in _ENVS.values():
    try:
      env.close()
    except lmdb.Error:
      pass
  _ENVS.clear()


os.register_at_fork(after_in_child=_close_inherited_envs)


def _open(path: str) -> lmdb.Environment:
  key = os.path.realpath(path)
  env = _ENVS.get(key)
  if env is not None:
    return env
  try:
    # Read-only opens never reserve the 2 TiB map size the files record.
    env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True,
                    lock=False, readahead=False, meminit=False,
                    max_readers=1024)
  except lmdb.Error as e:
    raise DataError(path, None, f"cannot open as an LMDB file: {e}") from e
  # A truncated file (an interrupted download or copy) would crash the
  # process with a bus error where a read reaches past its end: check that
  # it holds every page its header counts.
  data = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
  try:
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
  except lmdb.Error as e:
    env.close()
    raise DataError(path, None, f"cannot read the LMDB header: {e}") from e
  have = os.path.getsize(data)
  if have < need:
    env.close()
    raise DataError(path, None, f"the file is truncated: it has {have} "
                    f"bytes but its LMDB header counts {need}; copy or "
                    "download it again")
  _ENVS[key] = env
  return env


class LmdbReader:
  """Random access to the entries of one LMDB dataset path.

  Entries are ordered by file (natural order of shard names), then by the
  integer value of the key. The `b"length"` key is checked, never returned;
  other non-integer keys (metadata) are ignored.

  Environments are opened lazily and shared per process, so a reader can be
  sent to worker processes.
  """

  def __init__(self, path: str):
    self.path = str(path)
    self.files = find_lmdb_files(self.path)
    self._entries: list[tuple[int, bytes]] = []
    for file_index, f in enumerate(self.files):
      for k in self._scan_keys(f):
        self._entries.append((file_index, k))

  def _scan_keys(self, f: str) -> list[bytes]:
    try:
      with _open(f).begin() as txn:
        keys = [k for k in txn.cursor().iternext(keys=True, values=False)]
        length_raw = txn.get(b"length")
    except lmdb.Error as e:
      raise DataError(f, None, f"cannot list the keys, the file is "
                      f"damaged: {type(e).__name__}: {e}") from e
    int_keys = sorted((k for k in keys if k.isdigit()), key=int)
    if length_raw is not None:
      try:
        length = int(torch_pickle.loads(length_raw))
      except Exception as e:
        raise DataError(f, "length",
                        f"cannot decode the length key: {e}") from e
      if length != len(int_keys):
        raise DataError(
            f, "length", f"the length key says {length} entries but the "
            f"file has {len(int_keys)} integer keys")
    return int_keys

  def __len__(self) -> int:
    return len(self._entries)

  def _env(self, file_index: int) -> lmdb.Environment:
    return _open(self.files[file_index])

  def key(self, i: int) -> tuple[str, str]:
    """Returns (file, key) of entry i."""
    file_index, k = self._entries[i]
    return self.files[file_index], k.decode()

  def raw(self, i: int) -> bytes:
    file_index, k = self._entries[i]
    try:
      with self._env(file_index).begin() as txn:
        value = txn.get(k)
    except lmdb.Error as e:
      raise DataError(self.files[file_index], k.decode(),
                      f"cannot read the value: {type(e).__name__}: {e}") from e
    if value is None:
      raise DataError(self.files[file_index], k.decode(), "key vanished")
    return value

  def fields(self, i: int) -> dict:
    path, key = self.key(i)
    try:
      return torch_pickle.fields_of(torch_pickle.loads(self.raw(i)))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
      raise DataError(path, key, f"cannot decode value: {e}") from e

  def __getitem__(self, i: int) -> Structure:
    path, key = self.key(i)
    return structure_from_fields(self.fields(i), path, key)

  def __iter__(self) -> Iterator[Structure]:
    for i in range(len(self)):
      yield self[i]
