"""The in-memory record every reader produces: one atomic structure.

All readers (OC20 LMDBs, matsciml LMDBs, ASE files) decode into `Structure`,
so the converter, the tests and the ASE calculator see one format whatever the
source. Arrays keep the dtype they will be stored with; positions and cell stay
float64 until they are written, so that neighbour lists are computed on the
values the source holds.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

# Tag value for "this source carries no OC20 tags". OC20 uses 0 (subsurface),
# 1 (surface) and 2 (adsorbate); a structure without tags must not be mistaken
# for an all-bulk one.
TAG_UNKNOWN = -1


class DataError(ValueError):
  """An entry of an input file that cannot be used.

  The message always names the file, the entry and the problem, so that a bad
  entry in a 100 GB LMDB can be found and fixed.
  """

  def __init__(self, path: str, key, problem: str):
    self.path = str(path)
    self.key = key
    self.problem = problem
    super().__init__(f"{self.path}, entry {key!r}: {problem}")


@dataclasses.dataclass
class Structure:
  """One atomic structure with optional targets.

  Attributes:
    atomic_numbers: int32 [N], Z in 1..118.
    positions: float64 [N, 3], Cartesian positions in Å.
    cell: float64 [3, 3], lattice vectors as rows in Å (zeros if aperiodic).
    pbc: bool [3], periodicity along each lattice vector.
    tags: int32 [N], OC20 tags (0 subsurface, 1 surface, 2 adsorbate) or
      `TAG_UNKNOWN` when the source has none.
    fixed: bool [N], True for atoms held fixed (FixAtoms).
    energy: energy of this structure in eV, or None (test splits).
    forces: float64 [N, 3] in eV/Å, or None.
    energy_relaxed: IS2RE target, relaxed energy in eV, or None.
    positions_relaxed: float64 [N, 3], IS2RS target in Å, or None.
    sid: system id (-1 if unknown).
    fid: frame id within the system (-1 if unknown).
    edge_index: int64 [2, E] stored edges (row 0 neighbour, row 1 centre), if
      the source has them; used only to check our own neighbour lists.
    cell_offsets: int64 [E, 3] image offsets of the stored edges.
    source: (path, key) the structure was read from, for error messages.
  """

  atomic_numbers: np.ndarray
  positions: np.ndarray
  cell: np.ndarray
  pbc: np.ndarray
  tags: np.ndarray
  fixed: np.ndarray
  energy: Optional[float] = None
  forces: Optional[np.ndarray] = None
  energy_relaxed: Optional[float] = None
  positions_relaxed: Optional[np.ndarray] = None
  sid: int = -1
  fid: int = -1
  edge_index: Optional[np.ndarray] = None
  cell_offsets: Optional[np.ndarray] = None
  source: tuple = ("<memory>", None)

  @property
  def num_atoms(self) -> int:
    return int(self.atomic_numbers.shape[0])

  def to_atoms(self):
    """Returns `ase.Atoms` with tags, constraints and a results calculator."""
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    atoms = ase.Atoms(
        numbers=self.atomic_numbers, positions=self.positions,
        cell=self.cell, pbc=self.pbc)
    if np.all(self.tags != TAG_UNKNOWN):
      atoms.set_tags(self.tags)
    if self.fixed.any():
      atoms.set_constraint(FixAtoms(mask=self.fixed))
    if self.energy is not None or self.forces is not None:
      atoms.calc = SinglePointCalculator(
          atoms, energy=self.energy, forces=self.forces)
    atoms.info.update(sid=self.sid, fid=self.fid)
    return atoms


def validate(s: Structure) -> Structure:
  """Checks a structure and returns it; raises `DataError` on the first problem.

  Checks shapes, finiteness of positions, cell and targets, atomic numbers
  in 1..118 and a non-singular cell along periodic directions. Targets may
  be missing (test splits) but, when present, must be finite and well shaped.
  """
  path, key = s.source

  def fail(problem):
    raise DataError(path, key, problem)

  n = s.atomic_numbers.shape[0] if s.atomic_numbers.ndim == 1 else -1
  if n <= 0:
    fail(f"atomic_numbers must be a non-empty vector, got shape "
         f"{s.atomic_numbers.shape}")
  if s.positions.shape != (n, 3):
    fail(f"positions have shape {s.positions.shape}, expected ({n}, 3)")
  if not np.all(np.isfinite(s.positions)):
    bad = int(np.argwhere(~np.isfinite(s.positions))[0, 0])
    fail(f"positions contain NaN or inf (first at atom {bad})")
  z = s.atomic_numbers
  if np.any((z < 1) | (z > 118)):
    bad = int(np.argwhere((z < 1) | (z > 118))[0, 0])
    fail(f"atomic number {int(z[bad])} of atom {bad} is outside 1..118")
  if s.cell.shape != (3, 3):
    fail(f"cell has shape {s.cell.shape}, expected (3, 3)")
  if not np.all(np.isfinite(s.cell)):
    fail("cell contains NaN or inf")
  if s.pbc.shape != (3,):
    fail(f"pbc has shape {s.pbc.shape}, expected (3,)")
  if s.pbc.any():
    # Only the periodic lattice vectors need to be independent.
    periodic = s.cell[s.pbc]
    sv = np.linalg.svd(periodic, compute_uv=False)
    scale = max(float(np.abs(periodic).max()), 1.0)
    if sv.min() < 1e-6 * scale:
      fail(f"cell is singular along its periodic directions "
           f"(pbc={s.pbc.tolist()}, cell={s.cell.tolist()})")
  if s.tags.shape != (n,):
    fail(f"tags have shape {s.tags.shape}, expected ({n},)")
  if s.fixed.shape != (n,):
    fail(f"fixed has shape {s.fixed.shape}, expected ({n},)")
  if s.forces is not None and s.forces.shape != (n, 3):
    fail(f"forces have shape {s.forces.shape}, expected ({n}, 3)")
  for name in ("energy", "energy_relaxed"):
    value = getattr(s, name)
    if value is not None and not np.isfinite(value):
      fail(f"{name} target is {value}")
  for name in ("forces", "positions_relaxed"):
    value = getattr(s, name)
    if value is not None and not np.all(np.isfinite(value)):
      bad = int(np.argwhere(~np.isfinite(value))[0, 0])
      fail(f"{name} target contains NaN or inf (first at atom {bad})")
  if (s.positions_relaxed is not None
      and s.positions_relaxed.shape != (n, 3)):
    fail(f"positions_relaxed have shape {s.positions_relaxed.shape}, "
         f"expected ({n}, 3)")
  return s
