r"""Scaling: throughput against device count, memory against model width.

    python -m benchmarks.scaling [--record] [--devices 1 2 4 8]
        [--widths 128 256 512]

* throughput: S2EF steps (energy and forces) of EGNN (width 128, 3 layers,
  6 Å) on 2 LiPS cells (83 atoms) per device, data parallel over 1, 2, 4
  and 8 devices: structures/s and the step time;
* memory: peak bytes per device of the compiled step (XLA's memory
  analysis: arguments, outputs and temporaries) on 8 devices, against the
  EGNN width, for plain data parallelism, FSDP over all 8 devices,
  rematerialised layers ("full"), and both; for the S2EF step (forces, a
  second-order gradient) and an energy-only step (first order, as IS2RE).

XLA:CPU's default scheduler favours concurrency and computes rematerialised
values as early as their inputs allow, which undoes remat's saving; the
memory runs on a CPU therefore use its memory-minimising scheduler
(`--xla_cpu_enable_concurrency_optimized_scheduler=false`), and one width is
also measured with the default, to show the difference. GPU and TPU
schedulers keep recomputation next to its use.

Each configuration runs in its own process so that the device count can be
chosen; where only a CPU is present the devices are simulated
(`--xla_force_host_platform_device_count`), so they share its cores and
throughput cannot grow with them: those figures test the machinery, real
scaling needs real devices. Needs `../shared/data/matsciml_lips_devset`.
Prints JSON; `--record` writes it to benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIPS = os.path.join(ROOT, "..", "shared", "data", "matsciml_lips_devset")
PER_DEVICE = 2  # LiPS cells per device and step


CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def worker(folder: str, width: int, data: int, fsdp: int, remat: str,
           steps: int, task: str = "s2ef") -> dict:
  """One configuration, in a process whose devices are already set."""
  import jax

  from configs import s2ef
  from matsci_jax import (models, monitoring, parallel, strategies, tasks,
                          train_state)
  from matsci_jax.data import batching, dataset_io

  split = dataset_io.Dataset(folder).split("train")
  n = data * fsdp
  sizes = split.sizes
  budget = batching.Budget(
      n_node=PER_DEVICE * int(sizes[:, 0].max()) + 1,
      n_edge=int(PER_DEVICE * sizes[:, 1].max()), n_graph=PER_DEVICE + 1)
  batches = [parallel.stack_batches([batching.collate(
      [split.source[(k * n * PER_DEVICE + d * PER_DEVICE + j) % len(split)]
       for j in range(PER_DEVICE)], budget) for d in range(n)])
             for k in range(2)]
  model = models.get("egnn", hidden_dim=width, num_layers=3, cutoff=6.0,
                     readout_hidden=64, remat=remat)
  config = s2ef.get_config()
  # Energy-only steps (first order, as IS2RE) train on the frame energies.
  task_def = (tasks.S2EF if task == "s2ef" else
              tasks.Task("energy", energy_target="energy", forces=False))
  loss_fn = task_def.make_loss(
      model, task_def.normalizer(split.statistics, model), config.loss)
  optimizer = train_state.make_optimizer(config)
  strategy = strategies.JitStrategy(parallel.make_mesh(data, fsdp),
                                    fsdp_min_size=2 ** 12)
  one = jax.tree_util.tree_map(lambda x: x[0], batches[0])
  state = strategy.create_state(
      lambda rng: train_state.TrainState.create(model.init(rng, one),
                                                optimizer),
      jax.random.PRNGKey(0))
  step = strategy.make_train_step(loss_fn, optimizer,
                                  config.optimizer.ema_decay)
  if strategy.batches_per_step == 1:  # The pipeline's form: unstacked.
    batches = [jax.tree_util.tree_map(lambda x: x[0], b) for b in batches]
  placed = [strategy.place_train(b) for b in batches]
  memory = step.lower(state, placed[0]).compile().memory_analysis()
  state, m = step(state, placed[0])
  jax.block_until_ready(m)
  warm = monitoring.compile_count()
  t0 = time.perf_counter()
  for k in range(steps):
    state, m = step(state, placed[k % 2])
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / steps
  params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  return {"task": task, "width": width, "devices": n,
          "mesh": {"data": data, "fsdp": fsdp}, "remat": remat,
          "num_params": int(params),
          "structures_per_step": n * PER_DEVICE,
          "step_time_s": round(dt, 4),
          "structures_per_s": round(n * PER_DEVICE / dt, 2),
          "peak_memory_per_device_mb": round(peak / 2 ** 20, 2),
          "compiles_after_warmup": monitoring.compile_count() - warm,
          "device_kind": jax.devices()[0].device_kind,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _run(folder, devices, width, data, fsdp, remat, steps, task="s2ef",
         memory_scheduler=False) -> dict:
  env = dict(os.environ)
  if "cpu" in _platform():
    flags = [env.get("XLA_FLAGS", ""),
             f"--xla_force_host_platform_device_count={devices}"]
    if memory_scheduler:
      flags.append(CPU_MEMORY_SCHEDULER)
    env["XLA_FLAGS"] = " ".join(flags).strip()
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.scaling", "--worker", folder,
       str(width), str(data), str(fsdp), remat or "none", str(steps), task],
      env=env, capture_output=True, text=True, cwd=ROOT)
  if out.returncode:
    sys.exit(f"worker failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(json.dumps(result), flush=True)
  return result


def _platform() -> str:
  import jax
  return jax.default_backend()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--record", action="store_true")
  p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    folder, width, data, fsdp, remat, steps, task = args.worker
    print(json.dumps(worker(folder, int(width), int(data), int(fsdp),
                            "" if remat == "none" else remat, int(steps),
                            task)))
    return
  if not os.path.isdir(LIPS):
    sys.exit(f"needs the LiPS fixture at {LIPS}")
  from benchmarks import _results
  from matsci_jax.data.converter import convert
  from matsci_jax.data.graph_spec import GraphSpec
  results = {"workload": {"model": "egnn, 3 layers, 6 A",
                          "structures_per_device": PER_DEVICE,
                          "structure": "LiPS cell, 83 atoms",
                          "tasks": "s2ef: energy and forces; energy: "
                                   "energy only (first order, as IS2RE)"},
             "throughput": [], "memory": []}
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "lips")
    convert([f"train={LIPS}"], folder, task="s2ef",
            graph_spec=GraphSpec(cutoff=6.0, max_neighbors=0), workers=1,
            progress=False)
    for n in args.devices:
      results["throughput"].append(
          _run(folder, n, 128, n, 1, "", args.steps))
    most = max(args.devices)
    for task in ("s2ef", "energy"):
      for width in args.widths:
        for fsdp, remat in ((1, ""), (most, ""), (1, "full"), (most, "full")):
          results["memory"].append(_run(folder, most, width, most // fsdp,
                                        fsdp, remat, 2, task, True))
      if "cpu" in _platform():  # The default scheduler, for comparison.
        for remat in ("", "full"):
          results["memory"].append(_run(folder, most, max(args.widths), most,
                                        1, remat, 2, task, False))
  _results.report(
      "scaling", "Scaling: devices and memory", results,
      "`python -m benchmarks.scaling --record`. On a CPU the devices are "
      "simulated and share its cores, so throughput cannot grow with their "
      "number there; the memory figures are XLA's per-device compiled "
      "sizes, which do not depend on that. Memory runs on a CPU use its "
      "memory-minimising scheduler (see `xla_flags`) except the two marked "
      "runs per task without it, which show that the default scheduler "
      "undoes remat's saving.", save=args.record)


if __name__ == "__main__":
  main()
