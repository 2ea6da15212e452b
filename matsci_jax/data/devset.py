"""Build a small OC20-like dev set from ASE's EMT potential.

The dev set lets a new user train and evaluate models without downloading
OC20. Every system is an fcc(111) or fcc(100) slab of Cu, Ag, Au, Ni, Pd, Pt
or Al with one small H/C/N/O adsorbate on an ontop, bridge or hollow site
(EMT has parameters for no other elements), relaxed with L-BFGS under EMT.

It follows the OC20 conventions:

* `tags`: 0 = subsurface (bulk) atom, 1 = surface atom (top two slab
  layers), 2 = adsorbate atom.
* All tag-0 atoms are fixed with `ase.constraints.FixAtoms`.
* Periodic in all three directions, with ~7 Å of vacuum on each side of the
  slab.
* Energies are adsorption energies in eV, referenced as OC20 references
  them: the total EMT energy minus that of the relaxed clean slab and minus
  gas-phase references for the adsorbate atoms (H from H2, O from H2O - H2,
  C from CO - O, N from N2, each molecule relaxed under EMT). The subtracted
  amount is kept in `info["energy_reference"]`, as OC20 keeps its
  `ref_energy`. Forces (eV/Å) are the raw forces (`apply_constraint=False`),
  so fixed atoms carry their forces too.

Two tasks are produced from the same relaxations:

* S2EF: every second frame of each relaxation (always the first, plus the
  last) and a few rattled copies of intermediate or relaxed frames, each
  with its energy and forces.
* IS2RE: one entry per system with the initial structure, its energy and
  forces, and the relaxed energy and positions.

Systems are split into `train` and `val` (about 10 % val), so no system
appears in both. Each system draws from `np.random.default_rng([seed,
index])`, which makes the output identical for a given seed whatever the
number of worker processes.

Usage::

    from matsci_jax.data import devset
    devset.build_devset("data/devset")

or `python -m data_prep.make_devset --output data/devset`.

`matsci_jax.data.bulk_devset` builds a second dev set, of strained bulk
cells with stress, with the helpers here (`staged_files`,
`results_in_order`, `begin_build`, `finish_build`, `read_marker`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import ase.io
import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.optimize import LBFGS
from tqdm import tqdm

from matsci_jax.data import processes
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec

DEFAULT_NUM_SYSTEMS = 300
VAL_FRACTION = 0.1
METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
FACETS = {"fcc111": fcc111, "fcc100": fcc100}
SIZES = ((2, 2, 4), (3, 3, 3), (3, 3, 4))
VACUUM = 7.0
SURFACE_LAYERS = 2
FMAX = 0.05
MAX_STEPS = 50
FRAME_STRIDE = 2
NUM_RATTLED = 3
RATTLE_SIGMA = (0.05, 0.15)
LATERAL_JITTER = 0.1  # Å, standard deviation
HEIGHT_JITTER = 0.15  # Å, half-width of a uniform draw
# Starting heights above the top layer; hollow sites sit lower than ontop
# ones, as they do on real surfaces.
SITE_HEIGHT = {"ontop": 1.9, "bridge": 1.6, "fcc": 1.3, "hcp": 1.3,
               "hollow": 1.2}

# Adsorbates as (symbols, positions), the binding atom first at the origin
# and the rest pointing away from the surface.
ADSORBATES = {
    "H": ("H", [(0, 0, 0)]),
    "C": ("C", [(0, 0, 0)]),
    "N": ("N", [(0, 0, 0)]),
    "O": ("O", [(0, 0, 0)]),
    "OH": ("OH", [(0, 0, 0), (0, 0, 0.97)]),
    "CO": ("CO", [(0, 0, 0), (0, 0, 1.15)]),
    "NO": ("NO", [(0, 0, 0), (0, 0, 1.17)]),
    "NH": ("NH", [(0, 0, 0), (0, 0, 1.03)]),
    "CH": ("CH", [(0, 0, 0), (0, 0, 1.10)]),
    "NH2": ("NH2", [(0, 0, 0), (0.82, 0, 0.59), (-0.82, 0, 0.59)]),
    "CH2": ("CH2", [(0, 0, 0), (0.87, 0, 0.63), (-0.87, 0, 0.63)]),
    "H2O": ("OH2", [(0, 0, 0), (0.76, 0, 0.59), (-0.76, 0, 0.59)]),
}

# OC20's gas-phase references: each adsorbate element from small molecules.
GAS_MOLECULES = ("H2", "H2O", "CO", "N2")

SPLITS = ("train", "val")
RAW_FILES = tuple(f"{task}_{split}.extxyz"
                  for task in ("s2ef", "is2re") for split in SPLITS)
MARKER = "devset.json"
# Bumped whenever the generated data or their statistics change, so that
# cached copies rebuild.
VERSION = 3
# Graph edges for EGNN/MegNet and point clouds for GALA, so that every model
# trains on the dev set.
DEVSET_GRAPH_SPEC = GraphSpec(
    cutoff=6.0, max_neighbors=50, representation="both",
    point_cloud=PointCloudSpec(cutoff=6.0, num_neighbors=16, bulk_samples=8,
                               seed=0))


def _relax(atoms: Atoms) -> float:
  """Relaxes `atoms` in place under EMT; returns the final energy."""
  atoms.calc = EMT()
  LBFGS(atoms, logfile=None).run(fmax=FMAX / 5, steps=200)
  return float(atoms.get_potential_energy())


@functools.cache
def gas_references() -> dict[str, float]:
  """EMT reference energy per adsorbate element, OC20's recipe.

  H = E(H2)/2, O = E(H2O) - E(H2), C = E(CO) - O, N = E(N2)/2, each molecule
  relaxed in a 16 Å box.
  """
  energy = {}
  for name in GAS_MOLECULES:
    gas = molecule(name)
    gas.center(vacuum=8.0)
    energy[name] = _relax(gas)
  o = energy["H2O"] - energy["H2"]
  return {"H": energy["H2"] / 2, "O": o, "C": energy["CO"] - o,
          "N": energy["N2"] / 2}


def _slab_kind(index: int) -> tuple[str, str, tuple[int, int, int]]:
  """Metal, facet and slab size of system `index`.

  They cycle with the index so that even a small set covers all metals.
  """
  metal = METALS[index % len(METALS)]
  facet = list(FACETS)[(index // len(METALS)) % len(FACETS)]
  size = SIZES[(index // (len(METALS) * len(FACETS))) % len(SIZES)]
  return metal, facet, size


def _clean_slab(metal: str, facet: str, size: tuple[int, int, int]) -> Atoms:
  """The tagged, constrained, periodic clean slab of one kind."""
  slab = FACETS[facet](metal, size=size, vacuum=VACUUM)
  # ase.build numbers layers from the top (1) downwards.
  tags = (slab.get_tags() <= SURFACE_LAYERS).astype(int)
  slab.set_tags(tags)
  slab.set_constraint(FixAtoms(mask=tags == 0))
  slab.pbc = True
  return slab


@functools.cache
def _slab_energy(metal: str, facet: str, size: tuple[int, int, int]) -> float:
  return _relax(_clean_slab(metal, facet, size))


def slab_energy(index: int) -> float:
  """Energy of system `index`'s relaxed clean slab (cached per slab kind)."""
  return _slab_energy(*_slab_kind(index))


