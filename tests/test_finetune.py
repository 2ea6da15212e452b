"""Fine-tuning: loading a trained model's parameters, frozen parameters."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from ase.build import add_adsorbate, fcc111

from configs import test as test_config
from matsci_jax import checkpoints, finetune, models, train, train_state
from matsci_jax.config_checks import ConfigError
from matsci_jax.data.graphs import batch_examples, graph_from_atoms

# The training job calls `finetune` once it honours `config.init`.
needs_training_hook = pytest.mark.skipif(
    not hasattr(train, "finetune"),
    reason="train.train_and_evaluate does not call matsci_jax.finetune yet")

EGNN = dict(hidden_dim=16, num_layers=2, num_radial=4, readout_hidden=8,
            cutoff=6.0)


def _example(**graph_kwargs):
  slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
  add_adsorbate(slab, "O", 1.4, "fcc")
  slab.pbc = True
  return batch_examples([graph_from_atoms(slab, 6.0, None, **graph_kwargs)])


@functools.cache
def _egnn_params():
  model = models.get("egnn", **EGNN)
  return jax.jit(model.init)(jax.random.PRNGKey(0), _example())


def _values(params) -> dict:
  return {p: np.asarray(v) for p, v in finetune.flat(params).items()}


@pytest.fixture(scope="module")
def trained(trained_s2ef):
  """(Pretrained, the same run as `checkpoints.load` gives it)."""
  return finetune.load(str(trained_s2ef)), checkpoints.load(trained_s2ef)


def test_merge_loads_the_encoder_and_keeps_a_new_last_head_layer_fresh(
    trained):
  pretrained, run = trained
  model = run.model.clone(num_heads=2)
  example = _example()
  fresh = jax.jit(model.init)(jax.random.PRNGKey(7), example)
  transfer = pretrained.check(model, example)
  merged = _values(jax.jit(transfer.merge)(fresh))  # Traced parameters.
  old, new = _values(run.params), _values(fresh)

  layers = [p for p in merged if p.startswith("layer_")]
  assert len(layers) == 22
  for path in layers + ["readout/kernel", "readout/bias"]:
    np.testing.assert_array_equal(merged[path], old[path], err_msg=path)
  # One output per head: that layer stays as initialised.
  assert merged["readout_out/kernel"].shape == (8, 2)
  for path in ("readout_out/kernel", "readout_out/bias"):
    np.testing.assert_array_equal(merged[path], new[path], err_msg=path)
  assert set(transfer.fresh) == {"readout_out/kernel", "readout_out/bias"}
  assert transfer.fresh["readout_out/kernel"] == "[8, 1] there, [8, 2] here"
  assert set(transfer.unused) == {"readout_out/kernel", "readout_out/bias"}

  # Embedding rows: elements of its training data load, others stay fresh.
  seen = list(pretrained.elements)
  assert {29, 8} <= set(seen) and 3 not in seen  # Cu, O; Li never.
  unseen = sorted(set(range(119)) - set(seen))
  np.testing.assert_array_equal(merged["embed/embedding"][seen],
                                old["embed/embedding"][seen])
  np.testing.assert_array_equal(merged["embed/embedding"][unseen],
                                new["embed/embedding"][unseen])
  assert not np.array_equal(old["embed/embedding"][unseen],
                            new["embed/embedding"][unseen])

  counts = transfer.counts()
  total = sum(int(np.prod(v.shape)) for v in new.values())
  assert counts["loaded"] + counts["fresh"] == total
  assert counts["fresh"] == 16 * len(unseen) + 8 * 2 + 2
  assert counts["unused"] == 8 + 1
  text = transfer.describe()
  assert str(pretrained.path) in text and "readout_out/kernel" in text
  assert f"{counts['loaded']:,} scalars load" in text


def test_same_heads_load_everything_but_unseen_embedding_rows(trained):
  pretrained, run = trained
  example = _example()
  fresh = jax.jit(run.model.init)(jax.random.PRNGKey(3), example)
  transfer = pretrained.check(run.model, example)
  merged, old = _values(transfer.merge(fresh)), _values(run.params)
  assert not transfer.fresh and not transfer.unused
  assert list(transfer.rows) == ["embed/embedding"]
  for path, value in merged.items():
    if path != "embed/embedding":
      np.testing.assert_array_equal(value, old[path], err_msg=path)


def test_one_hot_projections_count_as_embeddings():
  """GALA embeds species with Dense layers on one-hot vectors: their
  kernels' rows follow the elements the trained model saw."""
  model = models.get("gala", hidden_dim=8, depth=1, num_neighbors=24,
                     cutoff=6.0)
  example = _example(representation="point_cloud", num_neighbors=24)
  assert finetune.species_axes(model, example) == {
      "embed_center/kernel": 0, "embed_neighbor/kernel": 0}
  init = jax.jit(model.init)
  old = jax.device_get(init(jax.random.PRNGKey(0), example))
  fresh = init(jax.random.PRNGKey(1), example)
  seen = (1, 8, 29)
  pretrained = finetune.Pretrained(
      path="/runs/gala", step=10, model_config={"name": "gala"},
      params=old, elements=seen)
  merged = _values(pretrained.check(model, example).merge(fresh))
  old, fresh = _values(old), _values(fresh)
  unseen = sorted(set(range(119)) - set(seen))
  for path in ("embed_center/kernel", "embed_neighbor/kernel"):
    np.testing.assert_array_equal(merged[path][list(seen)],
                                  old[path][list(seen)])
    np.testing.assert_array_equal(merged[path][unseen], fresh[path][unseen])
  np.testing.assert_array_equal(merged["embed_center/bias"],
                                old["embed_center/bias"])

  # A model.json without elements: every row loads.
  everything = dataclasses.replace(pretrained, elements=None)
  merged = _values(everything.check(model, example).merge(fresh))
  np.testing.assert_array_equal(merged["embed_center/kernel"],
                                old["embed_center/kernel"])


