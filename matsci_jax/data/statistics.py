"""Dataset statistics the trainer needs, accumulated in one streaming pass.

For each split: histograms of atoms and edges per structure (which set the
padding budgets), energy mean/std (total and per atom), force RMS (all atoms
and free atoms), and per-element reference energies fitted by least squares,
E ~ sum_Z count_Z * ref_Z, from accumulated normal equations so that the fit
needs no second pass over the data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

NUM_ELEMENTS = 119  # Index 0 unused; Z in 1..118.


def _hist(values: np.ndarray) -> dict:
  if values.size == 0:
    return {"values": [], "counts": []}
  counts = np.bincount(values)
  nz = np.nonzero(counts)[0]
  return {"values": nz.tolist(), "counts": counts[nz].tolist()}


@dataclasses.dataclass
class _Moments:
  """Running sums for an energy-like target and its elemental fit."""
  n: int = 0
  total: float = 0.0
  total_sq: float = 0.0
  per_atom: float = 0.0
  per_atom_sq: float = 0.0
  ctc: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((NUM_ELEMENTS, NUM_ELEMENTS)))
  cty: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(NUM_ELEMENTS))
  counts_sum: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(NUM_ELEMENTS))

  def add(self, value: float, composition: np.ndarray, n_atoms: int):
    self.n += 1
    self.total += value
    self.total_sq += value * value
    self.per_atom += value / n_atoms
    self.per_atom_sq += (value / n_atoms) ** 2
    self.ctc += np.outer(composition, composition)
    self.cty += composition * value
    self.counts_sum += composition

  def summary(self) -> Optional[dict]:
    if self.n == 0:
      return None
    mean = self.total / self.n
    var = max(self.total_sq / self.n - mean * mean, 0.0)
    pa_mean = self.per_atom / self.n
    pa_var = max(self.per_atom_sq / self.n - pa_mean * pa_mean, 0.0)
    present = np.nonzero(np.diag(self.ctc) > 0)[0]
    a = self.ctc[np.ix_(present, present)]
    b = self.cty[present]
    # A tiny ridge keeps the fit defined when compositions are collinear
    # (e.g. a single stoichiometry); lstsq then gives the minimum-norm answer.
    ridge = 1e-9 * max(np.trace(a), 1.0)
    refs_present, *_ = np.linalg.lstsq(a + ridge * np.eye(len(present)), b,
                                       rcond=None)
    refs = np.zeros(NUM_ELEMENTS)
    refs[present] = refs_present
    # Residual moments from the normal equations: r = y - C @ refs.
    res_sum = self.total - refs @ self.counts_sum
    res_sq = (self.total_sq - 2 * refs @ self.cty + refs @ self.ctc @ refs)
    res_mean = res_sum / self.n
    res_var = max(res_sq / self.n - res_mean ** 2, 0.0)
    return {
        "count": self.n,
        "mean": mean,
        "std": math.sqrt(var),
        "per_atom_mean": pa_mean,
        "per_atom_std": math.sqrt(pa_var),
        "element_references": {int(z): float(refs[z]) for z in present},
        "residual_mean": res_mean,
        "residual_std": math.sqrt(res_var),
    }


class SplitStatistics:
  """Accumulates the statistics of one split, structure by structure."""

  def __init__(self):
    self.n_atoms: list[int] = []
    self.n_edges: list[int] = []
    self.n_slots: list[int] = []  # Point-cloud slots (centres x K).
    self.element_counts = np.zeros(NUM_ELEMENTS, np.int64)
    self.energy = _Moments()
    self.energy_relaxed = _Moments()
    self.force_sq = 0.0
    self.force_n = 0
    self.free_force_sq = 0.0
    self.free_force_n = 0

  def add(self, summary: dict):
    """Adds one structure's summary (see `summarize`)."""
    n = summary["n_atoms"]
    self.n_atoms.append(n)
    self.n_edges.append(summary["n_edges"])
    if summary.get("n_slots") is not None:
      self.n_slots.append(summary["n_slots"])
    comp = summary["composition"]
    self.element_counts += comp
    if summary["energy"] is not None:
      self.energy.add(summary["energy"], comp, n)
    if summary["energy_relaxed"] is not None:
      self.energy_relaxed.add(summary["energy_relaxed"], comp, n)
    if summary["force_sq"] is not None:
      self.force_sq += summary["force_sq"]
      self.force_n += 3 * n
      self.free_force_sq += summary["free_force_sq"]
      self.free_force_n += 3 * summary["n_free"]

  def sizes(self) -> np.ndarray:
    """int32 [num_structures, 2 or 3]: atoms, edges (and point-cloud slots)."""
    columns = [self.n_atoms, self.n_edges]
    if self.n_slots:
      columns.append(self.n_slots)
    return np.stack([np.asarray(c, np.int32) for c in columns],
                    axis=-1).reshape(-1, len(columns))

  def summary(self) -> dict:
    atoms = np.asarray(self.n_atoms, np.int64)
    edges = np.asarray(self.n_edges, np.int64)
    out = {
        "num_structures": int(atoms.size),
        "num_atoms": int(atoms.sum()),
        "num_edges": int(edges.sum()),
        "atoms_histogram": _hist(atoms),
        "edges_histogram": _hist(edges),
        "max_atoms": int(atoms.max(initial=0)),
        "max_edges": int(edges.max(initial=0)),
        "mean_atoms": float(atoms.mean()) if atoms.size else 0.0,
        "mean_edges": float(edges.mean()) if edges.size else 0.0,
        "max_edges_per_atom": (float((edges / atoms).max())
                               if atoms.size else 0.0),
        "element_counts": {int(z): int(c) for z, c in
                           enumerate(self.element_counts) if c},
        "energy": self.energy.summary(),
        "force_rms": (math.sqrt(self.force_sq / self.force_n)
                      if self.force_n else None),
        "free_force_rms": (math.sqrt(self.free_force_sq / self.free_force_n)
                           if self.free_force_n else None),
    }
    if self.energy_relaxed.n:
      out["energy_relaxed"] = self.energy_relaxed.summary()
    if self.n_slots:
      slots = np.asarray(self.n_slots, np.int64)
      out["point_cloud_slots_histogram"] = _hist(slots)
      out["max_point_cloud_slots"] = int(slots.max())
      out["mean_point_cloud_slots"] = float(slots.mean())
    return out


def summarize(example: dict) -> dict:
  """The per-structure numbers `SplitStatistics.add` needs (small, picklable)."""
  z = example["atomic_numbers"]
  energy = float(example["energy"])
  forces = example["forces"].astype(np.float64)
  free = ~example["fixed"]
  has_forces = bool(np.isfinite(forces).all())
  relaxed = example.get("energy_relaxed")
  return {
      "n_atoms": int(z.shape[0]),
      "n_edges": int(example["senders"].shape[0]),
      "n_slots": (int(example["pc_senders"].shape[0])
                  if "pc_senders" in example else None),
      "composition": np.bincount(z, minlength=NUM_ELEMENTS),
      "energy": energy if math.isfinite(energy) else None,
      "energy_relaxed": (float(relaxed) if relaxed is not None
                         and math.isfinite(float(relaxed)) else None),
      "force_sq": float((forces ** 2).sum()) if has_forces else None,
      "free_force_sq": (float((forces[free] ** 2).sum()) if has_forces
                        else None),
      "n_free": int(free.sum()),
  }
