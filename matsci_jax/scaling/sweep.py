"""Scaling sweeps: a grid of ordinary trainings, one record per finished run.

A sweep config (configs/scaling.py) names a training config (`base`),
fields set in every run (`base_overrides`), a grid of fields and their
values (`grid`; the runs are its product) and each run's `budget`:

* kind "steps", value n: n training steps;
* kind "epochs", value e: e times the steps of the training split's first
  epoch, rounded up. Epochs are packed into padded batches one by one, so
  a later epoch can take a step more or less: e epochs are exact for the
  first and close after it;
* kind "flops", value C: C divided by the FLOPs of one training step,
  rounded down. The FLOPs are XLA's cost analysis of the lowered step, as
  train.py counts them, measured before training by building the step
  (state included) and lowering it without compiling or running it
  (`measure`).

`budget.evaluations` (0: the base's schedule) spreads that many
evaluations, and checkpoints, evenly over each run, so that every run,
whatever its length, draws a learning curve of as many points.

Every run is an ordinary training workdir under DIR/runs/<name>, its name
made from its grid values ("hidden_dim=32,train_fraction=0.5,seed=0"), so
that a killed run resumes from its last checkpoint. Beside train.py's
files it holds sweep_run.json (its settings and resolved step count, so
that a resumed run keeps them), sweep_record.json (its record, once
finished) and sweep.log (its output, when it ran in a subprocess, and the
traceback of a failure). Each finished run appends one JSON line to
DIR/runs.jsonl (`make_record`), the file `matsci_jax.scaling.fit` reads.
A sweep started again skips the runs runs.jsonl holds, appends those that
finished without reaching it, and resumes the others.

Runs execute in this process one after the other (`parallel` 1, which a
run over all devices needs), or as `parallel` subprocesses at once, each
pinned to one GPU (CUDA_VISIBLE_DEVICES) or TPU chip (TPU_VISIBLE_CHIPS
with one-chip process bounds); on CPUs the subprocesses share the cores.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import numbers
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import ml_collections

from matsci_jax import config_files

BUDGET_KINDS = ("steps", "epochs", "flops")
RUNS_FILE = "runs.jsonl"
RUNS_DIR = "runs"
RUN_FILE = "sweep_run.json"
RECORD_FILE = "sweep_record.json"
LOG_FILE = "sweep.log"
FRACTION_FIELD = "data.train_fraction"
# Metrics where higher is better (as in fit.py); errors and losses: lower.
SCORES = ("force_cos", "efwt", "ewt")
# Metrics a progress line shows, the first a run has.
_SHOWN = ("val/force_mae", "val/energy_mae", "val/loss")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 120  # Characters; longer names end in a hash of the whole.
# TPU processes on one host each need their own mesh controller port.
_TPU_PORT = 8476


class SweepError(ValueError):
  """A sweep config or output folder that cannot be run as given."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep.

  Attributes:
    name: its name and folder under DIR/runs ("hidden_dim=32,seed=0").
    grid: its point of the grid, {dotted field: value}.
    overrides: (dotted field, value) pairs applied to the base config in
      order: the sweep's `base_overrides`, then `grid`.
    base: the training config spec ("configs/s2ef.py:egnn").
    budget: {"kind", "value", "evaluations"}.
  """
  name: str
  grid: dict
  overrides: tuple
  base: str
  budget: dict

  def spec(self) -> dict:
    """The run's settings as sweep_run.json holds them (JSON types)."""
    return _jsonable({"name": self.name, "grid": self.grid,
                      "overrides": [list(o) for o in self.overrides],
                      "base": self.base, "budget": self.budget})

  @classmethod
  def from_spec(cls, spec: dict) -> "Run":
    return cls(spec["name"], dict(spec["grid"]),
               tuple((f, v) for f, v in spec["overrides"]), spec["base"],
               dict(spec["budget"]))

  def config(self) -> ml_collections.ConfigDict:
    """The base config with the run's overrides (steps not yet set)."""
    config = config_files.load(self.base)
    for field, value in self.overrides:
      set_field(config, field, value, f"run {self.name}")
    return config


