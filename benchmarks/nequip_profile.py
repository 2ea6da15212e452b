r"""Where a NequIP training step spends its time, from a profile.

    python -m benchmarks.nequip_profile [--model nequip] [--steps 5]
        [--record]

The training step of `benchmarks/train_throughput.py` (batches of 8 LiPS
cells, energy, forces and their parameter gradient, AdamW) is traced with
`jax.profiler` after warm-up. Each compiled operation the trace times is
named in the compiled program, whose metadata carries the model's named
scopes (`models/nequip.py`): its time goes to the scope it belongs to,
forward and backward passes together:
* edge_geometry: edge vectors, spherical harmonics, Bessel basis, envelope;
* radial_mlp: the per-edge weights of every path and channel;
* gather: sender features gathered onto edges;
* tensor_product: the weighted products of features and harmonics;
* scatter: messages summed into atoms;
* other: node-level linear layers and gates, readout, loss, optimizer.
Shares are of the summed operation time (the operations of one step may
run on both cores at once). Needs `../shared/data/matsciml_lips_devset`.
Prints JSON; `--record` writes it to benchmarks/RESULTS.md.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from benchmarks import _results
from benchmarks import train_throughput as tt
from configs import s2ef

SCOPES = ("edge_geometry", "radial_mlp", "gather", "tensor_product",
          "scatter")


def op_scopes(hlo_text: str) -> dict[str, str]:
  """Compiled operation name -> the named scope of its metadata (or
  "other"), for every operation of the program.

  A scope is matched as a whole component of the op's name stack, also
  where a transformation wraps it ("jvp(radial_mlp)/...").
  """
  patterns = {s: re.compile(rf"(^|[/(]){s}([)/]|$)") for s in SCOPES}
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?"
                       r"metadata=\{[^}]*op_name=\"([^\"]*)\"",
                       hlo_text, re.MULTILINE):
    name, op_name = m.groups()
    out[name] = next((s for s, p in patterns.items() if p.search(op_name)),
                     "other")
  return out


def traced_durations(folder: str) -> collections.Counter:
  """Microseconds per traced event name (complete events)."""
  paths = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"),
                    recursive=True)
  if not paths:
    raise SystemExit(f"no trace written under {folder}")
  with gzip.open(sorted(paths)[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      totals[e["name"]] += float(e["dur"])
  return totals


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="nequip",
                 choices=["nequip", "nequip_reference"])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  config = s2ef.get_config()
  config.train.num_steps = 1000
  with tempfile.TemporaryDirectory() as tmp:
    split = tt.lips_split(tt.lips_dataset(os.path.join(tmp, "lips")),
                          args.model)
    _, batches = tt.lips_batches(split, 8)
    step, state, strategy, _ = tt.make_step(args.model, split, batches,
                                            config)
    placed = [strategy.place_train(b) for b in batches]
    # The traced program is this compiled one, whose names the trace uses.
    step = step.lower(state, placed[0]).compile()
    scopes = op_scopes(step.as_text())
    for b in placed[:2]:  # Warm up.
      state, m = step(state, b)
    jax.block_until_ready(m)
    folder = os.path.join(tmp, "trace")
    t0 = time.perf_counter()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for k in range(args.steps):
        state, m = step(state, placed[k % len(placed)])
      jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / args.steps
    durations = traced_durations(folder)
  per_scope = collections.Counter()
  for name, us in durations.items():
    if name in scopes:
      per_scope[scopes[name]] += us
  total = sum(per_scope.values())
  if not total:
    raise SystemExit("the trace names none of the compiled operations")
  top = sorted(((us, n) for n, us in durations.items() if n in scopes),
               reverse=True)[:8]
  result = {
      "model": args.model, "steps": args.steps,
      "step_seconds_traced": round(wall, 3),
      "op_seconds_per_step": round(total / 1e6 / args.steps, 3),
      "share": {s: round(per_scope[s] / total, 3)
                for s in SCOPES + ("other",)},
      "top_ops": [{"op": n, "scope": scopes[n],
                   "ms_per_step": round(us / 1e3 / args.steps, 1)}
                  for us, n in top]}
  _results.report(
      f"nequip_profile_{args.model}",
      f"Where a {args.model} training step spends its time", result,
      f"`python -m benchmarks.nequip_profile --model {args.model} "
      "--record`: shares of the traced operation time of a training step "
      "(batches of 8 LiPS cells, forces), forward and backward together, "
      "by the model's named scopes (see the script).", save=args.record)


if __name__ == "__main__":
  main()
