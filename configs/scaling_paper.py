r"""The large setting of atomistic GNN scaling studies, as a TPU pod recipe.

    # Every host of the slice runs the same command (one process per host):
    gcloud compute tpus tpu-vm ssh my-slice --worker=all --command="\
        cd matsci_jax && python -m matsci_jax.scaling sweep \
        --config=configs/scaling_paper.py --out /mnt/shared/scaling_paper \
        --parallel 1"
    python -m matsci_jax.scaling fit /mnt/shared/scaling_paper

EGNN from 0.45 to 8.8 billion parameters (hidden 2,500 to 7,000 with 12 to
30 layers, grown together: about 6 x hidden^2 parameters per layer) on
12.5%, 35% and all of OC20 S2EF 2M, two epochs each: 12 runs, each over
all devices of the slice (FSDP over 4 of them, bf16 dense layers,
rematerialised layers, two micro-batches per device and step). The runs go
one at a time (--parallel 1); every host runs the sweep, process 0 writes
the records, and `--out` must be a folder all hosts share.

Data: OC20's S2EF 2M training set converted once,
`python -m data_prep.convert --input s2ef_train_2M --output
/mnt/shared/oc20_s2ef_2M --task s2ef --val-fraction 0.01`.

Hardware: a TPU v5p-512 slice (256 chips, 64 hosts; 95 GB of HBM and
459 TFLOP/s bf16 per chip). FSDP splits an array only along a dimension its
size divides: 4 divides every width here (2,500 to 7,000), 256 none, so
the mesh is 64 (data) x 4 (fsdp). Plan the runs first
(`python -m matsci_jax.plan`, README "Large structures and large models"):
with layers rematerialised and scanned, each gathering its parameters as
it runs, every size fits 80 GB devices at fsdp 4 (7,000 x 30: 75 GB per
device planned on dev-set batches; 95 GB here). A step trains
256 x 4 x 2 = 2,048 structures.

Expected cost (an estimate; this recipe has not been run): XLA counts an
S2EF training step of EGNN (forces and their parameter gradient) at about
12 x hidden^2 FLOPs per layer for each edge and 60 x hidden^2 for each
atom, six times the forward pass of its dense layers (measured on the dev
set); with remat's second forward pass and OC20's ~75 atoms and ~2,900
edges within 6 Å per structure, that is 4.5e4 x layers x hidden^2 per
structure, 6.6e13 for the largest model. The grid trains 2 epochs x 2M x
(0.125 + 0.35 + 1) = 5.9M structures on each model, and the four models
together cost 1.56 times the largest: about 6e20 FLOPs. At 30% MFU
(graph networks gather more than they multiply; `perf/mfu` in each run's
log gives the real figure) that is about 5 hours of the slice (1,200
chip-hours), the largest run 2 hours.
Learning rates are untuned: sweep `optimizer.learning_rate` on the smallest
model first (runs of wider models usually need smaller ones).
"""

import ml_collections

from matsci_jax.config_files import dotted as _dotted


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.base = "configs/s2ef.py:egnn"
  config.base_overrides = _dotted({
      "data.path": "/mnt/shared/oc20_s2ef_2M",
      "data.batch_size": 4,  # Per device and micro-batch.
      "data.num_workers": 8,
      "data.prefetch": 4,
      "precision": "bf16",
      "model.remat": "full",
      "model.scan_layers": True,  # One layer's intermediates at a time.
      "mesh.data": -1,
      "mesh.fsdp": 4,  # Divides every width of the grid.
      "parallel.fsdp_min_size": 2 ** 14,
      "train.grad_accum_steps": 2,
      "train.progress_bar": False,
      "train.log_every": 20,
      "train.keep_checkpoints": 2,
      "optimizer.learning_rate": 2e-4,
      "optimizer.warmup_steps": 100,
      "optimizer.ema_decay": 0.999,
      "distributed.initialize": True,
  })
  config.grid = _dotted({
      # Width and depth grow together: (hidden, layers, readout width).
      "model.hidden_dim,model.num_layers,model.readout_hidden": (
          (2500, 12, 1250), (3500, 16, 1750), (5000, 22, 2500),
          (7000, 30, 3500)),
      "data.train_fraction": (0.125, 0.35, 1.0),
      "train.seed": (0,),
  })
  config.budget = ml_collections.ConfigDict(
      dict(kind="epochs", value=2.0, evaluations=10))
  return config