def reference_energy(atoms: Atoms, index: int) -> float:
  """What OC20 subtracts from a total energy: clean slab plus gas refs."""
  gas = gas_references()
  tags = atoms.get_tags()
  return slab_energy(index) + sum(
      gas[s] for s, t in zip(atoms.get_chemical_symbols(), tags) if t == 2)


def make_system(seed: int, index: int) -> tuple[Atoms, np.random.Generator]:
  """Builds the initial slab + adsorbate structure of one system.

  The slab comes from `_clean_slab`; adsorbate, site and placement are
  random.

  Args:
    seed: Global seed of the dev set.
    index: System index (`sid`).

  Returns:
    The tagged, constrained, fully periodic structure and the system's
    random generator, to be used for everything else about the system.
  """
  rng = np.random.default_rng([seed, index])
  metal, facet, size = _slab_kind(index)
  slab = _clean_slab(metal, facet, size)
  sites = list(slab.info["adsorbate_info"]["sites"])
  site = sites[rng.integers(len(sites))]
  symbols, positions = ADSORBATES[list(ADSORBATES)[
      rng.integers(len(ADSORBATES))]]
  ads = Atoms(symbols, positions=positions)
  ads.rotate(rng.uniform(0, 360), "z")
  height = SITE_HEIGHT[site] + rng.uniform(-HEIGHT_JITTER, HEIGHT_JITTER)
  cell_offset = (rng.integers(size[0]), rng.integers(size[1]))
  num_slab = len(slab)
  slab_tags = slab.get_tags()
  slab.set_constraint()
  add_adsorbate(slab, ads, height, position=site, offset=cell_offset)
  slab.positions[num_slab:, :2] += rng.normal(0, LATERAL_JITTER, 2)

  tags = np.full(len(slab), 2)
  tags[:num_slab] = slab_tags
  slab.set_tags(tags)
  slab.set_constraint(FixAtoms(mask=tags == 0))
  slab.info = {}
  slab.wrap()
  return slab, rng


