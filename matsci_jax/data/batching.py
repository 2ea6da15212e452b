"""Static-shape batches: padding budgets, greedy packing and collation.

A jitted step compiles once per input shape, so every batch of a split is
padded to one `Budget` of nodes, edges and graphs. The budget is chosen once
from the split's per-structure sizes; structures are then packed greedily in
(shuffled) order until the next one would overflow it (the idea of jraph's
`dynamically_batch`, run on the known sizes ahead of time so that the batch
sequence is a pure function of the seed and can be resumed), and each batch
is padded with `jraph.pad_with_graphs`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jraph
import numpy as np

from matsci_jax import _compat  # noqa: F401  (jraph needs it)


class BudgetError(ValueError):
  """A structure does not fit in the padding budget."""


@dataclasses.dataclass(frozen=True)
class Budget:
  """Padded sizes of every batch of a split.

  Attributes:
    n_node: nodes per batch, at least one of them padding.
    n_edge: edges per batch.
    n_graph: graphs per batch, at least one of them padding.
  """
  n_node: int
  n_edge: int
  n_graph: int

  def check(self, n_atoms: int, n_edges: int, what: str = "a structure"):
    if n_atoms > self.n_node - 1 or n_edges > self.n_edge:
      raise BudgetError(
          f"{what} has {n_atoms} atoms and {n_edges} edges, more than one "
          f"batch holds (budget: {self.n_node - 1} atoms, {self.n_edge} "
          "edges); raise the batch size or set the budget explicitly "
          "(config.data.max_nodes / max_edges)")


def bucket(size: int, multiple: int, growth: float = 1.25) -> int:
  """The smallest rung at least `size` on a ladder of padded sizes.

  Rungs start at `multiple` and grow by `growth`, rounded up to `multiple`,
  so that sizes that differ a little (edges along a relaxation, structures
  of one family) share a padded shape and a compiled function.
  """
  rung = multiple
  while rung < size:
    rung = int(math.ceil(rung * growth / multiple) * multiple)
  return rung


def bucket_budget(examples: Sequence[dict], *, node_multiple: int = 16,
                  edge_multiple: int = 256, growth: float = 1.25,
                  n_graph: int | None = None) -> Budget:
  """A budget on the bucket ladder (see `bucket`) that holds `examples`.

  Args:
    examples: stored examples to batch together.
    node_multiple, edge_multiple, growth: the ladders of node and edge sizes.
    n_graph: graph budget (default: the examples plus one padding graph).
  """
  n = sum(len(e["atomic_numbers"]) for e in examples)
  e = sum(len(e["senders"]) for e in examples)
  return Budget(n_node=bucket(n + 1, node_multiple, growth),
                n_edge=bucket(max(e, 1), edge_multiple, growth),
                n_graph=n_graph or len(examples) + 1)


def pack(order: np.ndarray, sizes: np.ndarray, budget: Budget
         ) -> list[np.ndarray]:
  """Greedily packs structures, in order, into batches under `budget`.

  Args:
    order: int [M] structure indices in the order to pack them.
    sizes: int [num_structures, 2] atoms and edges per structure.
    budget: the padding budget; one node and one graph stay for padding.

  Returns:
    A list of int64 index arrays, one per batch, covering `order` exactly.

  Raises:
    BudgetError: a structure is larger than the budget.
  """
  atoms = sizes[:, 0].tolist()
  edges = sizes[:, 1].tolist()
  cap_n, cap_e, cap_g = budget.n_node - 1, budget.n_edge, budget.n_graph - 1
  batches, current = [], []
  n_sum = e_sum = 0
  for i in np.asarray(order).tolist():
    a, e = atoms[i], edges[i]
    if a > cap_n or e > cap_e:
      budget.check(a, e, f"structure {i}")
    if current and (n_sum + a > cap_n or e_sum + e > cap_e
                    or len(current) == cap_g):
      batches.append(np.asarray(current, np.int64))
      current, n_sum, e_sum = [], 0, 0
    current.append(i)
    n_sum += a
    e_sum += e
  if current:
    batches.append(np.asarray(current, np.int64))
  return batches


def padding_efficiency(batches: Sequence[np.ndarray], sizes: np.ndarray,
                       budget: Budget) -> dict[str, float]:
  """Fractions of real nodes, edges and graphs in the padded batches."""
  nb = max(len(batches), 1)
  real = sizes[np.concatenate(batches)] if batches else np.zeros((0, 2))
  return {
      "nodes": float(real[:, 0].sum() / (nb * budget.n_node)),
      "edges": float(real[:, 1].sum() / (nb * budget.n_edge)),
      "graphs": float(len(real) / (nb * budget.n_graph)),
  }


def compute_budget(sizes: np.ndarray, batch_size: int, *, seed: int = 0,
                   sample: int = 20_000, n_node: int | None = None,
                   edge_multiple: int = 1) -> Budget:
  """Chooses a budget that holds about `batch_size` average structures.

  The node budget is `batch_size` times the mean structure (at least the
  largest one) plus one padding node. The edge budget is the smallest that
  costs at most one point of node efficiency against an edge budget that
  never binds, found by simulating the packing on a sample of the split.

  Args:
    sizes: int [num_structures, 2] atoms and edges per structure.
    batch_size: average number of structures per batch.
    seed: seed of the simulated shuffles.
    sample: number of structures used in the simulation.
    n_node: a node budget to use instead (edges and graphs follow it).
    edge_multiple: round the edge budget up to a multiple of this (point
      clouds: K slots per centre, so edges reshape to [n_edge / K, K]).
  """
  sizes = np.asarray(sizes, np.int64)
  if sizes.size == 0:
    raise ValueError("cannot choose a budget for an empty split")
  atoms, edges = sizes[:, 0], sizes[:, 1]
  if n_node is None:
    n_node = max(math.ceil(batch_size * atoms.mean()), int(atoms.max())) + 1
  elif n_node < atoms.max() + 1:
    raise BudgetError(f"node budget {n_node} cannot hold the largest "
                      f"structure ({int(atoms.max())} atoms plus one padding "
                      "node)")
  n_graph = (n_node - 1) // max(int(atoms.min()), 1) + 1
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sizes))[:sample]

  def node_eff(n_edge):
    b = Budget(n_node, n_edge, n_graph)
    return padding_efficiency(pack(order, sizes, b), sizes, b)["nodes"]

  ratio = edges / np.maximum(atoms, 1)
  loose = max(math.ceil((n_node - 1) * ratio.max()), int(edges.max()), 1)
  target = node_eff(loose) - 0.01
  base = (n_node - 1) * edges.sum() / max(atoms.sum(), 1)
  n_edge = loose
  for factor in np.arange(1.0, 2.0, 0.02):
    candidate = max(math.ceil(base * factor), int(edges.max()))
    if candidate >= loose:
      break
    if node_eff(candidate) >= target:
      n_edge = candidate
      break
  n_edge = -(-int(n_edge) // edge_multiple) * edge_multiple
  return Budget(n_node=int(n_node), n_edge=int(n_edge), n_graph=int(n_graph))


# Per-node, per-edge and per-graph fields of a stored example.
NODE_FIELDS = ("atomic_numbers", "positions", "tags", "fixed", "forces",
               "positions_relaxed")
EDGE_FIELDS = ("cell_shifts", "slot_mask")
GRAPH_FIELDS = ("cell", "pbc", "energy", "energy_relaxed", "stress", "sid",
                "fid", "source", "has_forces", "has_stress")
# Scalars decode as Python numbers; fix their dtypes so batches never vary.
_GRAPH_DTYPES = {"energy": np.float32, "energy_relaxed": np.float32,
                 "stress": np.float32, "sid": np.int64, "fid": np.int64,
                 "source": np.int32, "has_forces": np.bool_,
                 "has_stress": np.bool_}


def _padded(parts: Sequence[np.ndarray], size: int) -> np.ndarray:
  """`parts` concatenated into an array of `size` rows, zero-padded: one
  copy of each part, whatever its size."""
  dtype = np.result_type(*parts)
  out = np.zeros((size,) + parts[0].shape[1:], dtype)
  np.concatenate(parts, out=out[:sum(len(p) for p in parts)])
  return out


def collate(examples: Sequence[dict], budget: Budget,
            template: dict | None = None) -> jraph.GraphsTuple:
  """Batches stored examples into one padded `jraph.GraphsTuple` (numpy).

  The layout is jraph's (`batch_np` then `pad_with_graphs`), written in one
  pass: each field is copied once into its padded array, and node indices
  stay int32.

  Args:
    examples: decoded examples (dicts of numpy arrays, see `schema`); may be
      empty, giving an all-padding batch (used to even out shards).
    budget: the padding budget; must hold all the examples.
    template: any example of the split, needed only when `examples` is empty
      (it gives the fields and dtypes).

  Returns:
    A GraphsTuple whose `nodes`, `edges` and `globals` are dicts of arrays
    with leading sizes `n_node`, `n_edge` and `n_graph`. Each also holds a
    boolean `mask` (True for real entries), and `nodes["graph"]` holds the
    graph index of every node, so that models need not recompute it.
    `senders`/`receivers` follow the stored edge convention (see `schema`);
    padding edges join the first padding node to itself.

  Raises:
    BudgetError: the examples do not fit in the budget.
  """
  if examples:
    total_n = sum(ex["atomic_numbers"].shape[0] for ex in examples)
    total_e = sum(ex["senders"].shape[0] for ex in examples)
    budget.check(total_n, total_e, f"a batch of {len(examples)} structures")
    if len(examples) > budget.n_graph - 1:
      raise BudgetError(f"{len(examples)} structures exceed the graph budget "
                        f"of {budget.n_graph - 1}")
  elif template is None:
    raise ValueError("an empty batch needs a template example")
  if budget.n_graph < 2:
    raise BudgetError(f"a budget needs a padding graph, but n_graph is "
                      f"{budget.n_graph}")
  first = examples[0] if examples else template
  num_graphs = len(examples)
  n_node = [ex["atomic_numbers"].shape[0] for ex in examples]
  n_edge = [ex["senders"].shape[0] for ex in examples]
  real_nodes, real_edges = sum(n_node), sum(n_edge)
  pad_graphs = budget.n_graph - num_graphs - 1

  def rows(k, graph_field=False):
    """The examples' rows of field k (an empty batch: none of the
    template's, which still give the dtype)."""
    as_rows = ((lambda v: np.asarray(v, _GRAPH_DTYPES.get(k))[None])
               if graph_field else np.asarray)
    return [as_rows(ex[k]) for ex in examples] or [as_rows(template[k])[:0]]

  nodes = {k: _padded(rows(k), budget.n_node)
           for k in NODE_FIELDS if k in first}
  edges = {k: _padded(rows(k), budget.n_edge)
           for k in EDGE_FIELDS if k in first}
  globals_ = {k: _padded(rows(k, graph_field=True), budget.n_graph)
              for k in GRAPH_FIELDS if k in first}
  # Node indices of each graph's edges shift by the nodes before it;
  # padding edges join the first padding node (index real_nodes) to itself.
  senders = np.full(budget.n_edge, real_nodes, np.int32)
  receivers = np.full(budget.n_edge, real_nodes, np.int32)
  node_offset = edge_offset = 0
  for ex, nn, ne in zip(examples, n_node, n_edge):
    np.add(ex["senders"], node_offset,
           out=senders[edge_offset:edge_offset + ne], casting="unsafe")
    np.add(ex["receivers"], node_offset,
           out=receivers[edge_offset:edge_offset + ne], casting="unsafe")
    node_offset += nn
    edge_offset += ne
  n_node = np.asarray(n_node + [budget.n_node - real_nodes] + [0] * pad_graphs,
                      np.int32)
  n_edge = np.asarray(n_edge + [budget.n_edge - real_edges] + [0] * pad_graphs,
                      np.int32)
  nodes["mask"] = np.arange(budget.n_node) < real_nodes
  nodes["graph"] = np.repeat(np.arange(budget.n_graph, dtype=np.int32),
                             n_node)
  edges["mask"] = np.arange(budget.n_edge) < real_edges
  if "slot_mask" in edges:  # Point clouds: empty neighbour slots are padding.
    edges["mask"] = edges["mask"] & edges.pop("slot_mask")
  globals_["mask"] = np.arange(budget.n_graph) < num_graphs
  for k in ("sid", "fid"):  # jax would silently truncate int64 ids.
    if k in globals_:
      ids = globals_[k]
      info = np.iinfo(np.int32)
      if ids.size and (ids.max() > info.max or ids.min() < info.min):
        raise ValueError(f"{k} values exceed the int32 range")
      globals_[k] = ids.astype(np.int32)
  return jraph.GraphsTuple(nodes=nodes, edges=edges, globals=globals_,
                           senders=senders, receivers=receivers,
                           n_node=n_node, n_edge=n_edge)
