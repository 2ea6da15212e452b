"""Build a small dev set of strained bulk cells with stress, from ASE's EMT.

Where the slab dev set (`matsci_jax.data.devset`) has adsorption energies
and forces, this one has stress: every structure is an fcc cell of Cu, Ag,
Au, Ni, Pd, Pt or Al, or a random binary alloy of two of them (Vegard's-law
lattice constant), 8 to 32 atoms, under a random symmetric strain (a few
percent, shear included) with its atoms rattled by 0.05-0.1 Å. Its
targets are EMT's:

* total energy in eV, not referenced (no reference is subtracted);
* forces in eV/Å;
* stress in eV/Å^3, as `atoms.get_stress(voigt=False)` gives it (ASE's
  sign: positive when the cell pulls inwards).

Structures carry no OC20 tags and no fixed atoms, and are periodic in all
three directions. They are split into `train` and `val` (about 10 % val).
Structure `index` draws from `np.random.default_rng([seed, index])`, so
the output is identical for a given seed whatever the number of worker
processes.

Usage::

    from matsci_jax.data import bulk_devset
    bulk_devset.build_bulk_devset("data/bulk_devset")

or `python -m data_prep.make_devset --kind bulk --output data/bulk_devset`.
The S2EF dataset is then `data/bulk_devset/s2ef`, opened with
`matsci_jax.data.dataset_io.Dataset`, converted with the slab dev set's
graph settings (`devset.DEVSET_GRAPH_SPEC`: cutoff 6 Å, 50 neighbours,
graph edges and point clouds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, reference_states
from tqdm import tqdm

from matsci_jax.data import devset
from matsci_jax.data.graph_spec import GraphSpec

# About 1.5 s of EMT on one core, and as long again to convert.
DEFAULT_NUM_STRUCTURES = 400
METALS = devset.METALS
# (cubic cell, repeats): 8 to 32 atoms, from the 1-atom primitive cell and
# the 4-atom cubic one.
CELLS = ((False, (2, 2, 2)), (True, (2, 1, 1)), (False, (3, 2, 2)),
         (True, (2, 2, 1)), (False, (3, 3, 2)), (False, (3, 3, 3)),
         (True, (2, 2, 2)))
NORMAL_STRAIN = 0.03  # Half-width of the uniform draw of each component.
SHEAR_STRAIN = 0.02
RATTLE_SIGMA = (0.05, 0.1)  # Å, range of the standard deviation.
_CHUNK = 50  # Structures per worker job.
# A worker process starts in about the time of a few hundred structures
# (a fresh interpreter importing numpy and ASE, when the caller runs
# threads), so each worker gets at least this many or is not started.
_MIN_STRUCTURES_PER_WORKER = 500
SPLITS = devset.SPLITS
RAW_FILES = tuple(f"s2ef_{split}.extxyz" for split in SPLITS)
MARKER = "bulk_devset.json"
# Bumped whenever the generated data or their statistics change, so that
# cached copies rebuild.
VERSION = 1


def lattice_constant(symbols: list[str]) -> float:
  """fcc lattice constant in Å of a composition, by Vegard's law from
  ASE's reference lattice constants of the pure metals."""
  return float(np.mean([reference_states[atomic_numbers[s]]["a"]
                        for s in symbols]))


