"""Host memory reuse for XLA:CPU's per-step buffers (glibc only).

Every execution of a compiled step allocates its temporaries (about 110 MB
for the default S2EF step) and frees them at the end. glibc serves
allocations this large from threads other than the main one with fresh
`mmap`s, and returns them at `free`, so each step page-faults all of its
temporaries in again: on two cores that kernel work took as long as the
step's arithmetic (70 of 145 CPU-ms per step). One heap that keeps freed
memory (one arena, no `mmap` for large blocks, no trimming) turns those
faults into reuse. `tune()` sets that with `mallopt`, before XLA starts its
threads; `MATSCI_JAX_MALLOC=default` leaves glibc's settings alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP = 2 ** 31 - 1  # Bytes of free memory kept at the heap's top: all.

tuned = False


def tune() -> bool:
  """Applies the settings above once; returns whether they are in force."""
  global tuned
  if tuned or os.environ.get("MATSCI_JAX_MALLOC") == "default":
    return tuned
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # Not glibc (e.g. musl).
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  tuned = all(mallopt(p, v) == 1 for p, v in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
      (_M_TRIM_THRESHOLD, _KEEP)))
  return tuned
