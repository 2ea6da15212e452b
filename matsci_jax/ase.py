"""A trained model as an ASE calculator.

    from matsci_jax.ase import Calculator
    atoms.calc = Calculator("runs/my_run")
    ase.optimize.FIRE(atoms).run(fmax=0.05)

    # Cell and positions together (stress from the same model):
    ase.optimize.FIRE(ase.filters.FrechetCellFilter(atoms)).run(fmax=0.05)

The calculator rebuilds the structure's graph (or point cloud) at every
call, with the cutoff and neighbour cap the model was trained with, and pads
it to a size on a ladder of buckets (`batching.bucket_budget`): each jitted
function (energy and forces; energy, forces and stress) compiles once per
bucket, so a relaxation, whose edge count drifts a little, compiles once or
twice, not at every step.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from ase.calculators import calculator as ase_calculator
from ase.stress import full_3x3_to_voigt_6_stress

from matsci_jax import checkpoints
from matsci_jax.data import batching


class Calculator(ase_calculator.Calculator):
  """Energy (eV), forces (eV/Å) and stress (eV/Å^3) of a trained model for
  any `ase.Atoms`.

  Periodic or not; fixed atoms (`FixAtoms`) get forces like the others, and
  ASE's constraints zero them in optimisers, as for any calculator. A model
  trained on IS2RE predicts relaxed energies, which have no forces: it gives
  "energy" only.

  Stress is the strain derivative of the model's energy (see
  `energy.make_energy_forces_stress_fn`), in ASE's sign convention and
  Voigt order (xx, yy, zz, yz, xz, xy). Any model with forces gives it,
  whether or not it was trained on stress, for structures periodic in all
  three directions. It is computed only when asked for (ASE's cell filters
  ask at every step, before the forces): one backward pass then gives
  forces and stress.

  Args:
    model: a training workdir or checkpoint path (see `checkpoints.load`),
      or a loaded `checkpoints.Trained`.
    checkpoint, precision: passed to `checkpoints.load` for a path.
    source: for a model trained on several data sources
      (`Trained.sources`), the name of the one whose energies to predict:
      sources have different energy zeros and may have their own heads.
      Default: the model's own choice, which for a freshly loaded model is
      its first source (`Trained.sources[0]`).
    node_multiple, edge_multiple, growth: the padding ladder (see
      `batching.bucket_budget`); point-cloud edge sizes are also multiples
      of the model's slots per centre.
    mesh: a `jax.sharding.Mesh` to split each structure's edges over (for
      structures whose edges do not fit one device; see
      `Trained.on_devices`); None: one device.
    edge_chunk: edges per chunk of each layer's edge work, bounding memory
      on a device (`EnergyModel.edge_chunk`); 0: all at once.

  Raises:
    ValueError: `source` is not one of the model's sources.
  """

  def __init__(self, model, *, checkpoint: str | int = "best",
               precision: str | None = None, source: str | None = None,
               node_multiple: int = 16, edge_multiple: int = 256,
               growth: float = 1.25, mesh=None, edge_chunk: int = 0,
               **kwargs):
    super().__init__(**kwargs)
    trained = (model if isinstance(model, checkpoints.Trained) else
               checkpoints.load(model, checkpoint=checkpoint,
                                precision=precision))
    if source is not None:
      trained = trained.for_source(source)
    if mesh is not None or edge_chunk:
      trained = trained.on_devices(mesh, edge_chunk)
    self.trained = trained
    slots = self.trained.graph_spec.edge_multiple
    self._ladder = dict(
        node_multiple=node_multiple,
        edge_multiple=edge_multiple * slots // math.gcd(edge_multiple, slots),
        growth=growth)
    # One jitted function per kind of result, each compiled once per bucket.
    if self.trained.task.forces:
      self.implemented_properties = ["energy", "free_energy", "forces",
                                     "stress"]
      self._fns = {"forces": jax.jit(self.trained.energy_and_forces),
                   "stress": jax.jit(self.trained.energy_forces_stress)}
    else:
      self.implemented_properties = ["energy", "free_energy"]
      energy_fn = self.trained.energy_fn
      self._fns = {"energy": jax.jit(lambda p, g: (energy_fn(p, g),))}
    self.budgets: set[batching.Budget] = set()  # One compilation each.

  def get_property(self, name, atoms=None, allow_calculation=True):
    if name not in self.implemented_properties and name in ("forces",
                                                             "stress"):
      raise ase_calculator.PropertyNotImplementedError(
          f"the model in {self.trained.workdir} was trained on "
          f"{self.trained.task.name.upper()} (relaxed energies), which has no "
          "forces and no stress")
    return super().get_property(name, atoms, allow_calculation)

  def calculate(self, atoms=None, properties=("energy",),
                system_changes=ase_calculator.all_changes):
    super().calculate(atoms, properties, system_changes)
    kind = "forces" if self.trained.task.forces else "energy"
    if "stress" in properties and "stress" in self._fns:
      _check_stress_cell(self.atoms)
      kind = "stress"
    example = self.trained.example(self.atoms)
    budget = batching.bucket_budget([example], **self._ladder)
    self.budgets.add(budget)
    graph = self.trained.place(batching.collate([example], budget))
    out = jax.device_get(self._fns[kind](self.trained.params, graph))
    energy = float(out[0][0])
    self.results = {"energy": energy, "free_energy": energy}
    if len(out) > 1:
      self.results["forces"] = np.asarray(out[1][:len(self.atoms)],
                                          np.float64)
    if len(out) > 2:
      self.results["stress"] = full_3x3_to_voigt_6_stress(
          np.asarray(out[2][0], np.float64))


def _check_stress_cell(atoms) -> None:
  """Raises PropertyNotImplementedError unless `atoms` has a cell periodic
  in all three directions (stress is a derivative per unit volume)."""
  pbc = np.asarray(atoms.pbc, bool)
  rank = atoms.cell.rank
  if pbc.all() and rank == 3 and atoms.cell.volume > 0:
    return
  raise ase_calculator.PropertyNotImplementedError(
      f"stress of {atoms.get_chemical_formula()} needs a cell periodic in "
      f"all three directions, but it has pbc={pbc.tolist()} and a cell of "
      f"rank {rank}: a molecule or a slab has no volume to strain; set "
      "atoms.cell and atoms.pbc = True for a bulk structure")
