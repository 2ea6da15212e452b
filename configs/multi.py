r"""S2EF on two datasets at once: EMT slabs with adsorbates and EMT bulk cells.

    python -m matsci_jax.main --config=configs/multi.py
    python -m matsci_jax.main --config=configs/multi.py:shared   (one head)

Two built-in dev sets with different energy zeros: the slab dev set
(adsorption energies, forces) and the bulk dev set (total energies, forces
and stress of strained, rattled fcc metals and alloys; `python -m
data_prep.make_devset --kind bulk`). A shared EGNN encoder with one energy
head per source ("per_source", or one "shared" head); each source keeps its
own element references and scale, fitted on its own training split, and
reports its own metrics (`val/slabs/force_mae`, `val/bulk/stress_mae`).

Hardware: a laptop CPU (2 cores). Expected cost: both dev sets build on
first use (about 30 s, cached in ~/.cache/matsci_jax), then 2,400 steps,
1.1 minutes on two Zen 5 cores; validation force MAE ends at about 0.076
eV/Å on the slabs and 0.052 on the bulk cells, bulk stress MAE at about
0.0028 eV/Å^3 (README lists the numbers).

Sampling temperature 1 draws every structure alike, so a small source is
rarely drawn (LiPS's 200 frames next to the slab dev set: 3.8% of
batches); give it a larger weight or a lower temperature.

Point a source at any converted dataset to mix in your own data, e.g.
`config.data.sources.lips = ml_collections.ConfigDict(dict(path=...,
weight=1.0))`; sources must share graph settings (cutoff, neighbour cap).
"""

import ml_collections

from matsci_jax import config_files

s2ef = config_files.sibling(__file__, "s2ef")


def get_config(heads: str = "per_source") -> ml_collections.ConfigDict:
  config = s2ef.get_config("egnn")

  # Data: named sources with sampling weights (p ~ weight x size**T).
  config.data.sources = ml_collections.ConfigDict({
      "slabs": {"path": "devset", "weight": 1.0},
      "bulk": {"path": "devset_bulk", "weight": 1.0},
  })
  config.data.sampling_temperature = 1.0
  config.data.bulk_devset_dir = "~/.cache/matsci_jax/devset_bulk"
  config.data.bulk_devset_num_structures = 400

  # Model: one energy head per source on a shared encoder, or one head.
  config.model.heads = heads

  # Loss: stress where a source has it (the bulk cells), in units of that
  # source's stress RMS.
  config.loss.stress_weight = 1.0

  # The best checkpoint by the sum of both sources' force errors.
  config.train.best_metric = "val/slabs/force_mae + val/bulk/force_mae"
  return config
