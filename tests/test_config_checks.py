"""Config checks: every shipped config passes, impossible values are named."""

import math
import os

import ml_collections
import pytest

from matsci_jax import config_files
from matsci_jax.config_checks import ConfigError, check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = config_files.sibling(os.path.join(REPO, "configs", "s2ef.py"),
                              "models").names()
# The models configs/test.py sizes.
TINY_MODELS = ("egnn", "megnet", "gala", "nequip")
# The `get_config` argument of every config file (None: its default).
CONFIG_ARGS = {
    "s2ef.py": [None] + MODELS,
    "is2re.py": [None] + MODELS,
    "multi.py": [None, "shared"],
    "test.py": ([None] + list(TINY_MODELS)
                + [f"is2re,{m}" for m in TINY_MODELS]),
}

# Sweep configs (`python -m matsci_jax.scaling sweep`) are not training
# configs: the config of every run they plan (their base with the run's
# overrides) must pass instead.
SWEEP_CONFIGS = ("scaling.py", "scaling_paper.py")


def _spec(name, arg):
  return f"configs/{name}" + ("" if arg is None else f":{arg}")


def test_every_config_file_is_covered():
  folder = os.path.join(REPO, "configs")
  files = {f for f in os.listdir(folder) if f.endswith(".py")
           and "def get_config" in open(os.path.join(folder, f)).read()}
  assert files == set(CONFIG_ARGS) | set(SWEEP_CONFIGS), (
      "add the new config file to CONFIG_ARGS (or SWEEP_CONFIGS)")


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
def test_sweep_configs_plan_runs_that_pass(name):
  from matsci_jax.scaling import sweep
  assert sweep.plan(config_files.load(f"configs/{name}"))  # Checks each run.


@pytest.mark.parametrize("spec", [_spec(name, arg)
                                  for name, args in CONFIG_ARGS.items()
                                  for arg in args])
def test_shipped_configs_pass(spec):
  check_config(config_files.load(spec))


def _with(spec: str, **changes) -> ml_collections.ConfigDict:
  """Config `spec` with "section.field" values replaced (of any type)."""
  d = config_files.load(spec).to_dict()
  for path, value in changes.items():
    section, field = path.split(".")
    d[section][field] = value
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("path,value,allowed", [
    # Counts, steps and intervals.
    ("data.batch_size", -4, "an integer >= 1"),
    ("data.batch_size", 0, "an integer >= 1"),
    ("data.batch_size", 2.5, "an integer >= 1"),
    ("data.batch_size", True, "an integer >= 1"),
    ("data.batch_size", "8", "an integer >= 1"),
    ("train.num_steps", 0, "an integer >= 1"),
    ("train.eval_every", 0, "an integer >= 1"),
    ("train.log_every", -1, "an integer >= 1"),
    ("train.checkpoint_every", 0, "an integer >= 1"),
    ("train.keep_checkpoints", 0, "an integer >= 1"),
    ("train.grad_accum_steps", 0, "an integer >= 1"),
    ("data.devset_num_systems", 1, "an integer >= 2"),
    # Zero meaning "off" or "from the statistics", but never negative.
    ("data.max_nodes", -1, "an integer >= 0"),
    ("data.num_workers", -2, "an integer >= 0"),
    ("data.prefetch", -1, "an integer >= 0"),
    ("train.seed", -1, "an integer >= 0"),
    ("optimizer.warmup_steps", -5, "an integer >= 0"),
    ("parallel.fsdp_min_size", -1, "an integer >= 0"),
    # Model sizes and lengths.
    ("model.cutoff", 0, "a finite number > 0"),
    ("model.cutoff", -1.0, "a finite number > 0"),
    ("model.cutoff", math.nan, "a finite number > 0"),
    ("model.cutoff", math.inf, "a finite number > 0"),
    ("model.hidden_dim", 0, "an integer >= 1"),
    ("model.num_layers", 0, "an integer >= 1"),
    ("model.num_radial", -3, "an integer >= 1"),
    ("model.avg_num_neighbors", 0.0, "a finite number > 0"),
    ("model.num_species", 50, "an integer >= 119"),
    # Optimizer rates and factors.
    ("optimizer.learning_rate", 0.0, "a finite number > 0"),
    ("optimizer.learning_rate", -1e-3, "a finite number > 0"),
    ("optimizer.end_lr_factor", 1.5, "a finite number >= 0 and <= 1"),
    ("optimizer.b1", 1.0, "a finite number >= 0 and < 1"),
    ("optimizer.b2", -0.1, "a finite number >= 0 and < 1"),
    ("optimizer.ema_decay", 1.0, "a finite number >= 0 and < 1"),
    ("optimizer.weight_decay", -1e-6, "a finite number >= 0"),
    ("optimizer.clip_norm", -1.0, "a finite number >= 0"),
    # Loss weights.
    ("loss.energy_weight", -1.0, "a finite number >= 0"),
    ("loss.force_weight", math.nan, "a finite number >= 0"),
    # Devices.
    ("mesh.data", 0, "an integer >= 1, or -1"),
    ("mesh.fsdp", -2, "an integer >= 1, or -1"),
    ("distributed.process_id", -2, "an integer >= 0, or -1"),
])
def test_out_of_range_numbers_are_named(path, value, allowed):
  config = _with("configs/s2ef.py", **{path: value})
  with pytest.raises(ConfigError) as err:
    check_config(config)
  assert str(err.value) == f"config.{path} = {value!r}: must be {allowed}"


