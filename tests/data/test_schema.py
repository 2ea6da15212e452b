"""The example serializer writes what tfds writes, byte for byte."""

import dataclasses

import numpy as np
import pytest
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.proto import tf_example_pb2

from matsci_jax.data import schema
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.data.lmdb_reader import LmdbReader

SPECS = {
    "graph": GraphSpec(),
    "point_cloud": GraphSpec(representation="point_cloud",
                             point_cloud=PointCloudSpec(6.0)),
    "both": GraphSpec(5.0, 30, "both", PointCloudSpec(5.0, 12, 4, seed=3)),
}


def _tfds_bytes(features, example):
  """tfds' own serialization, with protobuf's deterministic map order."""
  serializer = example_serializer.ExampleSerializer(
      features.get_serialized_info())
  return serializer.get_tf_example(features.encode_example(
      example)).SerializeToString(deterministic=True)


@pytest.mark.parametrize("representation", sorted(SPECS))
@pytest.mark.parametrize("task,variant", [
    ("s2ef", "oc20_s2ef_toy/edges"), ("is2re", "oc20_is2re_toy"),
    ("s2ef", "matsciml_lips_devset")])
def test_same_bytes_as_tfds(shared_data, task, variant, representation):
  spec = SPECS[representation]
  features = schema.features(task, spec.point_cloud is not None)
  serialize = schema.Serializer(task, spec.point_cloud is not None)
  reader = LmdbReader(str(shared_data / variant))
  for i in range(0, len(reader), max(len(reader) // 6, 1)):
    s = reader[i]
    if i % 2:  # Missing targets are NaN; negative ids take ten bytes.
      s = dataclasses.replace(s, energy=None, forces=None, sid=-5 - i)
    example = spec.stored_example(s, task)
    got = serialize(example)
    assert got == _tfds_bytes(features, example)
    # And it parses to the example (any map order parses the same).
    parsed = features.deserialize_example_np(got)
    for key, value in example.items():
      np.testing.assert_array_equal(parsed[key], value, err_msg=key)


def test_empty_arrays_and_parsing():
  features = schema.features("s2ef")
  example = {
      "atomic_numbers": np.array([1], np.int32),
      "positions": np.zeros((1, 3), np.float32),
      "cell": np.eye(3, dtype=np.float32), "pbc": np.zeros(3, bool),
      "tags": np.array([-1], np.int32), "fixed": np.ones(1, bool),
      "senders": np.zeros(0, np.int32), "receivers": np.zeros(0, np.int32),
      "cell_shifts": np.zeros((0, 3), np.int8),
      "energy": np.float32(-1e30), "forces": np.full((1, 3), np.inf,
                                                      np.float32),
      "sid": np.int64(2**62), "fid": np.int64(-2**63)}
  got = schema.Serializer("s2ef")(example)
  assert got == _tfds_bytes(features, example)
  assert tf_example_pb2.Example.FromString(got) == (
      tf_example_pb2.Example.FromString(features.serialize_example(example)))


def test_wrong_dtype_or_shape_is_an_error():
  spec = GraphSpec()
  from ase.build import bulk

  from matsci_jax.data.ase_reader import structure_from_atoms
  example = spec.stored_example(
      structure_from_atoms(bulk("Cu") * (2, 1, 1), "<cu>", 0), "s2ef")
  serialize = schema.Serializer("s2ef")
  with pytest.raises(ValueError, match="'positions' must be float32"):
    serialize(dict(example, positions=example["positions"].astype(float)))
  with pytest.raises(ValueError, match="'cell' must be float32 of shape"):
    serialize(dict(example, cell=np.eye(2, dtype=np.float32)))


@pytest.mark.parametrize("representation", sorted(SPECS))
@pytest.mark.parametrize("task,variant", [
    ("s2ef", "oc20_s2ef_toy/edges"), ("is2re", "oc20_is2re_toy")])
def test_stress_bytes_and_added_nan_stress(shared_data, task, variant,
                                           representation):
  """With stress, the bytes are tfds' too; a record written without stress
  and given a NaN one by `add_missing_stress` is the record of the same
  example with NaN stress (what splits without stress store in a dataset
  with stress)."""
  spec = SPECS[representation]
  pc = spec.point_cloud is not None
  features = schema.features(task, pc, stress=True)
  with_stress = schema.Serializer(task, pc, stress=True)
  without = schema.Serializer(task, pc)
  assert "stress" in features.keys()
  assert "stress" not in schema.features(task, pc).keys()
  reader = LmdbReader(str(shared_data / variant))
  rng = np.random.default_rng(0)
  for i in range(0, len(reader), max(len(reader) // 4, 1)):
    s = dataclasses.replace(reader[i], stress=rng.normal(size=(3, 3)))
    example = spec.stored_example(s, task, stress=True)
    got = with_stress(example)
    assert got == _tfds_bytes(features, example)
    np.testing.assert_array_equal(
        features.deserialize_example_np(got)["stress"],
        s.stress.astype(np.float32))
    bare = dataclasses.replace(s, stress=None)
    nan_example = spec.stored_example(bare, task, stress=True)
    assert np.isnan(nan_example["stress"]).all()
    assert schema.add_missing_stress(
        without(spec.stored_example(bare, task))) == with_stress(nan_example)
