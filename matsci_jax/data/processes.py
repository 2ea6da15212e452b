"""Worker-process start method shared by the converter and the dev set.

`fork` starts workers at once and shares the parent's loaded modules, but
forking a process that runs other threads (jax's thread pools, grain's
prefetchers) can deadlock the child. Such processes use `forkserver`, which
forks from a clean single-threaded server instead.
"""

import multiprocessing
import os
import threading


def _thread_count() -> int:
  try:  # Native threads too (XLA's pools are invisible to `threading`).
    return len(os.listdir("/proc/self/task"))
  except OSError:
    return threading.active_count()


def pool_context():
  """A multiprocessing context that is safe to start workers from here."""
  if _thread_count() == 1:
    return multiprocessing.get_context("fork")
  return multiprocessing.get_context("forkserver")
