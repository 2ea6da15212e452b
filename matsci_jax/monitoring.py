"""Compile counting, metric writers (CSV, TensorBoard) and the training log.

XLA compilations are counted through `jax.monitoring` events, so a
recompilation anywhere (a shape change, a new dtype) shows in the logs. The
count must stay at its warm-up value for the rest of a run.
"""

from __future__ import annotations

import csv
import os
import threading
import time

import jax
import numpy as np
import tqdm

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CSV_HEADER = ["step", "metric", "value"]
_lock = threading.Lock()
_compiles = 0
_installed = False


def _on_event(name, *args, **kwargs):
  global _compiles
  if name == _COMPILE_EVENT:
    with _lock:
      _compiles += 1


def compile_count() -> int:
  """Number of XLA backend compilations in this process so far."""
  global _installed
  if not _installed:
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    _installed = True
  return _compiles


def drop_rows_after(workdir: str, step: int) -> None:
  """Removes CSV rows logged after `step` (a resumed run logs them again)."""
  path = os.path.join(workdir, "metrics.csv")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path, newline="") as f:
    rows = [r for r in csv.reader(f) if r != CSV_HEADER]
  keep = [CSV_HEADER] + [r for r in rows if int(r[0]) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    csv.writer(f).writerows(keep)
  os.replace(tmp, path)


class MetricWriter:
  """Writes scalars to `metrics.csv` and TensorBoard event files.

  Only process 0 writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._tb = None
    self._csv = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.csv")
    # Empty: a run killed before its first flush left the file, not rows.
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    self._csv_file = open(path, "a", newline="")
    self._csv = csv.writer(self._csv_file)
    if new:
      self._csv.writerow(CSV_HEADER)
      self._csv_file.flush()
    # tensorboardX writes event files without TensorFlow.
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._csv.writerow([step, name, f"{float(value):.8g}"])
      if self._tb is not None:
        self._tb.add_scalar(name, float(value), step)
    self._csv_file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if not self.enabled:
      return
    self._csv_file.close()
    if self._tb is not None:
      self._tb.close()


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient."""


class TrainLog:
  """Step metrics of a training run: fetched once per log window, checked,
  averaged, timed and written, with a progress bar.

  Steps are dispatched asynchronously; their metrics stay on the devices
  until `flush`, so logging costs one host synchronisation per window.

  Args:
    writer: a `MetricWriter`.
    schedule: the learning-rate schedule (logged per window).
    nodes_per_step: padded nodes a step of this process holds (for the
      padding efficiency).
    num_steps, start: the run's last step and the step it starts from.
    progress: show a progress bar (process 0 only).
    latest_checkpoint: `() -> str` describing the latest checkpoint, for
      the non-finite error.
    host_metrics: reduces fetched metrics to one value each (see
      `strategies.Strategy.host_metrics`).
    compiles_at_start: the compile count the logged count starts from.
    flops_per_step: the training step's FLOPs over all devices (XLA's
      cost analysis), or None; gives model FLOP/s.
    peak_flops: the devices' peak FLOP/s, or None; gives MFU.
  """

  def __init__(self, writer: MetricWriter, schedule, nodes_per_step: int,
               num_steps: int, start: int, progress: bool,
               latest_checkpoint, host_metrics=lambda m: m,
               compiles_at_start: int = 0,
               flops_per_step: float | None = None,
               peak_flops: float | None = None):
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self._clock = time.perf_counter
    self.writer, self.schedule = writer, schedule
    self.nodes_per_step = nodes_per_step
    self.latest_checkpoint = latest_checkpoint
    self.host_metrics = host_metrics
    self.compiles_at_start = compiles_at_start
    self.pending: list[tuple[int, dict, int | None, int | None]] = []
    self.window_start = self._clock()
    self.bar = tqdm.tqdm(total=num_steps, initial=start, unit="step",
                         disable=not progress or jax.process_index() != 0,
                         dynamic_ncols=True)

  def restart_clock(self) -> None:
    """Starts a timing window (after compilation or evaluation)."""
    self.window_start = self._clock()

  def add(self, step: int, metrics: dict, graphs: int | None,
          atoms: int | None) -> None:
    """Records step `step`'s metrics; `graphs`/`atoms` None leaves the step
    out of the throughput (it included compilation)."""
    self.pending.append((step, metrics, graphs, atoms))
    self.bar.update(1)

  def flush(self, step: int) -> None:
    """Fetches pending metrics, stops on a non-finite loss, logs.

    Raises:
      NonFiniteLossError: a pending step's loss or gradient is not finite.
    """
    if not self.pending:
      return
    fetched = [self.host_metrics(m) for m in
               jax.device_get([p[1] for p in self.pending])]
    for (s, _, _, _), m in zip(self.pending, fetched):
      if not bool(m["finite"]):
        raise NonFiniteLossError(
            f"loss or gradient is not finite at step {s + 1} "
            f"(loss={m['loss']}); the run stops here and saves nothing "
            f"from this step on. Latest checkpoint: "
            f"{self.latest_checkpoint()}")
    elapsed = max(self._clock() - self.window_start, 1e-9)
    timed = [p for p in self.pending if p[2] is not None]
    scalars = {f"train/{k}": float(np.mean([m[k] for m in fetched]))
               for k in fetched[0] if k != "finite"}
    scalars.update({
        "train/learning_rate": float(self.schedule(step - 1)),
        "perf/compiles": compile_count() - self.compiles_at_start,
    })
    if timed:
      graphs = sum(p[2] for p in timed)
      atoms = sum(p[3] for p in timed)
      # This process's structures times the process count: processes take
      # equal numbers of batches from one shuffled sequence.
      procs = jax.process_count()
      scalars.update({
          "perf/structures_per_s": procs * graphs / elapsed,
          "perf/atoms_per_s": procs * atoms / elapsed,
          "perf/step_time_s": elapsed / len(timed),
          "perf/padding_efficiency_nodes": atoms / (
              len(timed) * self.nodes_per_step),
      })
      if self.flops_per_step:
        flops = self.flops_per_step * len(timed) / elapsed
        scalars["perf/model_flops_per_s"] = flops
        if self.peak_flops:
          scalars["perf/mfu"] = flops / self.peak_flops
    self.writer.write(step, scalars)
    self.bar.set_postfix(
        loss=f"{scalars['train/loss']:.4g}",
        struct_s=f"{scalars.get('perf/structures_per_s', 0):.1f}")
    self.pending.clear()
    self.restart_clock()

  def close(self) -> None:
    self.bar.close()
