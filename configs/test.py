r"""A tiny run for tests: a few steps of a small model.

    python -m matsci_jax.main --config=configs/test.py \
        --config.data.path=DATASET_DIR --workdir=/tmp/run
    python -m matsci_jax.main --config=configs/test.py:is2re,gala ...
    (models: egnn, megnet, gala, nequip)

Hardware: any CPU; about 20 s, mostly compilation. Tests point `data.path`
at a small converted dataset.
"""

from matsci_jax import config_files

is2re = config_files.sibling(__file__, "is2re")
s2ef = config_files.sibling(__file__, "s2ef")

# Tiny sizes per model, so that every model runs in seconds.
_TINY = {
    "egnn": dict(hidden_dim=16, num_layers=2, num_radial=4, readout_hidden=8),
    "megnet": dict(embed_dim=8, pre=(16, 16), block_mlp=(16, 16, 16),
                   num_blocks=2, num_gaussians=16, readout_mlp=(16,)),
    "gala": dict(hidden_dim=16, depth=1, dilation=1.0),
    "nequip": dict(hidden_irreps="8x0e + 4x1o + 2x2e", num_layers=2,
                   num_radial=4, radial_hidden=8, readout_hidden=8),
}


def get_config(arg: str = "egnn"):
  """`arg` is "<model>" (S2EF) or "is2re,<model>"."""
  task, _, model = arg.rpartition(",")
  config = (is2re if task == "is2re" else s2ef).get_config(model)
  config.data.devset_num_systems = 12
  config.data.devset_dir = "~/.cache/matsci_jax/devset_test"
  config.data.batch_size = 4
  config.model.update(_TINY[config.model.name])
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
