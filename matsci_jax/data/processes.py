"""Worker processes shared by the converter and the dev set.

`fork` starts workers at once and shares the parent's loaded modules, but
forking a process that runs other threads (jax's thread pools, grain's
prefetchers) can deadlock the child. Such processes use `spawn`, which
starts fresh interpreters that import the calling script's `__main__`
module, so scripts need an `if __name__ == "__main__":` guard. (Not
`forkserver`: its server outlives a killed caller, with its workers.)
Workers are the caller's children and die with it, and a worker that dies
raises an error here rather than hanging the run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Iterable, Iterator


def _thread_count() -> int:
  try:  # Native threads too (XLA's pools are invisible to `threading`).
    return len(os.listdir("/proc/self/task"))
  except OSError:
    return threading.active_count()


def pool_context():
  """A multiprocessing context that is safe to start workers from here."""
  if _thread_count() == 1:
    return multiprocessing.get_context("fork")
  return multiprocessing.get_context("spawn")


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, initializer, initargs) -> None:
  """Worker initializer: the kernel kills this worker when its parent, the
  caller, dies, so a killed run leaves no workers behind."""
  if sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                         use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent:  # It died just before.
    os._exit(1)
  if initializer is not None:
    initializer(*initargs)


def ordered_map(fn: Callable, jobs: Iterable, workers: int,
                initializer: Callable | None = None, initargs: tuple = (),
                in_flight_per_worker: int = 4) -> Iterator:
  """Yields fn(job) for every job, in order, computed by worker processes.

  At most `workers * in_flight_per_worker` jobs are pending at once, so a
  slow consumer (a writer) never lets results pile up in memory.

  Raises:
    RuntimeError: a worker process died (e.g. killed, or a script without a
      `__main__` guard under spawn).
  """
  limit = max(1, workers * in_flight_per_worker)
  context = pool_context()
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=context, initializer=_die_with_parent,
      initargs=(os.getpid(), initializer, initargs)) as pool:
    pending = collections.deque()
    try:
      for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= limit:
          yield _result(pending.popleft())
      while pending:
        yield _result(pending.popleft())
    finally:
      for future in pending:
        future.cancel()


def _result(future):
  try:
    return future.result()
  except concurrent.futures.process.BrokenProcessPool as e:
    raise RuntimeError(
        "a worker process died; if this runs from a script, guard its entry "
        "point with `if __name__ == \"__main__\":` (workers import it)") from e
