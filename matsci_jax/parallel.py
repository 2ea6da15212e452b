"""Device meshes, shardings, and the train and eval steps on many devices.

A global step gives every device its own padded batch (budgets are per
device), stacked along a leading device axis: arrays of shape
[devices, ...] sharded over both mesh axes, ("data", "fsdp"). Each device
computes the loss and gradient of its own batch; the loss terms divide by
counts summed over all devices (graphs, atoms), so the step is the step on
the union of the batches, whatever the number of devices.

Parameters, their EMA and the optimizer state are replicated, or, with
FSDP (ZeRO-3), each large array is split over the "fsdp" axis along one
dimension: a device gathers a parameter where a layer reads it
(`GatherOnUse`) and keeps only its slice of the gradient (the transpose
of that gather is a reduce-scatter, right after the layer's backward
pass), and the optimizer updates each slice where it lives. In a
rematerialised layer the gather is recomputed in the backward pass, so
whole parameters need not outlive their layer; with layers scanned in
order (EGNN's `scan_layers`) per-device memory is the state's slices plus
one layer's whole parameters, however deep the model (unrolled layers
leave the compiler free to schedule otherwise, see `models/remat.py`).

Two ways to run the same step:
* "jit": one `jax.jit` with declared `NamedSharding`s for state and batch,
  the per-device work written with `jax.shard_map`;
* "pmap": the classic `jax.pmap` over one axis with replicated state.
In both, gradients are summed across devices exactly once: the per-device
gradient is taken with respect to device-local ("varying") parameters, and
one `psum` adds them (for FSDP arrays the reduce-scatter adds over "fsdp"
and a `psum` over "data" adds the rest).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from matsci_jax import _compat
from matsci_jax import train_step as train_step_lib
from matsci_jax.data import pipeline
from matsci_jax.train_state import TrainState

AXES = ("data", "fsdp")
PMAP_AXIS = "devices"


def initialize_distributed(config) -> None:
  """Starts multi-process JAX if `config.distributed.initialize` is set.

  Empty fields (address "", processes 0, process id -1) are left to JAX,
  which reads them from SLURM, Open MPI or TPU VM environments. Call it
  before anything touches the devices; a second call does nothing.
  """
  d = config.get("distributed")
  if not d or not d.initialize or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
      coordinator_address=d.coordinator_address or None,
      num_processes=d.num_processes or None,
      process_id=None if d.process_id < 0 else d.process_id)


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp") mesh; one size may be -1 (inferred).

  Axes are automatic, not explicit (the default of recent `jax.make_mesh`):
  explicit axes reject the gathers and scatters of graph networks.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [data, fsdp]
  if sizes.count(-1) > 1:
    raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if known < 1 or n % known:
      raise ValueError(f"cannot infer a mesh axis: {n} devices are not a "
                       f"multiple of {known}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n or min(sizes) < 1:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} needs "
                     f"{math.prod(sizes)} devices, but {n} are present")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(tuple(sizes), AXES, axis_types=auto, devices=devices)


def mesh_from_config(config) -> Mesh:
  """The mesh of `config.mesh` (fields `data`, `fsdp`) over all devices."""
  return make_mesh(int(config.mesh.data), int(config.mesh.fsdp))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Stacked batches: the leading (device) axis over both mesh axes."""
  return NamedSharding(mesh, P(AXES))


def fsdp_dim(shape: Sequence[int], fsdp: int, min_size: int) -> int | None:
  """The dimension an array of `shape` is split along, or None.

  The largest dimension divisible by the "fsdp" size (the last of equal
  ones, so that layers stacked along a leading axis split along their
  own dimensions where they can), for arrays of at least `min_size`
  elements: small arrays (biases, norms) stay replicated, where splitting
  would cost more in latency than it saves.
  """
  if fsdp <= 1 or math.prod(shape) < min_size:
    return None
  dims = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  return max(dims, key=lambda d: (shape[d], d)) if dims else None


def _spec(shape, fsdp: int, min_size: int) -> P:
  d = fsdp_dim(shape, fsdp, min_size)
  return P() if d is None else P(*([None] * d), "fsdp")


def state_shardings(state: Any, mesh: Mesh, fsdp: bool = False,
                    min_size: int = 2 ** 14) -> Any:
  """`NamedSharding`s for a pytree of arrays (or shape structs).

  Replicated, or with `fsdp`, large arrays split over the "fsdp" axis. The
  rule depends only on each array's shape, so parameters, their EMA and
  the optimizer's moments are split alike.
  """
  size = mesh.shape["fsdp"] if fsdp else 1
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, _spec(np.shape(x), size, min_size)),
      state)


