"""Shared test fixtures.

`shared_data` points at the real OC20/matsciml fixture files in
`../shared/data` (or `$MATSCI_JAX_SHARED_DATA`). Tests that need them skip
when the folder is absent, and fail instead when
`MATSCI_JAX_REQUIRE_FIXTURES=1` (as CI sets), so a broken checkout cannot pass
by skipping.
"""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_data_dir() -> pathlib.Path:
  env = os.environ.get("MATSCI_JAX_SHARED_DATA")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = _shared_data_dir()
  if not (path / "README.md").is_file():
    message = (f"fixture folder {path} is absent; set MATSCI_JAX_SHARED_DATA "
               "or place shared/data beside the checkout")
    if os.environ.get("MATSCI_JAX_REQUIRE_FIXTURES") == "1":
      pytest.fail(message + " (MATSCI_JAX_REQUIRE_FIXTURES=1)")
    pytest.skip(message)
  return path


@pytest.fixture(scope="session")
def devset(tmp_path_factory) -> pathlib.Path:
  """The full built-in dev set (about 15 s on two cores), built once."""
  from matsci_jax.data.devset import build_devset
  out = tmp_path_factory.mktemp("devset") / "devset"
  build_devset(out, progress=False)
  return out


@pytest.fixture(scope="session")
def small_devset(tmp_path_factory) -> pathlib.Path:
  """A 12-system dev set (a few seconds), for training tests."""
  from matsci_jax.data.devset import build_devset
  out = tmp_path_factory.mktemp("small_devset") / "devset"
  build_devset(out, num_systems=12, workers=1, progress=False)
  return out


@pytest.fixture(scope="session")
def trained_s2ef(small_devset, tmp_path_factory) -> pathlib.Path:
  """The workdir of a tiny EGNN trained for 100 steps on the small dev set.

  With a mean-squared force loss: the default L2-MAE, a median-like loss,
  keeps a briefly trained model's forces near zero (most dev-set atoms are
  near equilibrium), which would leave relaxations nothing to do.
  """
  from configs import test as test_config
  from matsci_jax import train
  config = test_config.get_config()
  config.data.path = str(small_devset / "s2ef")
  config.train.num_steps = 100
  config.train.eval_every = config.train.checkpoint_every = 100
  config.optimizer.learning_rate = 5e-3
  config.loss.force_loss = "mse"
  config.loss.energy_weight = 1.0
  workdir = tmp_path_factory.mktemp("trained_s2ef")
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="session")
def lips_dataset(shared_data, tmp_path_factory) -> pathlib.Path:
  """matsciml's LiPS dev set (DFT AIMD, 200 frames of Li27P12S44) converted
  with the dev set's graph settings (6 Å, 50 neighbours), 160 train / 40
  val, so that it can share a run with the dev set."""
  from matsci_jax.data import converter
  from matsci_jax.data.devset import DEVSET_GRAPH_SPEC
  out = tmp_path_factory.mktemp("lips") / "lips"
  converter.convert([str(shared_data / "matsciml_lips_devset")], str(out),
                    task="s2ef", workers=1, val_fraction=0.2, split_seed=0,
                    progress=False,
                    graph_spec=DEVSET_GRAPH_SPEC.select("graph"))
  return out


@pytest.fixture(scope="session")
def trained_multi(small_devset, lips_dataset, tmp_path_factory
                  ) -> pathlib.Path:
  """The workdir of a tiny EGNN with one head per source, trained for 30
  steps on the small dev set ("slabs") and LiPS ("lips") together."""
  import ml_collections
  from configs import test as test_config
  from matsci_jax import train
  config = test_config.get_config()
  config.data.sources = ml_collections.ConfigDict({
      "slabs": {"path": str(small_devset / "s2ef"), "weight": 1.0},
      "lips": {"path": str(lips_dataset), "weight": 1.0}})
  config.model.heads = "per_source"
  config.train.best_metric = "val/slabs/force_mae + val/lips/force_mae"
  config.train.num_steps = 30
  config.train.eval_every = config.train.checkpoint_every = 30
  workdir = tmp_path_factory.mktemp("trained_multi")
  train.train_and_evaluate(config, str(workdir))
  return workdir
