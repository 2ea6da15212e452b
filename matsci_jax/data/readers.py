"""Opens any supported input path as a random-access reader of `Structure`s.

A reader has `len(reader)`, `reader[i] -> Structure` and
`reader.key(i) -> (file, key)`; it can be pickled to worker processes.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from matsci_jax.data.ase_reader import AseReader
from matsci_jax.data.lmdb_reader import LmdbReader

Reader = Union[LmdbReader, AseReader]

_ASE_SUFFIXES = (".xyz", ".extxyz", ".traj", ".db", ".cif", ".vasp", ".json",
                 ".pdb", ".xsf")


def _is_lmdb_path(path: str) -> bool:
  if os.path.isfile(path):
    return path.endswith(".lmdb") or os.path.basename(path) == "data.mdb"
  return os.path.isdir(path) and (
      os.path.isfile(os.path.join(path, "data.mdb"))
      or any(f.endswith(".lmdb") for f in os.listdir(path)))


def open_readers(path: str, *, subtract_reference: bool = False,
                 ase_format: Optional[str] = None) -> list[Reader]:
  """Returns the readers for one input path.

  Args:
    path: an LMDB file, a folder of LMDB shards, an LMDB environment folder,
      an ASE-readable file, or a folder of ASE-readable files (such as OC20's
      `*.extxyz` + `*.txt` S2EF chunks).
    subtract_reference: for OC20 extxyz chunks, subtract the reference
      energies listed in the `.txt` files.
    ase_format: ASE format name for files whose suffix does not tell it.

  Raises:
    FileNotFoundError: nothing readable at `path`.
  """
  path = os.fspath(path)
  if os.path.basename(path) == "data.mdb":
    path = os.path.dirname(path)
  if _is_lmdb_path(path):
    return [LmdbReader(path)]
  if os.path.isdir(path):
    from matsci_jax.data.lmdb_reader import natural_key
    files = sorted((os.path.join(path, f) for f in os.listdir(path)
                    if f.endswith(_ASE_SUFFIXES)), key=natural_key)
    if not files:
      raise FileNotFoundError(
          f"{path}: no LMDB or ASE-readable files ({', '.join(_ASE_SUFFIXES)})")
    return [AseReader(f, subtract_reference=subtract_reference,
                      format=ase_format) for f in files]
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or folder")
  return [AseReader(path, subtract_reference=subtract_reference,
                    format=ase_format)]
