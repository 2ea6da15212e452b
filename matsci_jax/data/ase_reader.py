"""Reads any file ASE can read (extxyz, trajectories, ASE databases, ...).

Targets come from the attached calculator's results (what `ase.io.write`
stores), or from `info`/`arrays` entries for files written by hand:
`energy`/`y`, `forces`/`force`, `stress`, `energy_relaxed`/`y_relaxed` and
`positions_relaxed`/`pos_relaxed`. Fixed atoms come from `FixAtoms`
constraints (extxyz `move_mask`), tags from `atoms.arrays['tags']`.

Stress is ASE's `atoms.get_stress(voigt=False)` (eV/Å^3): extended XYZ
`stress=` (9 values, or 6 Voigt components xx yy zz yz xz xy, which ASE
itself refuses there) and ASE database rows' stress; without one, an
extended XYZ `virial=` (eV) gives stress = -virial / volume (see
`structure.stress_target`).

OC20 distributes S2EF data as `<n>.extxyz` files with a `<n>.txt` beside each,
one line `random<sid>,frame<fid>,<reference energy>` per frame. When such a
file is present, sid and fid come from it, and `subtract_reference=True`
subtracts the reference energy, as OC20's `preprocess_ef.py --ref-energy` does.
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterator, NamedTuple, Optional

import numpy as np

from matsci_jax.data.structure import (DataError, Structure, TAG_UNKNOWN,
                                       full_to_voigt, stress_target)

_XYZ_SUFFIXES = (".xyz", ".extxyz")


def _xyz_frame_spans(path: str) -> np.ndarray:
  """Byte offsets of the frames of an (ext)xyz file, found without parsing
  them: int64 [frames, 2], the start and end of each frame's lines."""
  spans = []
  with open(path, "rb") as f:
    while True:
      start = f.tell()
      line = f.readline()
      if not line:
        return np.array(spans, np.int64).reshape(-1, 2)
      if not line.strip():
        continue
      try:
        natoms = int(line)
      except ValueError:
        raise DataError(path, len(spans),
                        f"expected an atom count, got {line!r}") from None
      for _ in range(natoms + 1):
        if not f.readline():
          raise DataError(path, len(spans), "file ends inside this frame")
      spans.append((start, f.tell()))


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


class _Frame(NamedTuple):
  """What a `Structure` is made of, as `ase.Atoms` hold it."""
  numbers: np.ndarray
  positions: np.ndarray
  cell: np.ndarray
  pbc: np.ndarray
  results: dict  # The calculator's results.
  info: dict
  arrays: dict
  fixed: np.ndarray


def structure_from_atoms(atoms, path: str, key, *, sid: int = -1,
                         fid: int = -1, energy_offset: float = 0.0
                         ) -> Structure:
  """Converts an `ase.Atoms` (with optional results) into a `Structure`."""
  try:
    fixed = _fixed_mask(atoms)
  except (TypeError, ValueError) as e:
    raise DataError(path, key, f"cannot interpret frame: {e}") from e
  frame = _Frame(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc,
                 dict(getattr(atoms.calc, "results", None) or {}),
                 atoms.info, atoms.arrays, fixed)
  return _structure(frame, path, key, sid=sid, fid=fid,
                    energy_offset=energy_offset)


