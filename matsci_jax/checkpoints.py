"""A training run's folder: written and read back here, side by side.

    runs/<name>/
      model.json      model config, task, normaliser, graph settings, dataset
      config.json     the run's full config
      checkpoints/    orbax: the latest few training states and data positions
      best/           orbax: the best state by `config.train.best_metric`
      metrics.json    final metrics; metrics.csv, tensorboard/ (monitoring)

`RunFolder` writes and reads the JSON files, `Checkpoints` saves and
restores training states, and `load` turns a folder into a `Trained` model
on one device, whatever mesh or device count wrote it:

    trained = checkpoints.load("runs/20261201-120000")
    energies, forces = trained.energy_and_forces(trained.params, graph)

Each saved step records a CRC-32 of every array of its state (in orbax's
`_CHECKPOINT_METADATA` of the step, written with it); a restore compares
them. A step that does not restore whole (unreadable, missing files,
changed bytes) is skipped for the next newest one, with a
`DamagedCheckpointWarning` naming it and why (see `checkpoint_integrity`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from matsci_jax import checkpoint_integrity as integrity
from matsci_jax import models, tasks
from matsci_jax.config_checks import best_metric_terms, best_metric_value
from matsci_jax.checkpoint_integrity import (  # noqa: F401  (public here)
    CheckpointError, DamagedCheckpointWarning)
from matsci_jax.models import precision as precision_lib
from matsci_jax.data.ase_reader import structure_from_atoms
from matsci_jax.data.graph_spec import GraphSpec
from matsci_jax.data.structure import Structure
from matsci_jax.energy import (Normalizer, make_atom_energies_fn,
                               make_energy_and_forces_fn, make_energy_fn,
                               make_energy_forces_stress_fn, split_edges)

MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
RESULT_FILE = "metrics.json"
LATEST_DIR = "checkpoints"
BEST_DIR = "best"
_MODEL_FIELDS = ("model", "task", "normalizer", "cutoff")
DAMAGED_SUFFIX = ".damaged"


class UnseenElementError(ValueError):
  """A structure holds an element the model never saw in training."""


class UnseenElementWarning(UserWarning):
  """A structure holds an element the model never saw in training."""


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


def _write_json(path: str, obj) -> None:
  """Whole or not at all: a reader never sees half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


class RunFolder:
  """The files of one training run.

  Only process 0 writes the JSON files (`writer`); every process reads.
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))
    self.writer = jax.process_index() == 0

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def create(self) -> "RunFolder":
    os.makedirs(self.path, exist_ok=True)
    return self

  def write_model(self, model_config, task: tasks.Task,
                  normalizer: Normalizer, graph_spec: GraphSpec,
                  dataset: str, num_params: int,
                  elements: Sequence[int] | None = None,
                  sources: Sequence[tuple[str, str]] = ()) -> None:
    """What `load` needs to rebuild the model and its inputs, and the
    atomic numbers its training data held.

    `sources`: (name, dataset folder) of each data source of a run with
    several; the normaliser then holds one entry per source, in order.
    """
    if self.writer:
      _write_json(self.file(MODEL_FILE), {
          "model": model_config.to_dict(), "task": task.name,
          "stress": task.stress,
          "normalizer": normalizer.to_dict(), "dataset": dataset,
          "sources": [{"name": n, "dataset": d} for n, d in sources],
          **graph_spec.to_dict(), "num_params": num_params,
          "elements": None if elements is None else sorted(
              int(z) for z in elements)})

  def read_model(self) -> dict:
    """model.json, with its graph settings as `graph_spec` and its task as
    a `tasks.Task`."""
    path = self.file(MODEL_FILE)
    info = _read_json(path)
    missing = [k for k in _MODEL_FIELDS if k not in info]
    if missing:
      raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    info["graph_spec"] = GraphSpec.from_dict(info)
    info["task"] = tasks.get(info["task"]).for_data(
        stress=info.get("stress", False))
    info["sources"] = tuple(s["name"] for s in info.get("sources") or ())
    return info

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    if self.writer:
      tmp = self.file(CONFIG_FILE) + ".tmp"
      with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=1))
      os.replace(tmp, self.file(CONFIG_FILE))

  def read_config(self) -> ml_collections.ConfigDict:
    """The run's config (empty when the run did not record it)."""
    path = self.file(CONFIG_FILE)
    return ml_collections.ConfigDict(
        _tuples(_read_json(path)) if os.path.exists(path) else {})

  def write_result(self, result: dict) -> None:
    if self.writer:
      _write_json(self.file(RESULT_FILE), result)

  def checkpoints(self, keep: int, best_metric: str) -> "Checkpoints":
    return Checkpoints(self.path, keep, best_metric)


