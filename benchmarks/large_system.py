r"""Energy and forces of one large structure: atoms/s and memory per device.

    python -m benchmarks.large_system [--sizes 1000,10000,100000,1000000] \
        [--devices 1,8] [--edge-chunk 131072] [--model egnn] [--record]

Workload: a rattled fcc Cu supercell of each size (`graph_build.
bulk_structure`), its graph within 6 Å keeping 50 neighbours per atom (the
dev set's settings), and the S2EF model of `configs/models.py` (default:
the laptop EGNN, width 64, two layers) with random parameters: energy and
forces by `jax.grad`, jitted. Each size runs on 1 and on 8 devices (edges
split over them, atoms replicated; `energy.shard_edges`), in one pass and in
chunks of `--edge-chunk` edges (`EnergyModel.edge_chunk`); each (devices,
size) in a fresh process, since 8 devices here are simulated CPU devices
(`--xla_force_host_platform_device_count`): they share this machine's cores
and memory, so their time shows the overhead of splitting, not a speed-up.

Memory per device is what XLA planned for the compiled program (arguments
+ outputs + temporaries - aliased; `memory_analysis`, per device); the
process's peak resident memory (VmHWM, all devices and the host's graph) is
recorded beside it. A mode whose plan exceeds 75% of the memory available
is not run and is reported as not fitting. From the per-device plans, a
least-squares fit bytes = a * atoms + b * edges per device + c gives what
fits one 80 GB or 141 GB device, and eight, in each mode. Prints JSON;
`--record` writes it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import _results
from benchmarks.graph_build import bulk_structure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUTOFF = 6.0
MAX_NEIGHBORS = 50
GB = 1e9


def _available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no MemAvailable in /proc/meminfo")


def _child(n_atoms: int, devices: int, chunk: int, model_name: str) -> dict:
  """One size on `devices` devices, both modes, measured in this process."""
  import jax
  import jax.numpy as jnp

  from configs import models as model_configs
  from matsci_jax import energy, models, parallel
  from matsci_jax.data.graphs import batch_examples, graph_from_atoms

  assert jax.device_count() == devices, jax.devices()
  start = time.perf_counter()
  atoms = bulk_structure(n_atoms)
  graph = batch_examples([graph_from_atoms(atoms, CUTOFF, MAX_NEIGHBORS)])
  build_s = time.perf_counter() - start
  n_edge = int(graph.n_edge[0])
  model = models.registry.from_config(
      model_configs.model_config(model_name, "s2ef"))
  # Parameters do not depend on the structure: initialise on a small one.
  small = batch_examples([graph_from_atoms(bulk_structure(32), CUTOFF,
                                           MAX_NEIGHBORS)])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), small)
  norm = energy.Normalizer.identity()
  mesh = parallel.make_mesh(data=devices) if devices > 1 else None
  out = {"atoms": len(atoms), "edges": n_edge, "devices": devices,
         "graph_build_s": round(build_s, 2), "modes": {}}
  # Chunks first: the process's peak memory then grows mode by mode.
  for mode, edge_chunk in (("chunked", chunk), ("one_pass", 0)):
    edges_per_device = -(-n_edge // devices)
    if mode == "chunked" and edges_per_device <= chunk:
      out["modes"][mode] = {"same_as": "one_pass"}
      continue
    m = model.clone(edge_chunk=edge_chunk)
    fn = jax.jit(energy.make_energy_and_forces_fn(m, norm, mesh=mesh))
    placed = (energy.split_edges(graph, m, mesh) if mesh is not None
              else jax.device_put(graph))
    t = time.perf_counter()
    compiled = fn.lower(params, placed).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    row = {"edges_per_device": edges_per_device,
           "planned_gb_per_device": round(per_device / GB, 3),
           "temp_gb_per_device": round(mem.temp_size_in_bytes / GB, 3),
           "compile_s": round(compile_s, 1)}
    if devices * per_device > 0.75 * _available_bytes():
      row["fits"] = False
      out["modes"][mode] = row
      continue
    times = []
    for _ in range(3 if n_atoms <= 100_000 else 1):
      t = time.perf_counter()
      e, f = compiled(params, placed)
      jax.block_until_ready(f)
      times.append(time.perf_counter() - t)
    assert np.isfinite(float(e[0])) and bool(jnp.isfinite(f).all())
    step = statistics.median(times)
    row.update(fits=True, seconds=round(step, 4),
               atoms_per_s=round(len(atoms) / step, 1),
               peak_rss_gb=round(_results.memory_status()["VmHWM"] / GB, 3))
    out["modes"][mode] = row
    del placed
  return out


def _run_child(n_atoms: int, devices: int, chunk: int, model: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_"
                        f"platform_device_count={devices}").strip()
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.large_system", "--child",
       f"--sizes={n_atoms}", f"--devices={devices}", f"--edge-chunk={chunk}",
       f"--model={model}"], cwd=ROOT, env=env, capture_output=True, text=True)
  if run.returncode:  # Another process may have taken the memory.
    why = ("killed (out of memory?)" if run.returncode < 0
           else run.stderr.strip().splitlines()[-1][-300:])
    return {"atoms": n_atoms, "devices": devices, "error": why, "modes": {}}
  return json.loads(run.stdout.strip().splitlines()[-1])


def _capacity(rows: list[dict]) -> dict:
  """Largest structures per device memory, from a fit of the plans.

  Atoms and edges per device vary independently only across device
  counts (a bulk structure has about 50 edges per atom), so the fit needs
  runs on one device and on several.
  """
  out = {}
  for mode in ("one_pass", "chunked"):
    pts = [(r["atoms"], r["modes"][mode]["edges_per_device"],
            r["modes"][mode]["planned_gb_per_device"] * GB)
           for r in rows
           if "planned_gb_per_device" in r["modes"].get(mode, {})]
    if len({(a, e) for a, e, _ in pts}) < 3:
      continue
    x = np.array([[a, e, 1.0] for a, e, _ in pts])
    y = np.array([b for _, _, b in pts])
    (per_atom, per_edge, fixed), *_ = np.linalg.lstsq(x, y, rcond=None)
    edges_per_atom = np.mean([r["edges"] / r["atoms"] for r in rows
                              if "edges" in r])
    fit = {"bytes_per_atom": round(per_atom, 1),
           "bytes_per_edge_per_device": round(per_edge, 1),
           "fixed_bytes": round(fixed)}
    for memory in (80, 141):
      for devices in (1, 8):
        per_structure_atom = per_atom + per_edge * edges_per_atom / devices
        fit[f"atoms_{memory}gb_x{devices}"] = int(
            (memory * GB - fixed) / per_structure_atom)
    out[mode] = fit
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1000,10000,100000,1000000")
  parser.add_argument("--devices", default="1,8")
  parser.add_argument("--edge-chunk", type=int, default=1 << 17)
  parser.add_argument("--model", default="egnn")
  parser.add_argument("--record", action="store_true")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  devices = [int(d) for d in args.devices.split(",")]
  if args.child:
    print(json.dumps(_child(sizes[0], devices[0], args.edge_chunk,
                            args.model)))
    return
  rows = []
  for d in devices:
    for n in sizes:
      rows.append(_run_child(n, d, args.edge_chunk, args.model))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  largest = max((r["atoms"] for r in rows
                 if any(m.get("fits") for m in r["modes"].values())),
                default=0)
  result = {"model": args.model, "cutoff": CUTOFF,
            "max_neighbors": MAX_NEIGHBORS, "edge_chunk": args.edge_chunk,
            "largest_run_atoms": largest, "runs": rows,
            "capacity_from_plans": _capacity(rows)}
  _results.report(
      "large_system", "Energy and forces of one large structure", result,
      "Rattled fcc Cu supercells, 6 Å / 50 neighbours, EGNN (laptop size), "
      "energy and forces; 1 device and 8 simulated CPU devices (edges split, "
      "atoms replicated), in one pass and in chunks. Memory per device is "
      "XLA's plan for the compiled program; `capacity_*` extrapolates it.",
      save=args.record)


if __name__ == "__main__":
  main()
