"""Data: readers of OC20 LMDBs and ASE files, converted datasets, batches.

The pieces a research script needs most (loaded on first use):
* `graph_from_atoms(atoms, cutoff=...)`, `graph_from_arrays(numbers,
  positions, cell, pbc, cutoff=...)`: one structure as a stored example;
* `Budget`, `compute_budget`, `bucket_budget`: padded sizes of a batch;
* `collate(examples, budget)`, `batch_examples(examples)`: a padded
  `jraph.GraphsTuple`;
* `Dataset(folder).split(name)`: a converted dataset's split;
* `GraphSpec`: cutoff, neighbour cap, representation and point-cloud
  settings, as a dataset and a trained model record them.
"""

from matsci_jax import _lazy

_NAMES = {
    "Budget": "matsci_jax.data.batching:Budget",
    "BudgetError": "matsci_jax.data.batching:BudgetError",
    "bucket_budget": "matsci_jax.data.batching:bucket_budget",
    "collate": "matsci_jax.data.batching:collate",
    "compute_budget": "matsci_jax.data.batching:compute_budget",
    "Dataset": "matsci_jax.data.dataset_io:Dataset",
    "DatasetError": "matsci_jax.data.dataset_io:DatasetError",
    "batch_examples": "matsci_jax.data.graphs:batch_examples",
    "GraphSpec": "matsci_jax.data.graph_spec:GraphSpec",
    "PointCloudSpec": "matsci_jax.data.graph_spec:PointCloudSpec",
    "graph_from_atoms": "matsci_jax.data.graphs:graph_from_atoms",
    "graph_from_arrays": "matsci_jax.data.graphs:graph_from_arrays",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = _lazy.attach(__name__, _NAMES)
