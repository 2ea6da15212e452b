"""Budgets, greedy packing, collation and the grain pipeline."""

import numpy as np
import pytest

from matsci_jax.data import batching, converter, pipeline
from matsci_jax.data.batching import Budget, BudgetError
from matsci_jax.data.dataset_io import Dataset


def _random_sizes(seed, n=500):
  rng = np.random.default_rng(seed)
  atoms = rng.integers(5, 120, n)
  edges = atoms * rng.integers(10, 50, n)
  return np.stack([atoms, edges], 1)


@pytest.mark.parametrize("seed", range(5))
def test_pack_respects_budget_and_loses_nothing(seed):
  sizes = _random_sizes(seed)
  budget = batching.compute_budget(sizes, batch_size=8, seed=seed)
  order = np.random.default_rng(seed).permutation(len(sizes))
  batches = batching.pack(order, sizes, budget)
  assert np.array_equal(np.concatenate(batches), order)  # All, once, in order.
  for b in batches:
    assert sizes[b, 0].sum() <= budget.n_node - 1
    assert sizes[b, 1].sum() <= budget.n_edge
    assert len(b) <= budget.n_graph - 1
  eff = batching.padding_efficiency(batches, sizes, budget)
  assert eff["nodes"] >= 0.85, eff


def test_oversized_structure_gets_a_clear_error():
  sizes = np.array([[10, 100], [500, 1000], [10, 100]])
  with pytest.raises(BudgetError, match=r"structure 1 has 500 atoms.*"
                     r"raise the batch size"):
    batching.pack(np.arange(3), sizes,
                  Budget(n_node=101, n_edge=5000, n_graph=5))


@pytest.fixture(scope="module")
def toy(shared_data, tmp_path_factory):
  out = tmp_path_factory.mktemp("toy") / "ds"
  converter.convert(
      [f"train={shared_data / 'oc20_s2ef_toy/noedges'}",
       f"val={shared_data / 'oc20_s2ef_toy/fairchem_core_1.9_noedges'}"],
      out, task="s2ef", workers=1, progress=False)
  return Dataset(str(out))


def test_padding_efficiency_on_the_oc20_toy(toy):
  split = toy.split("train")
  budget = batching.compute_budget(split.sizes, batch_size=8)
  plan = pipeline.BatchPlan(split.sizes, budget, shuffle=True, seed=0,
                            num_epochs=1)
  assert plan.efficiency(0)["nodes"] >= 0.90


def test_collate_layout_and_masks(toy):
  split = toy.split("train")
  examples = [split.source[i] for i in (4, 9, 2)]
  budget = Budget(n_node=130, n_edge=6000, n_graph=5)
  g = batching.collate(examples, budget)
  assert g.nodes["positions"].shape == (130, 3)
  assert g.edges["cell_shifts"].shape == (6000, 3)
  assert g.globals["cell"].shape == (5, 3, 3)
  assert g.nodes["mask"].sum() == 114 and g.globals["mask"].tolist() == [
      True, True, True, False, False]
  n_edges = sum(ex["senders"].shape[0] for ex in examples)
  assert g.edges["mask"].sum() == n_edges
  # Padding edges join the first padding node to itself.
  assert ((g.senders[n_edges:] == 114).all()
          and (g.receivers[n_edges:] == 114).all())
  # Real edges stay within their own graph.
  graph = g.nodes["graph"]
  assert np.array_equal(graph[g.senders[:n_edges]],
                        graph[g.receivers[:n_edges]])
  assert np.array_equal(np.bincount(graph[:114]), [38, 38, 38])
  assert (g.globals["energy"].dtype == np.float32
          and g.globals["sid"].dtype == np.int32)
  np.testing.assert_array_equal(g.nodes["positions"][38:76],
                                examples[1]["positions"])
  np.testing.assert_array_equal(g.globals["energy"][:3],
                                [ex["energy"] for ex in examples])
  with pytest.raises(BudgetError):
    batching.collate(examples, Budget(n_node=100, n_edge=6000, n_graph=5))
  empty = batching.collate([], budget, template=examples[0])
  assert not empty.nodes["mask"].any() and not empty.globals["mask"].any()
  assert empty.nodes["positions"].shape == (130, 3)
  assert (set(empty.nodes) == set(g.nodes)
          and set(empty.globals) == set(g.globals))


