r"""IS2RE: initial structure to relaxed energy, as a direct regression.

    python -m matsci_jax.main --config=configs/is2re.py        (EGNN)
    python -m matsci_jax.main --config=configs/is2re.py:megnet  (or :gala ...)

Default data: the built-in dev set's IS2RE split (270 train, 30 val systems),
built on first use. Hardware: a laptop CPU (two cores): about 1.5 minutes
for EGNN, 5 for MegNet, 6.5 for GALA. Metrics: energy MAE and EwT
(|error| < 0.02 eV) on the relaxed energy, OC20's definitions. Point
`data.path` at any dataset converted with `--task is2re`.
"""

from matsci_jax import config_files

s2ef = config_files.sibling(__file__, "s2ef")
models = config_files.sibling(__file__, "models")


def get_config(model: str = "egnn"):
  config = s2ef.get_config(model)
  config.data.task = "is2re"
  config.model = models.model_config(model, "is2re")
  # Relaxed energies only: no forces; per-structure MAE in eV.
  config.loss.energy_weight = 1.0
  config.loss.force_weight = 0.0
  config.loss.energy_per_atom = False
  # One target per structure makes small batches noisy: with 8 structures
  # EGNN and MegNet sat at the element-reference fit for hundreds of steps.
  config.data.batch_size = 32
  config.optimizer.learning_rate = 2e-3
  config.optimizer.clip_norm = 10.0
  config.optimizer.warmup_steps = 50
  config.train.num_steps = 800
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.train.best_metric = "val/energy_mae"
  if config.model.name == "gala":
    # Without forces the energy's jumps where neighbours swap rank do not
    # matter, and 8 of the 16 stored slots costs a quarter of the pair work.
    config.model.nearest_neighbors = 8
  return config
