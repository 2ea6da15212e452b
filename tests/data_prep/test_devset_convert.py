"""Built-in dev set, converted by the same converter, is ready to train on."""

import json

import numpy as np
import pytest

from matsci_jax.data import batching, dataset_io, pipeline
from matsci_jax.data import devset as devset_lib  # `devset`: the fixture


def test_full_devset_sizes_and_targets(devset):
  s2ef = dataset_io.Dataset(str(devset / "s2ef"))
  is2re = dataset_io.Dataset(str(devset / "is2re"))
  assert s2ef.task == "s2ef" and is2re.task == "is2re"
  n_frames = sum(len(s2ef.split(s)) for s in ("train", "val"))
  n_systems = sum(len(is2re.split(s)) for s in ("train", "val"))
  assert 2000 <= n_frames <= 5000 and 200 <= n_systems <= 400
  train = s2ef.split("train")
  assert train.targets == {"energy": True, "forces": True}
  stats = train.statistics
  assert set(stats["element_counts"]) <= {
      str(z) for z in (1, 6, 7, 8, 13, 28, 29, 46, 47, 78, 79)}
  assert stats["force_rms"] > 0 and stats["energy"]["std"] > 0
  ex = is2re.split("val").source[0]
  assert (np.isfinite(ex["energy_relaxed"])
          and ex["energy_relaxed"] < ex["energy"])
  assert set(np.unique(ex["tags"])) == {0, 1, 2}
  assert np.array_equal(ex["fixed"], ex["tags"] == 0)


@pytest.mark.parametrize("task", ["s2ef", "is2re"])
@pytest.mark.parametrize("batch_size", [8, 16])
def test_devset_padding_efficiency(devset, task, batch_size):
  ds = dataset_io.Dataset(str(devset / task))
  for name in ds.splits:
    split = ds.split(name)
    budget = batching.compute_budget(split.sizes, batch_size)
    plan = pipeline.BatchPlan(split.sizes, budget, shuffle=True, seed=0)
    assert plan.efficiency()["nodes"] >= 0.90, (name, budget)


def test_devset_is_deterministic(tmp_path):
  a = devset_lib.build_devset(tmp_path / "a", seed=4, num_systems=8,
                              workers=2, progress=False)
  b = devset_lib.build_devset(tmp_path / "b", seed=4, num_systems=8,
                              workers=1, progress=False)
  assert {k: v for k, v in a.items() if "seconds" not in k} == {
      k: v for k, v in b.items() if "seconds" not in k}
  for task in ("s2ef", "is2re"):
    x = dataset_io.Dataset(str(tmp_path / "a" / task))
    y = dataset_io.Dataset(str(tmp_path / "b" / task))
    assert x.metadata["splits"] == y.metadata["splits"]
    for name in x.splits:
      sx, sy = x.split(name), y.split(name)
      for i in range(len(sx)):
        ex, ey = sx.source[i], sy.source[i]
        for k in ex:
          assert np.array_equal(ex[k], ey[k], equal_nan=True), (
              task, name, i, k)
  with pytest.raises(FileExistsError, match="--overwrite"):
    devset_lib.build_devset(tmp_path / "a", seed=4, num_systems=8,
                            progress=False)
  assert devset_lib.is_built(tmp_path / "a", 8)
  assert not devset_lib.is_built(tmp_path / "a", 9)


def test_devset_graph_spec_is_both_representations(devset):
  for task in ("s2ef", "is2re"):
    ds = dataset_io.Dataset(str(devset / task))
    assert ds.graph_spec == devset_lib.DEVSET_GRAPH_SPEC
  assert devset_lib.is_built(devset, devset_lib.DEFAULT_NUM_SYSTEMS)


def test_is_built_reads_the_marker(tmp_path):
  marker = tmp_path / devset_lib.MARKER
  assert not devset_lib.is_built(tmp_path, 8)  # No marker.
  record = {"seed": 0, "num_systems": 8, "cutoff": 6.0, "max_neighbors": 50,
            "representation": "both", "version": devset_lib.VERSION}
  marker.write_text(json.dumps(record))
  assert devset_lib.is_built(tmp_path, 8)
  assert not devset_lib.is_built(tmp_path, 300)
  for stale in ({"representation": "graph"},
                {"version": devset_lib.VERSION - 1}):
    marker.write_text(json.dumps({**record, **stale}))
    assert not devset_lib.is_built(tmp_path, 8), stale
  marker.write_text('{"num_systems": 8, "repr')  # Cut short by a crash.
  assert not devset_lib.is_built(tmp_path, 8)
