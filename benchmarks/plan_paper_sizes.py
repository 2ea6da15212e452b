r"""The smallest mesh of 80 GB devices for each layout of the paper sizes.

    python -m benchmarks.plan_paper_sizes [--device-memory 80GB]
        [--max-devices 256] [--sizes 2500,12 4000,16] [--set FIELD=VALUE]
        [--record]

The EGNN sizes of configs/scaling_paper.py (hidden 2,500 to 7,000 with 12
to 30 layers; `--sizes HIDDEN,LAYERS` for others, readout half the
width), trained as that recipe trains them (4 structures per device and
micro-batch, 2 micro-batches, `parallel.fsdp_min_size` 2**14, layers
scanned where rematerialised) but on the built-in dev set, whose batch
shapes are those training chooses there (`--set data.max_nodes=...` sizes
batches like another dataset's). For
every layout of `matsci_jax.plan` it finds the smallest power-of-two
device count, up to `--max-devices`, whose planned peak fits a device,
and prints JSON with a markdown table; `--record` writes both to
benchmarks/RESULTS.md.

Each check is `python -m matsci_jax.plan` in a fresh process with that
many simulated devices (one compilation, tens of seconds for the largest
models), so the search avoids compiling where it can:
* the per-device memory of a layout does not grow with the device count
  (each device has its own batch; the state divides or stays whole);
* data parallelism replicates the state, so its memory does not depend on
  the count: one check on one device, none when the state alone is more
  than a device holds;
* FSDP layouts split over the "fsdp" size that leaves the least state per
  device (`plan.best_fsdp`: arrays split only along a dimension the size
  divides); counts with the same size as a smaller count are skipped, as
  are counts whose state alone (exact from the shapes) does not fit; the
  rest are bisected.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "configs/s2ef.py"
# configs/scaling_paper.py's overrides that shape a step; the others (its
# data, processes, logging) and the layout's own fields do not apply.
_RECIPE_FIELDS = ("data.batch_size", "train.grad_accum_steps",
                  "parallel.fsdp_min_size", "model.scan_layers")


def paper_sizes() -> list[tuple[int, int, int]]:
  """(hidden, layers, readout width) of configs/scaling_paper.py."""
  from matsci_jax import config_files
  grid = config_files.load("configs/scaling_paper.py").grid
  return [tuple(int(v) for v in point) for point in
          grid["model.hidden_dim,model.num_layers,model.readout_hidden"]]


def recipe_overrides() -> dict:
  from matsci_jax import config_files
  base = config_files.load("configs/scaling_paper.py").base_overrides
  return {k: base[k] for k in _RECIPE_FIELDS}


def _flags(fields: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in fields.items()]


class Planner:
  """Checks one (size, layout, devices, fsdp) in a fresh process each,
  remembering the results."""

  def __init__(self, memory: str, settings: list[str]):
    self.memory, self.settings = memory, settings
    self.checks = []

  def check(self, fields: dict, layout: str, devices: int,
            fsdp: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "plan.json")
      cmd = [sys.executable, "-m", "matsci_jax.plan", f"--config={BASE}",
             f"--devices={devices}", f"--fsdp={fsdp}", f"--layouts={layout}",
             f"--device-memory={self.memory}", f"--json={out}"]
      cmd += _flags(fields) + [f"--config.{s}" for s in self.settings]
      started = time.perf_counter()
      proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
      if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
      with open(out) as f:
        result = json.load(f)["layouts"][0]
    seconds = time.perf_counter() - started
    row = {"hidden": fields["model.hidden_dim"],
           "layers": fields["model.num_layers"], "layout": layout,
           "devices": devices, "fsdp": fsdp, "peak_gb": result["peak"] / 1e9,
           "fits": result["fits"], "seconds": round(seconds, 1),
           "compile_seconds": result["compile_seconds"]}
    self.checks.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return result


def smallest_fitting(candidates: list[int], fits) -> int | None:
  """The first of `candidates` (ascending) for which `fits` holds, given
  that it holds for every candidate after one where it holds; None if
  none. Checks the last first, then bisects."""
  if not candidates or not fits(candidates[-1]):
    return None
  lo, hi = -1, len(candidates) - 1  # fits(candidates[hi]); lo unknown/no.
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(candidates[mid]):
      hi = mid
    else:
      lo = mid
  return candidates[hi]


def layout_fields(fields: dict, layout) -> dict:
  """The recipe's fields for `layout`: layers are scanned only where they
  are rematerialised (without remat a scan keeps every layer's
  intermediates, stacked, for the backward pass: more memory than
  unrolled layers, which the compiler frees as it goes)."""
  if layout.remat or not fields.get("model.scan_layers"):
    return fields
  return dict(fields, **{"model.scan_layers": False})


def search(planner: Planner, fields: dict, layouts: list[str],
           memory: int, max_devices: int, min_size: int) -> dict:
  """The smallest fitting mesh of each layout for one model size."""
  from benchmarks.plan_validation import apply_settings
  from matsci_jax import config_files, plan
  states = {}

  def abstract_state(fields):
    key = tuple(sorted(fields.items()))
    if key not in states:
      config = config_files.load(BASE)
      config.train.progress_bar = False
      config.update_from_flattened_dict(fields)
      apply_settings(config, planner.settings)
      states[key] = plan.abstract_state(config)
    return states[key]

  out = {"num_params": plan.num_scalars(abstract_state(fields).params),
         "layouts": {}}
  counts = [2 ** k for k in range(max_devices.bit_length())
            if 2 ** k <= max_devices]
  all_fields = fields
  for name in layouts:
    layout = plan.get_layout(name)
    fields = layout_fields(all_fields, layout)
    state = abstract_state(fields)
    if not layout.fsdp:
      candidates = [1] if plan.fsdp_bytes(state, 1, min_size) <= memory \
          else []
      sizes = {1: 1}
    else:
      sizes, seen = {}, set()
      for d in counts:
        k = plan.best_fsdp(state, d, min_size)
        if k not in seen:  # A larger count with the same split: no gain.
          seen.add(k)
          sizes[d] = k
      candidates = [d for d, k in sizes.items()
                    if plan.fsdp_bytes(state, k, min_size) <= memory]
    found = {}

    def fits(d):
      found[d] = planner.check(fields, name, d, sizes[d])
      return found[d]["fits"]

    best = smallest_fitting(candidates, fits)
    entry = {"devices": best}
    if best is not None:
      p = found[best]
      entry.update(fsdp=p["mesh"]["fsdp"], peak_gb=round(p["peak"] / 1e9, 2),
                   state_gb=round((p["params"] + p["ema_params"]
                                   + p["opt_state"]) / 1e9, 2),
                   overrides=p["overrides"])
    else:
      smallest = min(plan.fsdp_bytes(state, k, min_size)
                     for k in sizes.values())
      entry["state_gb_at_best"] = round(smallest / 1e9, 2)
    out["layouts"][name] = entry
  return out


def markdown(results: list[dict], layouts: list[str], memory: str) -> str:
  head = ["hidden x layers", "parameters"] + layouts
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for r in results:
    cells = [f"{r['hidden']:,} x {r['layers']}",
             f"{r['num_params'] / 1e9:.2f} B"]
    for name in layouts:
      e = r["layouts"][name]
      if e["devices"] is None:
        cells.append("does not fit")
      else:
        mesh = (f" (fsdp {e['fsdp']})" if e["fsdp"] > 1 else "")
        cells.append(f"{e['devices']}{mesh}: {e['peak_gb']:.1f} GB")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + (f"\n\nSmallest power-of-two number of {memory} "
                             "devices and the planned peak per device.")


def main():
  from matsci_jax import plan
  p = argparse.ArgumentParser()
  p.add_argument("--device-memory", default="80GB")
  p.add_argument("--max-devices", type=int, default=256)
  p.add_argument("--sizes", nargs="+", help="HIDDEN,LAYERS pairs (default: "
                 "configs/scaling_paper.py's grid)")
  p.add_argument("--layouts", nargs="+", default=list(plan.LAYOUT_NAMES))
  p.add_argument("--set", action="append", default=[],
                 help="a config field for every check, e.g. "
                 "data.max_nodes=400")
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  memory = plan.parse_memory(args.device_memory)
  if args.sizes:
    sizes = []
    for text in args.sizes:
      hidden, layers = (int(v) for v in text.split(","))
      sizes.append((hidden, layers, hidden // 2))
  else:
    sizes = paper_sizes()
  recipe = recipe_overrides()
  planner = Planner(args.device_memory, args.set)
  started = time.perf_counter()
  results = []
  for hidden, layers, readout in sizes:
    fields = dict(recipe, **{"model.hidden_dim": hidden,
                             "model.num_layers": layers,
                             "model.readout_hidden": readout})
    t = time.perf_counter()
    found = search(planner, fields, args.layouts, memory, args.max_devices,
                   int(recipe["parallel.fsdp_min_size"]))
    results.append({"hidden": hidden, "layers": layers, **found,
                    "seconds": round(time.perf_counter() - t, 1)})
  table = markdown(results, args.layouts, args.device_memory)
  from benchmarks import _results
  _results.report(
      "plan_paper_sizes", "Smallest meshes for the paper's EGNN sizes",
      {"device_memory": args.device_memory, "max_devices": args.max_devices,
       "recipe": recipe, "settings": args.set, "sizes": results,
       "checks": planner.checks, "markdown": table,
       "planning_seconds": round(time.perf_counter() - started, 1)},
      "`python -m benchmarks.plan_paper_sizes`: `matsci_jax.plan` on "
      "simulated CPU devices, batches of the built-in dev set (see the "
      f"script).\n\n{table}", save=args.record)


if __name__ == "__main__":
  main()