@dataclasses.dataclass(frozen=True)
class Probe:
  """What a run's training will be, measured before it trains.

  Attributes:
    train_structures: structures of the training split (after
      `data.train_fraction`).
    steps_per_epoch: training steps of the split's first epoch.
    flops_per_step: FLOPs of one training step over all devices (XLA's
      cost analysis), or None when not measured or not available.
  """
  train_structures: int
  steps_per_epoch: int
  flops_per_step: float | None


@dataclasses.dataclass
class Outcome:
  """What a sweep did.

  Attributes:
    runs: every run of the grid.
    skipped: names of runs already in runs.jsonl.
    recorded: names of runs recorded now.
    failed: (name, log path) of runs that failed.
  """
  runs: list
  skipped: list = dataclasses.field(default_factory=list)
  recorded: list = dataclasses.field(default_factory=list)
  failed: list = dataclasses.field(default_factory=list)


def _jsonable(value):
  """Tuples and ConfigDicts as JSON lists and objects."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _tuples(value):
  """JSON lists back as tuples, as config fields hold sequences."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


# Dotted fields of a config.

def _parent(config, field: str):
  """(ConfigDict holding `field`, its last name), or None if a section on
  the way is missing."""
  *sections, name = field.split(".")
  node = config
  for section in sections:
    if not isinstance(node, ml_collections.ConfigDict) or section not in node:
      return None
    node = node[section]
  if not isinstance(node, ml_collections.ConfigDict):
    return None
  return node, name


def has_field(config, field: str) -> bool:
  """Whether `config` has the dotted `field`."""
  found = _parent(config, field)
  return found is not None and found[1] in found[0]


