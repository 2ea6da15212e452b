"""Model configs by name, shared by the task configs.

    --config=configs/s2ef.py:megnet       --config=configs/is2re.py:gala_paper

Laptop-sized defaults ("egnn", "megnet", "gala", "nequip") and sizes close
to those of the Open MatSci ML Toolkit's papers ("*_paper": E(n)-GNN about
72k, MegNet about 1M, GALA about 1.5M parameters). "gala" is the reference
GALA configuration (depth 2, hidden 64, concat merge and join, "full"
invariants); "nequip_reference" has the sizes of a common JAX NequIP.
README lists the parameter count of every model and task.
"""

import ml_collections

_MODELS = {
    # Two layers: on the dev set, S2EF validation force MAE 0.067 eV/Å
    # after 2,400 steps, as three layers give (0.066), at 70% of the cost.
    "egnn": dict(name="egnn", hidden_dim=64, num_layers=2, activation="silu",
                 cutoff=6.0, num_radial=8, avg_num_neighbors=32.0,
                 coordinate_update=False, readout_hidden=32),
    "egnn_paper": dict(name="egnn", hidden_dim=50, num_layers=4,
                       activation="silu", cutoff=6.0, num_radial=8,
                       avg_num_neighbors=32.0, coordinate_update=False,
                       readout_hidden=25),
    "megnet": dict(name="megnet", embed_dim=16, pre=(64, 32),
                   block_mlp=(64, 64, 32), num_blocks=3, num_gaussians=100,
                   gaussian_width=0.5, cutoff=6.0, readout_mlp=(32, 16),
                   set2set_steps=3, activation="shifted_softplus"),
    "megnet_paper": dict(name="megnet", embed_dim=16, pre=(160, 80),
                         block_mlp=(160, 160, 80), num_blocks=3,
                         num_gaussians=100, gaussian_width=0.5, cutoff=6.0,
                         readout_mlp=(64, 32), set2set_steps=3,
                         activation="shifted_softplus"),
    # pairs_per_chunk bounds the pair activations (see models/gala.py);
    # 0 is faster on accelerators with memory to spare.
    "gala": dict(name="gala", hidden_dim=64, depth=2, dilation=2.0,
                 num_neighbors=16, nearest_neighbors=0, cutoff=6.0,
                 pairs_per_chunk=1024),
    "gala_paper": dict(name="gala", hidden_dim=208, depth=2, dilation=2.0,
                       num_neighbors=16, nearest_neighbors=0, cutoff=6.0,
                       pairs_per_chunk=1024),
    # Four layers (the last outputs scalars only): about 10 structures/s
    # with forces on the LiPS training benchmark on two cores (target: 3);
    # on the dev set, S2EF validation force MAE 0.052 eV/Å after 2,400
    # steps (three layers: 0.055 at 1.15 times the speed).
    "nequip": dict(name="nequip", hidden_irreps="32x0e + 16x1o + 8x2e",
                   num_layers=4, lmax=2, cutoff=6.0, num_radial=8,
                   radial_hidden=32, radial_layers=2, avg_num_neighbors=32.0,
                   readout_hidden=16),
    # The sizes of NequIP's usual JAX configuration (README: parameters).
    "nequip_reference": dict(
        name="nequip", num_layers=5, lmax=2, cutoff=6.0, num_radial=8,
        hidden_irreps="64x0e + 64x0o + 32x1e + 32x1o + 4x2e + 4x2o",
        radial_hidden=64, radial_layers=2, avg_num_neighbors=32.0,
        readout_hidden=16),
}


def names() -> list[str]:
  return sorted(_MODELS)


def model_config(name: str, task: str) -> ml_collections.ConfigDict:
  """The config of model `name` for `task` ("s2ef" or "is2re")."""
  if name not in _MODELS:
    raise ValueError(f"unknown model config {name!r}; choose one of "
                     f"{', '.join(names())}")
  fields = dict(_MODELS[name])
  # Rematerialise interaction layers: "", "full", "dots", "dots_no_batch"
  # (see matsci_jax/models/remat.py).
  fields["remat"] = ""
  if fields["name"] == "egnn":
    # One nn.scan over stacked layers: deep models compile once and, with
    # remat, hold one layer at a time (models/remat.py); the parameter
    # trees of the two forms differ.
    fields["scan_layers"] = False
  if fields["name"] == "megnet":
    # Structure-level targets use Set2Set; energies with forces must be
    # extensive sums of per-atom terms.
    fields["readout"] = "set2set" if task == "is2re" else "per_atom"
  return ml_collections.ConfigDict(fields)


def representation(name: str) -> str:
  """The input representation ("graph" or "point_cloud") that model config
  `name` reads, as its model class declares it."""
  from matsci_jax import models
  return models.model_class(_MODELS[name]["name"]).representation
