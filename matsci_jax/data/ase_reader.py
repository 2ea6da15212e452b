"""Reads any file ASE can read (extxyz, trajectories, ASE databases, ...).

Targets come from the attached calculator's results (what `ase.io.write`
stores), or from `info`/`arrays` entries for files written by hand:
`energy`/`y`, `forces`/`force`, `energy_relaxed`/`y_relaxed` and
`positions_relaxed`/`pos_relaxed`. Fixed atoms come from `FixAtoms`
constraints (extxyz `move_mask`), tags from `atoms.arrays['tags']`.

OC20 distributes S2EF data as `<n>.extxyz` files with a `<n>.txt` beside each,
one line `random<sid>,frame<fid>,<reference energy>` per frame. When such a
file is present, sid and fid come from it, and `subtract_reference=True`
subtracts the reference energy, as OC20's `preprocess_ef.py --ref-energy` does.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Optional

import numpy as np

from matsci_jax.data.structure import DataError, Structure, TAG_UNKNOWN

_XYZ_SUFFIXES = (".xyz", ".extxyz")


def _count_xyz_frames(path: str) -> int:
  """Counts frames of an (ext)xyz file without parsing them."""
  count = 0
  with open(path, "rb") as f:
    while True:
      line = f.readline()
      if not line:
        return count
      if not line.strip():
        continue
      try:
        natoms = int(line)
      except ValueError:
        raise DataError(path, count,
                        f"expected an atom count, got {line!r}") from None
      for _ in range(natoms + 1):
        if not f.readline():
          raise DataError(path, count, "file ends inside this frame")
      count += 1


def _read_oc20_txt(path: str) -> Optional[list[tuple[int, int, float]]]:
  txt = os.path.splitext(path)[0] + ".txt"
  if not os.path.isfile(txt):
    return None
  rows = []
  with open(txt) as f:
    for line_no, line in enumerate(f):
      if not line.strip():
        continue
      parts = line.strip().split(",")
      match = [re.search(r"(-?\d+)$", p) for p in parts[:2]]
      if len(parts) < 2 or not all(match):
        raise DataError(txt, line_no, "expected 'random<sid>,frame<fid>"
                        f"[,<reference energy>]', got {line.strip()!r}")
      ref = float(parts[2]) if len(parts) > 2 else 0.0
      rows.append((int(match[0].group(1)), int(match[1].group(1)), ref))
  return rows


def _fixed_mask(atoms) -> np.ndarray:
  from ase.constraints import FixAtoms
  mask = np.zeros(len(atoms), bool)
  for c in atoms.constraints:
    if isinstance(c, FixAtoms):
      mask[c.get_indices()] = True
  if "move_mask" in atoms.arrays:  # extxyz written without constraints.
    mm = np.asarray(atoms.arrays["move_mask"])
    mask |= ~mm.reshape(len(atoms), -1).all(axis=1).astype(bool)
  return mask


def structure_from_atoms(atoms, path: str, key, *, sid: int = -1,
                         fid: int = -1, energy_offset: float = 0.0
                         ) -> Structure:
  """Converts an `ase.Atoms` (with optional results) into a `Structure`."""
  results = dict(getattr(atoms.calc, "results", None) or {})
  info, arrays = atoms.info, atoms.arrays

  def pick(sources, keys):
    for src in sources:
      for k in keys:
        if k in src and src[k] is not None:
          return src[k]
    return None

  energy = pick([results, info], ("energy", "free_energy", "y"))
  forces = pick([results, arrays], ("forces", "force"))
  energy_relaxed = pick([info], ("energy_relaxed", "y_relaxed"))
  pos_relaxed = pick([arrays], ("positions_relaxed", "pos_relaxed"))
  tags = (np.asarray(arrays["tags"], np.int32) if "tags" in arrays
          else np.full(len(atoms), TAG_UNKNOWN, np.int32))
  try:
    return Structure(
        atomic_numbers=np.asarray(atoms.numbers, np.int32),
        positions=np.asarray(atoms.positions, np.float64),
        cell=np.asarray(atoms.cell.array, np.float64),
        pbc=np.asarray(atoms.pbc, bool),
        tags=tags,
        fixed=_fixed_mask(atoms),
        energy=None if energy is None else float(energy) - energy_offset,
        forces=None if forces is None else np.asarray(forces, np.float64),
        energy_relaxed=(None if energy_relaxed is None
                        else float(energy_relaxed) - energy_offset),
        positions_relaxed=(None if pos_relaxed is None
                           else np.asarray(pos_relaxed, np.float64)),
        sid=int(info.get("sid", sid)),
        fid=int(info.get("fid", fid)),
        source=(path, key),
    )
  except (TypeError, ValueError) as e:
    raise DataError(path, key, f"cannot interpret frame: {e}") from e


class AseReader:
  """Random access to the frames of one ASE-readable file.

  Frames are parsed lazily in blocks, so that a worker converting frames
  [a, b) parses only those.

  Args:
    path: file to read.
    subtract_reference: subtract the reference energy of an OC20 `.txt`
      sidecar file (OC20's `--ref-energy` preprocessing).
    format: ASE format name, when it cannot be guessed from the file name.
  """

  def __init__(self, path: str, *, subtract_reference: bool = False,
               format: Optional[str] = None):
    self.path = str(path)
    self.format = format
    self.subtract_reference = subtract_reference
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"{self.path}: no such file")
    self._is_db = self.path.endswith(".db") or format == "db"
    if self._is_db:
      import ase.db
      with ase.db.connect(self.path) as db:
        self._ids = [row.id for row in db.select(include_data=False)]
      self._n = len(self._ids)
    elif self.path.endswith(_XYZ_SUFFIXES) or format in ("xyz", "extxyz"):
      self._n = _count_xyz_frames(self.path)
    else:
      import ase.io
      self._n = len(ase.io.read(self.path, index=":", format=format))
    self._oc20 = _read_oc20_txt(self.path)
    if self._oc20 is not None and len(self._oc20) != self._n:
      raise DataError(os.path.splitext(self.path)[0] + ".txt", None,
                      f"has {len(self._oc20)} lines but {self.path} has "
                      f"{self._n} frames")
    if subtract_reference and self._oc20 is None:
      raise DataError(self.path, None, "subtract_reference needs an OC20 "
                      "'.txt' file with reference energies beside it")
    self._block: tuple[int, list] = (-1, [])

  def __len__(self) -> int:
    return self._n

  def key(self, i: int) -> tuple[str, int]:
    return self.path, (self._ids[i] if self._is_db else i)

  def _atoms(self, i: int):
    if self._is_db:
      import ase.db
      with ase.db.connect(self.path) as db:
        row = db.get(id=self._ids[i])
        atoms = row.toatoms(add_additional_information=True)
        atoms.info.update(atoms.info.pop("key_value_pairs", {}))
        atoms.info.update(atoms.info.pop("data", {}) or {})
        return atoms
    start, frames = self._block
    if not start <= i < start + len(frames):
      import ase.io
      block = 256  # Sequential access parses each frame once.
      start = i - i % block
      stop = min(start + block, self._n)
      try:
        frames = ase.io.read(self.path, index=f"{start}:{stop}",
                             format=self.format)
      except Exception:  # A bad frame: fall back to reading one by one.
        frames = [None] * (stop - start)
      self._block = (start, frames)
    frame = frames[i - start]
    if frame is None:
      import ase.io
      try:
        frame = ase.io.read(self.path, index=i, format=self.format)
      except Exception as e:
        raise DataError(self.path, i, f"ASE cannot read this frame: "
                        f"{type(e).__name__}: {e}") from e
    return frame

  def __getitem__(self, i: int) -> Structure:
    if not 0 <= i < self._n:
      raise IndexError(i)
    sid, fid, ref = -1, i, 0.0
    if self._oc20 is not None:
      sid, fid, ref = self._oc20[i]
    path, key = self.key(i)
    return structure_from_atoms(
        self._atoms(i), path, key, sid=sid, fid=fid,
        energy_offset=ref if self.subtract_reference else 0.0)

  def __iter__(self) -> Iterator[Structure]:
    for i in range(self._n):
      yield self[i]