def _frame(atoms: Atoms, positions: np.ndarray, energy: float,
           forces: np.ndarray, **info) -> Atoms:
  """Returns a copy of `atoms` at `positions` with stored results."""
  frame = atoms.copy()
  frame.positions = positions
  frame.calc = SinglePointCalculator(frame, energy=float(energy),
                                     forces=forces)
  frame.info.update(info)
  return frame


def run_system(seed: int, index: int) -> dict:
  """Relaxes one system and derives its S2EF frames and IS2RE entry.

  Args:
    seed: Global seed of the dev set.
    index: System index (`sid`).

  Returns:
    `{"s2ef": [Atoms, ...], "is2re": Atoms}` with results attached.
  """
  atoms, rng = make_system(seed, index)
  reference = reference_energy(atoms, index)
  atoms.calc = EMT()
  trajectory = []

  def record():
    trajectory.append((atoms.positions.copy(),
                       atoms.get_potential_energy() - reference,
                       atoms.get_forces(apply_constraint=False)))

  # L-BFGS rather than BFGS: BFGS diagonalises its Hessian every step, and
  # OpenBLAS threads in forked workers then compete for the cores (several
  # times slower); L-BFGS needs only vector products.
  opt = LBFGS(atoms, logfile=None)
  opt.attach(record)  # called on the start structure and after each step
  opt.run(fmax=FMAX, steps=MAX_STEPS)

  steps = list(range(0, len(trajectory), FRAME_STRIDE))
  if steps[-1] != len(trajectory) - 1:
    steps.append(len(trajectory) - 1)
  frames = [_frame(atoms, *trajectory[i], sid=index, fid=i,
                   energy_reference=reference) for i in steps]

  # Rattled copies sample off-path configurations near the minimum, which
  # the relaxation itself rarely visits.
  free = np.ones(len(atoms), bool)
  free[atoms.constraints[0].get_indices()] = False
  probe = atoms.copy()
  probe.calc = EMT()
  for k in range(NUM_RATTLED):
    base = rng.integers(len(trajectory) // 2, len(trajectory))
    sigma = rng.uniform(*RATTLE_SIGMA)
    positions = trajectory[base][0].copy()
    positions[free] += rng.normal(0, sigma, (free.sum(), 3))
    probe.positions = positions
    frames.append(_frame(atoms, positions,
                         probe.get_potential_energy() - reference,
                         probe.get_forces(apply_constraint=False),
                         sid=index, fid=len(trajectory) + k,
                         energy_reference=reference))

  initial = _frame(atoms, *trajectory[0], sid=index,
                   energy_relaxed=float(trajectory[-1][1]),
                   energy_reference=reference)
  initial.new_array("positions_relaxed", trajectory[-1][0])
  return {"s2ef": frames, "is2re": initial}


def _run_system(args: tuple[int, int]) -> dict:
  """Single-argument form of `run_system` for `Pool.imap`."""
  return run_system(*args)


def split_systems(num_systems: int, seed: int) -> np.ndarray:
  """Assigns each system to a split.

  Args:
    num_systems: Number of systems.
    seed: Global seed of the dev set.

  Returns:
    Array of split names, one per system.
  """
  num_val = round(VAL_FRACTION * num_systems)
  num_val = max(1, num_val) if num_systems > 1 else 0
  # The third entry keeps this stream apart from the per-system ones.
  order = np.random.default_rng([seed, 0, 1]).permutation(num_systems)
  split = np.full(num_systems, "train", dtype=object)
  split[order[:num_val]] = "val"
  return split


@contextlib.contextmanager
def staged_files(folder: Path, names: tuple[str, ...]) -> Iterator[dict]:
  """Files to write, moved into `folder` only once all are complete.

  Yields `{stem: open text file}` for the file `names` (stems without the
  suffix), in a temporary sibling folder; when the block ends without an
  error they are closed and moved into `folder` (created if missing), and
  in any case the temporary folder is deleted.
  """
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-",
                                  dir=folder.parent))
  try:
    with contextlib.ExitStack() as stack:
      yield {name.removesuffix(".extxyz"):
             stack.enter_context(open(tmp_dir / name, "w"))
             for name in names}
    folder.mkdir(exist_ok=True)
    for name in names:
      os.replace(tmp_dir / name, folder / name)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def results_in_order(fn, jobs: list, workers: int | None) -> Iterator:
  """`fn(job)` for every job, in order, from up to `workers` processes
  (default `os.cpu_count()`; one runs them here).

  Results come back in order, so that the output does not depend on the
  worker count, and they are written while later jobs run.
  """
  workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
  if workers > 1:
    with contextlib.closing(processes.ordered_map(fn, jobs,
                                                  workers)) as results:
      yield results
  else:
    yield map(fn, jobs)


