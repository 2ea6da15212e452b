"""GraphSpec: one definition of graph settings, written and read back."""

import numpy as np
import pytest
from ase.build import bulk

from matsci_jax.data.ase_reader import structure_from_atoms
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec


def test_round_trip_and_select():
  both = GraphSpec(5.0, 0, "both", PointCloudSpec(4.0, 12, 2, 3))
  assert both.max_neighbors is None  # 0 keeps every neighbour.
  assert GraphSpec.from_dict(both.to_dict()) == both
  assert both.representations == ("graph", "point_cloud")
  pc = both.select("point_cloud")
  assert pc.edge_cutoff == 4.0 and pc.edge_multiple == 12
  graph = both.select("graph")
  assert graph.point_cloud is None and graph.edge_multiple == 1
  assert graph.edge_cutoff == 5.0
  with pytest.raises(ValueError, match="no point_cloud representation"):
    graph.select("point_cloud")


@pytest.mark.parametrize("kwargs,match", [
    (dict(cutoff=0.0), "cutoff must be positive"),
    (dict(max_neighbors=-5), "max_neighbors must be >= 0"),
    (dict(representation="mesh"), "representation must be one of"),
    (dict(representation="point_cloud"), "needs point-cloud settings"),
    (dict(point_cloud=PointCloudSpec(5.0)), "takes no point-cloud"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    GraphSpec(**kwargs)


def test_examples_follow_the_spec():
  atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
  s = structure_from_atoms(atoms, "<atoms>", 0)
  spec = GraphSpec(4.0, 6, "both", PointCloudSpec(3.0, 8, 0, 0))
  stored = spec.stored_example(s, "s2ef")
  graph = spec.select("graph").example(s, "s2ef")
  slots = spec.select("point_cloud").example(s, "s2ef")
  for key in ("senders", "receivers", "cell_shifts"):
    np.testing.assert_array_equal(graph[key], stored[key])
    np.testing.assert_array_equal(slots[key], stored["pc_" + (
        "shifts" if key == "cell_shifts" else key)])
  assert np.bincount(graph["receivers"]).max() == 6
  assert len(slots["senders"]) % 8 == 0 and "slot_mask" in slots
  with pytest.raises(ValueError, match="reads one representation"):
    spec.example(s, "s2ef")


def test_a_slab_stress_is_left_out():
  """EMT gives a 2D-periodic slab a stress, which has no volume to refer
  to: the reader leaves it out with a warning, and an example built for
  prediction holds none."""
  import dataclasses

  from ase.build import fcc111
  from ase.calculators.emt import EMT

  from matsci_jax.data.graphs import graph_from_atoms
  from matsci_jax.data.structure import DataError, StressIgnoredWarning
  slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
  slab.calc = EMT()
  slab.get_forces()
  with pytest.warns(StressIgnoredWarning, match="<slab>: stress left out"):
    s = structure_from_atoms(slab, "<slab>", 0)
  assert s.stress is None and not slab.pbc.all()
  example = graph_from_atoms(slab)
  assert "stress" not in example and example["forces"].shape == (12, 3)
  # A Structure made by hand with such a stress is refused.
  bad = dataclasses.replace(s, stress=np.zeros((3, 3)))
  with pytest.raises(DataError, match="a stress needs a cell periodic"):
    GraphSpec().stored_example(bad, "s2ef", stress=True)