class Checkpoints:
  """Saves and restores training states in a run folder.

  `checkpoints/` keeps the latest `keep` states with the data iterator's
  position (so a resumed run reads the same batches); `best/` keeps the
  state with the lowest `best_metric` among evaluated steps. Every process
  calls `save` (arrays are written by the processes that hold them).

  Saves run in the background: a save that fails (a full disk) raises a
  `CheckpointError` from the next `save` or from `wait`. Each step records
  the CRC-32 of the arrays that process 0 holds whole (all of them, on one
  process); restores compare them.
  """

  def __init__(self, workdir: str, keep: int, best_metric: str):
    integrity.quiet_orbax_noise()
    self.best_metric = best_metric
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, LATEST_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True,
            best_fn=lambda m: best_metric_value(best_metric, m),
            best_mode="min"),
        item_names=("state",))
    self._saving = {}  # manager -> the step it may still be writing
    self._reported_disk_full = False

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def _restore(self, step: int, state: Any) -> tuple[Any, Any]:
    saved = integrity.saved_checksums(
        os.path.join(self.latest.directory, str(step)), "state")
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
    integrity.verify(restored.state, saved)
    return restored.state, restored.data

  def restore(self, step: int, state: Any) -> tuple[Any, Any]:
    """(state, data position) of `step`, in the shardings of `state`
    (restoring into them reshards a checkpoint written on another mesh).

    Raises:
      CheckpointError: the step does not restore whole; says why.
    """
    _, restored, _ = integrity.first_that_restores(
        str(self.latest.directory), [step], lambda s: self._restore(s, state))
    return restored

  def restore_latest(self, state: Any) -> tuple[int, Any, Any] | None:
    """(step, state, data position) of the newest checkpoint that restores
    whole, None when there is none.

    Newer ones that do not restore are named in a
    `DamagedCheckpointWarning` and renamed to `<step>.damaged` (orbax
    would otherwise not save those steps again).

    Raises:
      CheckpointError: there are checkpoints but none restores.
    """
    steps = self.latest.all_steps()
    if not steps:
      return None
    folder = str(self.latest.directory)
    step, (host, data), skipped = integrity.first_that_restores(
        folder, sorted(steps, reverse=True),
        lambda s: self._restore(s, state),
        "\nMove the folder away to start the run afresh.")
    moved = self._set_aside(folder, [s for s, _ in skipped])
    integrity.warn_skipped(folder, skipped, step,
                  lambda s: f"; moved to {moved[s]}" if s in moved else "")
    return step, host, data

  def _set_aside(self, folder: str, steps: list[int]) -> dict[int, str]:
    moved = {}
    if steps and jax.process_index() == 0:
      for step in steps:
        path = os.path.join(folder, str(step))
        target, k = path + DAMAGED_SUFFIX, 1
        while os.path.exists(target):
          k += 1
          target = f"{path}{DAMAGED_SUFFIX}{k}"
        os.rename(path, target)
        moved[step] = target
    if steps:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("matsci_jax damaged checkpoints")
      self.latest.reload()
    return moved

  def _guard(self, manager, step, call) -> None:
    """Runs `call`; a full disk becomes one `CheckpointError` (once: the
    other manager's save fails for the same reason)."""
    try:
      call()
    except Exception as e:
      if not integrity.is_disk_full(e):
        raise
      if self._reported_disk_full:
        return
      self._reported_disk_full = True
      for other in (self.latest, self.best):
        try:  # Left running, it would fail again as the process exits.
          other.wait_until_finished()
        except Exception:  # The same full disk, or an error already seen.
          pass
      raise integrity.disk_full_error(str(manager.directory), step,
                             self.latest.latest_step()) from None

  def _finish(self, manager) -> None:
    """Waits for the background save of `manager`, which may fail."""
    self._guard(manager, self._saving.pop(manager, None),
                manager.wait_until_finished)

  def _save(self, manager, step: int, args, **kwargs) -> None:
    self._finish(manager)
    self._saving[manager] = step
    self._guard(manager, step,
                lambda: manager.save(step, args=args, **kwargs))

  def save(self, step: int, state: Any, data: Any,
           eval_results: dict | None = None) -> None:
    """Saves `state` and the data position; also as the best state when
    `eval_results` hold the best metric.

    Raises:
      CheckpointError: this or the previous save ran out of disk space.
    """
    # Hashed now, from the arrays being saved: orbax writes the step's
    # metadata (process 0) in the background with the arrays.
    metadata = integrity.checksums(state) if jax.process_index() == 0 else None
    self._save(self.latest, step, ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
        custom_metadata=metadata)
    if eval_results and all(name in eval_results for _, name in
                            best_metric_terms(self.best_metric)):
      if jax.process_count() > 1:
        # Two managers finishing at once across processes can meet in the
        # same orbax barrier ("already ongoing") and time out.
        self._finish(self.latest)
      self._save(self.best, step, ocp.args.Composite(
          state=ocp.args.StandardSave(state)), metrics=eval_results,
          custom_metadata=metadata)

  def wait(self) -> None:
    """Waits for both background saves.

    Raises:
      CheckpointError: one ran out of disk space.
    """
    errors = []
    for manager in (self.latest, self.best):
      try:
        self._finish(manager)
      except Exception as e:  # The other still has to be waited for.
        errors.append(e)
    if errors:
      raise errors[0]

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model, ready to predict.

  Attributes:
    model: the Flax module (its `dtype` follows the requested precision).
    params: model variables ({"params": ...}), on one device.
    normalizer: maps model outputs to energies in eV.
    config: the run's full config.
    task: the `tasks.Task` it was trained on.
    step: training step of the restored checkpoint.
    graph_spec: how its input graphs or point clouds are built (the
      training dataset's cutoff, neighbour cap and slots).
    dataset: the converted dataset folder it was trained on.
    workdir: the run's folder.
    elements: atomic numbers in its training data (None: not recorded).
      Others have a reference energy of zero and an untrained embedding:
      `example` warns once per such element.
    sources: names of the data sources of a run with several (their
      energies have different zeros, and may have their own heads).
    source: the index of the source whose energies it predicts (see
      `for_source`).
    mesh: devices its energy functions split each batch's edges over (see
      `on_devices`); None: one device.
  """
  model: Any
  params: Any
  normalizer: Normalizer
  config: ml_collections.ConfigDict
  task: tasks.Task
  step: int
  graph_spec: GraphSpec
  dataset: str
  workdir: str
  elements: tuple[int, ...] | None = None
  sources: tuple[str, ...] = ()
  source: int = 0
  mesh: Any = None
  _warned: set = dataclasses.field(default_factory=set, init=False,
                                   repr=False, compare=False)

  def example(self, structure, strict: bool = False) -> dict:
    """A structure as the stored example this model reads.

    Args:
      structure: `ase.Atoms` or `matsci_jax.data.structure.Structure`.
      strict: an element absent from the training data is an error
        (`UnseenElementError`) instead of a warning.

    Returns:
      Its graph or point cloud (`graph_spec`), as `batching.collate`
      takes it.
    """
    if not isinstance(structure, Structure):
      structure = structure_from_atoms(structure, "<atoms>", 0)
    self._check_elements(structure, strict)
    return self.graph_spec.example(structure, self.task.name)

  def _check_elements(self, structure: Structure, strict: bool) -> None:
    if self.elements is None:
      return
    unseen = sorted(set(structure.atomic_numbers.tolist())
                    - set(self.elements))
    if not unseen:
      return
    message = (f"element(s) Z={unseen} in {structure.source[0]}, entry "
               f"{structure.source[1]!r} never appeared in the training "
               f"data of {self.workdir}: their reference energies are zero "
               "and their embeddings untrained, so predictions for them "
               "mean little")
    if strict:
      raise UnseenElementError(message)
    new = [z for z in unseen if z not in self._warned]
    if new:
      self._warned.update(new)
      warnings.warn(message, UnseenElementWarning, stacklevel=3)

  def for_source(self, name: str) -> "Trained":
    """This model predicting the energies of data source `name` (its
    reference energies, normaliser and head).

    Raises:
      ValueError: the model has no source of that name.
    """
    if name not in self.sources:
      raise ValueError(
          f"the model in {self.workdir} has no data source {name!r}; it has "
          f"{', '.join(map(repr, self.sources)) or 'none (one dataset)'}")
    return dataclasses.replace(self, source=self.sources.index(name))

  def on_devices(self, mesh: jax.sharding.Mesh | None = None,
                 edge_chunk: int = 0) -> "Trained":
    """This model for structures too large for one device or one pass.

    Args:
      mesh: split each batch's edges over the devices of this mesh, atoms
        replicated (`energy.shard_edges`); None: one device.
      edge_chunk: edges per chunk of each layer's edge work on a device, to
        bound its memory (`EnergyModel.edge_chunk`); 0: all at once.

    Results equal the one-device ones up to floating-point rounding.
    """
    params = self.params
    if mesh is not None:  # Replicated on the mesh's devices.
      params = jax.device_put(params, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))
    return dataclasses.replace(
        self, model=self.model.clone(edge_chunk=int(edge_chunk)),
        params=params, mesh=mesh)

  def place(self, graph):
    """A padded batch of numpy arrays placed for the energy functions: its
    edges split over `mesh` (`energy.split_edges`); unchanged without one."""
    if self.mesh is None:
      return graph
    return split_edges(graph, self.model, self.mesh)

  def _on_source(self, fn: Callable) -> Callable:
    """`fn` with each batch's structures marked as `source`'s, unless
    the batch names its sources."""
    if not self.sources:
      return fn
    index = self.source

    def on_source(params, graph, *args):
      if "source" not in graph.globals:
        mask = graph.globals["mask"]
        graph = graph._replace(globals=dict(
            graph.globals, source=jnp.full(mask.shape, index, jnp.int32)))
      return fn(params, graph, *args)

    return on_source

  @property
  def energy_fn(self) -> Callable:
    """`energy_fn(params, graph) -> float32 [n_graph]` energies in eV."""
    return self._on_source(make_energy_fn(self.model, self.normalizer,
                                          mesh=self.mesh))

  @property
  def atom_energies(self) -> Callable:
    """`fn(params, graph) -> float32 [n_node]` per-atom energies in eV."""
    return self._on_source(make_atom_energies_fn(self.model,
                                                 self.normalizer))

  @property
  def energy_and_forces(self) -> Callable:
    """`fn(params, graph) -> (energies, forces)`.

    Energies are [n_graph] in eV, forces [n_node, 3] in eV/Å.
    """
    return self._on_source(make_energy_and_forces_fn(
        self.model, self.normalizer, mesh=self.mesh))

  @property
  def energy_forces_stress(self) -> Callable:
    """`fn(params, graph) -> (energies, forces, stress)`.

    Stress is [n_graph, 3, 3] in eV/Å^3 (ASE's sign convention), the
    strain derivative of the energy; zero for structures without a cell.
    """
    return self._on_source(make_energy_forces_stress_fn(
        self.model, self.normalizer, mesh=self.mesh))


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


def _restore_on_one_device(folder: str, step: int) -> dict:
  """A saved training state, whatever its shardings, on the first device,
  checked against its checksums."""
  saved = integrity.saved_checksums(os.path.join(folder, str(step)), "state")
  manager = ocp.CheckpointManager(
      folder, item_handlers={"state": ocp.StandardCheckpointHandler()})
  try:
    metadata = manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target))).state
  finally:
    manager.close()
  integrity.verify(state, saved)
  return state


def _best_first(folder: str, steps: list[int], metric: str | None):
  """Steps of `best/` by their recorded metric (lowest first), then the
  newest first where none is recorded."""
  def key(step):
    try:
      value = best_metric_value(metric, _read_json(
          os.path.join(folder, str(step), "metrics", "metrics")))
    except (CheckpointError, KeyError, TypeError, ValueError,
            AttributeError):
      value = math.inf
    return (value if math.isfinite(value) else math.inf, -step)
  return sorted(steps, key=key)


def load(path: str, *, checkpoint: str | int = "best", ema: bool = True,
         precision: str | None = None) -> Trained:
  """Loads a trained model from a workdir or one of its checkpoints.

  A checkpoint that does not restore whole (missing or unreadable files,
  bytes that differ from their saved checksums) is skipped for the next
  one, with a `DamagedCheckpointWarning` naming it and why: the next best
  in `best`, the next newest in `checkpoints`. A step asked for by number
  or by its folder is not replaced.

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
    CheckpointError: not a workdir, the checkpoint is absent, or none
      restores.
  """
  integrity.quiet_orbax_noise()
  workdir, folder, step = _locate(path)
  run = RunFolder(workdir)
  info = run.read_model()
  config = run.read_config()
  if folder is None:
    if checkpoint == "best" and _steps(run.file(BEST_DIR)):
      folder = run.file(BEST_DIR)
    else:
      folder = run.file(LATEST_DIR)
      if checkpoint not in ("best", "latest"):
        step = int(checkpoint)
  available = _steps(folder)
  if not available:
    raise CheckpointError(f"{folder} holds no checkpoints")
  hint = ""
  if step is not None:
    if step not in available:
      raise CheckpointError(
          f"{folder} has no step {step}; it has {available}")
    candidates = [step]
  elif os.path.basename(folder) == BEST_DIR:
    candidates = _best_first(folder, available,
                             (config.get("train") or {}).get("best_metric"))
    hint = (f"\nload({workdir!r}, checkpoint=\"latest\") loads the latest "
            f"training checkpoint (in {LATEST_DIR}/) instead.")
  else:
    candidates = available[::-1]
  step, state, skipped = integrity.first_that_restores(
      folder, candidates, lambda s: _restore_on_one_device(folder, s), hint)
  integrity.warn_skipped(folder, skipped, step)

  model = models.from_config(
      ml_collections.ConfigDict(_tuples(info["model"])),
      num_sources=max(len(info["sources"]), 1))
  model = precision_lib.apply(
      model, precision or config.get("precision", "float32"))
  return Trained(
      model=model, params=state["ema_params" if ema else "params"],
      normalizer=Normalizer.from_dict(info["normalizer"]), config=config,
      task=info["task"], step=step, graph_spec=info["graph_spec"],
      dataset=info.get("dataset", ""), workdir=workdir,
      elements=(None if info.get("elements") is None
                else tuple(info["elements"])), sources=info["sources"])
