"""Scaling studies: how a model's error falls with its size, data and compute.

* `sweep`: a grid of ordinary trainings (widths, depths, data fractions,
  seeds) under a budget of steps, epochs or FLOPs; one JSON record per
  finished run in DIR/runs.jsonl; killed runs and sweeps resume.
* `fit`: power laws of the loss against parameters, training structures and
  training FLOPs, with bootstrap intervals.
* `plots`: their figures.

    python -m matsci_jax.scaling sweep --config=configs/scaling.py --out DIR
    python -m matsci_jax.scaling fit DIR
"""
