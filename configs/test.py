r"""A tiny S2EF run for tests: a few steps of a small EGNN.

    python -m matsci_jax.main --config=configs/test.py \
        --config.data.path=DATASET_DIR --workdir=/tmp/run

Hardware: any CPU; about 20 s, mostly compilation. Tests point `data.path`
at a small converted dataset.
"""

from configs import s2ef


def get_config():
  config = s2ef.get_config()
  config.data.devset_num_systems = 12
  config.data.devset_dir = "~/.cache/matsci_jax/devset_test"
  config.data.batch_size = 4
  config.model.hidden_dim = 16
  config.model.num_layers = 2
  config.model.num_radial = 4
  config.model.readout_hidden = 8
  config.optimizer.warmup_steps = 5
  config.optimizer.learning_rate = 3e-3
  config.optimizer.ema_decay = 0.9
  config.train.num_steps = 40
  config.train.log_every = 10
  config.train.eval_every = 20
  config.train.checkpoint_every = 10
  config.train.keep_checkpoints = 2
  config.train.progress_bar = False
  return config