def make_structure(seed: int, index: int) -> Atoms:
  """Builds structure `index`, without its results.

  Pure metals and binary alloys alternate with the index, and the metal
  (the alloy's first) cycles through `METALS`, so that a small set covers
  them all; the alloy partner, its share, the cell, the strain and the
  rattling are random.

  Args:
    seed: Global seed of the dev set.
    index: Structure index (`sid`).

  Returns:
    The strained, rattled, periodic structure, with `sid` in `info`.
  """
  rng = np.random.default_rng([seed, index])
  metal = METALS[(index // 2) % len(METALS)]
  cubic, repeats = CELLS[rng.integers(len(CELLS))]
  atoms = bulk(metal, "fcc", a=1.0, cubic=cubic) * repeats
  n = len(atoms)
  symbols = [metal] * n
  if index % 2:
    partner = [m for m in METALS if m != metal][rng.integers(len(METALS) - 1)]
    count = int(rng.integers(1, n))  # At least one atom of each.
    for i in rng.choice(n, size=count, replace=False):
      symbols[i] = partner
  atoms.set_chemical_symbols(symbols)
  atoms.set_cell(atoms.cell * lattice_constant(symbols), scale_atoms=True)

  strain = np.diag(rng.uniform(-NORMAL_STRAIN, NORMAL_STRAIN, 3))
  upper = np.triu_indices(3, 1)
  strain[upper] = rng.uniform(-SHEAR_STRAIN, SHEAR_STRAIN, 3)
  strain = np.triu(strain) + np.triu(strain, 1).T
  atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
  sigma = rng.uniform(*RATTLE_SIGMA)
  atoms.positions += rng.normal(0.0, sigma, (n, 3))
  atoms.wrap()
  atoms.info["sid"] = index
  return atoms


def run_structure(seed: int, index: int) -> Atoms:
  """Structure `index` with its EMT energy, forces and stress attached."""
  atoms = make_structure(seed, index)
  atoms.calc = EMT()
  energy = atoms.get_potential_energy()
  forces = atoms.get_forces()
  stress = atoms.get_stress(voigt=False)
  atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces,
                                     stress=stress)
  return atoms


def _run_structures(args: tuple[int, int, int]) -> list[Atoms]:
  """Structures [start, stop) of seed `seed`, from `(seed, start, stop)`:
  a worker's job (one structure takes a few ms, less than sending it)."""
  seed, start, stop = args
  return [run_structure(seed, index) for index in range(start, stop)]


def generate_raw(raw_dir: str | os.PathLike, *, seed: int = 0,
                 num_structures: int = DEFAULT_NUM_STRUCTURES,
                 workers: int | None = None, progress: bool = False) -> dict:
  """Generates the dev set as extended-XYZ files.

  Writes `s2ef_train.extxyz` and `s2ef_val.extxyz` (one entry per
  structure, with `sid` in `info`), moved into `raw_dir` once both are
  complete.

  Args:
    raw_dir: Output folder; created if missing.
    seed: Seed of the dev set; the same seed gives identical files.
    num_structures: Number of structures.
    workers: Worker processes; defaults to `os.cpu_count()`, each with at
      least 500 structures (fewer are made in this process).
    progress: Whether to show a progress bar.

  Returns:
    Counts keyed by file stem (`s2ef_train`, `s2ef_val`) and the elapsed
    time as `seconds`.
  """
  start = time.perf_counter()
  if not workers:
    workers = min(os.cpu_count() or 1,
                  max(1, num_structures // _MIN_STRUCTURES_PER_WORKER))
  split = devset.split_systems(num_structures, seed)
  counts = {name.removesuffix(".extxyz"): 0 for name in RAW_FILES}
  jobs = [(seed, start, min(start + _CHUNK, num_structures))
          for start in range(0, num_structures, _CHUNK)]
  with (devset.staged_files(Path(raw_dir), RAW_FILES) as files,
        devset.results_in_order(_run_structures, jobs, workers) as results,
        tqdm(total=num_structures, desc="bulk devset", unit="structure",
             disable=not progress) as bar):
    index = 0
    for chunk in results:
      for atoms in chunk:
        key = f"s2ef_{split[index]}"
        ase.io.write(files[key], atoms, format="extxyz")
        counts[key] += 1
        index += 1
      bar.update(len(chunk))
  counts["seconds"] = time.perf_counter() - start
  return counts


def build_bulk_devset(output_dir: str | os.PathLike, *, seed: int = 0,
                      num_structures: int = DEFAULT_NUM_STRUCTURES,
                      workers: int | None = None,
                      graph_spec: GraphSpec = devset.DEVSET_GRAPH_SPEC,
                      overwrite: bool = False,
                      progress: bool = False) -> dict:
  """Generates the bulk dev set and converts it to the training format.

  Produces `output_dir/raw` (extended XYZ, see `generate_raw`),
  `output_dir/s2ef` (the converted dataset, with stress) and finally
  `output_dir/bulk_devset.json`, whose presence marks a complete dev set.

  Args:
    output_dir: Folder of the dev set.
    seed: Seed of the dev set.
    num_structures: Number of structures.
    workers: Worker processes; defaults to `os.cpu_count()`, each with at
      least 500 structures.
    graph_spec: Graph edges and point clouds the converter stores (the
      trainer takes only representation "both", see `is_built`).
    overwrite: Rebuild even if `output_dir` holds a complete dev set.
    progress: Whether to show progress bars.

  Returns:
    The counts and timing of `generate_raw`, plus the total elapsed time
    as `total_seconds`.

  Raises:
    FileExistsError: If `output_dir` holds a complete bulk dev set and
      `overwrite` is false.
  """
  # Imported here, as in `devset`: the workers do not need the converter.
  from matsci_jax.data import converter

  start = time.perf_counter()
  output_dir = Path(output_dir)
  marker = output_dir / MARKER
  devset.begin_build(marker, overwrite)
  raw = output_dir / "raw"
  summary = generate_raw(raw, seed=seed, num_structures=num_structures,
                         workers=workers, progress=progress)
  converter.convert(
      inputs={split: [str(raw / f"s2ef_{split}.extxyz")] for split in SPLITS},
      output=str(output_dir / "s2ef"), task="s2ef", graph_spec=graph_spec,
      # Without the marker a converted folder here is from an interrupted
      # build (or overwrite was asked for): replace it.
      workers=workers, overwrite=True, progress=progress,
      name="bulk_devset_s2ef")
  summary["total_seconds"] = time.perf_counter() - start
  devset.finish_build(marker, {
      "seed": seed, "num_structures": num_structures,
      "cutoff": graph_spec.cutoff, "max_neighbors": graph_spec.max_neighbors,
      "representation": graph_spec.representation, "version": VERSION,
      **summary})
  return summary


def is_built(output_dir: str | os.PathLike, num_structures: int) -> bool:
  """Whether `output_dir` holds a complete bulk dev set the trainer can use.

  That is one of `num_structures` structures, built at the current
  `VERSION` with both representations (so that every model trains on it).
  """
  record = devset.read_marker(Path(output_dir) / MARKER)
  if record is None:
    return False
  built = (record.get("num_structures"), record.get("representation"),
           record.get("version"))
  return built == (num_structures, "both", VERSION)
