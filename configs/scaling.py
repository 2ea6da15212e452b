r"""A scaling sweep on the EMT dev set: 4 EGNN widths x 4 data fractions.

    python -m matsci_jax.scaling sweep --config=configs/scaling.py \
        --out /tmp/scaling_devset
    python -m matsci_jax.scaling fit /tmp/scaling_devset

Hardware: two CPU cores. Expected cost: about 25 s to build the dev set on
first use (shared with configs/s2ef.py), then 16 runs of 800 steps, one at
a time (EGNN, 2 layers, hidden 8 to 64: 2k to 61k parameters, on 10, 41,
164 and 654 of the 4,090 training structures), 14 to 30 s each, 5.6
minutes in all on two Zen 5 cores here; the fit and its figures
take 3 s. Validation force MAE ends between 0.26 eV/Å (10 structures)
and 0.092 (hidden 64, 164 structures); the fit gives exponents of 0.61
[0.26, 0.87] over parameters (at 654 structures) and 0.30 [0.25, 0.43]
over training FLOPs (the compute frontier). A sweep started again skips
the runs it recorded and resumes a killed one.

The fractions cover the range where data limits this set: EMT's slabs
hold few distinct environments, and at these budgets more than a few
hundred structures no longer lower the validation error (4% of the
structures reach 0.062 eV/Å force MAE in 2,000 steps of the widest model,
all of them 0.070). Every run takes the same number of steps, so the data
axis varies how often a run sees each structure, not its compute; a budget
of ("flops", C) gives every run the same compute instead, and
("epochs", e) the same passes over its data.
"""

import ml_collections

from matsci_jax.config_files import dotted as _dotted


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # The training config every run starts from (see configs/s2ef.py).
  config.base = "configs/s2ef.py:egnn"
  # Set in every run.
  config.base_overrides = _dotted({
      "train.progress_bar": False,
      "train.log_every": 100,
      "train.keep_checkpoints": 1,
      "optimizer.warmup_steps": 30,
      # The sweep draws its own figures over all runs; each run's own
      # (plots/ in its workdir) would add about 5 s to runs of 14 to 30 s.
      "train.plots": False,
  })
  # The runs: the product of these values. A key "a.b,c.d" sets two fields
  # together from tuples of two values (e.g. width with depth).
  config.grid = _dotted({
      "model.hidden_dim": (8, 16, 32, 64),
      "data.train_fraction": (0.0025, 0.01, 0.04, 0.16),
      "train.seed": (0,),
  })
  # Each run's budget: kind "steps", "epochs" or "flops", and its value;
  # `evaluations` spread over the run draw its learning curve.
  config.budget = ml_collections.ConfigDict(
      dict(kind="steps", value=800, evaluations=8))
  return config
