"""Tasks: what a model is trained to predict, and everything that follows.

A `Task` owns its targets, the checks that a split and a batch carry them,
the normaliser, the loss, the evaluation step, the metrics it reports and
its trivial baselines. A new target (stress, several sources) is a change
to this object; the training job only calls it.

* S2EF (structure to energy and forces): the energy of every frame and the
  forces, as `-jax.grad` of the energy, inside the training step.
* IS2RE (initial structure to relaxed energy): one energy per structure,
  a direct regression without forces.

Stress, the strain derivative of the energy, joins S2EF's targets when the
data has it (`Task.for_data`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from matsci_jax import train_step
from matsci_jax.data.dataset_io import DatasetError, Split
from matsci_jax.energy import Normalizer

# Reported for every task, from `train_step.make_eval_step`'s sums.
_ENERGY_METRICS = ("energy_mae", "energy_per_atom_mae", "ewt", "loss")
_FORCE_METRICS = ("force_mae", "force_cos", "efwt")
_STRESS_METRICS = ("stress_mae",)


@dataclasses.dataclass(frozen=True)
class Task:
  """A training target and its metrics.

  Attributes:
    name: "s2ef" or "is2re", as datasets and `config.data.task` name it.
    energy_target: the per-structure energy field ("energy" or
      "energy_relaxed").
    forces: whether forces are a target (and the model gives them).
    stress: whether stress is a target (then forces are too).
  """
  name: str
  energy_target: str
  forces: bool
  stress: bool = False

  @property
  def targets(self) -> tuple[str, ...]:
    """Fields every labelled structure carries."""
    return ((self.energy_target,) + (("forces",) if self.forces else ())
            + (("stress",) if self.stress else ()))

  @property
  def metrics(self) -> tuple[str, ...]:
    """Names of the metrics an evaluation split reports."""
    return (_ENERGY_METRICS + (_FORCE_METRICS if self.forces else ())
            + (_STRESS_METRICS if self.stress else ()))

  def for_data(self, *, forces: bool | None = None,
               stress: bool = False) -> "Task":
    """This task on data with (or without) forces and stress: stress is a
    target of a force task whose data has it; a source without forces
    (energies only) trains on its energies."""
    forces = self.forces if forces is None else forces and self.forces
    task = dataclasses.replace(self, forces=forces,
                               stress=bool(stress and forces))
    return self if task == self else task

  def check_split(self, split: Split, folder: str) -> None:
    """Raises DatasetError when `split` lacks a target (a test split)."""
    missing = [t for t in self.targets if not split.targets.get(t)]
    if missing:
      raise DatasetError(
          f"{folder}: split {split.name!r} has no {' / '.join(missing)} "
          "targets (a test split?); train and evaluate on labelled splits")

  def check_references(self, normalizer: Normalizer, splits: list[Split],
                       folder: str) -> None:
    """Raises DatasetError when adsorbate-only references (a
    structure-level model on OC20-tagged data) meet untagged splits."""
    if normalizer.reference_tag < 0:
      return
    untagged = [s.name for s in splits if "adsorbate_fit" not in
                (s.statistics.get(self.energy_target) or {})]
    if untagged:
      raise DatasetError(
          f"{folder}: the train split is OC20-tagged, so this "
          "structure-level model adds reference energies for adsorbate "
          f"atoms (tag 2) only, but split(s) {', '.join(untagged)} have "
          "structures without OC20 tags (0, 1, 2), whose energies would "
          "lack those references; convert all splits with tags")

  def target_check(self, split: str) -> Callable:
    """A batch transform that rejects non-finite targets, naming the
    structure (see `TargetCheck`)."""
    return TargetCheck(self.targets, split)

  def normalizer(self, statistics: dict, model) -> Normalizer:
    """The normaliser of `model`'s outputs from training statistics."""
    return Normalizer.from_statistics(statistics, self.energy_target,
                                      per_graph=model.per_graph_output)

  def make_loss(self, model, normalizer: Normalizer, loss_config) -> Callable:
    """`loss_fn(params, batch, counts=None) -> (loss, aux)`."""
    if self.forces:
      return train_step.make_s2ef_loss(model, normalizer, loss_config,
                                       stress=self.stress)
    return train_step.make_energy_loss(model, normalizer, loss_config,
                                       target=self.energy_target)

  def make_eval_step(self, loss_fn: Callable,
                     free_atoms_only: bool = True) -> Callable:
    """`eval_step(params, batch) -> metric sums` (see `metrics`)."""
    return train_step.make_eval_step(loss_fn, free_atoms_only,
                                     self.energy_target)

  def baselines(self, split: Split, train_statistics: dict,
                free_atoms_only: bool = True) -> dict[str, float]:
    """Errors of trivial predictors on a split, for comparison.

    "mean_energy_mae": predict the training mean energy; with forces,
    "zero_force_mae": predict zero forces (on the atoms the loss counts);
    with stress, "zero_stress_mae".
    """
    key = self.energy_target
    mean = (train_statistics[key]["mean"] if train_statistics.get(key)
            else 0.0)
    e_err, f_abs, f_n, s_abs = [], 0.0, 0, 0.0
    for i in range(len(split)):
      ex = split.source[i]
      e_err.append(abs(float(ex[key]) - mean))
      if self.forces:
        m = (~ex["fixed"] if free_atoms_only
             else np.ones(len(ex["fixed"]), bool))
        f_abs += float(np.abs(ex["forces"][m]).sum())
        f_n += 3 * int(m.sum())
      if self.stress:
        s_abs += float(np.abs(ex["stress"]).mean())
    out = {"mean_energy_mae": float(np.mean(e_err))}
    if self.forces:
      out["zero_force_mae"] = f_abs / max(f_n, 1)
    if self.stress:
      out["zero_stress_mae"] = s_abs / max(len(split), 1)
    return out


class TargetCheck:
  """Batch transform that rejects NaN or infinite targets of real
  structures with the structure named (sid, fid)."""

  def __init__(self, targets: tuple[str, ...], split: str):
    self.targets = targets
    self.split = split

  def __call__(self, batch):
    g = batch.globals
    if g["mask"].ndim > 1:  # One batch per device (and micro-batch).
      for i in range(g["mask"].shape[0]):
        self(jax.tree_util.tree_map(lambda x, i=i: x[i], batch))
      return batch
    for key in self.targets:
      if key in g:
        labelled = g["mask"] & g.get(f"has_{key}", True)
        bad = labelled & ~np.isfinite(g[key]).reshape(len(labelled), -1).all(
            axis=-1)
      else:
        per_atom = (~np.isfinite(batch.nodes[key]).all(axis=-1)
                    & batch.nodes["mask"])
        if f"has_{key}" in g:  # Sources without forces store none.
          per_atom &= g[f"has_{key}"][batch.nodes["graph"]]
        bad = np.zeros_like(g["mask"])
        bad[np.unique(batch.nodes["graph"][per_atom])] = True
      if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(
            f"split {self.split!r}: structure sid={int(g['sid'][i])} "
            f"fid={int(g['fid'][i])} has a NaN or infinite {key} target")
    return batch


S2EF = Task("s2ef", energy_target="energy", forces=True)
IS2RE = Task("is2re", energy_target="energy_relaxed", forces=False)
TASKS = {t.name: t for t in (S2EF, IS2RE)}


def get(name: str) -> Task:
  """The task called `name` ("s2ef" or "is2re")."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of "
                     f"{', '.join(TASKS)}")
  return TASKS[name]
