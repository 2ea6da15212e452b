"""Device strategies: how one training job uses the devices it has.

A strategy creates the training state on the devices, places each padded
batch from the input pipeline where its step expects it, and builds the
train and evaluation steps, so the training loop never branches on the
layout:

* `JitStrategy`: one `jax.jit` with declared shardings over a ("data",
  "fsdp") mesh (`config.mesh`), FSDP when the "fsdp" axis is larger than
  one; also the single-device case (a mesh of one).
* `PmapStrategy`: the classic `jax.pmap`, the state replicated on every
  local device (data parallel only).

The input pipeline gives one padded batch per local device and
micro-batch, stacked along a leading axis when there is more than one
(`batches_per_step`); the steps themselves are in `matsci_jax.parallel`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from absl import logging

from matsci_jax import parallel
from matsci_jax.models import scan_unroll
from matsci_jax.train_state import TrainState


class Strategy:
  """What every strategy provides (see the module docstring).

  Args:
    grad_accum_steps: micro-batches per device and step.
  """
  name = ""

  def __init__(self, grad_accum_steps: int = 1):
    self.grad_accum_steps = int(grad_accum_steps)
    self.local_devices = jax.local_device_count()

  @property
  def batches_per_step(self) -> int:
    """Padded batches this process reads per training step."""
    return self.local_devices * self.grad_accum_steps

  @property
  def eval_batches_per_step(self) -> int:
    """Padded batches this process reads per evaluation step."""
    return self.local_devices

  def _shape_train(self, batch):
    """[batches_per_step, ...] (or one batch) -> [devices, (micro,) ...]."""
    if self.batches_per_step == 1:
      return parallel.stack_batches([batch])
    if self.grad_accum_steps > 1:
      return parallel.split_micro_batches(batch, self.grad_accum_steps)
    return batch

  def _shape_eval(self, batch):
    if self.local_devices == 1:
      return parallel.stack_batches([batch])
    return batch

  def create_state(self, init: Callable[[jax.Array], TrainState],
                   rng: jax.Array) -> TrainState:
    """`init(rng)` run on the devices, laid out for the steps."""
    raise NotImplementedError

  def abstract_state(self, init: Callable[[jax.Array], TrainState],
                     rng: jax.Array) -> TrainState:
    """What `create_state` would give, as `jax.ShapeDtypeStruct`s with
    their shardings, computing nothing (for ahead-of-time compilation)."""
    raise NotImplementedError(f"the {self.name} strategy has no abstract "
                              "state; use the jit strategy")

  def make_train_step(self, loss_fn: Callable,
                      optimizer: optax.GradientTransformation,
                      ema_decay: float) -> Callable:
    """`step(state, placed batch) -> (state, metrics)`, jitted once."""
    raise NotImplementedError

  def make_eval_step(self, eval_step: Callable) -> Callable:
    """`fn(ema params, placed batch) -> metric sums over all devices`."""
    raise NotImplementedError

  def step_flops(self, train_step: Callable,
                 make_step: Callable[[], Callable], state: TrainState,
                 batch, placed: bool = False) -> float | None:
    """FLOPs of one training step over all devices, or None where the
    backend gives none.

    XLA's cost analysis of the lowered `train_step` (nothing is compiled).
    XLA counts a loop's body once, so a step with loops (the model's
    scans, micro-batches) is counted as `make_step()` builds it afresh
    with them unrolled (`models.scan_unroll`). `batch` is a pipeline
    batch, or with `placed` one already placed (or abstract, as
    `abstract_train_batch` gives it).
    """
    batch = batch if placed else self.place_train(batch)
    try:
      lowered = train_step.lower(state, batch)
      if "while" in lowered.as_text():
        with scan_unroll.unrolled():
          lowered = make_step().lower(state, batch)
      cost = lowered.cost_analysis()
    except Exception as e:  # Best effort: cost analysis is optional in XLA.
      logging.warning("no FLOP count of the training step: %s: %s",
                      type(e).__name__, e)
      return None
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return None if flops is None else float(flops) * self._flops_copies

  # The lowered program holds one device's work (pmap, and jit's shard_map).
  _flops_copies = 1

  def place_train(self, batch):
    """A training batch from the pipeline, placed for `make_train_step`."""
    raise NotImplementedError

  def place_eval(self, batch):
    """An evaluation batch from the pipeline, placed for `make_eval_step`."""
    raise NotImplementedError

  def abstract_train_batch(self, batch):
    """`place_train`'s result as shape structs, placing nothing."""
    raise NotImplementedError(f"the {self.name} strategy has no abstract "
                              "batch; use the jit strategy")

  def host_state(self, state: TrainState) -> TrainState:
    """One copy of the state, as checkpoints store it."""
    return state

  def from_host_state(self, state: TrainState) -> TrainState:
    """The inverse of `host_state`, for a restored checkpoint."""
    return state

  def host_metrics(self, metrics: dict) -> dict:
    """Fetched step metrics as one value each."""
    return metrics

  def describe(self) -> dict:
    return {"strategy": self.name, "count": jax.device_count(),
            "mesh": None, "grad_accum_steps": self.grad_accum_steps}


