r"""Per-device memory of a training run's layouts, planned before any run.

    python -m matsci_jax.plan --config=configs/s2ef.py \
        --config.model.hidden_dim=4096 --config.model.num_layers=12 \
        --devices 64 --device-memory 80GB [--fsdp 16|auto] \
        [--layouts fsdp,fsdp_remat] [--json plan.json]

For each layout (`LAYOUTS`: data parallel; FSDP; FSDP with "full" remat;
FSDP with remat and bf16) the training step of the config is built as
`train.build` builds it, with the state as shape structs (no parameter is
created), and compiled ahead of time for a mesh of `--devices` simulated
CPU devices. Any config override works as with `matsci_jax.main`, and the
batch shapes are the ones training would choose (the dataset's budget), so
the config's dataset is opened (the built-in dev set is built on first
use).

Per device it reports (`LayoutPlan`):
* parameters, EMA parameters, optimizer state and gradients: the arrays'
  shapes x dtype sizes divided as their shardings divide them (exact);
* temporaries: XLA's temporary buffers of the compiled step (activations,
  gradients, gathered FSDP parameters, the optimizer's intermediates);
* peak = arguments + outputs - aliased outputs + temporaries, from
  `compiled.memory_analysis()`: everything the step holds while it runs,
  with the donated state updated in place. It is XLA's buffer assignment,
  an upper bound of what is live at once (jax's `peak_memory_in_bytes`
  leaves the temporaries out on XLA:CPU, so it is not used);
* FLOPs per step over all devices (XLA's cost analysis of the lowered
  per-device program with the model's scans unrolled, times the devices,
  as training logs them; `models/scan_unroll.py`);
* parameters that FSDP leaves whole on every device: an array is split
  only along a dimension the "fsdp" size divides, so a 7,000-wide model
  splits over 8 devices but not over 16 or 256. `--fsdp auto` takes the
  size (a divisor of `--devices`) that leaves the least state per device;
* whether the peak fits `--device-memory` ("80GB" is 80e9 bytes, "80GiB"
  80 x 2**30; a plain number is bytes). On GPUs JAX takes 75% of the
  memory by default (`XLA_PYTHON_CLIENT_MEM_FRACTION`): give what it may
  use, and leave room for the runtime (cuBLAS/cuDNN workspaces).

The numbers are XLA:CPU's compilation of the same program, with its
memory-minimising scheduler (as GPU and TPU schedulers, it recomputes
rematerialised values next to their use; see `models/remat.py`). GPU and
TPU compilers fuse differently, so temporaries there differ somewhat;
parameters and optimizer state do not. On the CPU the planned peak agrees
with the measured one (`benchmarks/plan_validation.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

# Nothing here imports jax at module level: the command sets the device
# count first, which jax reads when it starts.

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9,
          "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "tib": 2 ** 40}


def parse_memory(text: str) -> int:
  """Bytes of a memory size: "80GB" (SI: 80e9), "80GiB" (80 x 2**30),
  "16e9" or "16000000000" (bytes); units are case-insensitive.

  Raises:
    ValueError: not a positive size with one of those units.
  """
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)"
                   r"\s*", str(text))
  unit = m and m.group(2).lower()
  if not m or unit not in _UNITS:
    raise ValueError(
        f"device memory {text!r}: expected a number of bytes with an "
        "optional unit, B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, "
        "GiB, TiB (powers of 1024), e.g. 80GB, 80GiB or 16e9")
  value = float(m.group(1)) * _UNITS[unit]
  if value < 1:
    raise ValueError(f"device memory {text!r} is not a positive size")
  return int(value)


def memory_unit(text: str, largest: float = float("inf")
                ) -> tuple[str, int]:
  """(name, bytes) of the unit a table shows sizes in: binary (GiB) when
  `text` is in binary units, decimal (GB) otherwise; MB or MiB when the
  `largest` size is under a tenth of a GB."""
  binary = "ib" in str(text).lower()
  if largest < (2 ** 30 if binary else 10 ** 9) / 10:
    return ("MiB", 2 ** 20) if binary else ("MB", 10 ** 6)
  return ("GiB", 2 ** 30) if binary else ("GB", 10 ** 9)


# The layouts, and how each is made from a config.

@dataclasses.dataclass(frozen=True)
class Layout:
  """One way to lay a training run over the devices.

  Attributes:
    name: its key ("fsdp_remat").
    description: what it does, in words.
    fsdp: whether the state is split over an "fsdp" axis (else all devices
      are on "data" and the state is replicated).
    remat: `config.model.remat`.
    precision: `config.precision`.
  """
  name: str
  description: str
  fsdp: bool
  remat: str
  precision: str

  def overrides(self, devices: int, fsdp: int | None = None
                ) -> dict[str, Any]:
    """The config fields (dotted) that train this layout on `devices`;
    FSDP layouts split the state over `fsdp` of them (default all, the
    rest on "data").

    Raises:
      ValueError: `fsdp` does not divide `devices`.
    """
    if not self.fsdp:
      data, k = devices, 1
    else:
      k = devices if not fsdp else int(fsdp)
      if k < 1 or devices % k:
        raise ValueError(f"--fsdp {k} does not divide --devices {devices}")
      data = devices // k
    return {"parallel.strategy": "jit", "mesh.data": data, "mesh.fsdp": k,
            "model.remat": self.remat, "precision": self.precision}


LAYOUTS = (
    Layout("data_parallel", "data parallel: state replicated on every "
           "device", fsdp=False, remat="", precision="float32"),
    Layout("fsdp", "FSDP: state split over the fsdp axis", fsdp=True,
           remat="", precision="float32"),
    Layout("fsdp_remat", "FSDP, layers rematerialised (remat 'full')",
           fsdp=True, remat="full", precision="float32"),
    Layout("fsdp_remat_bf16", "FSDP, remat 'full', bf16 dense layers",
           fsdp=True, remat="full", precision="bf16"),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


def get_layout(name: str) -> Layout:
  """The layout called `name` (ValueError for an unknown one)."""
  for layout in LAYOUTS:
    if layout.name == name:
      return layout
  raise ValueError(f"unknown layout {name!r}; choose from "
                   f"{', '.join(LAYOUT_NAMES)}")


def layout_config(config, layout: Layout, devices: int,
                  fsdp: int | None = None):
  """A copy of `config` set to train `layout` on `devices`."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.update_from_flattened_dict(layout.overrides(devices, fsdp))
  return out


