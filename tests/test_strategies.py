"""Device strategies give the plain single-device step (one CPU device).

Several devices are checked in test_parallel.py (8 simulated devices).
"""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from matsci_jax import models, strategies, tasks, train_state, train_step
from matsci_jax.data import batching, dataset_io, pipeline


def _config(strategy, accum):
  return ml_collections.ConfigDict({
      "train": {"grad_accum_steps": accum},
      "parallel": {"strategy": strategy, "fsdp_min_size": 64},
      "mesh": {"data": -1, "fsdp": 1}})


# Between them: micro-batches split per device, and one batch stacked.
@pytest.mark.parametrize("name,accum", [("jit", 2), ("pmap", 1)])
def test_strategy_step_equals_the_plain_step(small_devset, name, accum):
  split = dataset_io.Dataset(str(small_devset / "s2ef")).split("train")
  budget = batching.compute_budget(split.sizes, 3)
  micro = [batching.collate([split.source[i]], budget) for i in range(accum)]
  merged = batching.collate([split.source[i] for i in range(accum)],
                            batching.Budget(2 * budget.n_node,
                                            2 * budget.n_edge, 3))
  model = models.get("egnn", hidden_dim=16, num_layers=2)
  loss_cfg = ml_collections.ConfigDict(dict(
      energy_weight=1.0, force_weight=1.0, energy_loss="mae",
      energy_per_atom=True, force_loss="l2mae", free_atoms_only=True))
  loss_fn = tasks.S2EF.make_loss(
      model, tasks.S2EF.normalizer(split.statistics, model), loss_cfg)
  # SGD with momentum: a wrongly scaled gradient shows in the update.
  optimizer = optax.sgd(0.1, momentum=0.9)

  def init(rng):
    return train_state.TrainState.create(model.init(rng, micro[0]),
                                         optimizer)

  rng = jax.random.PRNGKey(0)
  ref_state, ref = jax.jit(train_step.make_train_step(loss_fn, optimizer))(
      init(rng), merged)

  strategy = strategies.from_config(_config(name, accum))
  assert strategy.batches_per_step == accum  # One CPU device.
  state = strategy.create_state(init, rng)
  step = strategy.make_train_step(loss_fn, optimizer, 0.999)
  from_pipeline = micro[0] if accum == 1 else pipeline.stack(micro)
  state, m = step(state, strategy.place_train(from_pipeline))
  m = strategy.host_metrics(jax.device_get(m))
  assert abs(float(m["loss"]) - float(ref["loss"])) < 1e-5 * float(ref["loss"])
  new = strategy.host_state(state)
  assert int(new.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves(new.params),
                  jax.tree_util.tree_leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # Evaluation: metric sums of the placed batch, one value each.
  eval_step = strategy.make_eval_step(tasks.S2EF.make_eval_step(loss_fn))
  sums = jax.device_get(eval_step(state.ema_params,
                                  strategy.place_eval(micro[0])))
  assert float(np.asarray(sums["graphs"])) == 1.0
  assert strategy.describe()["strategy"] == name