class JitStrategy(Strategy):
  """One jitted step with declared shardings over a ("data", "fsdp") mesh.

  Args:
    mesh: see `parallel.make_mesh`.
    grad_accum_steps: micro-batches per device and step.
    fsdp_min_size: arrays smaller than this stay replicated under FSDP.
  """
  name = "jit"

  def __init__(self, mesh: jax.sharding.Mesh, grad_accum_steps: int = 1,
               fsdp_min_size: int = 2 ** 14):
    super().__init__(grad_accum_steps)
    self.mesh = mesh
    self.fsdp_min_size = fsdp_min_size
    self.shardings = None

  def abstract_state(self, init, rng):
    shapes = jax.eval_shape(init, rng)
    self.shardings = parallel.state_shardings(
        shapes, self.mesh, fsdp=self.mesh.shape["fsdp"] > 1,
        min_size=self.fsdp_min_size)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes, self.shardings)

  def create_state(self, init, rng):
    self.abstract_state(init, rng)  # Sets the shardings.
    # Created in place: with FSDP no device ever holds all of it.
    return jax.jit(init, out_shardings=self.shardings)(rng)

  def make_train_step(self, loss_fn, optimizer, ema_decay):
    return parallel.make_sharded_train_step(
        loss_fn, optimizer, self.mesh, self.shardings, ema_decay,
        self.grad_accum_steps)

  def make_eval_step(self, eval_step):
    return parallel.make_sharded_eval_step(eval_step, self.mesh,
                                           self.shardings.ema_params)

  def place_train(self, batch):
    return parallel.to_global(self._shape_train(batch), self.mesh)

  def abstract_train_batch(self, batch):
    """A placed training step's batch as shape structs, from one unstacked
    padded batch: [devices, (micro,) ...] as `place_train` gives it."""
    lead = (self.mesh.size,) + ((self.grad_accum_steps,)
                                if self.grad_accum_steps > 1 else ())
    sharding = parallel.batch_sharding(self.mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(lead + x.shape, x.dtype,
                                       sharding=sharding), batch)

  def place_eval(self, batch):
    return parallel.to_global(self._shape_eval(batch), self.mesh)

  @property
  def _flops_copies(self) -> int:
    # The lowered step's per-device work (inside `shard_map`) is counted
    # once; the optimizer update outside it is small beside it.
    return self.mesh.size

  def describe(self):
    return dict(super().describe(), mesh=dict(self.mesh.shape))


class PmapStrategy(Strategy):
  """`jax.pmap` over the local devices, the state replicated on each."""
  name = "pmap"

  @property
  def _flops_copies(self) -> int:
    return jax.device_count()

  def create_state(self, init, rng):
    return parallel.replicate(jax.jit(init)(rng))

  def make_train_step(self, loss_fn, optimizer, ema_decay):
    return parallel.make_pmap_train_step(loss_fn, optimizer, ema_decay,
                                         self.grad_accum_steps)

  def make_eval_step(self, eval_step):
    step = parallel.make_pmap_eval_step(eval_step)
    return lambda params, batch: parallel.unreplicate(step(params, batch))

  def place_train(self, batch):
    return self._shape_train(batch)

  def place_eval(self, batch):
    return self._shape_eval(batch)

  def host_state(self, state):
    return parallel.unreplicate(state)

  def from_host_state(self, state):
    return parallel.replicate(state)

  def host_metrics(self, metrics: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[0], metrics)


def from_config(config) -> Strategy:
  """The strategy of `config.parallel.strategy` over `config.mesh`."""
  accum = int(config.train.grad_accum_steps)
  if config.parallel.strategy == "pmap":
    return PmapStrategy(accum)
  return JitStrategy(parallel.mesh_from_config(config), accum,
                     config.parallel.fsdp_min_size)
