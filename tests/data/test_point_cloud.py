"""Point clouds: centre selection, neighbour slots, shards and budgets."""

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111
from ase.neighborlist import neighbor_list as ase_neighbor_list

from matsci_jax.data import batching, converter, pipeline
from matsci_jax.data.ase_reader import structure_from_atoms
from matsci_jax.data.dataset_io import Dataset, DatasetError
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.data.point_cloud import point_cloud, select_centers

K = 12


def _slab(tagged: bool = True):
  """Pt(111), 4 layers, CO on top; OC20 tags (0, 1, 2) or none."""
  atoms = fcc111("Pt", size=(2, 2, 4), vacuum=6.0)
  layer = atoms.get_tags()  # ASE: 1 is the top layer
  add_adsorbate(atoms, "C", 1.9, "ontop")
  add_adsorbate(atoms, "O", 3.05, "ontop")
  atoms.pbc = True
  if tagged:
    atoms.set_tags(np.concatenate([np.where(layer <= 2, 1, 0), [2, 2]]))
  else:
    del atoms.arrays["tags"]
  return atoms


def test_centers_are_adsorbate_surface_and_a_seeded_bulk_sample():
  tags = np.array([0, 0, 0, 0, 0, 1, 1, 2])
  picks = [select_centers(tags, 2, np.random.default_rng(seed))
           for seed in range(8)]
  for centers in picks:
    assert list(centers[-3:]) == [5, 6, 7] and len(centers) == 5
    assert np.all(tags[centers[:2]] == 0) and np.all(np.diff(centers) > 0)
  again = select_centers(tags, 2, np.random.default_rng(3))
  assert np.array_equal(again, picks[3])
  assert len({tuple(c) for c in picks}) > 1  # the sample follows the seed
  assert np.array_equal(select_centers(tags, 9, np.random.default_rng(0)),
                        np.arange(8))
  assert np.array_equal(select_centers(np.full(4, -1), 2,
                                       np.random.default_rng(0)),
                        np.arange(4))


@pytest.mark.parametrize("cutoff", [3.0, 6.0])
def test_slots_are_the_nearest_periodic_neighbours(cutoff):
  atoms = _slab()
  s = structure_from_atoms(atoms, "<slab>", 0)
  pc = point_cloud(s, cutoff, K, bulk_samples=3,
                   rng=np.random.default_rng(0))
  tags = atoms.get_tags()
  assert set(np.nonzero(tags > 0)[0]) <= set(pc.centers)
  assert np.sum(tags[pc.centers] == 0) == 3
  assert len(pc.senders) == len(pc.centers) * K
  vec = (atoms.positions[pc.senders] - atoms.positions[pc.receivers]
         + pc.cell_shifts @ atoms.cell.array).reshape(-1, K, 3)
  dist = np.linalg.norm(vec, axis=-1)
  mask = pc.mask.reshape(-1, K)
  # An independent neighbour list: ASE's, over periodic images.
  i, d = ase_neighbor_list("id", atoms, cutoff)
  for row, c in enumerate(pc.centers):
    assert np.all(pc.receivers.reshape(-1, K)[row] == c)
    expected = np.sort(d[i == c])[:K]
    n = len(expected)
    # Real slots first, nearest first; then empty slots.
    assert np.array_equal(mask[row], np.arange(K) < n)
    np.testing.assert_allclose(dist[row, :n], expected, atol=1e-9)
    assert np.all(np.diff(dist[row, :n]) >= -1e-12)
    empty = ~mask[row]
    assert np.all(pc.senders.reshape(-1, K)[row][empty] == c)
    assert np.all(pc.cell_shifts.reshape(-1, K, 3)[row][empty] == 0)
  if cutoff == 3.0:  # Pt-Pt is 2.77 Å: fewer than K neighbours, some empty
    assert not mask.all() and mask.any(axis=1).all()


