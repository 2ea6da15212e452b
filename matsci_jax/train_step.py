"""Training and evaluation steps as pure functions, built once and jitted once.

`make_train_step(loss_fn, optimizer, ...)` returns
`train_step(state, batch) -> (state, metrics)`. Forces inside `loss_fn` are a
`jax.grad` with respect to positions; the step then differentiates the loss
with respect to parameters (a second-order derivative, in one XLA program).
A step whose loss or gradient is not finite leaves the state unchanged and
reports `finite = False`, so the host can stop without saving a bad state.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from matsci_jax import losses, metrics
from matsci_jax.energy import (Normalizer, make_energy_and_forces_fn,
                               make_energy_fn, make_energy_forces_stress_fn)
from matsci_jax.models import scan_unroll
from matsci_jax.train_state import TrainState


def make_s2ef_loss(model, normalizer: Normalizer, loss_config,
                   stress: bool = False) -> Callable:
  """Returns `loss_fn(params, batch, counts=None) -> (loss, aux)`.

  Energy and forces, and with `stress` the stress (batches then carry
  `globals["stress"]`), from one gradient. `counts` (see
  `losses.loss_counts`) are what the terms average over; by default this
  batch's, and over a whole step (several micro-batches or devices) their
  sums, so that the terms add up. `loss_config` fields: energy_weight,
  force_weight, stress_weight (optional, default 0), energy_loss ("mae" or
  "mse"), energy_per_atom, force_loss ("l2mae", "mae", "mse"),
  free_atoms_only.
  """
  if stress:
    derivatives = make_energy_forces_stress_fn(model, normalizer)
  else:
    derivatives = make_energy_and_forces_fn(model, normalizer)
  c = loss_config
  stress_weight = c.get("stress_weight", 0.0)

  def loss_fn(params, batch, counts=None):
    energies, forces, *rest = derivatives(params, batch)
    counts = counts or {}
    e_term = losses.energy_loss(energies, batch,
                                normalizer.per_graph("scale", batch),
                                c.energy_loss, c.energy_per_atom,
                                counts.get("graphs"))
    f_term = losses.force_loss(
        forces, batch, normalizer.per_node("scale", batch), c.force_loss,
        c.free_atoms_only,
        counts.get("free_atoms" if c.free_atoms_only else "atoms"))
    loss = c.energy_weight * e_term + c.force_weight * f_term
    aux = {"energy_loss": e_term, "force_loss": f_term, "energy": energies,
           "forces": forces}
    if stress:
      s_term = losses.stress_loss(
          rest[0], batch, normalizer.per_graph("stress_scale", batch),
          counts.get("stress_graphs"))
      loss = loss + stress_weight * s_term
      aux.update(stress_loss=s_term, stress=rest[0])
    return loss, aux

  return loss_fn


def make_energy_loss(model, normalizer: Normalizer, loss_config,
                     target: str = "energy") -> Callable:
  """Returns `loss_fn(params, batch, counts=None)` on a structure-level
  energy `target` (counts as in `make_s2ef_loss`)."""
  energy_fn = make_energy_fn(model, normalizer)
  c = loss_config

  def loss_fn(params, batch, counts=None):
    energies = energy_fn(params, batch)
    labelled = batch._replace(globals=dict(batch.globals,
                                           energy=batch.globals[target]))
    e_term = losses.energy_loss(energies, labelled,
                                normalizer.per_graph("scale", batch),
                                c.energy_loss, c.energy_per_atom,
                                (counts or {}).get("graphs"))
    return c.energy_weight * e_term, {"energy_loss": e_term,
                                      "energy": energies}

  return loss_fn


def accumulate_gradients(loss_fn: Callable, params, batch, steps: int = 1,
                         sum_counts: Callable = lambda c: c):
  """Loss, loss terms and parameter gradient of one step's batch.

  Args:
    loss_fn: `(params, batch, counts) -> (loss, aux)`.
    params: parameters.
    batch: a padded batch, or with `steps` > 1, `steps` of them stacked
      [steps, ...] (micro-batches, processed one after the other so that
      only one micro-batch's activations are alive at a time).
    steps: number of micro-batches.
    sum_counts: adds counts over devices (a `psum`) when run per device.

  Returns:
    (loss, terms, grads); terms are the loss's "energy_loss",
    "force_loss" and "stress_loss" (those it has). Every term is
    normalised by the counts of the whole step, so the sums over
    micro-batches (and devices) equal the loss of one batch holding all of
    them.
  """
  if steps == 1:
    counts = sum_counts(losses.loss_counts(batch))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, counts)
    return loss, _terms(aux), grads
  counts = jax.tree_util.tree_map(lambda x: jnp.sum(x, 0),
                                  jax.vmap(losses.loss_counts)(batch))
  counts = sum_counts(counts)

  def micro_step(carry, micro):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, micro, counts)
    return jax.tree_util.tree_map(jnp.add, carry,
                                  (loss, _terms(aux), grads)), None

  # The first micro-batch starts the sums, so that they carry the types
  # (and, per device, the device-locality) of the gradients.
  first = jax.tree_util.tree_map(lambda x: x[0], batch)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, first, counts)
  carry = (loss, _terms(aux), grads)
  rest = jax.tree_util.tree_map(lambda x: x[1:], batch)
  carry, _ = jax.lax.scan(micro_step, carry, rest,
                          unroll=scan_unroll.unroll())
  return carry


def _terms(aux: dict) -> dict:
  return {k: aux[k] for k in ("energy_loss", "force_loss", "stress_loss")
          if k in aux}


def apply_gradients(state: TrainState, grads, loss, terms: dict,
                    optimizer: optax.GradientTransformation,
                    ema_decay: float) -> tuple[TrainState, dict]:
  """The optimizer update, the EMA, and the non-finite guard."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
  # Written as a step towards p, so that a parameter that does not move
  # (frozen) keeps its EMA bit for bit.
  ema = jax.tree_util.tree_map(lambda e, p: e + (1 - decay) * (p - e),
                               state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                   ema_params=ema)
  # A non-finite step changes nothing; the host stops the run.
  new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new,
                               state)
  return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
               **terms}


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    ema_decay: float = 0.999,
                    grad_accum_steps: int = 1) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)` on one device.

  Args:
    loss_fn: `(params, batch, counts=None) -> (loss, aux)`.
    optimizer: the optax transformation the state was created with.
    ema_decay: decay of the parameter EMA (warmed up over the first steps).
    grad_accum_steps: micro-batches per step; the batch is then stacked
      [grad_accum_steps, ...], and the step equals one step on a batch
      holding all of them.

  For several devices see `matsci_jax.parallel`.
  """

  def train_step(state: TrainState, batch):
    loss, terms, grads = accumulate_gradients(loss_fn, state.params, batch,
                                              grad_accum_steps)
    return apply_gradients(state, grads, loss, terms, optimizer, ema_decay)

  return train_step


def make_eval_step(loss_fn: Callable, free_atoms_only: bool = True,
                   target: str = "energy") -> Callable:
  """Builds `eval_step(params, batch) -> metric sums` (see `metrics`)."""

  def eval_step(params, batch):
    loss, aux = loss_fn(params, batch)
    if "forces" in aux:
      stress = ({"stress_pred": aux["stress"],
                 "stress_mask": losses.stress_mask(batch)}
                if "stress" in aux else {})
      sums = metrics.batch_sums(batch, aux["energy"], batch.globals[target],
                                aux["forces"],
                                losses.force_mask(batch, free_atoms_only),
                                **stress)
    else:
      sums = metrics.batch_sums(batch, aux["energy"], batch.globals[target])
    graphs = jnp.sum(batch.globals["mask"])
    sums["loss"] = loss * graphs  # Weighted so that the mean is exact-ish.
    return sums

  return eval_step
