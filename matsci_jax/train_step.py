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
from matsci_jax.energy import Normalizer, make_energy_and_forces_fn, make_energy_fn
from matsci_jax.train_state import TrainState


def make_s2ef_loss(model, normalizer: Normalizer, loss_config) -> Callable:
  """Returns `loss_fn(params, batch) -> (loss, aux)` for energy and forces.

  `loss_config` fields: energy_weight, force_weight, energy_loss ("mae" or
  "mse"), energy_per_atom, force_loss ("l2mae", "mae", "mse"),
  free_atoms_only.
  """
  energy_and_forces = make_energy_and_forces_fn(model, normalizer)
  c = loss_config

  def loss_fn(params, batch):
    energies, forces = energy_and_forces(params, batch)
    e_term = losses.energy_loss(energies, batch, normalizer.scale,
                                c.energy_loss, c.energy_per_atom)
    f_term = losses.force_loss(forces, batch, normalizer.scale, c.force_loss,
                               c.free_atoms_only)
    loss = c.energy_weight * e_term + c.force_weight * f_term
    return loss, {"energy_loss": e_term, "force_loss": f_term,
                  "energy": energies, "forces": forces}

  return loss_fn


def make_energy_loss(model, normalizer: Normalizer, loss_config,
                     target: str = "energy") -> Callable:
  """Returns `loss_fn(params, batch)` on a structure-level energy `target`."""
  energy_fn = make_energy_fn(model, normalizer)
  c = loss_config

  def loss_fn(params, batch):
    energies = energy_fn(params, batch)
    labelled = batch._replace(globals=dict(batch.globals,
                                           energy=batch.globals[target]))
    e_term = losses.energy_loss(energies, labelled, normalizer.scale,
                                c.energy_loss, c.energy_per_atom)
    return c.energy_weight * e_term, {"energy_loss": e_term,
                                      "energy": energies}

  return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    ema_decay: float = 0.999) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)`.

  Args:
    loss_fn: `(params, batch) -> (loss, aux)`.
    optimizer: the optax transformation the state was created with.
    ema_decay: decay of the parameter EMA (warmed up over the first steps).
  """

  def train_step(state: TrainState, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p,
                                 state.ema_params, params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     ema_params=ema, rng=jax.random.fold_in(state.rng, 1))
    # A non-finite step changes nothing; the host stops the run.
    new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new,
                                 state)
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
           "energy_loss": aux["energy_loss"]}
    if "force_loss" in aux:
      out["force_loss"] = aux["force_loss"]
    return new, out

  return train_step


def make_eval_step(loss_fn: Callable, free_atoms_only: bool = True,
                   target: str = "energy") -> Callable:
  """Builds `eval_step(params, batch) -> metric sums` (see `metrics`)."""

  def eval_step(params, batch):
    loss, aux = loss_fn(params, batch)
    if "forces" in aux:
      sums = metrics.batch_sums(batch, aux["energy"], batch.globals[target],
                                aux["forces"],
                                losses.force_mask(batch, free_atoms_only))
    else:
      sums = metrics.batch_sums(batch, aux["energy"], batch.globals[target])
    graphs = jnp.sum(batch.globals["mask"])
    sums["loss"] = loss * graphs  # Weighted so that the mean is exact-ish.
    return sums

  return eval_step
