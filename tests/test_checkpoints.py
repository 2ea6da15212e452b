"""The run folder: model.json and config.json written and read side by side,
and clear errors for folders that are not runs."""

import json
import warnings

import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from matsci_jax import checkpoints, tasks
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.energy import Normalizer


def test_model_and_config_files_round_trip(tmp_path):
  run = checkpoints.RunFolder(str(tmp_path / "run")).create()
  config = test_config.get_config("is2re,gala")
  spec = GraphSpec(5.0, None, "point_cloud", PointCloudSpec(5.5, 12, 3, 7))
  norm = Normalizer.identity()
  run.write_model(config.model, tasks.IS2RE, norm, spec, "/data/x", 123)
  run.write_config(config)
  info = run.read_model()
  assert info["task"] is tasks.IS2RE and info["graph_spec"] == spec
  assert info["num_params"] == 123 and info["dataset"] == "/data/x"
  assert Normalizer.from_dict(info["normalizer"]).to_dict() == norm.to_dict()
  assert run.read_config().to_dict() == config.to_dict()
  assert not list((tmp_path / "run").glob("*.tmp"))  # Written whole.


def test_load_names_what_is_missing(small_devset, tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="not a training"):
    checkpoints.load(small_devset)
  (tmp_path / "model.json").write_text("{}")
  with pytest.raises(checkpoints.CheckpointError, match="lacks model, task"):
    checkpoints.load(tmp_path)
  (tmp_path / "model.json").write_text(json.dumps(
      {"model": {"name": "egnn"}, "task": "s2ef", "normalizer": {},
       "cutoff": 6.0}))
  with pytest.raises(checkpoints.CheckpointError, match="holds no checkpoints"):
    checkpoints.load(tmp_path)


def test_trained_builds_the_graphs_it_was_trained_on(trained_s2ef):
  from ase.build import fcc111
  trained = checkpoints.load(trained_s2ef)
  assert trained.task is tasks.S2EF
  assert trained.graph_spec.representation == "graph"
  atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0, periodic=True)
  example = trained.example(atoms)
  x = example["positions"]
  vec = (x[example["senders"]] - x[example["receivers"]]
         + example["cell_shifts"] @ example["cell"])
  assert np.linalg.norm(vec, axis=-1).max() <= trained.graph_spec.cutoff + 1e-4
  counts = np.bincount(example["receivers"], minlength=len(atoms))
  assert counts.max() <= trained.graph_spec.max_neighbors
  assert isinstance(trained.config, ml_collections.ConfigDict)


def test_unseen_elements_warn_once_or_stop(trained_s2ef):
  from ase.build import bulk

  from matsci_jax.ase import Calculator
  from matsci_jax.data.ase_reader import structure_from_atoms
  trained = checkpoints.load(trained_s2ef)
  assert 29 in trained.elements and 26 not in trained.elements  # Cu, Fe.
  seen = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # A known element warns nothing.
    trained.example(seen)
  iron = seen.copy()
  iron.numbers[:2] = 26
  iron.calc = Calculator(trained)
  with pytest.warns(checkpoints.UnseenElementWarning, match=r"Z=\[26\]"):
    iron.get_potential_energy()
  iron.positions[0] += 0.05
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Once per element.
    iron.get_potential_energy()
  with pytest.raises(checkpoints.UnseenElementError, match="entry 7"):
    trained.example(structure_from_atoms(iron, "fe.xyz", 7), strict=True)
