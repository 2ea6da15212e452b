r"""Building the padded graph of one large periodic structure, on the host.

    python -m benchmarks.graph_build [--sizes 1000 10000 100000 1000000] \
        [--representations graph point_cloud] [--record]

Run from the repository root. Each structure is a rattled fcc Cu supercell
(`bulk_structure`, about 78 neighbours per atom within 6 Å), built in a
fresh process per size and representation as `graph_from_atoms` and
`batch_examples` build it:
* `graph`: edges within 6 Å, the 50 nearest per atom;
* `point_cloud`: 16 neighbour slots per atom (untagged: every atom is a
  centre), within 6 Å.
Per run it reports, in seconds of wall-clock time (best of a few repeats
below 100,000 atoms) and of this process's CPU time (`*_cpu_s`, all
threads, steadier on a shared machine):
* `example_s`: `graph_from_atoms` (validation, neighbour search, the
  stored example);
* `collate_s`: `batch_examples` (padding into a `jraph.GraphsTuple`);
* `neighbors_s`: the neighbour search alone (`neighbor_list`) on
  `threads` threads (`search_threads`), and `neighbors_1_thread_s` on one,
  with `threads_identical` whether both gave the same edges;
* `peak_rss_gb`: the process's peak resident memory (VmHWM) after the
  example and the batch are built, and `baseline_rss_gb` before (the
  imports); `example_gb` and `batch_gb` are the bytes of their arrays.
matsci_jax's allocator settings (`matsci_jax._malloc`) are in force, as in
any process that imports it.
Prints one JSON object; `--record` also writes it to benchmarks/RESULTS.md.

`bulk_structure(n_atoms, seed)` gives the structure alone, for other
benchmarks.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import _results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUTOFF = 6.0
MAX_NEIGHBORS = 50
SLOTS = 16


def bulk_structure(n_atoms: int, seed: int = 0):
  """A rattled fcc Cu supercell of about `n_atoms` atoms (periodic).

  Args:
    n_atoms: the atoms wanted; the supercell repeats the 4-atom cubic cell
      (a = 3.6 Å) r or r + 1 times along each axis, whichever of those
      near-cubic shapes comes closest (1,000,000 gives 1,000,188).
    seed: seed of the rattle (0.05 Å standard deviation).

  Returns:
    `ase.Atoms` with pbc along all three axes.
  """
  from ase.build import bulk
  r = max(int((n_atoms / 4) ** (1 / 3)), 1)
  shapes = [(r, r, r), (r, r, r + 1), (r, r + 1, r + 1), (r + 1,) * 3]
  shape = min(shapes, key=lambda s: abs(4 * np.prod(s) - n_atoms))
  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(shape)
  atoms.rattle(0.05, seed=seed)
  return atoms


def _status() -> dict:
  """Resident memory now and at its peak, in GB (GiB)."""
  return {k: v / 2**30 for k, v in _results.memory_status().items()}


def _nbytes(tree) -> float:
  import jax
  return sum(np.asarray(x).nbytes
             for x in jax.tree_util.tree_leaves(tree)) / 2**30


def _timed(fn, repeats: int):
  """fn()'s result, and its best wall-clock and CPU seconds."""
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return result, round(min(wall), 4), round(min(cpu), 4)


def _child(n_atoms: int, representation: str) -> dict:
  """One size and representation, measured in this process."""
  from matsci_jax.data.graphs import batch_examples, graph_from_atoms
  from matsci_jax.data.neighbors import neighbor_list, search_threads
  atoms = bulk_structure(n_atoms)
  baseline = _status()["VmRSS"]
  repeats = 3 if len(atoms) < 100_000 else 1
  point_cloud = representation == "point_cloud"
  example, example_s, example_cpu = _timed(
      lambda: graph_from_atoms(atoms, CUTOFF, MAX_NEIGHBORS,
                               representation=representation,
                               num_neighbors=SLOTS), repeats)
  batch, collate_s, collate_cpu = _timed(
      lambda: batch_examples([example]), repeats)
  peak = _status()["VmHWM"]
  example_gb, batch_gb = _nbytes(example), _nbytes(batch._asdict())
  edges = len(example["senders"])
  del batch
  cap = SLOTS if point_cloud else MAX_NEIGHBORS
  args = (atoms.positions, atoms.cell.array, atoms.pbc, CUTOFF, cap)
  threads = search_threads(len(atoms))
  threaded, neighbors_s, neighbors_cpu = _timed(
      lambda: neighbor_list(*args, distances=False), repeats)
  one, one_s, one_cpu = _timed(
      lambda: neighbor_list(*args, distances=False, n_threads=1), repeats)
  identical = all(np.array_equal(a, b) for a, b in zip(threaded[:3], one[:3]))
  return {
      "representation": representation, "atoms": len(atoms), "edges": edges,
      "edges_per_atom": round(edges / len(atoms), 2),
      "example_s": example_s, "example_cpu_s": example_cpu,
      "collate_s": collate_s, "collate_cpu_s": collate_cpu,
      "neighbors_s": neighbors_s, "neighbors_cpu_s": neighbors_cpu,
      "threads": threads, "neighbors_1_thread_s": one_s,
      "neighbors_1_thread_cpu_s": one_cpu, "threads_identical": identical,
      "peak_rss_gb": round(peak, 3), "baseline_rss_gb": round(baseline, 3),
      "example_gb": round(example_gb, 3), "batch_gb": round(batch_gb, 3)}


def _run_child(n_atoms: int, representation: str) -> dict:
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.graph_build", "--child",
       f"--size={n_atoms}", f"--representation={representation}"],
      cwd=ROOT, capture_output=True, text=True)
  if run.returncode:
    raise SystemExit(f"{representation} of {n_atoms} atoms failed:\n"
                     f"{run.stderr[-3000:]}")
  return json.loads(run.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+",
                 default=[10**3, 10**4, 10**5, 10**6])
  p.add_argument("--representations", nargs="+",
                 default=["graph", "point_cloud"],
                 choices=["graph", "point_cloud"])
  p.add_argument("--record", action="store_true")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--size", type=int, help=argparse.SUPPRESS)
  p.add_argument("--representation", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(_child(args.size, args.representation)))
    return
  started = time.perf_counter()
  runs = [_run_child(n, rep) for rep in args.representations
          for n in args.sizes]
  _results.report(
      "graph_build", "Building one large structure's padded graph",
      {"cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS, "slots": SLOTS,
       "structure": "rattled fcc Cu supercell (benchmarks.graph_build."
                    "bulk_structure)",
       "runs": runs, "seconds": round(time.perf_counter() - started, 1)},
      "`python -m benchmarks.graph_build`: `graph_from_atoms` and "
      "`batch_examples` on one periodic structure per size, in a fresh "
      "process each (see the script).",
      save=args.record)


if __name__ == "__main__":
  main()