def command_line(overrides: dict[str, Any]) -> str:
  """`--config.FIELD=VALUE` flags of `overrides`, for `matsci_jax.main`."""
  return " ".join(f"--config.{k}={v!r}" if isinstance(v, str) and not v
                  else f"--config.{k}={v}" for k, v in overrides.items())


# Planning.

def sharded_bytes(tree) -> int:
  """Bytes of one device's shards of a pytree of shape structs with
  `NamedSharding`s: each array's shard shape x its dtype's size."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return int(total)


def unsplit_bytes(tree) -> int:
  """Bytes of the arrays of a pytree of shape structs that no mesh axis
  splits (held whole by every device)."""
  import jax
  import numpy as np
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)
                 if x.sharding.shard_shape(x.shape) == tuple(x.shape)))


def fsdp_bytes(tree, fsdp: int, min_size: int) -> int:
  """Per-device bytes of a pytree of arrays or shape structs split over an
  "fsdp" axis of `fsdp` devices by `parallel.fsdp_dim`'s rule (as
  `parallel.state_shardings` splits them), without a mesh."""
  import jax
  import numpy as np

  from matsci_jax import parallel
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    size = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    split = parallel.fsdp_dim(x.shape, fsdp, min_size) is not None
    total += size // fsdp if split else size
  return int(total)


def best_fsdp(state, devices: int, min_size: int) -> int:
  """The "fsdp" axis size, a divisor of `devices`, that leaves the fewest
  bytes of `state` (shape structs) per device; the smallest such.

  An array is split only along a dimension the size divides (a 7,000-wide
  layer splits over 8 devices, not 16), so all devices on "fsdp" can leave
  more on each device than fewer.
  """
  sizes = [k for k in range(1, devices + 1) if devices % k == 0]
  return min(sizes, key=lambda k: (fsdp_bytes(state, k, min_size), k))


def abstract_state(config):
  """The training state of `config` as shape structs (data parallel over
  this process's devices); nothing is created."""
  from matsci_jax import train
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.update_from_flattened_dict({"mesh.data": -1, "mesh.fsdp": 1})
  return train.build(cfg, abstract=True, count_flops=False).state


def num_scalars(tree) -> int:
  """Scalars in a pytree of arrays or shape structs."""
  import jax
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass
class LayoutPlan:
  """The planned memory of one layout (sizes in bytes, per device).

  Attributes:
    layout: the layout's name.
    devices: devices of the mesh.
    mesh: {"data": size, "fsdp": size}.
    overrides: config fields that train this layout (`Layout.overrides`).
    num_params: parameter scalars of the model.
    params, ema_params, opt_state, gradients: per-device bytes from the
      shardings (gradients are sharded as the parameters; they live among
      the temporaries).
    unsplit_params: bytes of parameters that no mesh axis splits.
    batch: per-device bytes of the step's batch.
    temporaries: XLA's temporary buffers.
    argument, output, alias: XLA's argument, output and aliased (donated)
      bytes.
    peak: argument + output - alias + temporaries.
    device_memory: the bytes a device has; fits: peak <= device_memory.
    flops_per_step: FLOPs of one step over all devices (XLA), or None.
    compile_seconds: time to lower and compile the step.
  """
  layout: str
  devices: int
  mesh: dict
  overrides: dict
  num_params: int
  params: int
  ema_params: int
  opt_state: int
  gradients: int
  unsplit_params: int
  batch: int
  temporaries: int
  argument: int
  output: int
  alias: int
  peak: int
  device_memory: int
  fits: bool
  flops_per_step: float | None
  compile_seconds: float

  @property
  def state(self) -> int:
    """Per-device bytes of the whole training state."""
    return self.params + self.ema_params + self.opt_state


@dataclasses.dataclass
class CompiledLayout:
  """A layout's training step, compiled ahead of time.

  Attributes:
    layout: the layout.
    config: the config that trains it (`layout_config`).
    job: `train.build(config, abstract=True)`: its state is shape structs.
    batch: the step's batch as shape structs.
    compiled: the compiled step; it runs on real arrays laid out as
      `job.state` and `batch` are.
    seconds: time to build, lower and compile it.
  """
  layout: Layout
  config: Any
  job: Any
  batch: Any
  compiled: Any
  seconds: float


def compile_layout(config, layout: Layout, devices: int,
                   fsdp: int | None = None) -> CompiledLayout:
  """Builds and compiles `layout` of `config` on the `devices` devices of
  this process (see `plan`), creating no array.

  Raises:
    ConfigError, DatasetError: as training would raise them.
  """
  from matsci_jax import train
  from matsci_jax.config_checks import check_config
  cfg = layout_config(config, layout, devices, fsdp)
  check_config(cfg)
  started = time.perf_counter()
  job = train.build(cfg, abstract=True)
  batch = job.strategy.abstract_train_batch(job.train_data.first())
  compiled = job.train_step.lower(job.state, batch).compile()
  return CompiledLayout(layout, cfg, job, batch, compiled,
                        time.perf_counter() - started)


def layout_plan(step: CompiledLayout, device_memory: int) -> LayoutPlan:
  """The per-device memory and FLOPs of a compiled layout."""
  memory = step.compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  mesh = step.job.strategy.mesh
  state = step.job.state
  return LayoutPlan(
      layout=step.layout.name, devices=mesh.size, mesh=dict(mesh.shape),
      overrides=step.layout.overrides(mesh.size, mesh.shape["fsdp"]),
      num_params=num_scalars(state.params), params=sharded_bytes(state.params),
      ema_params=sharded_bytes(state.ema_params),
      opt_state=sharded_bytes(state.opt_state),
      gradients=sharded_bytes(state.params),
      unsplit_params=unsplit_bytes(state.params),
      batch=sharded_bytes(step.batch),
      temporaries=int(memory.temp_size_in_bytes),
      argument=int(memory.argument_size_in_bytes),
      output=int(memory.output_size_in_bytes),
      alias=int(memory.alias_size_in_bytes), peak=int(peak),
      device_memory=int(device_memory), fits=peak <= device_memory,
      flops_per_step=step.job.flops_per_step,
      compile_seconds=round(step.seconds, 2))


def plan(config, devices: int, device_memory: int | str,
         layouts: tuple[str, ...] | None = None,
         fsdp: int | str | None = None) -> list[LayoutPlan]:
  """Plans `layouts` (default all of `LAYOUTS`) of `config` on `devices`.

  Args:
    config: a training config (configs/s2ef.py and its overrides).
    devices: devices of the mesh; this process must have exactly that
      many (`python -m matsci_jax.plan` simulates them on the CPU).
    device_memory: bytes per device, or a size `parse_memory` reads.
    layouts: names from `LAYOUT_NAMES`.
    fsdp: the "fsdp" axis size of FSDP layouts (default all devices; the
      rest are on "data"), or "auto" (`best_fsdp`).

  Raises:
    ValueError: another device count, an unknown layout, a bad size.
    ConfigError, DatasetError: as training would raise them.
  """
  import jax
  if isinstance(device_memory, str):
    device_memory = parse_memory(device_memory)
  chosen = [get_layout(n) for n in (layouts or LAYOUT_NAMES)]
  if jax.device_count() != devices:
    raise ValueError(
        f"planning for {devices} devices needs a process with that many, "
        f"but this one has {jax.device_count()}: run python -m "
        f"matsci_jax.plan --devices {devices}, or set XLA_FLAGS="
        f"{DEVICE_COUNT_FLAG}={devices} before jax is imported")
  if fsdp == "auto":
    fsdp = best_fsdp(abstract_state(config), devices,
                     int(config.parallel.fsdp_min_size))
  for layout in chosen:  # Before any compilation: a bad --fsdp fails fast.
    layout.overrides(devices, fsdp)
  return [layout_plan(compile_layout(config, layout, devices, fsdp),
                      device_memory) for layout in chosen]


# The command.

def xla_flags(devices: int, existing: str = "") -> str:
  """`existing` XLA flags with `devices` simulated CPU devices and, unless
  set there, the CPU's memory-minimising scheduler."""
  kept = [f for f in existing.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  if not any(f.startswith(CPU_MEMORY_SCHEDULER) for f in kept):
    kept.append(f"{CPU_MEMORY_SCHEDULER}=false")
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])


