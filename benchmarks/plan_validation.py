r"""Planned against measured peak memory per device, for every layout.

    python -m benchmarks.plan_validation [--devices 8] [--record]
        [--config configs/test.py] [--set model.hidden_dim=64 ...]

`matsci_jax.plan` compiles a training step ahead of time and reads XLA's
memory analysis. Here the same step also runs, in a fresh process of
`--devices` simulated CPU devices, and its memory is measured:

* the state and batch the step reads: the bytes of the device buffers JAX
  holds for them (each device's shards), the largest over devices;
* what the step adds while it runs: the growth of the process's peak
  resident memory (VmHWM, reset through /proc/self/clear_refs just before
  the step) above its resident memory then, divided by the devices (all
  of them are this process's threads).

measured peak = state and batch + growth / devices. glibc is set to give
every allocation of 64 KiB or more its own `mmap` and return it when freed
(not the heap reuse of `matsci_jax._malloc`, which would serve the step's
buffers from memory freed by compilation, invisibly), so resident memory
follows the step's buffers. The step runs twice: the first execution also
starts the runtime's threads; `measured` is the second's. Linux only.

The default model is configs/test.py's tiny EGNN (16 wide, 2 layers) on
its 12-structure dev set; `--set` overrides config fields
(`model.hidden_dim=64`). Prints JSON; `--record` writes it to
benchmarks/RESULTS.md.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from benchmarks import _results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every allocation of at least this many bytes gets its own mmap, returned
# to the system when freed (a fixed threshold also stops glibc raising it).
_MMAP_THRESHOLD = 65536


def _reset_peak() -> None:
  """Sets VmHWM to the current resident size (Linux >= 4.0)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _device_bytes(tree) -> int:
  """The largest number of bytes any device holds of a pytree's arrays."""
  import jax
  per = {}
  for x in jax.tree_util.tree_leaves(tree):
    for shard in x.addressable_shards:
      per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
  return max(per.values())


def apply_settings(config, settings: list[str]) -> None:
  """Sets "field.name=value" items, each value of its field's type."""
  for item in settings:
    key, _, value = item.partition("=")
    node = config
    for part in key.split(".")[:-1]:
      node = node[part]
    kind = type(node[key.split(".")[-1]])
    config.update_from_flattened_dict({key: kind(value)})


def _config(spec: str, settings: list[str], path: str | None):
  from matsci_jax import config_files
  config = config_files.load(spec)
  apply_settings(config, settings)
  if path:
    config.data.path = path
  config.train.progress_bar = False
  return config


def measure(config, layout_name: str, devices: int) -> dict:
  """Planned and measured memory of one layout, in this process (whose
  devices are set): the executable `matsci_jax.plan` compiled is the one
  that runs, on a state created as training creates it."""
  import jax

  from matsci_jax import plan, train
  from matsci_jax.data import pipeline
  step = plan.compile_layout(config, plan.get_layout(layout_name), devices)
  planned = plan.layout_plan(step, 2 ** 60)
  job = train.build(step.config)
  first, n = job.train_data.first(), job.strategy.batches_per_step
  # As the input pipeline gives them: stacked when a step takes several.
  batch = job.strategy.place_train(
      first if n == 1 else pipeline.stack([first] * n))
  arguments = _device_bytes((job.state, batch))
  state, compiled = job.state, step.compiled
  del job, step
  growth = []
  for _ in range(2):
    gc.collect()
    before = _results.memory_status()["VmRSS"]
    _reset_peak()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    growth.append(_results.memory_status()["VmHWM"] - before)
    del metrics
  measured = arguments + growth[-1] / devices
  return {
      "layout": layout_name, "mesh": planned.mesh,
      "num_params": planned.num_params,
      "planned_peak_mb": round(planned.peak / 1e6, 3),
      "measured_peak_mb": round(measured / 1e6, 3),
      "ratio": round(planned.peak / measured, 4),
      "planned_temporaries_mb": round(planned.temporaries / 1e6, 3),
      "planned_arguments_mb": round(planned.argument / 1e6, 3),
      "measured_arguments_mb": round(arguments / 1e6, 3),
      "measured_growth_per_device_mb": [round(g / devices / 1e6, 3)
                                        for g in growth],
      "compile_seconds": planned.compile_seconds,
  }


def child_env(devices: int) -> dict:
  """The environment of a measuring process (see the module docstring)."""
  from matsci_jax import plan
  return dict(os.environ, JAX_PLATFORMS="cpu", MATSCI_JAX_MALLOC="default",
              GLIBC_TUNABLES=f"glibc.malloc.mmap_threshold={_MMAP_THRESHOLD}",
              XLA_FLAGS=plan.xla_flags(devices,
                                       os.environ.get("XLA_FLAGS", "")))


def run(layouts: list[str], devices: int, config: str, settings: list[str],
        data_path: str | None = None) -> list[dict]:
  """The layouts measured one after the other in a fresh process."""
  cmd = [sys.executable, "-m", "benchmarks.plan_validation",
         f"--child={','.join(layouts)}", f"--devices={devices}",
         f"--config={config}"] + [f"--set={s}" for s in settings]
  if data_path:
    cmd.append(f"--data-path={data_path}")
  proc = subprocess.run(cmd, cwd=ROOT, env=child_env(devices),
                        capture_output=True, text=True, timeout=900)
  if proc.returncode:
    raise RuntimeError(f"measuring {layouts} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  from matsci_jax import plan
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--config", default="configs/test.py")
  p.add_argument("--set", action="append", default=[],
                 help="a config field, e.g. model.hidden_dim=64")
  p.add_argument("--layouts", nargs="+", default=list(plan.LAYOUT_NAMES))
  p.add_argument("--data-path", help="a converted dataset (default: the "
                 "config's)")
  p.add_argument("--record", action="store_true")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    config = _config(args.config, args.set, args.data_path)
    print(json.dumps([measure(config, name, args.devices)
                      for name in args.child.split(",")]))
    return
  started = time.perf_counter()
  results = run(args.layouts, args.devices, args.config, args.set,
                args.data_path)
  worst = max(abs(r["ratio"] - 1) for r in results)
  _results.report(
      "plan_validation", "Planned against measured peak memory per device",
      {"config": args.config, "settings": args.set, "devices": args.devices,
       "layouts": results, "worst_relative_error": round(worst, 4),
       "seconds": round(time.perf_counter() - started, 1)},
      "`python -m benchmarks.plan_validation`: `matsci_jax.plan`'s peak "
      "(XLA's memory analysis of the step compiled ahead of time) against "
      "the peak measured when the step runs, per device (see the script).",
      save=args.record)


if __name__ == "__main__":
  main()