def test_another_model_or_encoder_is_a_config_error(trained):
  pretrained, run = trained
  example = _example()
  megnet = models.get("megnet", embed_dim=8, pre=(16, 16),
                      block_mlp=(16, 16, 16), num_blocks=2,
                      num_gaussians=16, readout_mlp=(16,))
  with pytest.raises(ConfigError, match="holds model 'egnn', config.model "
                     "is 'megnet'"):
    pretrained.check(megnet, example)

  wider = models.get("egnn", **dict(EGNN, hidden_dim=32))
  with pytest.raises(ConfigError) as error:
    pretrained.check(wider, example)
  message = str(error.value)
  assert pretrained.path in message
  assert ("parameter layer_0/message_out/kernel is [16, 16] in the trained "
          "model, [32, 32] in config.model") in message

  deeper = models.get("egnn", **dict(EGNN, num_layers=3))
  with pytest.raises(ConfigError,
                     match=r"parameter layer_2/message_out/kernel \[16, 16\] "
                     "of config.model is absent from the trained model"):
    pretrained.check(deeper, example)
  shallower = models.get("egnn", **dict(EGNN, num_layers=1))
  with pytest.raises(ConfigError,
                     match=r"parameter layer_1/message_out/kernel \[16, 16\] "
                     "of the trained model is absent from config.model"):
    pretrained.check(shallower, example)


def test_load_names_config_init_from(tmp_path):
  with pytest.raises(ConfigError, match="config.init.checkpoint = .*not a "
                     "training workdir"):
    finetune.load(str(tmp_path))


def test_from_config_is_off_without_a_source():
  config = test_config.get_config()
  assert finetune.from_config(config, None, None) is None
  del config["init"]
  assert finetune.from_config(config, None, None) is None


def _config(freeze=(), weight_decay=0.3, clip_norm=0.0):
  config = test_config.get_config()
  config.init.freeze = freeze
  config.optimizer.weight_decay = weight_decay
  config.optimizer.clip_norm = clip_norm
  config.optimizer.warmup_steps = 0
  return config


def _updates(optimizer, params, steps=5):
  """`params` after `steps` updates with random gradients."""
  rng = np.random.default_rng(0)

  @jax.jit
  def step(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = optimizer.init(params)
  for _ in range(steps):
    grads = jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    params, state = step(params, state, grads)
  return params


@pytest.mark.parametrize("clip_norm", [0.0, 10.0])
def test_frozen_parameters_stay_bit_identical(clip_norm):
  params = _egnn_params()
  freeze = ("layer_0/.*", "embed/embedding")
  frozen = _values(_updates(
      train_state.make_optimizer(_config(freeze, clip_norm=clip_norm)),
      params))
  free = _values(_updates(
      train_state.make_optimizer(_config(clip_norm=clip_norm)), params))
  before = _values(params)
  for path, value in frozen.items():
    if path.startswith("layer_0/") or path == "embed/embedding":
      np.testing.assert_array_equal(value, before[path], err_msg=path)
      assert not np.array_equal(free[path], before[path]), path
    else:
      assert not np.array_equal(value, before[path]), path
      if not clip_norm:  # Per-parameter AdamW: the same updates.
        np.testing.assert_allclose(value, free[path], rtol=1e-6,
                                   atol=1e-7, err_msg=path)


def test_weight_decay_alone_leaves_frozen_parameters_fixed():
  params = _egnn_params()
  optimizer = train_state.make_optimizer(_config(("layer_.*",), 0.5))
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  step = jax.jit(lambda p, s: optimizer.update(zeros, s, p))
  moved, state = params, optimizer.init(params)
  for _ in range(3):
    updates, state = step(moved, state)
    moved = optax.apply_updates(moved, updates)
  before, after = _values(params), _values(moved)
  for path in before:
    if path.startswith("layer_"):
      np.testing.assert_array_equal(after[path], before[path])
    elif path.endswith("kernel") or path.endswith("embedding"):
      # Decayed towards zero.
      assert np.abs(after[path]).sum() < np.abs(before[path]).sum(), path


def test_freeze_counts_and_patterns_that_match_nothing():
  model = models.get("egnn", **EGNN)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _example())
  sizes = {p: int(np.prod(s.shape)) for p, s in finetune.flat(shapes).items()}
  total = sum(sizes.values())
  layers = sum(s for p, s in sizes.items() if p.startswith("layer_"))
  assert finetune.freeze_counts(shapes, ()) == (total, 0)
  assert finetune.freeze_counts(shapes, ("layer_.*",)) == (total - layers,
                                                           layers)
  # Overlapping patterns count a parameter once.
  assert finetune.freeze_counts(shapes, ("layer_.*", "layer_0/.*")) == (
      total - layers, layers)
  for pattern in ("layer_9/.*", "params/layer_0/.*", "layer_0"):
    with pytest.raises(ConfigError) as error:
      finetune.freeze_counts(shapes, ("layer_.*", pattern))
    message = str(error.value)
    assert repr(pattern) in message and "matches no parameter" in message
    assert "embed/embedding" in message  # Real paths, for comparison.
  with pytest.raises(ConfigError, match="not a regular expression"):
    finetune.freeze_counts(shapes, ("layer_[",))
  optimizer = train_state.make_optimizer(_config(("layer_9/.*",)))
  with pytest.raises(ConfigError, match="'layer_9/.\\*' matches no"):
    optimizer.init(jax.tree_util.tree_map(jnp.zeros_like, shapes))