def _specs(shardings) -> Any:
  return jax.tree_util.tree_map(lambda s: s.spec, shardings)


def _gather_dim(spec: P) -> int | None:
  for d, name in enumerate(spec):
    if name == "fsdp":
      return d
  return None


def _split_dims(param_specs) -> Any:
  """Per parameter, the dimension split over "fsdp" (None: replicated)."""
  return jax.tree_util.tree_map(_gather_dim, param_specs,
                                is_leaf=lambda x: isinstance(x, P))


class GatherOnUse(flax.struct.PyTreeNode, meta.AxisMetadata):
  """A parameter's FSDP slice, gathered whole where a module reads it.

  Flax unboxes `AxisMetadata` in `Module.param`, so the all-gather runs
  inside the layer that uses the parameter: within `nn.remat` it is
  recomputed for the backward pass instead of being kept, and its
  transpose (a reduce-scatter of the gradient) runs right after that
  layer's backward pass. A parameter read in a scan body (edge chunks) is
  gathered once per iteration: memory stays bounded, traffic grows with
  the chunks.

  Layers stacked along a leading axis (`nn.scan` over layers) remove that
  axis from their parameters: the split dimension moves with it, or, for
  an array split along the stacking axis itself (`fsdp_dim` chose it as
  the largest divisible dimension, e.g. a bias [16 layers, 3500] over 16
  devices), the array is gathered whole before the scan; it then costs
  as much memory as a replicated one, and a warning names it (at each
  tracing of the step).

  Attributes:
    value: this device's slice (or the whole array, gathered).
    dim: the dimension split over the "fsdp" axis; None once gathered.
  """
  value: Any
  dim: int | None = flax.struct.field(pytree_node=False)

  def unbox(self):
    """The whole parameter (an all-gather over "fsdp")."""
    if self.dim is None:
      return self.value
    return jax.lax.all_gather(self.value, "fsdp", axis=self.dim, tiled=True)

  def replace_boxed(self, val):
    """The same box around `val`."""
    return self.replace(value=val)

  def add_axis(self, index, params):
    """The box after a transformation inserts axis `index`."""
    if self.dim is None:
      return self
    index = index % (self.value.ndim + 1)
    return self.replace(dim=self.dim + (index <= self.dim))

  def remove_axis(self, index, params):
    """The box after a transformation removes axis `index` (a scan over
    stacked layers)."""
    if self.dim is None:
      return self
    index = index % self.value.ndim
    if index == self.dim:
      logging.warning(
          "FSDP split an array of local shape %s along the axis its layers "
          "are stacked on; it is gathered whole before the scan over "
          "layers (choose an fsdp size that divides another of its "
          "dimensions, or raise parallel.fsdp_min_size)",
          tuple(self.value.shape))
      return self.replace(value=self.unbox(), dim=None)
    return self.replace(dim=self.dim - (index < self.dim))


def _gather_on_use(params, dims) -> Any:
  """Parameters whose FSDP slices a module gathers when it reads them
  (inside `shard_map`); replicated ones are passed as they are."""
  return jax.tree_util.tree_map(
      lambda x, d: x if d is None else GatherOnUse(x, d), params, dims)


def _to_varying(x, axes: tuple[str, ...]):
  """Marks a replicated value as device-local, so that its gradient is not
  summed over `axes` implicitly (we sum once, explicitly)."""
  return _compat.to_varying(x, axes)


stack_batches = pipeline.stack


