r"""Converter throughput on OC20-sized structures (about 80 atoms, 6 Å).

    python -m benchmarks.convert_throughput [--workers 1 2] \
        [--inputs slabs slabs_extxyz lips] [--record]

Run from the repository root. Each input is converted end to end (reading,
decoding, validation, vesin neighbour lists with the 50-neighbour rule,
serialisation, ArrayRecord writing and statistics):
* `slabs`: an LMDB of 80-atom fcc(111) slabs with adsorbates, written here in
  the matsciml dict layout.
* `slabs_extxyz`: the same slabs as an extended XYZ file (ASE's reader).
* `lips`: the real matsciml LiPS LMDB (83 atoms, torch pickles), listed
  repeatedly; needs `../shared/data`.
Rates are wall-clock (start-up included); `cpu_seconds` is the CPU time of
the conversion and its worker processes, steadier on a shared machine.
Prints one JSON object; `--record` also writes it to benchmarks/RESULTS.md.
Target: at least 300 structures/s per core.
"""

import argparse
import json
import os
import pickle
import resource
import tempfile
import time

import lmdb
import numpy as np

from benchmarks import _results
from matsci_jax.data import converter


def _slabs(n):
  """`n` fcc(111) Pt slabs with adsorbates, rattled, with random targets."""
  from ase.build import add_adsorbate, fcc111
  from ase.calculators.singlepoint import SinglePointCalculator
  from ase.constraints import FixAtoms
  rng = np.random.default_rng(0)
  for k in range(n):
    slab = fcc111("Pt", (4, 4, 5), vacuum=7.0)
    for ads in ("O", "H", "C")[: 1 + k % 3]:
      add_adsorbate(slab, ads, 1.5, (rng.uniform(0, 5), rng.uniform(0, 5)))
    slab.rattle(0.05, seed=k)
    del slab.info["adsorbate_info"]
    slab.set_constraint(FixAtoms(indices=[]))
    slab.calc = SinglePointCalculator(
        slab, energy=float(rng.normal()),
        forces=rng.normal(size=(len(slab), 3)).astype(np.float32))
    yield slab


def _write_slabs(path, n):
  env = lmdb.open(path, subdir=False, map_size=1 << 32, lock=False)
  with env.begin(write=True) as txn:
    for k, slab in enumerate(_slabs(n)):
      n_atoms = len(slab)
      txn.put(str(k).encode(), pickle.dumps({
          "pos": slab.positions.astype(np.float32),
          "cell": slab.cell.array.astype(np.float32)[None],
          "atomic_numbers": slab.numbers.astype(np.int64),
          "tags": slab.get_tags().astype(np.int64),
          "fixed": np.zeros(n_atoms, np.float32),
          "energy": np.float64(slab.get_potential_energy()),
          "forces": slab.get_forces().astype(np.float32)}))
  env.close()


def _write_slabs_extxyz(path, n):
  import ase.io
  ase.io.write(path, list(_slabs(n)), format="extxyz")


def _cpu_seconds() -> float:
  """CPU time of this process and of its finished children."""
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + children.ru_utime + children.ru_stime


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  p.add_argument("--structures", type=int, default=3000)
  p.add_argument("--inputs", nargs="+", default=["slabs", "slabs_extxyz",
                                                 "lips"],
                 choices=["slabs", "slabs_extxyz", "lips"])
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  shared = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "..", "shared", "data",
      "matsciml_lips_devset")
  results = {"cpu": _results.cpu_model(), "runs": []}
  with tempfile.TemporaryDirectory() as tmp:
    inputs = {}
    if "slabs" in args.inputs:
      inputs["slabs"] = [f"train={os.path.join(tmp, 'slabs.lmdb')}"]
      _write_slabs(os.path.join(tmp, "slabs.lmdb"), args.structures)
    if "slabs_extxyz" in args.inputs:
      inputs["slabs_extxyz"] = [f"train={os.path.join(tmp, 'slabs.extxyz')}"]
      _write_slabs_extxyz(os.path.join(tmp, "slabs.extxyz"), args.structures)
    if "lips" in args.inputs and os.path.isdir(shared):
      inputs["lips"] = [f"train={shared}"] * (args.structures // 200)
    for name, paths in inputs.items():
      for workers in args.workers:
        out = os.path.join(tmp, f"{name}-{workers}")
        t, cpu = time.perf_counter(), _cpu_seconds()
        summary = converter.convert(paths, out, task="s2ef",
                                    workers=workers, progress=False)
        seconds = time.perf_counter() - t
        cpu = _cpu_seconds() - cpu
        n = sum(summary.counts.values())
        stats = json.load(open(os.path.join(out, "metadata.json")))
        st = stats["splits"]["train"]["statistics"]
        results["runs"].append({
            "input": name, "workers": workers, "structures": n,
            "mean_atoms": round(st["mean_atoms"], 1),
            "mean_edges": round(st["mean_edges"], 1),
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 3),
            "structures_per_s": round(n / seconds, 1),
            "structures_per_s_per_core": round(
                n / seconds / min(workers, os.cpu_count()), 1),
            "structures_per_cpu_s": round(n / cpu, 1)})
  # After the runs: importing jax starts threads, which would make the
  # converter start its workers with spawn instead of fork.
  _results.report("convert_throughput", "Converter throughput", results,
                  "`python -m benchmarks.convert_throughput --record`. "
                  "Target: 300 structures/s per core.", save=args.record)


if __name__ == "__main__":
  main()