def test_configs_without_init_train_every_parameter():
  params = _egnn_params()
  config = _config(clip_norm=10.0)
  bare = ml_collections.ConfigDict(config.to_dict())
  del bare["init"]
  plain = optax.chain(
      optax.clip_by_global_norm(10.0),
      optax.adamw(train_state.learning_rate_schedule(config), b1=0.9,
                  b2=0.999, weight_decay=0.3))
  expected = _values(_updates(plain, params))
  for cfg in (bare, config):
    got = _values(_updates(train_state.make_optimizer(cfg), params))
    for path, value in got.items():
      np.testing.assert_array_equal(value, expected[path], err_msg=path)
  assert train_state.freeze_patterns(bare) == ()


def _lips_config(lips_dataset, init_from: str, num_steps: int):
  """The conftest `trained_s2ef` run's settings, on LiPS."""
  config = test_config.get_config()
  config.data.path = str(lips_dataset)
  config.train.num_steps = num_steps
  config.train.eval_every = config.train.checkpoint_every = num_steps
  config.optimizer.learning_rate = 5e-3
  config.loss.force_loss = "mse"
  config.loss.energy_weight = 1.0
  config.init.checkpoint = init_from
  return config


@needs_training_hook
def test_finetuning_the_devset_model_beats_scratch_on_lips(
    trained_s2ef, lips_dataset, tmp_path):
  """Same seed, data and 50 steps: the dev-set model fine-tuned on LiPS
  predicts LiPS forces better than a model trained from scratch.

  LiPS (Li, P, S) shares no element with the EMT dev set: only the
  encoder's layers and the head carry over. From scratch the tiny model
  still predicts almost no force after 50 steps (validation MAE 0.4332
  eV/Å against 0.4334 for zero forces); fine-tuned, 0.4285 (0.424-0.429
  over five seeds, always 0.004-0.009 below scratch).
  """
  results = {}
  for name, source in (("finetuned", str(trained_s2ef)), ("scratch", "")):
    results[name] = train.train_and_evaluate(
        _lips_config(lips_dataset, source, 50), str(tmp_path / name))
  assert results["finetuned"]["init"]["checkpoint"] == str(trained_s2ef)
  assert results["scratch"]["init"] is None
  tuned, scratch = (results[k]["metrics"]["val/force_mae"]
                    for k in ("finetuned", "scratch"))
  assert tuned < scratch - 0.002, (tuned, scratch)


@needs_training_hook
def test_finetuning_run_keeps_frozen_parameters(trained_s2ef, lips_dataset,
                                                tmp_path):
  """Frozen layers keep their trained values, in the parameters and in
  their moving average (what evaluation and `checkpoints.load` use)."""
  config = _lips_config(lips_dataset, str(trained_s2ef), 10)
  config.init.freeze = ("layer_.*",)
  config.optimizer.weight_decay = 0.1
  result = train.train_and_evaluate(config, str(tmp_path))
  old = _values(finetune.load(str(trained_s2ef)).params)
  layers = sum(v.size for p, v in old.items() if p.startswith("layer_"))
  assert result["frozen_params"] == layers
  assert result["trainable_params"] + layers == result["num_params"]
  for ema in (False, True):
    new = _values(checkpoints.load(tmp_path, checkpoint="latest",
                                   ema=ema).params)
    for path, value in new.items():
      if path.startswith("layer_"):
        np.testing.assert_array_equal(value, old[path], err_msg=path)
    assert not np.array_equal(new["readout/kernel"], old["readout/kernel"])