def _structure(frame: _Frame, path: str, key, *, sid: int, fid: int,
               energy_offset: float) -> Structure:
  results, info, arrays = frame.results, frame.info, frame.arrays

  def pick(sources, keys):
    for src in sources:
      for k in keys:
        if k in src and src[k] is not None:
          return src[k]
    return None

  energy = pick([results, info], ("energy", "free_energy", "y"))
  forces = pick([results, arrays], ("forces", "force"))
  cell = np.asarray(frame.cell, np.float64)
  pbc = np.asarray(frame.pbc, bool)
  stress = stress_target(pick([results, info], ("stress",)),
                         pick([info], ("virial",)), cell, pbc, path, key)
  energy_relaxed = pick([info], ("energy_relaxed", "y_relaxed"))
  pos_relaxed = pick([arrays], ("positions_relaxed", "pos_relaxed"))
  tags = (np.asarray(arrays["tags"], np.int32) if "tags" in arrays
          else np.full(len(frame.numbers), TAG_UNKNOWN, np.int32))
  try:
    return Structure(
        atomic_numbers=np.asarray(frame.numbers, np.int32),
        positions=np.asarray(frame.positions, np.float64),
        cell=cell,
        pbc=pbc,
        tags=tags,
        fixed=frame.fixed,
        energy=None if energy is None else float(energy) - energy_offset,
        forces=None if forces is None else np.asarray(forces, np.float64),
        stress=stress,
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


# A `stress=` or `virial=` key of an extended XYZ comment line, quoted as
# ASE quotes values.
_TENSOR_KEY = re.compile(
    r'(^|\s)(stress|virial)(\s*=\s*)(["{])([^"{}]*)(["}])')


def _expand_voigt(comment: str) -> str:
  """The comment line with a 6-component (Voigt, xx yy zz yz xz xy)
  `stress=` or `virial=` written as the 9 values ASE reads there."""

  def nine(match):
    values = re.findall(r"[^\s,]+", match.group(5))  # As ASE splits.
    if len(values) != 6:
      return match.group(0)
    xx, yy, zz, yz, xz, xy = values
    full = " ".join((xx, xy, xz, xy, yy, yz, xz, yz, zz))
    return "".join(match.group(1, 2, 3, 4)) + full + match.group(6)

  if "stress" not in comment and "virial" not in comment:
    return comment
  return _TENSOR_KEY.sub(nine, comment)


# Extended XYZ columns that `_parse_extxyz_frame` reads, by ASE's name for
# them: (type, columns).
_FAST_COLUMNS = {"symbols": ("S", 1), "numbers": ("I", 1),
                 "positions": ("R", 3), "move_mask": ("L", 1),
                 "tags": ("I", 1), "forces": ("R", 3), "energies": ("R", 1)}
_BOOLS = {"T": True, "F": False, "True": True, "False": False}


def _parse_extxyz_frame(lines: list[str]) -> Optional[_Frame]:
  """Reads one extended XYZ frame (its lines, count and comment included)
  as `ase.io.read` would, for the common columns (`_FAST_COLUMNS`) and
  comment keys; returns None for anything else, which ASE then reads.

  ASE converts its frames atom by atom into tuples, then builds an `Atoms`
  and a calculator, which takes several times longer than converting each
  column at once. The conversions are ASE's own (`float`, `int`, its
  `T`/`F` table), so values and errors are the same; a frame that ASE
  would reject (or that any step here rejects) is left to ASE.
  """
  from ase.data import atomic_numbers
  from ase.io import extxyz
  try:
    natoms = int(lines[0])
    comment = lines[1].strip()
    info = extxyz.key_val_str_to_dict(comment) if comment else {}
    pbc = info.pop("pbc", None)
    lattice = info.pop("Lattice", None)
    if pbc is None and lattice is not None:
      pbc = np.ones(3, bool)
    if pbc is not None:
      if not isinstance(pbc, (list, tuple, np.ndarray)):
        return None
      pbc = np.array(pbc)
      if pbc.dtype != bool or pbc.shape != (3,):
        return None
    if lattice is None:
      cell = np.zeros((3, 3))
    elif (isinstance(lattice, np.ndarray) and lattice.shape == (3, 3)
          and lattice.dtype.kind in "iuf"):
      cell = np.array(lattice.T, float)  # ASE's cell is the transpose.
    else:
      return None
    spec = info.pop("Properties", "species:S:1:pos:R:3")
    if not isinstance(spec, str):
      return None
    properties = extxyz.parse_properties(spec)[0]
    fields = spec.split(":")
    columns = []  # (ASE name, type, first column, columns)
    first = 0
    for name, ptype in zip(fields[::3], fields[1::3]):
      ase_name, cols = properties[name]
      if _FAST_COLUMNS.get(ase_name) != (ptype, cols):
        return None
      columns.append((ase_name, ptype, first, cols))
      first += cols
    names = [c[0] for c in columns]
    if len(set(names)) != len(names) or "positions" not in names or not (
        {"symbols", "numbers"} & set(names)):
      return None
    results = {}
    for k in list(info):
      if k in extxyz.per_config_properties:  # Calculator results in ASE.
        value = info.pop(k)
        if k in ("energy", "free_energy"):
          results[k] = value
        elif k == "stress":  # ASE keeps 3x3 values as Voigt components.
          if not (isinstance(value, np.ndarray) and value.shape == (3, 3)
                  and value.dtype.kind in "iuf"):
            return None
          results[k] = full_to_voigt(value)
        elif not (isinstance(value, (int, float, np.number)) or (
            isinstance(value, np.ndarray) and value.dtype.kind in "iuf")):
          return None  # Numbers are kept (and not needed here).
    rows = [line.split() for line in lines[2:2 + natoms]]
    if len(rows) != natoms or min(map(len, rows), default=first) < first:
      return None
    table = list(zip(*rows)) if natoms else [()] * first
    arrays, numbers, fixed = {}, None, np.zeros(natoms, bool)
    for ase_name, ptype, start, cols in columns:
      if ptype == "R":  # numpy converts strings with `float`.
        value = np.array(table[start:start + cols], np.float64).T
      elif ptype == "I":
        value = np.array([int(x) for x in table[start]], np.int32)
      elif ptype == "L":
        value = np.array([_BOOLS.get(x) for x in table[start]], bool)
      else:
        value = [str(x) for x in table[start]]
      if cols == 1 and ptype == "R":
        value = value[:, 0]
      arrays[ase_name] = value
    positions = arrays.pop("positions")
    symbols = arrays.pop("symbols", None)
    numbers = arrays.pop("numbers", None)
    if numbers is None:
      numbers = np.array([atomic_numbers[x.capitalize()] for x in symbols],
                         np.int64)
    if "move_mask" in arrays:
      fixed = ~arrays.pop("move_mask")
    for name in ("forces", "energies"):
      if name in arrays:
        results[name] = arrays.pop(name)
    return _Frame(numbers, positions, cell,
                  np.zeros(3, bool) if pbc is None else pbc, results, info,
                  arrays, fixed)
  except Exception:  # ASE reads it, or tells what is wrong.
    return None


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
    self._spans = None
    if self._is_db:
      import ase.db
      with ase.db.connect(self.path) as db:
        self._ids = [row.id for row in db.select(include_data=False)]
      self._n = len(self._ids)
    elif self.path.endswith(_XYZ_SUFFIXES) or format in ("xyz", "extxyz"):
      # Frames are read from their byte spans: ASE, given a path and a
      # range of frames, scans the file from its start for every range.
      self._spans = _xyz_frame_spans(self.path)
      self._n = len(self._spans)
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
      block = 256  # Sequential access parses each frame once.
      start = i - i % block
      stop = min(start + block, self._n)
      try:
        frames = self._read(start, stop)
      except Exception:  # A bad frame: fall back to reading one by one.
        frames = [None] * (stop - start)
      if len(frames) != stop - start:
        frames = [None] * (stop - start)
      self._block = (start, frames)
    frame = frames[i - start]
    if frame is None:
      try:
        frame = self._read(i, i + 1)[0]
      except Exception as e:
        raise DataError(self.path, i, f"ASE cannot read this frame: "
                        f"{type(e).__name__}: {e}") from e
    return frame

  def _read(self, start: int, stop: int) -> list:
    """Frames [start, stop), each an `ase.Atoms` or a `_Frame`."""
    import ase.io
    if self._spans is None:
      return ase.io.read(self.path, index=f"{start}:{stop}",
                         format=self.format)
    with open(self.path, "rb") as f:
      f.seek(self._spans[start, 0])
      data = f.read(self._spans[stop - 1, 1] - self._spans[start, 0])
    base = self._spans[start, 0]
    frames = []
    for a, b in self._spans[start:stop].tolist():
      # Decoded as ASE decodes the file; ASE reads lines split at "\n".
      text = io.TextIOWrapper(io.BytesIO(data[a - base:b - base])).read()
      frame = None
      if self.format in (None, "extxyz"):
        lines = text.split("\n")
        if len(lines) > 1:
          comment = _expand_voigt(lines[1])
          if comment != lines[1]:
            lines[1] = comment
            text = "\n".join(lines)
        frame = _parse_extxyz_frame(lines)
      if frame is None:
        frame = ase.io.read(io.StringIO(text), index=0,
                            format=self.format or "extxyz")
      frames.append(frame)
    return frames

  def __getitem__(self, i: int) -> Structure:
    if not 0 <= i < self._n:
      raise IndexError(i)
    sid, fid, ref = -1, i, 0.0
    if self._oc20 is not None:
      sid, fid, ref = self._oc20[i]
    path, key = self.key(i)
    frame = self._atoms(i)
    offset = ref if self.subtract_reference else 0.0
    if isinstance(frame, _Frame):
      return _structure(frame, path, key, sid=sid, fid=fid,
                        energy_offset=offset)
    return structure_from_atoms(frame, path, key, sid=sid, fid=fid,
                                energy_offset=offset)

  def __iter__(self) -> Iterator[Structure]:
    for i in range(self._n):
      yield self[i]
