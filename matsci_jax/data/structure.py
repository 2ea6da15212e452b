"""The in-memory record every reader produces: one atomic structure.

All readers (OC20 LMDBs, matsciml LMDBs, ASE files) decode into `Structure`,
so the converter, the tests and the ASE calculator see one format whatever the
source. Arrays keep the dtype they will be stored with; positions and cell stay
float64 until they are written, so that neighbour lists are computed on the
values the source holds.

Bounds on one structure, above any real entry (OC20 entries have fewer than
500 atoms and 25,000 stored edges, at most 50 per centre; a million-atom
supercell has about 80 pairs per atom within 6 Å) and below what would
exhaust memory; an entry beyond them is damaged or crafted:

* `MAX_ATOMS` (2**21): atoms per structure, a million-atom supercell
  rounded up to whole unit cells with room to spare.
* `max_edges(n)`: edges (stored `edge_index` columns, or neighbour pairs a
  cell would give) of a structure of n atoms: `MAX_EDGES` (10**8) or
  `MAX_EDGES_PER_ATOM` (500) per atom, whichever is larger. 500 pairs per
  atom within 6 Å is three times the density of diamond, the densest solid;
  a small cell asking for more is crafted (pairs grow as atoms squared over
  the volume), while a large structure may have as many edges as its atoms
  need. MAX_ATOMS * MAX_EDGES_PER_ATOM < 2**31, so edge indices and counts
  fit int32.
* `MIN_DISTANCE` (1e-6 Å): atoms closer than this, periodic images
  included, are one atom written twice.

Stress follows ASE's convention: `atoms.get_stress(voigt=False)`, in eV/Å^3,
sigma = (1/V) dE/d(strain), positive when the cell pulls inwards (tensile).
Readers turn a virial into it with sigma = -virial / V (the convention of
extended XYZ `virial=` and of MACE and nequip data), see `stress_target`.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Optional

import numpy as np

# Tag value for "this source carries no OC20 tags". OC20 uses 0 (subsurface),
# 1 (surface) and 2 (adsorbate); a structure without tags must not be mistaken
# for an all-bulk one.
TAG_UNKNOWN = -1

MAX_ATOMS = 2**21
MAX_EDGES = 10**8
MAX_EDGES_PER_ATOM = 500
MIN_DISTANCE = 1e-6


def max_edges(num_atoms: int) -> int:
  """The most edges (or neighbour pairs) a structure of `num_atoms` atoms
  may have: `MAX_EDGES`, or `MAX_EDGES_PER_ATOM` per atom if more."""
  return max(MAX_EDGES, MAX_EDGES_PER_ATOM * int(num_atoms))


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
    stress: float64 [3, 3] in eV/Å^3 (ASE's sign, see the module
      docstring), or None; only a cell periodic in 3D has one.
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
  stress: Optional[np.ndarray] = None
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
    if any(v is not None for v in (self.energy, self.forces, self.stress)):
      atoms.calc = SinglePointCalculator(
          atoms, energy=self.energy, forces=self.forces, stress=self.stress)
    atoms.info.update(sid=self.sid, fid=self.fid)
    return atoms


def validate(s: Structure) -> Structure:
  """Checks a structure and returns it; raises `DataError` on the first problem.

  Checks shapes, finiteness of positions, cell and targets, atomic numbers
  in 1..118, a non-singular cell along periodic directions, at most
  `MAX_ATOMS` atoms and `max_edges` stored edges, and that no two atoms (or
  an atom and another's periodic image) are closer than `MIN_DISTANCE`.
  Targets may be missing (test splits) but, when present, must be finite
  and well shaped; a stress needs a cell periodic in all three directions.
  """
  path, key = s.source

  def fail(problem):
    raise DataError(path, key, problem)

  n = s.atomic_numbers.shape[0] if s.atomic_numbers.ndim == 1 else -1
  if n <= 0:
    fail(f"atomic_numbers must be a non-empty vector, got shape "
         f"{s.atomic_numbers.shape}")
  if n > MAX_ATOMS:
    fail(f"{n:,} atoms, more than the {MAX_ATOMS:,} a structure may have "
         "(structure.MAX_ATOMS); the entry is damaged")
  if s.edge_index is not None and s.edge_index.size > 2 * max_edges(n):
    fail(f"{s.edge_index.size // 2:,} stored edges, more than the "
         f"{max_edges(n):,} a structure of {n:,} atoms may have "
         "(structure.max_edges); the entry is damaged")
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
  pair = coincident_atoms(s.positions, s.cell, s.pbc)
  if pair is not None:
    i, j, d = pair
    fail(f"atoms {i} and {j} are at the same position ({d:.1e} Å apart, "
         "periodic images included): an atom written twice")
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
  if s.stress is not None:
    if s.stress.shape != (3, 3):
      fail(f"stress has shape {s.stress.shape}, expected (3, 3) or 6 Voigt "
           "components (xx yy zz yz xz xy)")
    if not np.all(np.isfinite(s.stress)):
      fail(f"stress target contains NaN or inf: {s.stress.tolist()}")
    if not s.pbc.all():
      fail(f"a stress needs a cell periodic in all three directions, but "
           f"pbc={s.pbc.tolist()}")
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


# Voigt order (ASE's): xx yy zz yz xz xy.
_VOIGT_ROWS = np.array([0, 1, 2, 1, 0, 0])
_VOIGT_COLS = np.array([0, 1, 2, 2, 2, 1])


def voigt_to_full(voigt: np.ndarray) -> np.ndarray:
  """float [6] in ASE's Voigt order (xx yy zz yz xz xy) -> symmetric [3, 3],
  as `ase.stress.voigt_6_to_full_3x3_stress` gives it."""
  full = np.empty((3, 3), np.float64)
  full[_VOIGT_ROWS, _VOIGT_COLS] = voigt
  full[_VOIGT_COLS, _VOIGT_ROWS] = voigt
  return full


def full_to_voigt(full: np.ndarray) -> np.ndarray:
  """float [3, 3] -> [6] in ASE's Voigt order (the upper triangle, as ASE
  takes it)."""
  return np.asarray(full)[_VOIGT_ROWS, _VOIGT_COLS]


def _tensor(value, name: str, path: str, key) -> np.ndarray:
  """`value` as float64 [3, 3] from 9 values ([3, 3], [1, 3, 3], [9]) or 6
  Voigt components ([6], [1, 6]); any other shape is returned as it is."""
  try:
    arr = np.asarray(value, np.float64)
  except (TypeError, ValueError, OverflowError) as e:
    raise DataError(path, key, f"{name} is not numeric: {e}") from e
  if arr.shape in ((6,), (1, 6)):
    return voigt_to_full(arr.reshape(6))
  if arr.shape in ((9,), (3, 3), (1, 3, 3)):
    return arr.reshape(3, 3)
  return arr


class StressIgnoredWarning(UserWarning):
  """A stress given on a structure that cannot have one was left out."""


def stress_target(stress, virial, cell: np.ndarray, pbc: np.ndarray,
                  path: str, key) -> Optional[np.ndarray]:
  """The stress a reader stores, from a stress or a virial (or None).

  Args:
    stress: stress in eV/Å^3 with ASE's sign, as 9 values or 6 Voigt
      components (xx yy zz yz xz xy), or None.
    virial: virial in eV, W = -stress * V, as 9 values or 6 Voigt
      components, or None; used only without `stress`.
    cell: float [3, 3] lattice vectors as rows in Å.
    pbc: bool [3].
    path, key: where the structure comes from, for errors.

  Returns:
    float64 [3, 3], or None without either. A stress of another shape is
    returned as it is (`validate` names it). A stress or virial on a cell
    that is not periodic in all three directions (an ASE calculator gives
    one for slabs too) has no volume to refer to: it is left out, with a
    `StressIgnoredWarning` once per file.

  Raises:
    DataError: a value that is not numeric, a virial of another shape, or
      a virial on a flat cell.
  """
  if (stress is not None or virial is not None) and not np.asarray(
      pbc).all():
    warnings.warn(StressIgnoredWarning(
        f"{path}: stress left out of structures whose cell is not periodic "
        "in all three directions (it has no volume to refer to)"),
        stacklevel=2)
    return None
  if stress is not None:
    return _tensor(stress, "stress", path, key)
  if virial is None:
    return None
  virial = _tensor(virial, "virial", path, key)
  if virial.shape != (3, 3):
    raise DataError(path, key, f"virial has shape {virial.shape}, expected "
                    "(3, 3) or 6 Voigt components (xx yy zz yz xz xy)")
  volume = abs(float(np.linalg.det(cell))) if cell.shape == (3, 3) else 0.0
  if not volume > 0:
    raise DataError(path, key, "a virial becomes a stress only on a cell "
                    f"with a volume, but the volume is {volume:g} Å^3")
  return -virial / volume


_GRID_OFFSETS = np.array(list(itertools.product((0.0, MIN_DISTANCE),
                                                repeat=3)))


def _invertible_lattice(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
  """`cell` with its non-periodic rows replaced by unit vectors orthogonal
  to the periodic ones (which must be independent), so that it inverts."""
  if pbc.all():
    return cell
  periodic = cell[pbc]
  _, _, vt = np.linalg.svd(periodic.reshape(-1, 3), full_matrices=True)
  lattice = cell.copy()
  lattice[~pbc] = vt[len(periodic):]
  return lattice


def coincident_atoms(positions: np.ndarray, cell: np.ndarray,
                     pbc: np.ndarray) -> Optional[tuple[int, int, float]]:
  """Finds two atoms closer than `MIN_DISTANCE`, periodic images included.

  Positions are wrapped into the cell along periodic directions, atoms
  within reach of a cell face get an image across it, and the points are
  hashed into cubes of 2 * MIN_DISTANCE on 8 grids offset by MIN_DISTANCE
  along each axis: two points closer than MIN_DISTANCE share a cube on at
  least one grid. Points sharing one are at most 2 * sqrt(3) * MIN_DISTANCE
  apart, so such pairs may be reported too. Takes O(N log N): one sort of
  a 64-bit hash of (grid, cube), then an exact comparison among the few
  points whose hash another point shares.

  Args:
    positions: float [N, 3] finite Cartesian positions in Å.
    cell: float [3, 3] lattice vectors as rows.
    pbc: bool [3]; the periodic rows of `cell` must be independent.

  Returns:
    (i, j, distance) with i < j for one such pair, or None.
  """
  pbc = np.asarray(pbc, bool)
  lattice = _invertible_lattice(cell, pbc)
  inverse = np.linalg.inv(lattice)
  frac = positions @ inverse
  frac[:, pbc] -= np.floor(frac[:, pbc])
  owners = np.arange(len(positions))
  # 2 * MIN_DISTANCE in fractional units: lattice planes along an axis are
  # 1 / |that column of the inverse| apart.
  reach = 2 * MIN_DISTANCE * np.linalg.norm(inverse, axis=0)
  for axis in np.flatnonzero(pbc):
    near = frac[:, axis] < reach[axis]
    image = frac[near]
    image[:, axis] += 1.0
    frac = np.concatenate([frac, image])
    owners = np.concatenate([owners, owners[near]])
  points = frac @ lattice
  # Cube coordinates stay floats (exact integers, whatever the magnitude),
  # whose bits the hash reads: adding the offsets (+0.0 on the first grid)
  # turned any -0.0 into 0.0, so equal cubes have equal bits.
  cubes = (points[None] + _GRID_OFFSETS[:, None]).reshape(-1, 3)
  cubes /= 2 * MIN_DISTANCE
  np.floor(cubes, out=cubes)
  grids = np.repeat(np.arange(len(_GRID_OFFSETS)), len(points))
  member = np.tile(np.arange(len(points)), len(_GRID_OFFSETS))
  # Points sharing a cube share its hash. One sort of hashes (their top bits,
  # the point's index in the low ones) finds the points whose hash is
  # shared: those, and the rare collisions, are compared exactly below.
  bits = cubes.view(np.uint64)
  key = _mix(grids.astype(np.uint64))
  for axis in range(3):
    key ^= bits[:, axis]
    key = _mix(key)
  index_bits = max(int(len(key) - 1).bit_length(), 1)
  key >>= np.uint64(index_bits)
  key <<= np.uint64(index_bits)
  key |= np.arange(len(key), dtype=np.uint64)
  key.sort()
  candidates = (key & np.uint64((1 << index_bits) - 1)).astype(np.intp)
  key >>= np.uint64(index_bits)
  same = key[1:] == key[:-1]
  if not same.any():
    return None
  shares = np.zeros(len(key), bool)
  shares[:-1] = same
  shares[1:] |= same
  candidates = candidates[shares]
  cubes, grids, member = (cubes[candidates], grids[candidates],
                          member[candidates])
  # Sorted by grid, cube and owner, a cube holding two atoms has two
  # neighbouring rows with different owners.
  order = np.lexsort((owners[member], cubes[:, 2], cubes[:, 1], cubes[:, 0],
                      grids))
  cubes, grids, member = cubes[order], grids[order], member[order]
  shared = np.flatnonzero(
      (grids[1:] == grids[:-1]) & (cubes[1:] == cubes[:-1]).all(axis=1)
      & (owners[member[1:]] != owners[member[:-1]]))
  if not len(shared):
    return None
  a, b = member[shared[0]], member[shared[0] + 1]
  return (int(owners[a]), int(owners[b]),
          float(np.linalg.norm(points[a] - points[b])))


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser, in place on uint64 `x` (wrapping)."""
  x ^= x >> np.uint64(30)
  x *= np.uint64(0xBF58476D1CE4E5B9)
  x ^= x >> np.uint64(27)
  x *= np.uint64(0x94D049BB133111EB)
  x ^= x >> np.uint64(31)
  return x
