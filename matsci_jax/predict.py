r"""Predictions of a trained model for OC20 LMDBs or ASE-readable files.

    python -m matsci_jax.predict --checkpoint=runs/my_run \
        --input=data/s2ef_val_id --output=predictions.csv \
        [--submission=s2ef_val_id.npz] [--relax --fmax=0.05 --steps=300]

Inputs are whatever the converter reads (OC20 LMDBs as published, folders
of OC20 extxyz chunks, any ASE-readable file). The table (`.csv`, or
`.parquet` through pyarrow) has one row per structure: id (OC20's
"<sid>_<fid>" for S2EF frames, "<sid>" for IS2RE systems and for
relaxations), source file and
entry, atom count, predicted energy and, where the input has it, the
target. `--submission` writes the arrays of OC20's evaluation submissions
(as fairchem's `predict` writes them, in float32): S2EF `ids`, `energy`,
`forces` (free atoms only, concatenated) and `chunk_idx` (where each
structure's rows start, after the first); IS2RE `ids` and `energy`. With
`--relax` (an S2EF model), every structure is relaxed with batched FIRE
(`matsci_jax.relax`); the table adds the relaxed energy, steps, final fmax
and convergence, and the submission holds IS2RE `ids` and relaxed `energy`
with IS2RS `positions` (all atoms) and `chunk_idx`.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import app, flags

from matsci_jax import checkpoints, relax
from matsci_jax.data import batching, readers
from matsci_jax.data.structure import DataError, Structure

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir or checkpoint folder.")
_WHICH = flags.DEFINE_string(
    "which", "best", "For a workdir: 'best', 'latest' or a step number.")
_INPUT = flags.DEFINE_multi_string(
    "input", None, "LMDB file or folder, or ASE-readable file or folder "
    "(repeatable).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Table of predictions: .csv or .parquet.")
_SUBMISSION = flags.DEFINE_string(
    "submission", None, "Optional .npz in OC20's submission layout.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Structures per batch.")
_RELAX = flags.DEFINE_bool("relax", False, "Relax every structure (FIRE).")
_FMAX = flags.DEFINE_float("fmax", 0.05, "Relaxation threshold, eV/Å.")
_STEPS = flags.DEFINE_integer("steps", 300, "Most FIRE steps.")
_STRICT = flags.DEFINE_bool(
    "strict", False, "Stop at a structure with an element the model never "
    "saw in training (default: warn once per element).")


def read_structures(paths: Sequence[str]) -> Iterator[Structure]:
  """Every structure of every input path, in order."""
  for path in paths:
    for reader in readers.open_readers(path):
      for i in range(len(reader)):
        yield reader[i]


def _structure_id(s: Structure, per_frame: bool, index: int) -> str:
  """OC20 ids: "<sid>_<fid>" for S2EF frames, "<sid>" for systems."""
  if s.sid < 0:  # Inputs without OC20 ids: the running index.
    return str(index)
  return f"{s.sid}_{s.fid}" if per_frame and s.fid >= 0 else str(s.sid)


def _batches(items, size):
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def predict(trained: checkpoints.Trained, structures, *, batch_size: int = 16,
            relaxation: dict | None = None,
            strict: bool = False) -> tuple[list[dict], dict]:
  """Predicts every structure.

  Args:
    trained: a loaded model.
    structures: iterable of `Structure`s.
    batch_size: structures per padded batch (the node and edge budgets are
      bucketed, so that few shapes compile).
    relaxation: None, or `relax.relax` keywords (fmax, steps) to relax the
      structures first.
    strict: an element absent from the model's training data is an error
      (`checkpoints.UnseenElementError`), not a warning.

  Returns:
    (rows, arrays): one dict per structure for the table, and the
    submission arrays (see the module docstring).
  """
  s2ef = trained.task.forces
  if relaxation is not None and not s2ef:
    raise ValueError(f"--relax needs an S2EF model (forces); "
                     f"{trained.workdir} was trained on {trained.task.name}")
  fn = jax.jit(trained.energy_and_forces if s2ef
               else lambda p, g: (trained.energy_fn(p, g), None))
  rows, energies, forces, free_counts = [], [], [], []
  positions, counts = [], []
  index = 0
  for group in _batches(structures, batch_size):
    examples = [trained.example(s, strict) for s in group]
    if relaxation is not None:
      results = relax.relax(trained, [s.to_atoms() for s in group],
                            **relaxation)
    budget = batching.bucket_budget(examples, n_graph=batch_size + 1)
    e, f = jax.device_get(fn(trained.params, batching.collate(examples,
                                                              budget)))
    start = 0
    for k, s in enumerate(group):
      n = s.num_atoms
      target = s.energy if s2ef else s.energy_relaxed
      row = {"id": _structure_id(s, s2ef and relaxation is None, index),
             "source": str(s.source[0]), "entry": str(s.source[1]),
             "num_atoms": n, "energy": float(e[k]),
             "target_energy": math.nan if target is None else float(target)}
      if s2ef:
        free = ~s.fixed
        forces.append(np.asarray(f[start:start + n][free], np.float32))
        free_counts.append(int(free.sum()))
        row["fmax"] = float(np.linalg.norm(f[start:start + n][free],
                                           axis=1).max(initial=0.0))
      if relaxation is not None:
        r = results[k]
        row.update(relaxed_energy=r.energy, relax_steps=r.steps,
                   relaxed_fmax=r.fmax, converged=r.converged)
        positions.append(np.asarray(r.atoms.positions, np.float32))
        counts.append(n)
      rows.append(row)
      energies.append(float(e[k]))
      start += n
      index += 1

  ids = np.array([r["id"] for r in rows])
  if relaxation is not None:
    arrays = {"ids": ids,
              "energy": np.array([r["relaxed_energy"] for r in rows],
                                 np.float32),
              "positions": np.concatenate(positions),
              "chunk_idx": np.cumsum(counts)[:-1]}
  elif s2ef:
    arrays = {"ids": ids, "energy": np.array(energies, np.float32),
              "forces": np.concatenate(forces),
              "chunk_idx": np.cumsum(free_counts)[:-1]}
  else:
    arrays = {"ids": ids, "energy": np.array(energies, np.float32)}
  return rows, arrays


def write_table(rows: list[dict], path: str) -> None:
  """Writes rows as CSV, or Parquet for a `.parquet` path (whole or not
  at all: a temporary file is renamed at the end)."""
  if not path.endswith((".csv", ".parquet")):
    raise ValueError(f"the table must be a .csv or .parquet file, got {path}")
  partial = path + ".partial"
  if path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), partial)
  else:
    with open(partial, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  os.replace(partial, path)


def write_submission(arrays: dict, path: str) -> None:
  """Writes the submission arrays to an .npz, whole or not at all."""
  if not path.endswith(".npz"):
    raise ValueError(f"the submission must be an .npz file, got {path}")
  partial = path[:-len(".npz")] + ".partial.npz"
  np.savez_compressed(partial, **arrays)
  os.replace(partial, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("checkpoint", "input", "output"):
    if not flags.FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  if not _OUTPUT.value.endswith((".csv", ".parquet")):
    raise app.UsageError(f"--output must end in .csv or .parquet, got "
                         f"{_OUTPUT.value}")
  if _SUBMISSION.value and not _SUBMISSION.value.endswith(".npz"):
    raise app.UsageError(f"--submission must end in .npz, got "
                         f"{_SUBMISSION.value}")
  which = _WHICH.value
  trained = checkpoints.load(_CHECKPOINT.value,
                             checkpoint=int(which) if which.isdigit()
                             else which)
  relaxation = (dict(fmax=_FMAX.value, steps=_STEPS.value) if _RELAX.value
                else None)
  try:
    rows, arrays = predict(trained, read_structures(_INPUT.value),
                           batch_size=_BATCH.value, relaxation=relaxation,
                           strict=_STRICT.value)
  except (DataError, checkpoints.UnseenElementError) as e:
    raise SystemExit(f"bad input: {e}") from e
  if not rows:
    raise SystemExit(f"no structures in {', '.join(_INPUT.value)}")
  output = os.path.abspath(_OUTPUT.value)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  write_table(rows, output)
  if _SUBMISSION.value:
    write_submission(arrays, os.path.abspath(_SUBMISSION.value))
  print(f"{len(rows)} structures from {trained.workdir} (step "
        f"{trained.step}) -> {output}")


if __name__ == "__main__":
  app.run(main)