def split_micro_batches(batch: Any, steps: int) -> Any:
  """[devices * steps, ...] -> [devices, steps, ...] (device-major)."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape((x.shape[0] // steps, steps) + x.shape[1:]), batch)


def to_global(batch: Any, mesh: Mesh) -> Any:
  """This process's stacked batches [local devices, ...] as one global
  array per field, sharded over the mesh (every process passes its own)."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def make_sharded_train_step(
    loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh,
    state_sharding: Any, ema_decay: float = 0.999,
    grad_accum_steps: int = 1) -> Callable:
  """`train_step(state, batch) -> (state, metrics)` over a mesh, jitted.

  Args:
    loss_fn: `(params, batch, counts) -> (loss, aux)` of one device's batch
      (see `train_step.make_s2ef_loss`).
    optimizer: the optax transformation of the state.
    mesh: a ("data", "fsdp") mesh (`make_mesh`).
    state_sharding: `NamedSharding`s of the `TrainState` (`state_shardings`).
    ema_decay: parameter EMA decay.
    grad_accum_steps: micro-batches per device and step; the batch then has
      shape [devices, grad_accum_steps, ...].

  Returns:
    The jitted step; `batch` is a stacked batch [devices, ...] placed with
    `batch_sharding(mesh)`; the state is donated.
  """
  param_specs = _specs(state_sharding.params)
  dims = _split_dims(param_specs)

  def per_device(params, batch):
    batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    # Device-local copies: replicated over both axes, FSDP slices over
    # "data"; their gradients stay local until the psum below.
    local = jax.tree_util.tree_map(
        lambda p, d: _to_varying(p, AXES if d is None else ("data",)),
        params, dims)

    def gathered_loss(p, micro, counts):
      return loss_fn(_gather_on_use(p, dims), micro, counts)

    loss, terms, grads = train_step_lib.accumulate_gradients(
        gathered_loss, local, batch, grad_accum_steps,
        sum_counts=lambda c: jax.lax.psum(c, AXES))
    grads = jax.tree_util.tree_map(
        lambda g, d: jax.lax.psum(g, AXES if d is None else ("data",)),
        grads, dims)
    return jax.lax.psum((loss, terms), AXES), grads

  sharded = jax.shard_map(per_device, mesh=mesh,
                          in_specs=(param_specs, P(AXES)),
                          out_specs=(P(), param_specs))

  def step(state: TrainState, batch):
    (loss, terms), grads = sharded(state.params, batch)
    return train_step_lib.apply_gradients(state, grads, loss, terms,
                                          optimizer, ema_decay)

  return jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, NamedSharding(mesh, P())),
                 donate_argnums=0)


def make_pmap_train_step(
    loss_fn: Callable, optimizer: optax.GradientTransformation,
    ema_decay: float = 0.999, grad_accum_steps: int = 1,
    devices: Sequence[jax.Device] | None = None) -> Callable:
  """The same step with `jax.pmap`: state replicated on every device.

  The state carries a leading device axis (`replicate`), the batch is
  stacked [devices, ...]; gradients are summed with one `psum`.
  """

  def per_device(state: TrainState, batch):
    loss, terms, grads = train_step_lib.accumulate_gradients(
        loss_fn, state.params, batch, grad_accum_steps,
        sum_counts=lambda c: jax.lax.psum(c, PMAP_AXIS))
    grads = jax.lax.psum(grads, PMAP_AXIS)
    loss, terms = jax.lax.psum((loss, terms), PMAP_AXIS)
    return train_step_lib.apply_gradients(state, grads, loss, terms,
                                          optimizer, ema_decay)

  return jax.pmap(per_device, axis_name=PMAP_AXIS, devices=devices,
                  donate_argnums=0)


def make_pmap_eval_step(eval_step: Callable) -> Callable:
  """`eval_step` with `jax.pmap`: metric sums added over devices."""
  return jax.pmap(lambda params, batch: jax.lax.psum(
      eval_step(params, batch), PMAP_AXIS), axis_name=PMAP_AXIS)


def unreplicate(tree: Any) -> Any:
  """The first copy of a replicated pytree (pmap's leading axis)."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def replicate(tree: Any, num: int | None = None) -> Any:
  """A pytree with a new leading axis of `num` copies (default: one per
  device), the form `jax.pmap` shards over devices."""
  num = jax.local_device_count() if num is None else num
  return jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (num,) + jnp.shape(x)), tree)


def make_sharded_eval_step(eval_step: Callable, mesh: Mesh,
                           params_sharding: Any) -> Callable:
  """`eval_step(params, batch) -> metric sums` over stacked batches, jitted.

  Metric sums of each device's batch are added over devices.
  """
  param_specs = _specs(params_sharding)
  dims = _split_dims(param_specs)

  def per_device(params, batch):
    batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    return jax.lax.psum(eval_step(_gather_on_use(params, dims), batch),
                        AXES)

  sharded = jax.shard_map(per_device, mesh=mesh,
                          in_specs=(param_specs, P(AXES)), out_specs=P())
  return jax.jit(sharded, in_shardings=(params_sharding, batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))
