r"""What stress adds to a training step: the same step with and without it.

    python -m benchmarks.stress_cost [--models egnn] [--record]

Workload: `train_throughput`'s (one batch of 8 LiPS cells, 664 atoms, about
28,400 periodic edges within 6 Å; EGNN of width 128 and 3 layers by
default). LiPS has no stress, so the batch carries a zero stress target of
[n_graph, 3, 3]; the loss, its gradient and the update do the same work
whatever the target's values. Both steps run on that one batch: "forces"
(energy and forces, the S2EF step) and "stress" (energy, forces and stress
from one gradient with respect to positions and strain, and the stress
term in the loss, weight 1).

The machine may be shared, so the two steps alternate (ABBA), in
`--repeats` rounds of `--steps` steps each, and the result is the ratio of
the median step times; also the median of the per-round ratios, the ratio
of the fastest rounds, and the ratio of XLA's FLOP counts of the two
compiled steps, which no other process disturbs. Target: a stress step
costs at most 1.3x a step without. Prints JSON; `--record` writes it to
benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks import _results
from benchmarks import train_throughput as tt
from configs import s2ef
from matsci_jax import tasks

TARGET = 1.3


def _with_stress(batch):
  """`batch` with a stress target: its own, else zeros [n_graph, 3, 3]."""
  if "stress" in batch.globals:
    return batch
  n_graph = batch.globals["mask"].shape[0]
  return batch._replace(globals=dict(
      batch.globals, stress=np.zeros((n_graph, 3, 3), np.float32)))


def _flops(step, state, batch) -> float | None:
  """XLA's FLOP count of the compiled step (None where not reported)."""
  cost = step.lower(state, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # One entry per device in older jax.
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def _run(name, split, batch, steps, repeats, config):
  _, batches = tt.lips_batches(split, batch,
                               tt.RUNS[name].get("num_neighbors", 1))
  batches = [_with_stress(b) for b in batches]
  runs = {}
  for kind, task in (("forces", tasks.S2EF),
                     ("stress", tasks.S2EF.for_data(stress=True))):
    step, state, strategy, _ = tt.make_step(name, split, batches, config,
                                            task)
    placed = strategy.place_train(batches[0])
    t0 = time.perf_counter()
    flops = _flops(step, state, placed)
    compile_s = time.perf_counter() - t0
    state, m = step(state, placed)
    jax.block_until_ready(m)
    if ("stress_loss" in m) != (kind == "stress"):
      raise SystemExit(f"the {kind} step's metrics are {sorted(m)}")
    runs[kind] = dict(step=step, state=state, batch=placed, times=[],
                      flops=flops, compile_s=compile_s)
  for r in range(repeats):
    # Alternating, in ABBA order: both see the same load and its drift.
    for run in list(runs.values())[::1 if r % 2 == 0 else -1]:
      t0 = time.perf_counter()
      for _ in range(steps):
        run["state"], m = run["step"](run["state"], run["batch"])
      jax.block_until_ready(m)
      run["times"].append((time.perf_counter() - t0) / steps)
  out = {"model": name,
         "atoms_per_batch": int(batches[0].nodes["mask"].sum()),
         "edges_per_batch": int(batches[0].edges["mask"].sum())}
  for kind, run in runs.items():
    out[kind] = {"median_step_s": round(statistics.median(run["times"]), 4),
                 "min_step_s": round(min(run["times"]), 4),
                 "compile_s": round(run["compile_s"], 2),
                 "gflops": (None if run["flops"] is None
                            else round(run["flops"] / 1e9, 4))}
  f, s = out["forces"], out["stress"]
  out["ratio_median"] = round(s["median_step_s"] / f["median_step_s"], 3)
  out["ratio_min"] = round(s["min_step_s"] / f["min_step_s"], 3)
  out["ratio_paired_median"] = round(statistics.median(
      b / a for a, b in zip(runs["forces"]["times"],
                            runs["stress"]["times"])), 3)
  out["ratio_flops"] = (None if not (f["gflops"] and s["gflops"]) else
                        round(s["gflops"] / f["gflops"], 4))
  out["within_target"] = out["ratio_median"] <= TARGET
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="+", default=["egnn"],
                 choices=[n for n in tt.RUNS if not n.endswith("textbook")])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--repeats", type=int, default=21)
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  config = s2ef.get_config()
  config.train.num_steps = 1000
  config.loss.stress_weight = 1.0
  results = {"workload": {"structures_per_batch": args.batch,
                          "structure": "LiPS cell, 83 atoms", "cutoff": 6.0,
                          "stress_target": "zeros (LiPS has none)",
                          "steps_per_round": args.steps,
                          "rounds": args.repeats},
             "target_ratio": TARGET, "runs": []}
  with tempfile.TemporaryDirectory() as tmp:
    data = tt.lips_dataset(os.path.join(tmp, "lips"))
    for name in args.models:
      results["runs"].append(_run(name, tt.lips_split(data, name),
                                  args.batch, args.steps, args.repeats,
                                  config))
      print(json.dumps(results["runs"][-1]), flush=True)
  _results.report(
      "stress_cost", "Cost of stress in a training step", results,
      "`python -m benchmarks.stress_cost --record`. The same jitted S2EF "
      "training step on one batch, with and without stress (the strain "
      "derivative of the energy, from the same backward pass as the "
      "forces); ratio of the median step times over alternating rounds. "
      f"Target: at most {TARGET}x.", save=args.record)


if __name__ == "__main__":
  main()