def table(plans: list[LayoutPlan], memory_text: str) -> str:
  """The plans as a text table, sizes in GB or GiB as `memory_text`."""
  unit, scale = memory_unit(memory_text, max(p.peak for p in plans))
  columns = ("params", "ema", "opt state", "grads*", "batch", "temps",
             "peak", "TFLOP/step", "fits")
  rows = []
  for p in plans:
    flops = ("-" if p.flops_per_step is None
             else f"{p.flops_per_step / 1e12:.3g}")
    rows.append([f"{p.layout} ({p.mesh['data']}x{p.mesh['fsdp']})"] + [
        f"{v / scale:.4g}" for v in (p.params, p.ema_params, p.opt_state,
                                     p.gradients, p.batch, p.temporaries,
                                     p.peak)] + [flops,
                                                 "yes" if p.fits else "NO"])
  head = ["layout (data x fsdp)", *columns]
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths)))
           for r in [head] + rows]
  return "\n".join(lines)


def _run(argv, f: dict) -> None:
  """The command, once absl has parsed the flags `f` (see `main`)."""
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, devices, memory_text = (f["config"].value, f["devices"].value,
                                  f["memory"].value)
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/s2ef.py")
  try:
    memory = parse_memory(memory_text)
    layouts = tuple(f["layouts"].value)
    fsdp = _fsdp_flag(f["fsdp"].value)
    for name in layouts:
      get_layout(name).overrides(devices, None if fsdp == "auto" else fsdp)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if "jax" in sys.modules:
    raise app.UsageError("jax was imported before the device count could "
                         "be set; run python -m matsci_jax.plan")
  os.environ["XLA_FLAGS"] = xla_flags(devices,
                                      os.environ.get("XLA_FLAGS", ""))
  os.environ["JAX_PLATFORMS"] = "cpu"
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  with config.unlocked():
    config.train.progress_bar = False
  started = time.perf_counter()
  plans = plan(config, devices, memory, layouts, fsdp)
  seconds = time.perf_counter() - started
  unit, scale = memory_unit(memory_text, max(p.peak for p in plans))
  print(f"{plans[0].num_params:,} parameters; {devices} devices of "
        f"{memory_text} ({memory:,} bytes); sizes in {unit} "
        f"({'binary' if 'i' in unit else 'decimal'} units) per device:")
  print(table(plans, memory_text))
  print("* gradients are held among the temporaries; peak = arguments + "
        "outputs - donated + temporaries (XLA:CPU's buffer assignment)")
  for p in plans:
    print(f"{p.layout}: {command_line(p.overrides)}")
  for p in plans:
    if p.mesh["fsdp"] > 1 and p.unsplit_params > 0.1 * p.params:
      print(f"note: {p.layout} leaves {p.unsplit_params / scale:.3g} {unit} "
            f"of parameters whole on every device: FSDP splits an array "
            f"only along a dimension that {p.mesh['fsdp']} divides (and "
            f"not arrays under parallel.fsdp_min_size); --fsdp auto picks "
            f"the size that splits the most")
  print(f"planned in {seconds:.1f} s")
  if f["json"].value:
    with open(f["json"].value, "w") as out:
      json.dump({"devices": devices, "device_memory": memory,
                 "device_memory_text": memory_text,
                 "planning_seconds": round(seconds, 2),
                 "layouts": [dataclasses.asdict(p) for p in plans]}, out,
                indent=1)


