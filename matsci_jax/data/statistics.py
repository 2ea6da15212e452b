"""Dataset statistics the trainer needs, accumulated in one streaming pass.

For each split: histograms of atoms and edges per structure (which set the
padding budgets), energy mean/std (total and per atom), force RMS (all atoms
and free atoms), stress RMS (`stress_rms`, over the 9 components of the
structures with stress; None without), and per-element reference energies
fitted by least squares, E ~ sum_Z count_Z * ref_Z, from accumulated normal
equations so that the fit needs no second pass over the data.

When every structure carries OC20 tags (all in 0, 1, 2), a second fit uses
only the adsorbate atoms (tag 2) plus a constant,
E ~ c + sum_Z adsorbate_count_Z * ref_Z.
OC20 energies are adsorption energies, which do not grow with the slab: the
all-atom fit then gives the slab elements small spurious references that
scale with slab size, which a structure-level (intensive) readout cannot
undo; the adsorbate fit has no such term.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

NUM_ELEMENTS = 119  # Index 0 unused; Z in 1..118.
OC20_TAGS = (0, 1, 2)


def _hist(values: np.ndarray) -> dict:
  if values.size == 0:
    return {"values": [], "counts": []}
  counts = np.bincount(values)
  nz = np.nonzero(counts)[0]
  return {"values": nz.tolist(), "counts": counts[nz].tolist()}


# Structures whose composition terms are added to the sums in one step.
_BATCH = 1024


def _running_sum(total: np.ndarray, rows: list) -> np.ndarray:
  """`total` plus the rows, added one after another.

  Adding in order (an accumulate, not a reduction, which may add pairwise)
  gives the same floating-point sums as adding structure by structure.
  """
  return np.add.accumulate(np.vstack([total[None], rows]), axis=0)[-1]


@dataclasses.dataclass
class _Moments:
  """Running sums for an energy-like target and its elemental fit.

  The sums over compositions are updated for a batch of structures at a
  time (`_flush`), which costs far less than per-structure array updates.
  """
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
  # Adsorbate fit: column 0 (no element has Z = 0) is the constant.
  n_tagged: int = 0
  ads_ctc: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((NUM_ELEMENTS, NUM_ELEMENTS)))
  ads_cty: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(NUM_ELEMENTS))
  # (composition, value, adsorbate composition or None) not yet in the sums.
  pending: list = dataclasses.field(default_factory=list, repr=False)

  def add(self, value: float, composition: np.ndarray, n_atoms: int,
          adsorbate_composition: Optional[np.ndarray] = None):
    if adsorbate_composition is not None:
      self.n_tagged += 1
    self.n += 1
    self.total += value
    self.total_sq += value * value
    self.per_atom += value / n_atoms
    self.per_atom_sq += (value / n_atoms) ** 2
    self.pending.append((composition, value, adsorbate_composition))
    if len(self.pending) >= _BATCH:
      self._flush()

  def _flush(self):
    """Adds the pending structures to the composition sums.

    Compositions are integer counts, so C^T C and the count sums are exact
    in any order; the sums with energies are added in structure order.
    """
    if not self.pending:
      return
    comps = np.array([p[0] for p in self.pending], np.float64)
    values = np.array([p[1] for p in self.pending], np.float64)[:, None]
    self.ctc += comps.T @ comps
    self.cty = _running_sum(self.cty, comps * values)
    self.counts_sum += comps.sum(axis=0)
    tagged = [k for k, p in enumerate(self.pending) if p[2] is not None]
    if tagged:
      features = np.array([self.pending[k][2] for k in tagged], np.float64)
      features[:, 0] = 1.0
      self.ads_ctc += features.T @ features
      self.ads_cty = _running_sum(self.ads_cty, features * values[tagged])
    self.pending = []

  def summary(self) -> Optional[dict]:
    if self.n == 0:
      return None
    self._flush()
    mean = self.total / self.n
    var = max(self.total_sq / self.n - mean * mean, 0.0)
    pa_mean = self.per_atom / self.n
    pa_var = max(self.per_atom_sq / self.n - pa_mean * pa_mean, 0.0)
    refs, res_mean, res_std = self._fit(self.ctc, self.cty, self.counts_sum)
    out = {
        "count": self.n,
        "mean": mean,
        "std": math.sqrt(var),
        "per_atom_mean": pa_mean,
        "per_atom_std": math.sqrt(pa_var),
        "element_references": {int(z): float(refs[z])
                               for z in np.nonzero(np.diag(self.ctc))[0]},
        "residual_mean": res_mean,
        "residual_std": res_std,
    }
    if self.n_tagged == self.n:
      # The constant column is all ones, so row 0 of C^T C holds the column
      # sums of C.
      refs, res_mean, res_std = self._fit(self.ads_ctc, self.ads_cty,
                                          self.ads_ctc[0])
      out["adsorbate_fit"] = {
          "constant": float(refs[0]),
          "element_references": {
              int(z): float(refs[z])
              for z in np.nonzero(np.diag(self.ads_ctc))[0] if z},
          "residual_mean": res_mean,
          "residual_std": res_std,
      }
    return out

  def _fit(self, ctc: np.ndarray, cty: np.ndarray, column_sums: np.ndarray):
    """Least squares y ~ C @ w from C^T C, C^T y and the column sums of C.

    Returns w and the mean and standard deviation of the residual y - C @ w.
    """
    present = np.nonzero(np.diag(ctc) > 0)[0]
    a = ctc[np.ix_(present, present)]
    # A tiny ridge keeps the fit defined when compositions are collinear
    # (e.g. a single stoichiometry); lstsq then gives the minimum-norm answer.
    ridge = 1e-9 * max(np.trace(a), 1.0)
    w_present, *_ = np.linalg.lstsq(a + ridge * np.eye(len(present)),
                                    cty[present], rcond=None)
    w = np.zeros(NUM_ELEMENTS)
    w[present] = w_present
    # Residual moments from the normal equations: r = y - C @ w.
    res_sum = self.total - w @ column_sums
    res_sq = self.total_sq - 2 * w @ cty + w @ ctc @ w
    res_mean = res_sum / self.n
    return w, res_mean, math.sqrt(max(res_sq / self.n - res_mean ** 2, 0.0))


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
    self.stress_sq = 0.0
    self.stress_n = 0

  def add(self, summary: dict):
    """Adds one structure's summary (see `summarize`)."""
    n = summary["n_atoms"]
    self.n_atoms.append(n)
    self.n_edges.append(summary["n_edges"])
    if summary.get("n_slots") is not None:
      self.n_slots.append(summary["n_slots"])
    comp = summary["composition"]
    self.element_counts += comp
    ads = summary.get("adsorbate_composition")
    if summary["energy"] is not None:
      self.energy.add(summary["energy"], comp, n, ads)
    if summary["energy_relaxed"] is not None:
      self.energy_relaxed.add(summary["energy_relaxed"], comp, n, ads)
    if summary["force_sq"] is not None:
      self.force_sq += summary["force_sq"]
      self.force_n += 3 * n
      self.free_force_sq += summary["free_force_sq"]
      self.free_force_n += 3 * summary["n_free"]
    if summary.get("stress_sq") is not None:
      self.stress_sq += summary["stress_sq"]
      self.stress_n += 9

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
        "stress_rms": (math.sqrt(self.stress_sq / self.stress_n)
                       if self.stress_n else None),
    }
    if self.energy_relaxed.n:
      out["energy_relaxed"] = self.energy_relaxed.summary()
    if self.n_slots:
      slots = np.asarray(self.n_slots, np.int64)
      out["point_cloud_slots_histogram"] = _hist(slots)
      out["max_point_cloud_slots"] = int(slots.max())
      out["mean_point_cloud_slots"] = float(slots.mean())
    return out