def generate_raw(raw_dir: str | os.PathLike, *, seed: int = 0,
                 num_systems: int | None = None, workers: int | None = None,
                 progress: bool = True) -> dict:
  """Generates the dev set as extended-XYZ files.

  Writes `s2ef_{train,val}.extxyz` (one entry per frame, with `sid` and
  `fid` in `info`) and `is2re_{train,val}.extxyz` (one entry per
  system: initial structure, energy and forces, with `energy_relaxed` in
  `info` and `positions_relaxed` in `arrays`). Every entry carries
  its `tags` and `FixAtoms` constraint (written as `move_mask`).
  The files are written to a temporary sibling folder and moved into
  `raw_dir` once all of them are complete.

  Args:
    raw_dir: Output folder; created if missing.
    seed: Seed of the dev set; the same seed gives identical files.
    num_systems: Number of systems; defaults to `DEFAULT_NUM_SYSTEMS`.
    workers: Worker processes; defaults to `os.cpu_count()`.
    progress: Whether to show a progress bar.

  Returns:
    Counts keyed by file stem (`s2ef_train`: frames, `is2re_val`:
    systems, ...) and the elapsed time as `seconds`.
  """
  start = time.perf_counter()
  num_systems = DEFAULT_NUM_SYSTEMS if num_systems is None else num_systems
  split = split_systems(num_systems, seed)
  counts = {name.removesuffix(".extxyz"): 0 for name in RAW_FILES}
  jobs = [(seed, index) for index in range(num_systems)]
  with (staged_files(Path(raw_dir), RAW_FILES) as files,
        results_in_order(_run_system, jobs, workers) as results):
    for index, result in enumerate(tqdm(
            results, total=num_systems, desc="devset", unit="system",
            disable=not progress)):
      for task, images in (("s2ef", result["s2ef"]),
                           ("is2re", [result["is2re"]])):
        key = f"{task}_{split[index]}"
        ase.io.write(files[key], images, format="extxyz")
        counts[key] += len(images)
  counts["seconds"] = time.perf_counter() - start
  return counts


