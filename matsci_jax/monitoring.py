"""Compile counting and metric writers (console, CSV, TensorBoard).

XLA compilations are counted through `jax.monitoring` events, so a
recompilation anywhere (a shape change, a new dtype) shows in the logs. The
count must stay at its warm-up value for the rest of a run.
"""

from __future__ import annotations

import csv
import os
import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
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
    rows = list(csv.reader(f))
  keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
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
    new = not os.path.exists(path)
    self._csv_file = open(path, "a", newline="")
    self._csv = csv.writer(self._csv_file)
    if new:
      self._csv.writerow(["step", "metric", "value"])
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
