r"""Training throughput of S2EF steps (energy + forces) on a fixed workload.

    python -m benchmarks.train_throughput [--models egnn megnet gala] [--record]

Workload: batches of 8 LiPS cells (83 atoms each, 664 atoms, about 28,400
periodic edges within 6 Å), the workload the Open MatSci ML Toolkit's EGNN
was measured on (about 4 structures/s on 2 CPU cores). Each step computes
energies, forces as -dE/dx with jax.grad, the loss, its parameter gradient
and an AdamW update.
* egnn: width 128, 3 layers, on graph edges; also run in its "textbook"
  form (the first message layer applied per edge to the concatenated
  features, as a direct port would) for comparison at equal work;
* megnet: the laptop config, on graph edges;
* gala: the reference config (depth 2, hidden 64) on point clouds, every
  atom a centre with 16 neighbour slots (the reference implementation needed
  12.7 s and 2.3 GB for one 83-atom energy and could not do forces), in
  chunks of rows as configured and, as "gala_one_pass", all rows at once;
* nequip: the laptop config (32x0e+16x1o+8x2e, l <= 2), and
  "nequip_reference" with the sizes of NequIP's usual JAX configuration
  (5 layers, 64x0e+64x0o+32x1e+32x1o+4x2e+4x2o, radial MLP 64x2).
Peak memory is XLA's compiled memory analysis of the step.

Needs `../shared/data/matsciml_lips_devset`. Prints JSON (structures/s,
atoms/s, step time, padding efficiency, compilations); `--record` writes it
to benchmarks/RESULTS.md.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _results
from configs import models as models_config
from configs import s2ef
from matsci_jax import models, monitoring, strategies, tasks, train_state
from matsci_jax.data import batching, dataset_io
from matsci_jax.data.converter import convert
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.models import egnn

LIPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "data", "matsciml_lips_devset")


class TextbookEGNNLayer(egnn.EGNNLayer):
  """The same layer with the first message layer applied per edge."""

  @nn.compact
  def __call__(self, h, x, edges, graph):
    act = getattr(jax.nn, self.activation)
    d = self.hidden_dim
    inputs = jnp.concatenate([h[edges["receivers"]], h[edges["senders"]],
                              edges["features"]], axis=-1)
    m = act(nn.Dense(d, name="message_in")(inputs))
    m = act(nn.Dense(d, name="message_out")(m)) * edges["envelope"][:, None]
    agg = jax.ops.segment_sum(m, edges["receivers"],
                              num_segments=h.shape[0])
    agg = agg / self.avg_num_neighbors
    u = act(nn.Dense(d, name="update_self")(h)
            + nn.Dense(d, use_bias=False, name="update_message")(agg))
    return h + nn.Dense(d, name="update_out")(u), x


def lips_batches(split, batch, multiple=1):
  """(budget, 4 batches of `batch` structures); edge budgets are multiples
  of `multiple` (point-cloud slots)."""
  sizes = split.sizes
  n_edge = int(np.sort(sizes[:, 1])[-batch:].sum())
  budget = batching.Budget(
      n_node=int(batch * sizes[:, 0].max()) + 1,
      n_edge=-(-n_edge // multiple) * multiple, n_graph=batch + 1)
  batches = [batching.collate([split.source[(k * batch + j) % len(split)]
                               for j in range(batch)], budget)
             for k in range(4)]
  return budget, batches


# name -> model kwargs
RUNS = {
    "egnn": dict(name="egnn", hidden_dim=128, num_layers=3, cutoff=6.0,
                 readout_hidden=64),
    "egnn_textbook": dict(name="egnn", hidden_dim=128, num_layers=3,
                          cutoff=6.0, readout_hidden=64),
    "megnet": dict(models_config.model_config("megnet", "s2ef")),
    "gala": dict(models_config.model_config("gala", "s2ef")),
    "gala_one_pass": dict(models_config.model_config("gala", "s2ef"),
                          pairs_per_chunk=0),
    "nequip": dict(models_config.model_config("nequip", "s2ef")),
    "nequip_reference": dict(models_config.model_config("nequip_reference",
                                                        "s2ef")),
}


def lips_dataset(folder: str) -> dataset_io.Dataset:
  """LiPS converted into `folder` with graph edges and point clouds (6 Å,
  every neighbour; 16 slots per centre)."""
  if not os.path.isdir(LIPS):
    sys.exit(f"needs the LiPS fixture at {LIPS}")
  spec = GraphSpec(cutoff=6.0, max_neighbors=0, representation="both",
                   point_cloud=PointCloudSpec(cutoff=6.0, num_neighbors=16))
  convert([f"train={LIPS}"], folder, task="s2ef", graph_spec=spec, workers=1,
          progress=False)
  return dataset_io.Dataset(folder)


def lips_split(data: dataset_io.Dataset, name: str):
  """The training split in the representation model `name` reads."""
  return data.split("train", models.model_class(
      RUNS[name]["name"]).representation)


def make_step(name, split, batches, config, task=tasks.S2EF):
  """The trainer's own pieces for model `name`: `task`'s loss, the
  optimizer and the device strategy (`config.mesh`, one device on a CPU).

  Returns:
    (jitted train step, initial state, strategy, model).
  """
  model = models.from_config(RUNS[name])
  loss_fn = task.make_loss(model, task.normalizer(split.statistics, model),
                           config.loss)
  optimizer = train_state.make_optimizer(config)
  strategy = strategies.from_config(config)
  state = strategy.create_state(
      lambda rng: train_state.TrainState.create(
          model.init(rng, batches[0]), optimizer), jax.random.PRNGKey(0))
  step = strategy.make_train_step(loss_fn, optimizer,
                                  config.optimizer.ema_decay)
  return step, state, strategy, model


def _run(name, split, batch, steps, config):
  """Steps of the trainer's own pieces (see `make_step`)."""
  budget, batches = lips_batches(split, batch,
                                 RUNS[name].get("num_neighbors", 1))
  textbook = name.endswith("textbook")
  if textbook:
    egnn_layer = egnn.EGNNLayer
    egnn.EGNNLayer = TextbookEGNNLayer
  try:
    step, state, strategy, model = make_step(name, split, batches, config)
    placed = [strategy.place_train(b) for b in batches]
    memory = step.lower(state, placed[0]).compile().memory_analysis()
    t0 = time.perf_counter()
    state, m = step(state, placed[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    warm = monitoring.compile_count()
    t0 = time.perf_counter()
    for k in range(steps):
      state, m = step(state, placed[k % len(placed)])
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
  finally:
    if textbook:
      egnn.EGNNLayer = egnn_layer
  real = int(batches[0].nodes["mask"].sum())
  peak = None
  if memory is not None:
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  return {
      "model": name, "representation": model.representation,
      "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(
          strategy.host_state(state).params))),
      "atoms_per_batch": real,
      "edges_per_batch": int(batches[0].edges["mask"].sum()),
      "budget": dataclasses.asdict(budget),
      "first_step_s": round(compile_s, 2),
      "step_time_s": round(dt, 4),
      "structures_per_s": round(batch / dt, 2),
      "atoms_per_s": round(real / dt, 1),
      "padding_efficiency_nodes": round(real / budget.n_node, 4),
      "padding_efficiency_edges": round(
          float(batches[0].edges["mask"].mean()), 4),
      "peak_memory_mb": None if peak is None else round(peak / 2**20, 1),
      "compiles_after_warmup": monitoring.compile_count() - warm,
      "final_loss": float(m["loss"])}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="+", default=list(RUNS), choices=list(RUNS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  config = s2ef.get_config()
  config.train.num_steps = 1000
  results = {"workload": {"structures_per_batch": args.batch,
                          "structure": "LiPS cell, 83 atoms", "cutoff": 6.0},
             "runs": []}
  with tempfile.TemporaryDirectory() as tmp:
    data = lips_dataset(os.path.join(tmp, "lips"))
    for name in args.models:
      results["runs"].append(_run(name, lips_split(data, name), args.batch,
                                  args.steps, config))
      print(json.dumps(results["runs"][-1]), flush=True)
  _results.report(
      "train_throughput", "Training throughput (S2EF with forces)", results,
      "`python -m benchmarks.train_throughput --record`. Reference: the "
      "Open MatSci ML Toolkit's EGNN trains at about 4 structures/s on 2 "
      "CPU cores on this workload (target: at least 12); its GALA needed "
      "12.7 s and 2.3 GB for one 83-atom energy and could not do forces.",
      save=args.record)


if __name__ == "__main__":
  main()