def begin_build(marker: Path, overwrite: bool) -> None:
  """Starts a build whose completion `marker` records.

  Raises:
    FileExistsError: If the marker is there and `overwrite` is false.
  """
  if marker.exists():
    if not overwrite:
      raise FileExistsError(
          f"{marker.parent} already holds a dev set; pass --overwrite "
          "(overwrite=True) to rebuild it.")
    # Drop the marker first so an interrupted rebuild is not taken for a
    # complete dev set.
    marker.unlink()


def finish_build(marker: Path, record: dict) -> None:
  """Writes the marker of a complete build (atomically)."""
  tmp = marker.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  os.replace(tmp, marker)


def read_marker(marker: Path) -> dict | None:
  """The record of a complete build, or None."""
  try:
    record = json.loads(marker.read_text())
  except (OSError, ValueError):  # Absent, or cut short by a crash.
    return None
  return record if isinstance(record, dict) else None


def build_devset(output_dir: str | os.PathLike, *, seed: int = 0,
                 num_systems: int | None = None, workers: int | None = None,
                 graph_spec: GraphSpec = DEVSET_GRAPH_SPEC,
                 overwrite: bool = False, progress: bool = True) -> dict:
  """Generates the dev set and converts it to the training format.

  Produces `output_dir/raw` (extended XYZ, see `generate_raw`),
  `output_dir/s2ef` and `output_dir/is2re` (converted datasets), and
  finally `output_dir/devset.json`, whose presence marks a complete
  dev set.

  Args:
    output_dir: Folder of the dev set.
    seed: Seed of the dev set.
    num_systems: Number of systems; defaults to `DEFAULT_NUM_SYSTEMS`.
    workers: Worker processes; defaults to `os.cpu_count()`.
    graph_spec: Graph edges and point clouds the converter stores (the
      trainer takes only representation "both", see `is_built`).
    overwrite: Rebuild even if `output_dir` holds a complete dev set.
    progress: Whether to show progress bars.

  Returns:
    The counts and timing of `generate_raw`, plus the total
    elapsed time as `total_seconds`.

  Raises:
    FileExistsError: If `output_dir` holds a complete dev set and
      `overwrite` is false.
  """
  # Imported here: the relaxation workers, which import this module, do not
  # need the converter's heavier dependencies.
  from matsci_jax.data import converter

  start = time.perf_counter()
  output_dir = Path(output_dir)
  marker = output_dir / MARKER
  begin_build(marker, overwrite)

  raw = output_dir / "raw"
  summary = generate_raw(raw, seed=seed, num_systems=num_systems,
                         workers=workers, progress=progress)
  for task in ("s2ef", "is2re"):
    converter.convert(
        inputs={split: [str(raw / f"{task}_{split}.extxyz")]
                for split in SPLITS},
        output=str(output_dir / task), task=task, graph_spec=graph_spec,
        # Without the marker any converted folder here is from an
        # interrupted build (or overwrite was asked for): replace it.
        workers=workers, overwrite=True, progress=progress,
        name=f"devset_{task}")
  summary["total_seconds"] = time.perf_counter() - start

  record = {"seed": seed, "num_systems": num_systems or DEFAULT_NUM_SYSTEMS,
            "cutoff": graph_spec.cutoff,
            "max_neighbors": graph_spec.max_neighbors,
            "representation": graph_spec.representation, "version": VERSION,
            **summary}
  finish_build(marker, record)
  return summary


def is_built(output_dir: str | os.PathLike, num_systems: int) -> bool:
  """Whether `output_dir` holds a complete dev set the trainer can use.

  That is one of `num_systems` systems, built at the current `VERSION`
  with both representations (so that every model trains on it).
  """
  record = read_marker(Path(output_dir) / MARKER)
  if record is None:
    return False
  built = (record.get("num_systems"), record.get("representation"),
           record.get("version"))
  return built == (num_systems, "both", VERSION)
