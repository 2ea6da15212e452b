"""Loading a trained model from a training run's workdir.

    trained = checkpoints.load("runs/20261201-120000")
    energies, forces = trained.energy_and_forces(trained.params, graph)

A workdir (written by `train.train_and_evaluate`) holds `model.json` (model
config, task, normaliser, dataset cutoff), `config.json`, and orbax
checkpoints of the whole training state under `checkpoints/<step>` and
`best/<step>`. Loading restores one of them onto a single device, whatever
mesh or device count wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from matsci_jax import models
from matsci_jax.data import graphs
from matsci_jax.data.ase_reader import structure_from_atoms
from matsci_jax.data.structure import Structure
from matsci_jax.energy import (Normalizer, make_atom_energies_fn,
                               make_energy_and_forces_fn, make_energy_fn)

MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
PRECISIONS = ("float32", "bf16")


class CheckpointError(ValueError):
  """A path that is not a training workdir, or a checkpoint that is absent."""


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model, ready to predict.

  Attributes:
    model: the Flax module (its `dtype` follows the requested precision).
    params: model variables ({"params": ...}), on one device.
    normalizer: maps model outputs to energies in eV.
    config: the run's full config.
    task: "s2ef" or "is2re".
    step: training step of the restored checkpoint.
    cutoff: radius in Å of the dataset's graph edges, which the model expects.
    max_neighbors: the dataset's neighbour cap per atom (0: none).
    representation: "graph" or "point_cloud", what the model reads.
    point_cloud: the dataset's point-cloud settings (cutoff, num_neighbors,
      bulk_samples, seed), or None.
    dataset: the converted dataset folder it was trained on.
    workdir: the run's folder.
  """
  model: Any
  params: Any
  normalizer: Normalizer
  config: ml_collections.ConfigDict
  task: str
  step: int
  cutoff: float
  max_neighbors: int
  representation: str
  point_cloud: dict | None
  dataset: str
  workdir: str

  def example(self, structure) -> dict:
    """A structure as the stored example this model reads.

    Args:
      structure: `ase.Atoms` or `matsci_jax.data.structure.Structure`.

    Returns:
      Its graph (the dataset's cutoff and neighbour cap) or point cloud
      (the dataset's point-cloud settings), as `batching.collate` takes it.
    """
    if not isinstance(structure, Structure):
      structure = structure_from_atoms(structure, "<atoms>", 0)
    if self.representation == "point_cloud":
      pc = self.point_cloud or {}
      return graphs.example_from_structure(
          structure, pc.get("cutoff", self.cutoff), None, self.task,
          "point_cloud", pc.get("num_neighbors", 16),
          pc.get("bulk_samples", 8), pc.get("seed", 0))
    return graphs.example_from_structure(
        structure, self.cutoff, self.max_neighbors or None, self.task)

  @property
  def energy_fn(self) -> Callable:
    """`energy_fn(params, graph) -> float32 [n_graph]` energies in eV."""
    return make_energy_fn(self.model, self.normalizer)

  @property
  def atom_energies(self) -> Callable:
    """`fn(params, graph) -> float32 [n_node]` per-atom energies in eV."""
    return make_atom_energies_fn(self.model, self.normalizer)

  @property
  def energy_and_forces(self) -> Callable:
    """`fn(params, graph) -> (energies [n_graph] eV, forces [n_node, 3] eV/Å)`."""
    return make_energy_and_forces_fn(self.model, self.normalizer)


def _tuples(value):
  """JSON lists back to the tuples that configs hold (hashable fields)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from e


def _locate(path: str) -> tuple[str, str | None, int | None]:
  """(workdir, manager folder, step) for a workdir, a checkpoints or best
  folder, or one step's folder in either."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, MODEL_FILE)):
    return path, None, None
  parent = os.path.dirname(path)
  if os.path.isfile(os.path.join(parent, MODEL_FILE)):
    return parent, path, None
  grandparent = os.path.dirname(parent)
  name = os.path.basename(path)
  if name.isdigit() and os.path.isfile(os.path.join(grandparent, MODEL_FILE)):
    return grandparent, parent, int(name)
  raise CheckpointError(
      f"{path} is not a training workdir (no {MODEL_FILE} in it or above "
      "it); pass the folder given to --workdir, or a checkpoint inside it")


def _steps(folder: str) -> list[int]:
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def load(path: str, *, checkpoint: str | int = "best", ema: bool = True,
         precision: str | None = None) -> Trained:
  """Loads a trained model from a workdir or one of its checkpoints.

  Args:
    path: a training workdir, its `checkpoints` or `best` folder, or one
      step's folder in those.
    checkpoint: for a workdir, "best" (the best by validation, falling back
      to the latest when no best was saved), "latest", or a step number.
    ema: the exponential moving average of the parameters (what evaluation
      uses); False gives the raw parameters.
    precision: "float32" or "bf16" computation; default the run's.

  Returns:
    A `Trained` with parameters on the default device.

  Raises:
    CheckpointError: not a workdir, or the checkpoint is absent.
  """
  workdir, folder, step = _locate(path)
  info = _read_json(os.path.join(workdir, MODEL_FILE))
  missing = [k for k in ("model", "task", "normalizer", "cutoff")
             if k not in info]
  if missing:
    raise CheckpointError(f"{os.path.join(workdir, MODEL_FILE)} lacks "
                          f"{', '.join(missing)}")
  config_path = os.path.join(workdir, CONFIG_FILE)
  config = ml_collections.ConfigDict(
      _tuples(_read_json(config_path)) if os.path.exists(config_path) else {})
  if folder is None:
    if checkpoint == "best" and _steps(os.path.join(workdir, "best")):
      folder = os.path.join(workdir, "best")
    else:
      folder = os.path.join(workdir, "checkpoints")
      if checkpoint not in ("best", "latest"):
        step = int(checkpoint)
  available = _steps(folder)
  if not available:
    raise CheckpointError(f"{folder} holds no checkpoints")
  step = available[-1] if step is None else step
  if step not in available:
    raise CheckpointError(f"{folder} has no step {step}; it has {available}")

  manager = ocp.CheckpointManager(
      folder, item_handlers={"state": ocp.StandardCheckpointHandler()})
  metadata = manager.item_metadata(step)["state"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      metadata)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state
  manager.close()

  model = models.from_config(ml_collections.ConfigDict(_tuples(info["model"])))
  precision = precision or config.get("precision", "float32")
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got "
                     f"{precision!r}")
  if precision == "bf16":
    model = model.clone(dtype=jnp.bfloat16)
  return Trained(
      model=model, params=state["ema_params" if ema else "params"],
      normalizer=Normalizer.from_dict(info["normalizer"]), config=config,
      task=info["task"], step=step, cutoff=float(info["cutoff"]),
      max_neighbors=int(info.get("max_neighbors") or 0),
      representation=info.get("representation", "graph"),
      point_cloud=info.get("point_cloud"),
      dataset=info.get("dataset", ""), workdir=workdir)
