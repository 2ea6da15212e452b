"""Whether a saved checkpoint is whole, and clear errors when it is not.

Each saved step records a CRC-32, dtype and shape of every array of its
state in the custom metadata of orbax's `_CHECKPOINT_METADATA`, which orbax
writes with the step; `verify` compares a restored state against it. A
step that does not restore whole is skipped for the next one
(`first_that_restores`), with a `DamagedCheckpointWarning` naming it and
why. A save that runs out of disk space becomes one `CheckpointError`
naming the folder and the free space (`disk_full_error`), and the
tracebacks orbax's background threads would log for it are dropped
(`quiet_orbax_noise`).
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import os
import shutil
import sys
import warnings
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

# Orbax's files in a step folder: the step's record (with our checksums in
# its custom metadata) and, per item, the tree of saved arrays.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
TREE_METADATA_FILE = "_METADATA"
CHECKSUMS_KEY = "matsci_jax_checksums"


class CheckpointError(ValueError):
  """A path that is not a training workdir, a checkpoint that is absent or
  does not restore, or one that cannot be written."""


class DamagedCheckpointWarning(UserWarning):
  """A checkpoint that does not restore, skipped for an earlier one."""


class Damaged(Exception):
  """A step that restores wrongly or not at all: its message says why."""


def _named_arrays(tree) -> dict[str, Any]:
  """The arrays of `tree` that this process holds whole, by orbax's names
  ("params/params/embed/embedding").

  An array split over several processes has no whole copy in any one of
  them; it goes unchecked.
  """
  arrays = {}
  for name, x in ocp.tree.to_flat_dict(tree, sep="/").items():
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        continue
      x = x.addressable_shards[0].data
    arrays[name] = x
  return arrays


def _crc32(x) -> list:
  """[CRC-32 of its bytes, dtype, shape] of one array, read on the host."""
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    x = jax.random.key_data(x)  # Typed keys have no bytes of their own.
  x = np.asarray(jax.device_get(x))
  crc = zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
  return [f"{crc:08x}", str(x.dtype), list(x.shape)]


def _crc32_all(arrays: dict[str, Any]) -> dict[str, list]:
  # zlib releases the GIL: large states hash on several cores.
  with concurrent.futures.ThreadPoolExecutor(
      min(8, os.cpu_count() or 1)) as pool:
    return dict(zip(arrays, pool.map(_crc32, arrays.values())))


def checksums(state) -> dict:
  """The custom metadata that records the arrays of a state being saved."""
  return {CHECKSUMS_KEY: {"algorithm": "crc32",
                          "state": _crc32_all(_named_arrays(state))}}


def saved_checksums(step_dir: str, item: str) -> dict | None:
  """The checksums saved with one item of a step; None for a step saved
  without them (before they were recorded). Also checks that orbax's own
  metadata files are there: without them a restore fails obscurely."""
  for path in (os.path.join(step_dir, STEP_METADATA_FILE),
               os.path.join(step_dir, item, TREE_METADATA_FILE)):
    if not os.path.isfile(path):
      raise Damaged(f"{path} is missing (orbax metadata of the step)")
  path = os.path.join(step_dir, STEP_METADATA_FILE)
  try:
    with open(path) as f:
      custom = json.load(f).get("custom_metadata") or {}
  except (OSError, ValueError, AttributeError) as e:
    raise Damaged(f"cannot read {path}: {e}") from e
  return (custom.get(CHECKSUMS_KEY) or {}).get(item)


def verify(tree, saved: dict | None) -> None:
  """Raises `Damaged` when an array restored differs from the one saved.

  Arrays without a record (saved before checksums, or split over
  processes) and arrays restored to another dtype or shape go unchecked.
  """
  if not saved:
    return
  arrays = {k: v for k, v in _named_arrays(tree).items() if k in saved}
  bad = [k for k, now in _crc32_all(arrays).items()
         if now[1:] == saved[k][1:] and now[0] != saved[k][0]]
  if bad:
    more = ", ..." if len(bad) > 3 else ""
    raise Damaged(f"checksum mismatch in {len(bad)} array(s) "
                   f"({', '.join(bad[:3])}{more}): their bytes changed "
                   "after they were saved")


def _cause(error: BaseException) -> str:
  """An exception and its causes on one line (TensorStore's messages
  carry pages of JSON spec)."""
  parts = []
  while error is not None and len(parts) < 3:
    text = str(error).split(" [tensorstore_spec=")[0]
    text = text.split(". See full TensorStore details")[0].strip()
    line = text.splitlines()[0][:400] if text else type(error).__name__
    if line not in parts:
      parts.append(line)
    error = error.__cause__ or error.__context__
  return "; caused by: ".join(parts)


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds in every process (they must restore one step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def first_that_restores(folder: str, steps: Sequence[int],
                         restore: Callable[[int], Any], hint: str = ""):
  """(step, restored, [(step, cause) skipped]) for the first of `steps`
  that `restore` restores whole.

  Raises:
    CheckpointError: none does; names each step and why.
  """
  skipped = []
  for step in steps:
    try:
      restored, cause = restore(step), None
    except Exception as e:  # Orbax and TensorStore raise many kinds.
      restored, cause = None, _cause(e)
    if _everywhere(cause is None):
      return step, restored, skipped
    skipped.append((step, cause or "it did not restore in another process"))
  tried = "".join(f"\n  step {step}: {cause}" for step, cause in skipped)
  raise CheckpointError(f"no checkpoint in {folder} restores:{tried}{hint}")


def warn_skipped(folder: str, skipped, used: int, note=lambda step: ""):
  for step, cause in skipped:
    warnings.warn(
        f"checkpoint {os.path.join(folder, str(step))} does not restore "
        f"({cause}); using step {used} instead{note(step)}",
        DamagedCheckpointWarning, stacklevel=3)


def is_disk_full(error: BaseException | None) -> bool:
  """Whether an exception chain holds a full disk (or quota)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
      return True
    # TensorStore reports it as text: "No space left on device [os_error..".
    if any(t in str(error) for t in (os.strerror(errno.ENOSPC),
                                     os.strerror(errno.EDQUOT))):
      return True
    error = error.__cause__ or error.__context__
  return False


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def disk_full_error(folder: str, step, latest) -> CheckpointError:
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  usage = shutil.disk_usage(existing)
  return CheckpointError(
      f"no space left on device to save checkpoint step {step} in {folder}"
      f" ({_size(usage.free)} free of {_size(usage.total)} on that disk): "
      "free some space, or give the run a --workdir on a larger disk; "
      "started again with the same --workdir the run " + (
          "starts afresh (no checkpoint was completed)" if latest is None
          else f"resumes from its latest complete checkpoint (step {latest})"))


class _OrbaxDiskFullFilter(logging.Filter):
  """Drops orbax's log records of a full disk: each background thread of a
  failed save logs its traceback, burying the cause. `Checkpoints` raises
  it once, as a `CheckpointError` naming the folder and the free space."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (is_disk_full(error) or os.strerror(errno.ENOSPC)
                in record.getMessage())


def _quiet_unraisable(previous):
  """A `sys.unraisablehook` that drops what a failed TensorStore read or
  write leaves behind: its callbacks into orbax's already closed event
  loop, and orbax's coroutines it never awaited. The failure itself is
  reported where the save or restore is waited for."""

  def hook(unraisable):
    error, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    if ((isinstance(error, RuntimeError)
         and str(error) == "Event loop is closed")
        or (code is not None
            and f"{os.sep}orbax{os.sep}" in code.co_filename)):
      logging.getLogger(__name__).debug("dropped: %r", error)
      return
    previous(unraisable)

  hook.matsci_jax_quiet = True
  return hook


def quiet_orbax_noise() -> None:
  """Installs the two filters above, once."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxDiskFullFilter)
             for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxDiskFullFilter())
  if not getattr(sys.unraisablehook, "matsci_jax_quiet", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