def _fsdp_flag(text: str) -> int | str | None:
  """--fsdp: None for "all", "auto", or a positive size."""
  if text in ("all", "auto"):
    return None if text == "all" else text
  try:
    size = int(text)
  except ValueError:
    size = 0
  if size < 1:
    raise ValueError(f"--fsdp {text!r}: expected a positive size, 'all' or "
                     "'auto'")
  return size


def main() -> None:
  """Defines the command's flags (here, not at import: the library must
  not add flags to a program that imports it) and runs it."""
  from absl import app, flags
  from ml_collections import config_flags

  f = {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Path to a config file (configs/*.py).",
          lock_config=True),
      "devices": flags.DEFINE_integer(
          "devices", None, "Devices of the mesh (simulated CPU devices).",
          lower_bound=1, required=True),
      "memory": flags.DEFINE_string(
          "device-memory", "80GB", "Memory of one device: 80GB (10**9 "
          "bytes a GB), 80GiB (2**30 bytes a GiB) or bytes (16e9)."),
      "fsdp": flags.DEFINE_string(
          "fsdp", "all", "Size of the fsdp axis of the FSDP layouts, the "
          "rest of the devices on the data axis: a number, 'all' (the "
          "default) or 'auto' (the size that leaves the least state per "
          "device: arrays split only along dimensions it divides)."),
      "layouts": flags.DEFINE_list(
          "layouts", list(LAYOUT_NAMES), "Layouts to plan, of "
          f"{', '.join(LAYOUT_NAMES)}."),
      "json": flags.DEFINE_string("json", None,
                                  "Also write the plans to this file."),
  }
  app.run(lambda argv: _run(argv, f))


if __name__ == "__main__":
  main()