def test_batch_plan_is_seeded_and_sharded():
  sizes = _random_sizes(7, n=300)
  budget = batching.compute_budget(sizes, 6)
  a = pipeline.BatchPlan(sizes, budget, shuffle=True, seed=1, num_epochs=3)
  b = pipeline.BatchPlan(sizes, budget, shuffle=True, seed=1, num_epochs=3)
  assert len(a) == len(b) and all(np.array_equal(a[i], b[i])
                                  for i in range(len(a)))
  e0, e1 = a.epoch(0), a.epoch(1)
  assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
  assert sorted(np.concatenate(e1).tolist()) == list(range(300))
  with pytest.raises(IndexError):
    a[len(a)]
  shards = [pipeline.BatchPlan(sizes, budget, shuffle=True, seed=1,
                               num_epochs=1, shard_index=k, shard_count=4)
            for k in range(4)]
  assert len({len(s) for s in shards}) == 1  # Same number of steps each.
  covered = np.concatenate([np.concatenate(s.epoch(0)) for s in shards])
  assert sorted(covered.tolist()) == list(range(300))  # Nothing dropped.


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x.nodes["positions"], y.nodes["positions"])
             and np.array_equal(x.senders, y.senders)
             and np.array_equal(x.globals["energy"], y.globals["energy"],
                                equal_nan=True) for x, y in zip(a, b))


def test_pipeline_resumes_in_the_same_order(toy):
  split = toy.split("train")
  budget = batching.compute_budget(split.sizes, 4)
  ds, plan = pipeline.batch_dataset(split, budget, shuffle=True, seed=5,
                                    num_epochs=None)
  it = iter(ds)
  _take(it, 7)
  state = it.get_state()
  expected = _take(it, 40)  # Crosses an epoch boundary.
  assert plan.batches_per_epoch(0) < 47
  resumed = iter(ds)
  resumed.set_state(state)
  assert _same(_take(resumed, 40), expected)
  # Worker processes give the same batches, in the same order.
  ds_mp, _ = pipeline.batch_dataset(split, budget, shuffle=True, seed=5,
                                    num_epochs=None, worker_count=2)
  it_mp = iter(ds_mp)
  assert _same(_take(it_mp, 47), _take(iter(ds), 47))
  shapes = {(g.nodes["positions"].shape, g.senders.shape) for g in expected}
  assert len(shapes) == 1  # One batch shape: the step compiles once.


def test_batch_plan_is_thread_safe():
  """grain's prefetch threads index the plan concurrently across epochs."""
  import threading
  sizes = _random_sizes(3, n=400)
  budget = batching.compute_budget(sizes, 4)
  reference = pipeline.BatchPlan(sizes, budget, shuffle=True, seed=2,
                                 num_epochs=6)
  expected = [reference[i] for i in range(len(reference))]
  for _ in range(3):
    plan = pipeline.BatchPlan(sizes, budget, shuffle=True, seed=2,
                              num_epochs=None)
    got = {}

    def worker(offset):
      for i in range(offset, len(expected), 4):
        got[i] = plan[i]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert all(np.array_equal(got[i], expected[i])
               for i in range(len(expected)))


def test_plan_gives_each_process_its_devices_batches():
  """Steps of 2 processes x 3 batches cover every structure once per epoch;
  one batch per step and process is the plain every-P-th sharding."""
  sizes = _random_sizes(4, n=300)
  budget = batching.compute_budget(sizes, 4)
  whole = pipeline.BatchPlan(sizes, budget, shuffle=True, seed=1)
  plans = [pipeline.BatchPlan(sizes, budget, shuffle=True, seed=1,
                              shard_index=p, shard_count=2, per_step=3)
           for p in range(2)]
  assert len(plans[0]) == len(plans[1]) == -(-len(whole) // 6)
  seen = [int(i) for plan in plans for step in plan.epoch(0)
          for batch in step for i in batch]
  assert sorted(seen) == list(range(len(sizes)))
  # Step s takes batches 6s..6s+5 of the whole sequence: process 0 the
  # first three, process 1 the next three.
  for s in range(len(plans[0]) - 1):
    for p in range(2):
      for j in range(3):
        assert np.array_equal(plans[p][s][j], whole[6 * s + 3 * p + j])
  single = pipeline.BatchPlan(sizes, budget, shuffle=True, seed=1,
                              shard_index=1, shard_count=2)
  assert all(np.array_equal(single[s], whole[2 * s + 1])
             for s in range(len(whole) // 2))


def test_damaged_record_names_split_and_example(toy, tmp_path):
  import shutil
  folder = tmp_path / "copy"
  shutil.copytree(toy.folder, folder)
  shard = next(p for p in folder.iterdir() if "-val.array_record" in p.name)
  data = bytearray(shard.read_bytes())
  for k in range(len(data) // 3, len(data) // 3 + 64):
    data[k] ^= 0xFF
  shard.write_bytes(bytes(data))
  split = Dataset(str(folder)).split("val")
  budget = batching.compute_budget(split.sizes, 4)
  ds, _ = pipeline.batch_dataset(split, budget, shuffle=False)
  with pytest.raises(Exception,
                     match=r"split 'val', example \d+: cannot read it"):
    list(ds)
