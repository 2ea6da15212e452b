"""The immutable training state and the optimizer built from a config."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: model variables ({"params": ...}).
    opt_state: optax state.
    ema_params: exponential moving average of `params`, used for evaluation.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any

  @classmethod
  def create(cls, params,
             optimizer: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=optimizer.init(params),
               ema_params=jax.tree_util.tree_map(jnp.copy, params))


# Labels of `make_optimizer`'s two parameter groups.
TRAINED, FROZEN = "trained", "frozen"


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then cosine decay to `end_factor`."""
  total = max(int(config.train.num_steps), 1)
  warmup = min(int(config.optimizer.warmup_steps), total - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optimizer.learning_rate,
      warmup_steps=warmup, decay_steps=total,
      end_value=config.optimizer.learning_rate
      * config.optimizer.end_lr_factor)


def freeze_patterns(config) -> tuple[str, ...]:
  """`config.init.freeze`; () for configs without an `init` section."""
  init = config.get("init")
  return tuple(init.get("freeze", ())) if init is not None else ()


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with the schedule above and global-norm gradient clipping.

  Parameters matching `config.init.freeze` (regular expressions of
  parameter paths, see `matsci_jax.finetune`) get zero updates: neither
  gradients nor weight decay move them, they take no part in the clipping
  norm and hold no Adam moments. Configs without an `init` section train
  every parameter.
  """
  transforms = []
  if config.optimizer.clip_norm:
    transforms.append(optax.clip_by_global_norm(config.optimizer.clip_norm))
  transforms.append(optax.adamw(learning_rate_schedule(config),
                                b1=config.optimizer.b1, b2=config.optimizer.b2,
                                weight_decay=config.optimizer.weight_decay))
  optimizer = optax.chain(*transforms)
  patterns = freeze_patterns(config)
  if not patterns:
    return optimizer
  # Here, not above: finetune imports checkpoints, whose imports come back
  # to this module.
  from matsci_jax import finetune

  def labels(params):
    return jax.tree_util.tree_map(
        lambda frozen: FROZEN if frozen else TRAINED,
        finetune.frozen_mask(params, patterns))
  return optax.partition({TRAINED: optimizer, FROZEN: optax.set_to_zero()},
                         labels)