def _oc20_tags(tags: np.ndarray) -> bool:
  """Whether every tag is an OC20 tag (0, 1 or 2)."""
  if np.issubdtype(tags.dtype, np.integer):  # The common case, cheaper.
    return not tags.size or bool(tags.min() >= 0 and tags.max() <= 2)
  return bool(np.all(np.isin(tags, OC20_TAGS)))


def summarize(example: dict) -> dict:
  """The per-structure numbers `SplitStatistics.add` needs.

  They are small and picklable.
  """
  z = example["atomic_numbers"]
  energy = float(example["energy"])
  sq = example["forces"].astype(np.float64) ** 2
  force_sq = float(sq.sum())
  # Squares of float32 values cannot overflow a float64 sum: the sum is
  # finite exactly when every force is.
  has_forces = math.isfinite(force_sq)
  free = ~example["fixed"]
  relaxed = example.get("energy_relaxed")
  stress = example.get("stress")
  stress_sq = (float(np.sum(stress.astype(np.float64) ** 2))
               if stress is not None else math.nan)
  tags = example.get("tags")
  # Only OC20 tags (0 subsurface, 1 surface, 2 adsorbate) name adsorbates;
  # ase.build numbers slab layers 1..L, where 2 is just a layer.
  tagged = tags is not None and _oc20_tags(np.asarray(tags))
  return {
      "n_atoms": int(z.shape[0]),
      "n_edges": int(example["senders"].shape[0]),
      "n_slots": (int(example["pc_senders"].shape[0])
                  if "pc_senders" in example else None),
      "composition": np.bincount(z, minlength=NUM_ELEMENTS),
      "adsorbate_composition": (np.bincount(z[tags == 2],
                                            minlength=NUM_ELEMENTS)
                                if tagged else None),
      "energy": energy if math.isfinite(energy) else None,
      "energy_relaxed": (float(relaxed) if relaxed is not None
                         and math.isfinite(float(relaxed)) else None),
      "force_sq": force_sq if has_forces else None,
      "free_force_sq": float(sq[free].sum()) if has_forces else None,
      "n_free": int(free.sum()),
      "stress_sq": stress_sq if math.isfinite(stress_sq) else None,
  }