def _fields(config, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value:
      out += _fields(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


def set_field(config, field: str, value, where: str) -> None:
  """Sets the dotted `field` of `config`, which must have it.

  Raises:
    SweepError: no such field, or a value of another type (named with
      `where`).
  """
  found = _parent(config, field)
  if found is None or not has_field(config, field):
    raise SweepError(f"{where}: {field!r} is not a config field")
  node, name = found
  old = node.get(name)
  value = _tuples(value) if isinstance(old, tuple) or old is None else value
  try:
    node[name] = value
  except (TypeError, ValueError) as e:
    raise SweepError(f"{where}: cannot set {field} = {value!r}: {e}") from e


# The sweep config.

def _is_real(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_budget(budget) -> dict:
  if budget is None:
    raise SweepError("config has no 'budget'; e.g. "
                     "ConfigDict(kind='steps', value=500)")
  kind, value = budget.get("kind"), budget.get("value")
  if kind not in BUDGET_KINDS:
    raise SweepError(f"config.budget.kind: {kind!r} is not one of "
                     f"{', '.join(BUDGET_KINDS)}")
  if kind == "steps":
    ok = isinstance(value, numbers.Integral) and not isinstance(
        value, bool) and value >= 1
    need = "an integer >= 1"
  else:
    ok = _is_real(value) and value > 0
    need = "a finite number > 0"
  if not ok:
    raise SweepError(f"config.budget.value = {value!r}: a {kind!r} budget "
                     f"must be {need}")
  evaluations = budget.get("evaluations", 0)
  if not (isinstance(evaluations, numbers.Integral)
          and not isinstance(evaluations, bool) and evaluations >= 0):
    raise SweepError(f"config.budget.evaluations = {evaluations!r}: must be "
                     "an integer >= 0 (0: the base config's schedule)")
  return {"kind": kind, "value": value, "evaluations": int(evaluations)}


def _check_field(config, field: str, base: str, where: str) -> None:
  if has_field(config, field):
    return
  close = difflib.get_close_matches(field, _fields(config), n=1)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  raise SweepError(f"{where}: {field!r} is not a field of {base}{hint}")


def _check_fraction(field: str, value, where: str) -> None:
  if field == FRACTION_FIELD and not (_is_real(value) and 0 < value <= 1):
    raise SweepError(f"{where}: {field} = {value!r} is outside (0, 1]; a "
                     "data fraction keeps that share of the training split")


def _grid_axes(grid, base_config, base: str) -> list:
  """[(fields, values)] of the grid: fields a tuple of dotted names (several
  for a key "a.b,c.d", whose values are tuples, one value per field)."""
  axes, seen = [], set()
  for key, values in grid.items():
    fields = tuple(f.strip() for f in key.split(","))
    if not isinstance(values, (tuple, list)) or not values:
      raise SweepError(f"config.grid: {key!r} needs a non-empty tuple of "
                       f"values, got {values!r}")
    for field in fields:
      _check_field(base_config, field, base, "config.grid")
      if field in seen:
        raise SweepError(f"config.grid: {field!r} appears twice")
      seen.add(field)
    rows = []
    for value in values:
      if len(fields) > 1:
        if not isinstance(value, (tuple, list)) or len(value) != len(fields):
          raise SweepError(f"config.grid: {key!r} names {len(fields)} "
                           f"fields, so each value must be a tuple of "
                           f"{len(fields)}; got {value!r}")
        row = tuple(value)
      else:
        row = (value,)
      for field, v in zip(fields, row):
        _check_fraction(field, v, "config.grid")
      rows.append(row)
    axes.append((fields, rows))
  return axes


def _value_text(value) -> str:
  if isinstance(value, (tuple, list)):
    return "-".join(_value_text(v) for v in value)
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(point: dict) -> str:
  """"hidden_dim=32,train_fraction=0.5": the last part of each field (the
  whole dotted name where two fields share it) and its value, with any
  character unsafe in file names as "_"."""
  short = [f.rsplit(".", 1)[-1] for f in point]
  counts = collections.Counter(short)
  name = ",".join(f"{s if counts[s] == 1 else f}={_value_text(v)}"
                  for (f, v), s in zip(point.items(), short))
  name = _UNSAFE.sub("_", name)
  if len(name) > _MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f"{name[:_MAX_NAME - 11]}~{digest}"
  return name


def load(spec: str) -> ml_collections.ConfigDict:
  """The sweep config of "path/to/config.py[:arg]"; SweepError if absent."""
  try:
    return config_files.load(spec)
  except FileNotFoundError as e:
    raise SweepError(f"--config: {e}") from e


def plan(sweep: ml_collections.ConfigDict) -> list[Run]:
  """The runs of a sweep config, checked before anything trains.

  Raises:
    SweepError: a missing section, a grid field the base config lacks, a
      data fraction outside (0, 1], a bad budget, an empty grid, or a run
      whose config the trainer would reject (named with the run).
  """
  for key in ("base", "grid", "budget"):
    if key not in sweep:
      raise SweepError(f"config has no field {key!r}; see "
                       "configs/scaling.py")
  base = sweep.base
  try:
    base_config = config_files.load(base)
  except FileNotFoundError as e:
    raise SweepError(f"config.base: {e}") from e
  budget = _check_budget(sweep.budget)
  fixed = list((sweep.get("base_overrides") or {}).items())
  for field, value in fixed:
    _check_field(base_config, field, base, "config.base_overrides")
    _check_fraction(field, value, "config.base_overrides")
  axes = _grid_axes(sweep.grid or {}, base_config, base)
  if not axes:
    raise SweepError("config.grid is empty: give at least one field and "
                     "its values, e.g. {'model.hidden_dim': (16, 32, 64)}")
  runs = []
  for combination in itertools.product(*(rows for _, rows in axes)):
    point = {}
    for (fields, _), row in zip(axes, combination):
      point.update(zip(fields, row))
    point = _jsonable(point)
    runs.append(Run(run_name(point), point,
                    tuple(fixed) + tuple(point.items()), base, budget))
  names = collections.Counter(r.name for r in runs)
  twice = [n for n, c in names.items() if c > 1]
  if twice:
    raise SweepError(f"config.grid: runs share the name {twice[0]!r}; "
                     "grid values must differ in their text")
  from matsci_jax.config_checks import ConfigError, check_config
  for run in runs:
    try:
      check_config(run.config())
    except ConfigError as e:
      raise SweepError(f"run {run.name}: {e}") from e
  return runs


# One run.

def measure(config) -> Probe:
  """A run's training built as `train.train_and_evaluate` builds it
  (`train.build`), without training: the training split, its steps per
  epoch and XLA's FLOPs of the lowered (not compiled) step.

  The state is created on the devices as for training, so a large model
  briefly holds its memory here first.
  """
  from matsci_jax import parallel, train
  from matsci_jax.config_checks import check_config
  check_config(config)
  parallel.initialize_distributed(config)
  job = train.build(config)
  return Probe(len(job.train_data.split), len(job.train_data.plan.epoch(0)),
               job.flops_per_step)


def budget_steps(config, budget: dict) -> int:
  """Training steps of a run's budget (see the module docstring).

  Raises:
    SweepError: a "flops" budget on a backend without XLA cost analysis.
  """
  kind, value = budget["kind"], budget["value"]
  if kind == "steps":
    return int(value)
  probe = measure(config)
  if kind == "epochs":
    # The tolerance keeps 0.5 epochs of 48 steps at 24, not 25.
    return max(1, math.ceil(value * probe.steps_per_epoch - 1e-9))
  if not probe.flops_per_step:
    raise SweepError("a 'flops' budget needs the FLOPs of a training step, "
                     "and XLA's cost analysis gives none on this backend; "
                     "use a 'steps' or 'epochs' budget")
  return max(1, int(value // probe.flops_per_step))


def apply_budget(config, steps: int, evaluations: int) -> None:
  """Sets the run's steps and, with `evaluations`, its schedule."""
  config.train.num_steps = int(steps)
  if evaluations:
    every = max(1, math.ceil(steps / evaluations))
    config.train.eval_every = every
    config.train.checkpoint_every = every


def read_curve(workdir: str, flops_per_step: float | None) -> list[dict]:
  """Every evaluation in `workdir/metrics.csv`, by step.

  Returns:
    [{"step", "flops" (step x flops_per_step; absent without them),
    "metrics": {"val/...": value}}], in step order.
  """
  import csv
  by_step = collections.defaultdict(dict)
  path = os.path.join(workdir, "metrics.csv")
  if not os.path.exists(path):
    return []
  with open(path, newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      if row["metric"].startswith("val/"):
        by_step[int(row["step"])][row["metric"]] = float(row["value"])
  curve = []
  for step in sorted(by_step):
    point = {"step": step}
    if flops_per_step:
      point["flops"] = step * flops_per_step
    point["metrics"] = by_step[step]
    curve.append(point)
  return curve


def best_metrics(curve: list[dict]) -> dict:
  """The best value of every metric over the curve: the highest of scores
  (SCORES), the lowest of errors and losses."""
  best = {}
  for point in curve:
    for name, value in point["metrics"].items():
      if math.isnan(value):
        continue
      higher = name.rsplit("/", 1)[-1] in SCORES
      if name not in best or (value > best[name] if higher
                              else value < best[name]):
        best[name] = value
  return best


def make_record(run: Run, config, result: dict, workdir: str,
                wall_s: float) -> dict:
  """The JSON record of a finished run, as runs.jsonl holds it.

  Fields: name, overrides (the grid point), base, budget, params,
  train_structures, train_fraction, flops_per_step, total_flops (=
  flops_per_step x steps), steps, structures_seen, atoms_seen, wall_s
  (this attempt, setup included), device_s (its training time x devices),
  device_kind, device_count, resumed_from_step (None: a whole run), final
  (the last evaluation), best (over evaluations), curve (`read_curve`).
  A resumed run's wall_s and device_s count its last attempt only.
  """
  flops = result.get("flops_per_step")
  steps = int(result["step"])
  count = int(result["devices"]["count"])
  curve = read_curve(workdir, flops)
  return _jsonable({
      "name": run.name, "overrides": run.grid, "base": run.base,
      "budget": run.budget,
      "params": int(result["num_params"]),
      "train_structures": int(result["train_structures"]),
      "train_fraction": float(config.data.get("train_fraction", 1.0)),
      "flops_per_step": flops,
      "total_flops": None if flops is None else flops * steps,
      "steps": steps,
      "structures_seen": int(result["seen"]["structures"]),
      "atoms_seen": int(result["seen"]["atoms"]),
      "wall_s": float(wall_s),
      "device_s": float(result["train_seconds"]) * count,
      "device_kind": result["device_kind"], "device_count": count,
      "resumed_from_step": result.get("resumed_from_step"),
      "final": dict(result["metrics"]), "best": best_metrics(curve),
      "curve": curve})


def run_dir(out: str, name: str) -> str:
  return os.path.join(out, RUNS_DIR, name)


def _write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise SweepError(f"{path}: unreadable ({e}); delete it to redo the "
                     "run") from e


def _settings(spec: dict) -> dict:
  return {k: spec[k] for k in ("base", "overrides", "budget")}


def prepare(run: Run, workdir: str) -> dict:
  """The run's sweep_run.json, written if new.

  Raises:
    SweepError: the folder holds a run started with other settings.
  """
  spec = run.spec()
  path = os.path.join(workdir, RUN_FILE)
  old = _read_json(path)
  if old is None:
    os.makedirs(workdir, exist_ok=True)
    _write_json(path, spec)
    return spec
  if _settings(old) != _settings(spec):
    changed = [k for k in ("base", "overrides", "budget")
               if old[k] != spec[k]]
    raise SweepError(f"{workdir} holds run {run.name} started with another "
                     f"{' and '.join(changed)} ({path}); delete the folder "
                     "to redo it, or sweep into another --out")
  return old


def finished_record(run: Run, workdir: str) -> dict | None:
  """The record of a run that finished, or None."""
  record = _read_json(os.path.join(workdir, RECORD_FILE))
  spec = _read_json(os.path.join(workdir, RUN_FILE))
  if record is None or spec is None or _settings(spec) != _settings(
      run.spec()):
    return None
  return record


def execute(run: Run, workdir: str) -> dict:
  """Trains one run (resuming its workdir) and writes its record.

  Returns:
    The record (`make_record`), also in workdir/sweep_record.json.
  """
  import jax

  from matsci_jax import parallel, train
  started = time.perf_counter()
  config = run.config()
  parallel.initialize_distributed(config)
  writer = jax.process_index() == 0
  if writer:
    spec = prepare(run, workdir)
  else:  # Process 0 writes; the others resolve the same steps.
    spec = _read_json(os.path.join(workdir, RUN_FILE)) or run.spec()
  steps = spec.get("steps")
  if steps is None:
    steps = budget_steps(config, run.budget)
    if writer:
      _write_json(os.path.join(workdir, RUN_FILE), dict(spec, steps=steps))
  apply_budget(config, steps, run.budget["evaluations"])
  result = train.train_and_evaluate(config, workdir)
  record = make_record(run, config, result, workdir,
                       time.perf_counter() - started)
  if writer:
    _write_json(os.path.join(workdir, RECORD_FILE), record)
  return record


# The fields `inputs.dataset_folder` builds a dev set from.
_DEVSET_FIELDS = ("task", "devset_dir", "devset_num_systems",
                  "bulk_devset_dir", "bulk_devset_num_structures")


def devsets(run: Run) -> str | None:
  """What identifies the dev sets a run reads (a JSON text), or None when
  it reads none."""
  from matsci_jax import inputs
  data = run.config().data
  paths = [p for _, p, _ in inputs.source_settings(data)
           if p in (inputs.SLAB_DEVSET, inputs.BULK_DEVSET)]
  if not paths:
    return None
  return json.dumps([paths] + [_jsonable(data.get(f))
                               for f in _DEVSET_FIELDS])


def prepare_data(run: Run) -> None:
  """Builds the dev sets a run reads, if they are not yet built."""
  from matsci_jax import inputs
  config = run.config()
  for _, path, _ in inputs.source_settings(config.data):
    inputs.dataset_folder(config, path)


# runs.jsonl.

def recorded(out: str) -> dict[str, dict]:
  """The records of DIR/runs.jsonl by name ({} when there is none).

  A last line cut short (a sweep killed while writing it) is left out;
  `append_record` removes it.

  Raises:
    SweepError: another line is not a JSON record.
  """
  path = os.path.join(out, RUNS_FILE)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return {}
  records = {}
  lines = data.split(b"\n")[:-1]  # Whole lines end in a newline.
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      records[record["name"]] = record
    except (ValueError, KeyError, TypeError) as e:
      raise SweepError(f"{path}, line {i}: not a run record ({e})") from e
  return records


def append_record(out: str, record: dict) -> None:
  """Appends a record as one line, in one write, flushed to disk.

  A last line cut short by a kill is removed first.
  """
  path = os.path.join(out, RUNS_FILE)
  line = (json.dumps(record) + "\n").encode("utf-8")
  fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
      data = os.pread(fd, size, 0)
      print(f"warning: {path}: removing an unfinished last line",
            file=sys.stderr)
      os.ftruncate(fd, data.rfind(b"\n") + 1)
    written = os.write(fd, line)
    if written != len(line):
      raise OSError(f"wrote {written} of {len(line)} bytes of a record")
    os.fsync(fd)
  finally:
    os.close(fd)


# Devices and subprocesses.

_DEVICES = """
import json, jax
ds = jax.local_devices()
chips = {tuple(getattr(d, "coords", (d.id,))) for d in ds}
print(json.dumps({"platform": ds[0].platform, "count": len(ds),
                  "chips": len(chips)}))
"""


def local_devices() -> dict:
  """{"platform", "count", "chips"} of this host's devices, asked of a
  subprocess: a GPU or TPU that this process touched would stay held (a
  TPU chip serves one process), and its children could not use it.
  JAX_PLATFORMS=cpu needs no asking."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return {"platform": "cpu", "count": 1, "chips": 1}
  try:
    out = subprocess.run([sys.executable, "-c", _DEVICES], check=True,
                         capture_output=True, text=True)
  except subprocess.CalledProcessError as e:
    raise SweepError(f"cannot list the devices: {e.stderr.strip()}") from e
  return json.loads(out.stdout.strip().splitlines()[-1])


def device_slots(devices: dict, parallel: int) -> list[dict]:
  """The environment of each of `parallel` concurrent runs, pinning each
  to its own device.

  Raises:
    SweepError: more runs than TPU chips.
  """
  platform = devices["platform"]
  if platform == "tpu":
    if parallel > devices["chips"]:
      raise SweepError(f"--parallel {parallel}: this host has "
                       f"{devices['chips']} TPU chips, and a chip serves "
                       "one process")
    return [{"TPU_VISIBLE_CHIPS": str(i), "TPU_VISIBLE_DEVICES": str(i),
             "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
             "TPU_PROCESS_BOUNDS": "1,1,1",
             "TPU_PROCESS_PORT": str(_TPU_PORT + i),
             "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{_TPU_PORT + i}",
             "TPU_MESH_CONTROLLER_PORT": str(_TPU_PORT + i),
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"} for i in range(parallel)]
  if platform in ("gpu", "cuda"):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v for v in visible.split(",") if v.strip()] if visible
           else [str(i) for i in range(devices["count"])])
    shared = parallel > len(ids)
    return [{"CUDA_VISIBLE_DEVICES": ids[i % len(ids)],
             # Runs sharing a GPU cannot each take 75% of its memory.
             **({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if shared else {})}
            for i in range(parallel)]
  return [{} for _ in range(parallel)]


def default_parallel(devices: dict) -> int:
  """One run at a time on CPUs; one per GPU or TPU chip otherwise."""
  if devices["platform"] == "cpu":
    return 1
  return devices["chips"] if devices["platform"] == "tpu" else (
      devices["count"])


def _command(*args: str) -> list[str]:
  return [sys.executable, "-m", "matsci_jax.scaling", *args]


def _summary(record: dict) -> str:
  final = record.get("final") or {}
  shown = next((m for m in _SHOWN if m in final), None)
  metric = f"{shown} {final[shown]:.4g}, " if shown else ""
  return (f"{metric}{record['params']:,} parameters, {record['steps']} "
          f"steps, {record['wall_s']:.0f} s")


def run_sweep(sweep: ml_collections.ConfigDict, out: str,
              parallel: int | None = None,
              echo: Callable[[str], Any] = functools.partial(
                  print, flush=True)) -> Outcome:
  """Runs every run of `sweep` not yet recorded in OUT/runs.jsonl.

  Args:
    sweep: the sweep config (see configs/scaling.py).
    out: the output folder (created).
    parallel: runs at once: 1 runs them in this process, one after the
      other (on every process of a multi-host job, each run over all
      devices); more runs each in a subprocess pinned to one device.
      Default: 1 on CPUs and for multi-host jobs, else the number of local
      GPUs or TPU chips.
    echo: prints a progress line.

  Returns:
    What was skipped, recorded and failed; a failed run's output is in its
    sweep.log, and the other runs go on.

  Raises:
    SweepError: a bad sweep config, or an output folder whose runs were
      started with other settings.
  """
  runs = plan(sweep)
  os.makedirs(out, exist_ok=True)
  outcome = Outcome(runs)
  done = recorded(out)
  outcome.skipped = [r.name for r in runs if r.name in done]
  pending = [r for r in runs if r.name not in done]
  if not pending:
    echo(f"all {len(runs)} runs are recorded in {out}/{RUNS_FILE}")
    return outcome
  hosts = (runs[0].config().get("distributed") or {}).get("initialize")
  devices = None
  if parallel is None:
    if hosts:
      parallel = 1
    else:
      devices = local_devices()
      parallel = default_parallel(devices)
  if parallel < 1:
    raise SweepError(f"--parallel {parallel}: must be at least 1")
  if parallel > 1 and hosts:
    raise SweepError("config.distributed.initialize: each run spans the "
                     "hosts' devices, so runs go one at a time "
                     "(--parallel 1)")
  writer = True
  if parallel == 1:
    import jax

    from matsci_jax import parallel as parallel_lib
    parallel_lib.initialize_distributed(runs[0].config())
    writer = jax.process_index() == 0
  todo = []
  for run in pending:
    workdir = run_dir(out, run.name)
    if writer:
      prepare(run, workdir)
    record = finished_record(run, workdir)
    if record is None:
      todo.append(run)
    elif writer:  # Finished, but the sweep stopped before recording it.
      _finished(run, out, record, outcome, echo, "finished earlier")
  echo(f"{len(runs)} runs: {len(outcome.skipped)} recorded before, "
       f"{len(todo)} to run, in {os.path.abspath(out)}")
  if not todo:
    return outcome
  if parallel == 1:
    _in_process(todo, out, outcome, echo, writer)
  else:
    _subprocesses(todo, out, device_slots(devices or local_devices(),
                                          parallel), outcome, echo)
  return outcome


def _finished(run: Run, out: str, record: dict, outcome: Outcome,
              echo, count: str) -> None:
  append_record(out, record)
  outcome.recorded.append(run.name)
  echo(f"[{count}] {run.name}: {_summary(record)}")


def _failed(run: Run, log: str, outcome: Outcome, echo, why: str) -> None:
  outcome.failed.append((run.name, log))
  echo(f"run {run.name} failed ({why}); its log: {log}")


def _in_process(todo: list[Run], out: str, outcome: Outcome, echo,
                writer: bool) -> None:
  for i, run in enumerate(todo, 1):
    workdir = run_dir(out, run.name)
    echo(f"[{i}/{len(todo)}] {run.name} ...")
    try:
      record = execute(run, workdir)
    except Exception as e:  # A failed run must not stop the sweep.
      log = os.path.join(workdir, LOG_FILE)
      if writer:
        with open(log, "a", encoding="utf-8") as f:
          f.write(traceback.format_exc())
      _failed(run, log, outcome, echo, f"{type(e).__name__}: {e}")
      continue
    if writer:
      _finished(run, out, record, outcome, echo, f"{i}/{len(todo)}")
def _subprocesses(todo: list[Run], out: str, slots: list[dict],
                  outcome: Outcome, echo) -> None:
  # Children must not build a dev set at once into one folder: build each
  # first, in a process kept off the accelerators.
  built = set()
  for run in todo:
    key = devsets(run)
    if key is None or key in built:
      continue
    built.add(key)
    workdir = run_dir(out, run.name)
    done = subprocess.run(_command("run", "--data-only", workdir),
                          env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True)
    if done.returncode:
      raise SweepError(f"run {run.name}: building its dev set failed:\n"
                       f"{done.stderr.strip()}")
  pending = collections.deque(todo)
  free = list(range(len(slots)))
  active = {}
  total, finished = len(todo), 0
  while pending or active:
    while pending and free:
      run, slot = pending.popleft(), free.pop(0)
      workdir = run_dir(out, run.name)
      log = os.path.join(workdir, LOG_FILE)
      with open(log, "ab") as f:
        proc = subprocess.Popen(_command("run", workdir), stdout=f,
                                stderr=subprocess.STDOUT,
                                env=dict(os.environ, **slots[slot]))
      echo(f"started {run.name} (pid {proc.pid}, log {log})")
      active[proc] = (run, slot, log)
    time.sleep(0.2)
    for proc in [p for p in active if p.poll() is not None]:
      run, slot, log = active.pop(proc)
      free.append(slot)
      finished += 1
      record = (finished_record(run, run_dir(out, run.name))
                if proc.returncode == 0 else None)
      if record is None:
        _failed(run, log, outcome, echo, f"exit status {proc.returncode}")
      else:
        _finished(run, out, record, outcome, echo, f"{finished}/{total}")
