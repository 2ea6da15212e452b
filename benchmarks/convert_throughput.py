r"""Converter throughput on OC20-sized structures (about 80 atoms, 6 Å).

    python -m benchmarks.convert_throughput [--workers 1 2] [--record]

Run from the repository root. Two inputs, each converted end to end
(reading, decoding, validation, vesin neighbour lists with the 50-neighbour
rule, serialisation, ArrayRecord writing and statistics):
* `lips`: the real matsciml LiPS LMDB (83 atoms, torch pickles), listed
  repeatedly; needs `../shared/data`.
* `slabs`: an LMDB of 80-atom fcc(111) slabs with adsorbates, written here in
  the matsciml dict layout.
Prints one JSON object; `--record` also writes it to benchmarks/RESULTS.md.
Target: at least 300 structures/s per core.
"""

import argparse
import json
import os
import pickle
import tempfile
import time

import lmdb
import numpy as np

from benchmarks import _results
from matsci_jax.data import converter


def _write_slabs(path, n):
  from ase.build import add_adsorbate, fcc111
  rng = np.random.default_rng(0)
  env = lmdb.open(path, subdir=False, map_size=1 << 32, lock=False)
  with env.begin(write=True) as txn:
    for k in range(n):
      slab = fcc111("Pt", (4, 4, 5), vacuum=7.0)
      for ads in ("O", "H", "C")[: 1 + k % 3]:
        add_adsorbate(slab, ads, 1.5, (rng.uniform(0, 5), rng.uniform(0, 5)))
      slab.rattle(0.05, seed=k)
      n_atoms = len(slab)
      txn.put(str(k).encode(), pickle.dumps({
          "pos": slab.positions.astype(np.float32),
          "cell": slab.cell.array.astype(np.float32)[None],
          "atomic_numbers": slab.numbers.astype(np.int64),
          "tags": slab.get_tags().astype(np.int64),
          "fixed": np.zeros(n_atoms, np.float32),
          "energy": np.float64(rng.normal()),
          "forces": rng.normal(size=(n_atoms, 3)).astype(np.float32)}))
  env.close()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  p.add_argument("--structures", type=int, default=3000)
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  shared = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "..", "shared", "data",
      "matsciml_lips_devset")
  results = {"runs": []}
  with tempfile.TemporaryDirectory() as tmp:
    slabs = os.path.join(tmp, "slabs.lmdb")
    _write_slabs(slabs, args.structures)
    inputs = {"slabs": [f"train={slabs}"]}
    if os.path.isdir(shared):
      inputs["lips"] = [f"train={shared}"] * (args.structures // 200)
    for name, paths in inputs.items():
      for workers in args.workers:
        out = os.path.join(tmp, f"{name}-{workers}")
        t = time.perf_counter()
        summary = converter.convert(paths, out, task="s2ef",
                                    workers=workers, progress=False)
        seconds = time.perf_counter() - t
        n = sum(summary.counts.values())
        stats = json.load(open(os.path.join(out, "metadata.json")))
        st = stats["splits"]["train"]["statistics"]
        results["runs"].append({
            "input": name, "workers": workers, "structures": n,
            "mean_atoms": round(st["mean_atoms"], 1),
            "mean_edges": round(st["mean_edges"], 1),
            "seconds": round(seconds, 3),
            "structures_per_s": round(n / seconds, 1),
            "structures_per_s_per_core": round(
                n / seconds / min(workers, os.cpu_count()), 1)})
  # After the runs: importing jax starts threads, which would make the
  # converter start its workers with spawn instead of fork.
  _results.report("convert_throughput", "Converter throughput", results,
                  "`python -m benchmarks.convert_throughput --record`. "
                  "Target: 300 structures/s per core.", save=args.record)


if __name__ == "__main__":
  main()