def test_untagged_structures_make_every_atom_a_centre():
  atoms = _slab(tagged=False)
  pc = point_cloud(structure_from_atoms(atoms, "<slab>", 0), 6.0, K, 3,
                   np.random.default_rng(0))
  assert np.array_equal(pc.centers, np.arange(len(atoms)))


def _write_extxyz(path, n):
  from ase.calculators.singlepoint import SinglePointCalculator
  from ase.io import write
  frames = []
  rng = np.random.default_rng(0)
  for _ in range(n):
    atoms = _slab()
    atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
    atoms.calc = SinglePointCalculator(
        atoms, energy=float(rng.normal()),
        forces=rng.normal(size=atoms.positions.shape))
    frames.append(atoms)
  write(path, frames, format="extxyz")


@pytest.mark.parametrize("representation", ["point_cloud", "both"])
def test_converter_writes_point_cloud_shards(tmp_path, representation):
  src = tmp_path / "frames.extxyz"
  _write_extxyz(src, 6)
  out = tmp_path / "ds"
  spec = GraphSpec(cutoff=5.0, representation=representation,
                   point_cloud=PointCloudSpec(5.0, num_neighbors=K,
                                              bulk_samples=2))
  converter.convert([f"train={src}"], out, task="s2ef", workers=1,
                    progress=False, graph_spec=spec)
  ds = Dataset(str(out))
  expected = (("point_cloud",) if representation == "point_cloud"
              else ("graph", "point_cloud"))
  assert ds.representations == expected
  split = ds.split("train", "point_cloud")
  ex = split.source[0]
  n_centres = 8 + 2 + 2  # surface (two layers of four), CO, bulk sample
  assert ex["senders"].shape == (n_centres * K,)
  slots = ex["slot_mask"].reshape(n_centres, K)
  # Every centre has neighbours; the O atom, above the slab, not K of them.
  assert slots[:, 0].all() and not slots.all()
  assert np.array_equal(split.sizes[:, 1], np.full(6, n_centres * K))
  assert ds.metadata["point_cloud"]["num_neighbors"] == K
  # The bulk sample is seeded per structure: same seed, same shards.
  again = tmp_path / "again"
  converter.convert([f"train={src}"], again, task="s2ef", workers=2,
                    progress=False, graph_spec=spec)
  other = Dataset(str(again)).split("train", "point_cloud").source
  for i in range(6):
    assert np.array_equal(other[i]["receivers"], split.source[i]["receivers"])
  if representation == "point_cloud":
    with pytest.raises(DatasetError, match="--representation both"):
      ds.split("train", "graph")
  else:
    assert ds.split("train", "graph").sizes[0, 1] != n_centres * K


@pytest.mark.parametrize("task", ["s2ef", "is2re"])
def test_devset_point_cloud_batches_are_padded_rows_of_slots(devset, task):
  ds = Dataset(str(devset / task))
  k = ds.metadata["point_cloud"]["num_neighbors"]
  for name in ds.splits:
    split = ds.split(name, "point_cloud")
    budget = batching.compute_budget(split.sizes, 8, edge_multiple=k)
    assert budget.n_edge % k == 0
    plan = pipeline.BatchPlan(split.sizes, budget, shuffle=True, seed=0)
    efficiency = plan.efficiency()
    assert efficiency["nodes"] >= 0.90, (name, budget, efficiency)
    graph = batching.collate([split.source[int(i)] for i in plan[0]], budget,
                             template=split.source[0])
    assert graph.senders.shape == (budget.n_edge,)
    receivers = graph.receivers.reshape(-1, k)
    # Every row of K slots belongs to one centre; padding rows belong to a
    # padding node and hold no real slot.
    assert np.all(receivers == receivers[:, :1])
    padding = ~graph.nodes["mask"][receivers[:, 0]]
    assert padding.any()
    assert not graph.edges["mask"].reshape(-1, k)[padding].any()
    assert graph.edges["mask"].reshape(-1, k)[~padding].any(axis=1).all()
