"""Model scans lowered unrolled, so that XLA counts their FLOPs.

XLA's cost analysis counts a loop's body once, whatever its trip count, so
a step whose model scans (edge chunks, EGNN's stacked layers, GALA's rows)
would report a fraction of its FLOPs. Inside `unrolled()` every such scan
is lowered with all its iterations written out: the same computation, for
a lowering whose cost analysis counts each of them. Counting lowers a step
built afresh in that context (a step traced before keeps its loops), and
compiles nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_UNROLLED = contextvars.ContextVar("matsci_jax_unrolled_scans", default=False)


@contextlib.contextmanager
def unrolled() -> Iterator[None]:
  """Model scans traced in this context are unrolled."""
  token = _UNROLLED.set(True)
  try:
    yield
  finally:
    _UNROLLED.reset(token)


def unroll() -> int | bool:
  """The `unroll` argument of a model scan: 1, or True in `unrolled()`."""
  return True if _UNROLLED.get() else 1
