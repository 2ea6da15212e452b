"""matsci_jax: JAX/Flax machine learning on atomistic materials data.

    import matsci_jax as mj

    model = mj.models.get("egnn", hidden_dim=64)
    graph = mj.data.batch_examples([mj.data.graph_from_atoms(atoms)])
    params = model.init(jax.random.PRNGKey(0), graph)
    energy_and_forces = mj.make_energy_and_forces_fn(
        model, mj.Normalizer.identity())
    energies, forces = energy_and_forces(params, graph)

    trained = mj.load("runs/my_run")          # model, EMA params, config
    atoms.calc = mj.ase.Calculator(trained)   # an ASE calculator
    relaxed = mj.relax.relax(trained, [atoms])

Modules: `models` (the model contract, registry and the EGNN, MegNet and
GALA modules), `data` (readers, converted datasets, graph specs, graphs and
padded batches), `tasks` (S2EF, IS2RE), `losses`, `metrics` (OC20
metrics), `inputs` (a config's dataset and batches), `parallel` (meshes and
sharded steps), `strategies` (device strategies), `ase` (calculator),
`relax` (batched FIRE), `checkpoints` (the run folder and `load`),
`config_files`, `train` (the training job), `finetune` (starting from a
trained model) and `predict` (the prediction command). Attributes load on
first use, so that `import matsci_jax` stays cheap.
"""

from matsci_jax import _malloc

_malloc.tune()  # Before jax starts its threads; see _malloc.py.

from matsci_jax import _lazy  # noqa: E402

__version__ = "0.1.0"

_NAMES = {
    # Modules.
    **{m: f"matsci_jax.{m}" for m in (
        "ase", "checkpoints", "config_files", "data", "finetune", "inputs",
        "losses", "metrics", "models", "parallel", "predict", "relax",
        "strategies", "tasks", "train")},
    # A trained model.
    "load": "matsci_jax.checkpoints:load",
    "Trained": "matsci_jax.checkpoints:Trained",
    # Pure energy functions.
    "Normalizer": "matsci_jax.energy:Normalizer",
    "make_energy_fn": "matsci_jax.energy:make_energy_fn",
    "make_atom_energies_fn": "matsci_jax.energy:make_atom_energies_fn",
    "make_energy_and_forces_fn": "matsci_jax.energy:make_energy_and_forces_fn",
    "make_energy_forces_stress_fn":
        "matsci_jax.energy:make_energy_forces_stress_fn",
    # Training pieces.
    "TrainState": "matsci_jax.train_state:TrainState",
    "make_optimizer": "matsci_jax.train_state:make_optimizer",
    "make_s2ef_loss": "matsci_jax.train_step:make_s2ef_loss",
    "make_energy_loss": "matsci_jax.train_step:make_energy_loss",
    "make_train_step": "matsci_jax.train_step:make_train_step",
    "make_eval_step": "matsci_jax.train_step:make_eval_step",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = _lazy.attach(__name__, _NAMES)