@pytest.mark.parametrize("spec,changes,message", [
    ("configs/s2ef.py:megnet", {"model.pre": ()},
     r"config.model.pre = \(\): must be a non-empty sequence of integers "
     r">= 1"),
    ("configs/s2ef.py:megnet", {"model.block_mlp": (64, 0, 32)},
     r"config.model.block_mlp = \(64, 0, 32\): must be a non-empty "
     r"sequence"),
    ("configs/s2ef.py:megnet", {"model.gaussian_width": 0.0},
     r"config.model.gaussian_width = 0.0: must be a finite number > 0"),
    ("configs/s2ef.py:megnet", {"model.set2set_steps": 0},
     r"config.model.set2set_steps = 0: must be an integer >= 1"),
    ("configs/s2ef.py:gala", {"model.nearest_neighbors": 17},
     r"config.model.nearest_neighbors = 17: must be at most "
     r"config.model.num_neighbors \(16\), or 0"),
    ("configs/s2ef.py:gala", {"model.dilation": 0.01},
     r"config.model.dilation = 0.01: must make hidden_dim x dilation at "
     r"least 1"),
    ("configs/s2ef.py:gala", {"model.num_neighbors": 0},
     r"config.model.num_neighbors = 0: must be an integer >= 1"),
    ("configs/s2ef.py", {"mesh.data": -1, "mesh.fsdp": -1},
     r"at most one of them may be inferred"),
    ("configs/s2ef.py", {"loss.energy_weight": 0.0, "loss.force_weight": 0.0},
     r"both 0: nothing would be trained"),
    ("configs/is2re.py", {"loss.energy_weight": 0.0},
     r"config.loss.energy_weight = 0: must be > 0 for task 'is2re'"),
])
def test_fields_that_bound_each_other(spec, changes, message):
  with pytest.raises(ConfigError, match=message):
    check_config(_with(spec, **changes))


def test_zero_force_weight_is_fine_for_energy_only_training():
  check_config(_with("configs/s2ef.py", **{"loss.force_weight": 0.0}))
  check_config(_with("configs/s2ef.py", **{"mesh.data": -1, "mesh.fsdp": 1}))


def test_training_stops_before_any_work(tmp_path):
  from matsci_jax import train
  config = _with("configs/test.py", **{"data.batch_size": -4,
                                       "data.path": str(tmp_path / "none")})
  with pytest.raises(ConfigError, match=r"config.data.batch_size = -4: must "
                     r"be an integer >= 1"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
