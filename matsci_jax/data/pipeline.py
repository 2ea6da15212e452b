"""grain input pipeline: seeded, resumable, multi-worker batches of graphs.

The batch sequence is a pure function of (seed, epoch): `BatchPlan` shuffles
the split per epoch and packs it under the budget, so batch k is the same in
every run and a restored iterator state (a position in that sequence) gives
the same data order as an uninterrupted run. Workers load and collate batches
in parallel; grain keeps their output in order.

Worker processes re-import the `__main__` module: scripts that use workers
must guard their entry point with `if __name__ == "__main__":` (absl's
`app.run` does, and parses flags first, which grain's workers need).
"""

from __future__ import annotations

import bisect
import dataclasses
import sys
import threading
from typing import Optional

from absl import flags
import grain
import jax
import numpy as np

from matsci_jax.data import batching
from matsci_jax.data.batching import Budget
from matsci_jax.data.dataset_io import DatasetError, Split


class BatchPlan:
  """The sequence of batches (arrays of structure indices) of a split.

  Args:
    sizes: int [num_structures, 2] atoms and edges per structure.
    budget: the padding budget.
    shuffle: reshuffle every epoch (training) or keep file order (eval).
    seed: shuffling seed.
    num_epochs: epochs to cover; None repeats forever.
    shard_index, shard_count: this process's share in multi-process runs.
    per_step: batches a process takes per step (one per local device and
      micro-batch); items of the plan are then tuples of that many batches.
    sampler: `sampler(epoch) -> structure indices` in the order to pack
      them (e.g. `MixtureSampler`); default a seeded permutation of all
      structures (training) or file order (evaluation).
      Each step takes `shard_count * per_step` consecutive batches, process
      `shard_index` the `per_step` at offset `shard_index * per_step`.
      Epochs are evened out with empty (all-padding) batches, so no
      structure is dropped and every process runs the same number of steps.
  """

  def __init__(self, sizes: np.ndarray, budget: Budget, *, shuffle: bool,
               seed: int = 0, num_epochs: Optional[int] = 1,
               shard_index: int = 0, shard_count: int = 1, per_step: int = 1,
               sampler=None):
    self.sizes = np.asarray(sizes)
    self.sampler = sampler
    self.budget = budget
    self.shuffle = shuffle
    self.seed = seed
    self.num_epochs = num_epochs
    self.shard_index, self.shard_count = shard_index, shard_count
    self.per_step = per_step
    if per_step < 1:
      raise ValueError(f"per_step must be at least 1, got {per_step}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    big = np.argmax(self.sizes[:, 0] + self.sizes[:, 1])
    budget.check(*self.sizes[big].tolist(), f"structure {int(big)}")
    self._ends: list[int] = []  # Cumulative batch counts per epoch.
    self._cache: dict[int, list] = {}
    # grain's prefetch threads index the plan concurrently.
    self._lock = threading.RLock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.RLock()

  def epoch(self, e: int) -> list:
    """This shard's batches (tuples of `per_step` batches) of epoch `e`."""
    with self._lock:
      if e not in self._cache:
        if len(self._cache) >= 2:  # Keep the current and the next epoch.
          del self._cache[min(self._cache)]
        self._cache[e] = self._pack_epoch(e)
      return self._cache[e]

  def _pack_epoch(self, e: int) -> list[np.ndarray]:
    n = len(self.sizes)
    if self.sampler is not None:
      order = self.sampler(e)
    elif self.shuffle:
      order = np.random.default_rng([self.seed, e]).permutation(n)
    else:
      order = np.arange(n)
    batches = batching.pack(order, self.sizes, self.budget)
    group = self.shard_count * self.per_step
    steps = -(-len(batches) // group)
    empty = np.zeros(0, np.int64)
    batches += [empty] * (steps * group - len(batches))
    first = self.shard_index * self.per_step
    mine = [batches[s * group + first:s * group + first + self.per_step]
            for s in range(steps)]
    return [b[0] for b in mine] if self.per_step == 1 else [tuple(b)
                                                            for b in mine]

  def batches_per_epoch(self, e: int = 0) -> int:
    return len(self.epoch(e))

  def _locate(self, i: int) -> tuple[int, int]:
    with self._lock:
      while not self._ends or self._ends[-1] <= i:
        e = len(self._ends)
        if self.num_epochs is not None and e >= self.num_epochs:
          raise IndexError(i)
        self._ends.append((self._ends[-1] if self._ends else 0)
                          + len(self.epoch(e)))
      e = bisect.bisect_right(self._ends, i)
      return e, i - (self._ends[e - 1] if e else 0)

  def __len__(self) -> int:
    if self.num_epochs is None:
      return sys.maxsize
    try:
      self._locate(sys.maxsize)
    except IndexError:
      pass
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, i: int) -> np.ndarray:
    if i < 0:
      i += len(self)
    e, j = self._locate(i)
    return self.epoch(e)[j]

  def efficiency(self, e: int = 0) -> dict[str, float]:
    """Padding efficiency of epoch `e` (empty shard-filling batches count)."""
    batches = self.epoch(e)
    if self.per_step > 1:
      batches = [b for step in batches for b in step]
    return batching.padding_efficiency(batches, self.sizes, self.budget)


class MixtureSampler:
  """Epochs of several data sources drawn in proportion to their weights.

  An epoch holds as many structures as all sources together; source s
  contributes `round(p_s * total)` of them, where p_s is proportional to
  `weight_s * size_s ** temperature` (temperature 1 with equal weights
  samples every structure alike; 0 samples the sources by weight alone).
  Each source is read through its own endless stream of seeded
  permutations, so a small source repeats (each structure equally often)
  and a large one is subsampled without repeats until it is used up; the
  epoch's structures are then shuffled together. Epoch e is a pure
  function of (seed, e), so a resumed run draws the same batches.

  Args:
    counts: structures per source (their indices are consecutive, source
      0 first).
    weights: non-negative sampling weights per source.
    temperature: exponent of the source sizes.
    seed: sampling seed.
  """

  def __init__(self, counts, weights, temperature: float = 1.0,
               seed: int = 0):
    self.counts = np.asarray(counts, np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
    share = np.asarray(weights, np.float64) * self.counts.astype(
        np.float64) ** temperature
    if not (share.sum() > 0 and np.all(share >= 0)):
      raise ValueError(f"sampling weights {list(weights)} give no source a "
                       "positive share")
    self.probabilities = share / share.sum()
    total = int(self.counts.sum())
    self.per_epoch = np.maximum(np.round(self.probabilities * total),
                                self.probabilities > 0).astype(np.int64)
    self.seed = seed

  def _stream(self, s: int, start: int, length: int) -> np.ndarray:
    """Items [start, start + length) of source s's permutation stream."""
    n = int(self.counts[s])
    first, last = start // n, (start + length - 1) // n
    laps = [np.random.default_rng([self.seed, s, lap]).permutation(n)
            for lap in range(first, last + 1)]
    stream = np.concatenate(laps)
    return stream[start - first * n:start - first * n + length]

  def __call__(self, epoch: int) -> np.ndarray:
    picks = [self.offsets[s] + self._stream(s, epoch * int(k), int(k))
             for s, k in enumerate(self.per_epoch) if k > 0]
    order = np.concatenate(picks)
    # A stream apart from the permutations of the sources' own streams.
    rng = np.random.default_rng([self.seed, epoch, len(self.counts)])
    return rng.permutation(order)


@dataclasses.dataclass
class _LoadBatch:
  """Reads and collates one planned batch (runs in grain workers)."""
  source: object
  budget: Budget
  where: str

  def _read(self, i: int) -> dict:
    try:
      return self.source[i]
    except Exception as e:  # A damaged record: name it.
      raise DatasetError(f"{self.where}, example {i}: cannot read it "
                         f"({type(e).__name__}: {e}); convert the dataset "
                         "again") from e

  def _collate(self, indices: np.ndarray):
    examples = [self._read(int(i)) for i in indices]
    template = None if examples else self._read(0)
    return batching.collate(examples, self.budget, template)

  def __call__(self, item):
    if isinstance(item, tuple):  # One batch per device (and micro-batch).
      return stack([self._collate(indices) for indices in item])
    return self._collate(item)


def stack(batches):
  """Stacks equal-shape padded batches along a new leading axis."""
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


def batch_dataset(split: Split, budget: Budget, *, shuffle: bool,
                  seed: int = 0, num_epochs: Optional[int] = 1,
                  shard_index: int = 0, shard_count: int = 1,
                  per_step: int = 1, worker_count: int = 0, prefetch: int = 2,
                  sampler=None) -> tuple[grain.IterDataset, BatchPlan]:
  """Builds the grain dataset of padded batches for a split.

  Args:
    split: an opened split (`Dataset.split`).
    budget: its padding budget.
    shuffle, seed, num_epochs, shard_index, shard_count, per_step,
      sampler: see `BatchPlan`; with `per_step` > 1 each element stacks
      that many batches along a leading axis.
    worker_count: worker processes (0 loads in the calling process).
    prefetch: batches buffered per worker (or threads when no workers).

  Returns:
    (dataset, plan). `iter(dataset)` yields `jraph.GraphsTuple`s of numpy
    arrays; the iterator has `get_state()` / `set_state()` for checkpoints.
  """
  plan = BatchPlan(split.sizes, budget, shuffle=shuffle, seed=seed,
                   num_epochs=num_epochs, shard_index=shard_index,
                   shard_count=shard_count, per_step=per_step,
                   sampler=sampler)
  ds = grain.MapDataset.source(plan).map(
      _LoadBatch(split.source, budget, f"split {split.name!r}"))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=0 if worker_count else max(prefetch, 1),
      prefetch_buffer_size=prefetch))
  if worker_count:
    # grain reads absl flags when it starts workers; outside an absl app
    # (tests, notebooks) nobody parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch))
  return it, plan
