"""A trained model as an ASE calculator.

    from matsci_jax.ase import Calculator
    atoms.calc = Calculator("runs/my_run")
    ase.optimize.FIRE(atoms).run(fmax=0.05)

The calculator rebuilds the structure's graph (or point cloud) at every
call, with the cutoff and neighbour cap the model was trained with, and pads
it to a size on a ladder of buckets (`batching.bucket_budget`): the jitted
energy-and-forces function compiles once per bucket, so a relaxation, whose
edge count drifts a little, compiles once or twice, not at every step.
"""

from __future__ import annotations

import jax
import numpy as np
from ase.calculators import calculator as ase_calculator

from matsci_jax import checkpoints
from matsci_jax.data import batching


class Calculator(ase_calculator.Calculator):
  """Energy (eV) and forces (eV/Å) of a trained model for any `ase.Atoms`.

  Periodic or not; fixed atoms (`FixAtoms`) get forces like the others, and
  ASE's constraints zero them in optimisers, as for any calculator. A model
  trained on IS2RE predicts relaxed energies, which have no forces: it gives
  "energy" only.

  Args:
    model: a training workdir or checkpoint path (see `checkpoints.load`),
      or a loaded `checkpoints.Trained`.
    checkpoint, precision: passed to `checkpoints.load` for a path.
    node_multiple, edge_multiple, growth: the padding ladder (see
      `batching.bucket_budget`).
  """

  def __init__(self, model, *, checkpoint: str | int = "best",
               precision: str | None = None, node_multiple: int = 16,
               edge_multiple: int = 256, growth: float = 1.25, **kwargs):
    super().__init__(**kwargs)
    self.trained = (model if isinstance(model, checkpoints.Trained) else
                    checkpoints.load(model, checkpoint=checkpoint,
                                     precision=precision))
    self._ladder = dict(node_multiple=node_multiple,
                        edge_multiple=edge_multiple, growth=growth)
    if self.trained.task.forces:
      self.implemented_properties = ["energy", "free_energy", "forces"]
      self._fn = jax.jit(self.trained.energy_and_forces)
    else:
      self.implemented_properties = ["energy", "free_energy"]
      energy_fn = self.trained.energy_fn
      self._fn = jax.jit(lambda p, g: (energy_fn(p, g), None))
    self.budgets: set[batching.Budget] = set()  # One compilation each.

  def get_property(self, name, atoms=None, allow_calculation=True):
    if name not in self.implemented_properties and name == "forces":
      raise ase_calculator.PropertyNotImplementedError(
          f"the model in {self.trained.workdir} was trained on "
          f"{self.trained.task.name.upper()} (relaxed energies), which has no "
          "forces")
    return super().get_property(name, atoms, allow_calculation)

  def calculate(self, atoms=None, properties=("energy",),
                system_changes=ase_calculator.all_changes):
    super().calculate(atoms, properties, system_changes)
    example = self.trained.example(self.atoms)
    budget = batching.bucket_budget([example], **self._ladder)
    self.budgets.add(budget)
    graph = batching.collate([example], budget)
    energies, forces = jax.device_get(self._fn(self.trained.params, graph))
    energy = float(energies[0])
    self.results = {"energy": energy, "free_energy": energy}
    if forces is not None:
      self.results["forces"] = np.asarray(forces[:len(self.atoms)],
                                          np.float64)
