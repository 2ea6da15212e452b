r"""Peak memory of `python -m matsci_jax.predict` against the input size.

    python -m benchmarks.predict_memory [--sizes 2000 20000] [--record]

Run from the repository root. Trains a tiny model (configs/test.py, a few
steps on a 12-system dev set; or `--workdir` names a trained run), then
predicts small periodic structures (4-atom Cu cells, rattled) in a fresh
process per size and input, writing the `.csv` table and `.npz` submission
as the command does, from two inputs:
* `lmdb`: an LMDB in the matsciml dict layout, read as the command reads
  its inputs;
* `generated`: the same cells made on the fly, which isolates the
  prediction loop and its writers from the reader.
Per run it reports `peak_rss_mb`, the process's peak resident memory
(VmHWM); `peak_anon_mb`, the peak of its anonymous memory (heap, arrays),
sampled every 10 ms; and `file_rss_mb`, the file-backed pages mapped at
the end (the LMDB is read through mmap: clean page cache, which the kernel
reclaims under pressure); then each one's growth per structure from the
smallest to the largest size, and `anon_within_largest_run`, the growth of
anonymous memory within the largest run, from a tenth of its structures to
all of them (free of the few MB that differ between processes). The
smallest size runs twice: `noise_mb_between_processes` is the difference
between those two, for the same work. Target:
flat, no growth beyond noise (the command held about 7 KB per OC20-sized
structure before it streamed its outputs).
Prints JSON; `--record` writes it to benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks import _results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status() -> dict:
  """/proc/self/status memory fields, in MB."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
        out[key] = int(value.split()[0]) / 1024
  return out


def _cells(n: int):
  """n rattled 4-atom fcc Cu cells, one at a time."""
  from ase.build import bulk
  base = bulk("Cu", "fcc", a=3.6, cubic=True)
  for k in range(n):
    atoms = base.copy()
    atoms.rattle(0.05, seed=k)
    yield atoms


def _write_lmdb(path: str, n: int) -> None:
  """The cells in the matsciml dict layout, with OC20 ids (sid k, fid 0)."""
  import lmdb
  env = lmdb.open(path, subdir=False, map_size=1 << 32, lock=False)
  with env.begin(write=True) as txn:
    for k, atoms in enumerate(_cells(n)):
      txn.put(str(k).encode(), pickle.dumps({
          "pos": atoms.positions.astype(np.float32),
          "cell": atoms.cell.array.astype(np.float32)[None],
          "atomic_numbers": atoms.numbers.astype(np.int64),
          "tags": np.ones(len(atoms), np.int64),
          "fixed": np.zeros(len(atoms), np.float32),
          "sid": k, "fid": 0}))
  env.close()


def _train(tmp: str) -> str:
  from configs import test as test_config
  from matsci_jax import train
  from matsci_jax.data.devset import build_devset
  devset = os.path.join(tmp, "devset")
  build_devset(devset, num_systems=12, workers=1, progress=False)
  config = test_config.get_config()
  config.data.path = os.path.join(devset, "s2ef")
  config.train.num_steps = 10
  config.train.eval_every = config.train.checkpoint_every = 10
  workdir = os.path.join(tmp, "run")
  train.train_and_evaluate(config, workdir)
  return workdir


def _child(args) -> None:
  """Predicts one input as the command does; prints its memory as JSON."""
  peak_anon = [_status()["RssAnon"]]
  done = threading.Event()

  def sample():
    while not done.wait(0.01):
      peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])

  from matsci_jax import checkpoints, predict
  from matsci_jax.data.ase_reader import structure_from_atoms
  trained = checkpoints.load(args.workdir)
  if args.input.endswith(".lmdb"):
    entries = predict._entries([args.input])
  else:
    entries = (structure_from_atoms(atoms, "generated", k, sid=k, fid=0)
               for k, atoms in enumerate(_cells(int(args.input))))
  anon_at = {}

  def sampled(entries):
    """Notes the anonymous memory every tenth of the input, within the
    run: free of the noise between processes."""
    k = -1
    for k, entry in enumerate(entries):
      if k % max(args.size // 10, 1) == 0 and k:
        anon_at[k] = round(_status()["RssAnon"], 1)
      yield entry
    anon_at[k + 1] = round(_status()["RssAnon"], 1)
  before = _status()
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  t = time.perf_counter()
  summary = predict.predict_to_files(
      trained, sampled(entries),
      os.path.join(args.out, "pred.csv"), os.path.join(args.out, "sub.npz"),
      batch_size=args.batch_size)
  seconds = time.perf_counter() - t
  done.set()
  thread.join()
  after = _status()
  print(json.dumps({
      "structures": summary["predicted"], "seconds": round(seconds, 1),
      "rss_before_mb": round(before["VmRSS"], 1),
      "peak_rss_mb": round(after["VmHWM"], 1),
      "peak_anon_mb": round(max(peak_anon[0], after["RssAnon"]), 1),
      "file_rss_mb": round(after["RssFile"], 1),
      "anon_mb_after_structures": anon_at}))


def _run_child(tmp, workdir, source, n, batch_size) -> dict:
  """One prediction in a fresh process; its JSON result."""
  out = tempfile.mkdtemp(dir=tmp)
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.predict_memory", "--child",
       f"--workdir={workdir}", f"--input={source}", f"--out={out}",
       f"--batch-size={batch_size}", f"--size={n}"],
      cwd=ROOT, capture_output=True, text=True)
  shutil.rmtree(out)
  if run.returncode:
    raise SystemExit(f"predicting {source} failed:\n{run.stderr[-3000:]}")
  return json.loads(run.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--workdir", help="a trained run (default: train one)")
  p.add_argument("--record", action="store_true")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--input", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  p.add_argument("--size", type=int, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return _child(args)
  if len(set(args.sizes)) < 2:
    p.error("--sizes needs at least two different sizes")
  runs = []
  sizes = sorted(set(args.sizes))
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or _train(tmp)
    # The smallest size twice: the spread between processes (allocator
    # and compilation state) is the noise any growth is compared with.
    for n in [sizes[0]] + sizes:
      lmdb_path = os.path.join(tmp, f"input_{n}.lmdb")
      if not os.path.exists(lmdb_path):
        _write_lmdb(lmdb_path, n)
      for kind, source in (("lmdb", lmdb_path), ("generated", str(n))):
        runs.append({"input": kind, **_run_child(tmp, workdir, source, n,
                                                 args.batch_size)})
  growth, noise = {}, {}
  for kind in ("lmdb", "generated"):
    repeat, first, *_, last = [r for r in runs if r["input"] == kind]
    noise[kind] = {key: round(abs(first[key] - repeat[key]), 1)
                   for key in ("peak_rss_mb", "peak_anon_mb")}
    extra = last["structures"] - first["structures"]
    growth[kind] = {
        key: round((last[key] - first[key]) * 1024 / extra, 3)
        for key in ("peak_rss_mb", "peak_anon_mb", "file_rss_mb")}
    # Within the largest run, from a tenth of it (compiled, warm) to the end.
    anon = {int(k): v for k, v in last["anon_mb_after_structures"].items()}
    start, end = min(anon), max(anon)
    growth[kind]["anon_within_largest_run"] = round(
        (anon[end] - anon[start]) * 1024 / (end - start), 3)
  result = {
      "workload": {"structure": "4-atom Cu fcc cell, rattled",
                   "model": "configs/test.py EGNN", "batch_size":
                   args.batch_size, "outputs": ".csv table and .npz "
                   "submission (S2EF)"},
      "runs": runs,
      "growth_kb_per_structure": growth,
      "noise_mb_between_processes": noise,
      "cpu_model": _results.cpu_model()}
  _results.report(
      "predict_memory", "Prediction memory against input size", result,
      "`python -m benchmarks.predict_memory --record`. Target: flat peak "
      "memory. With the previous `predict`, which held every row and array "
      "until the end, this script measured a peak RSS growth of 1.64 KB "
      "per structure (0.89 KB anonymous) on the `lmdb` input, and "
      "anonymous memory rising steadily by 0.87 to 1.05 KB per structure "
      "within the largest run; OC20-sized structures held about 7 KB "
      "each. Streaming, anonymous memory is flat but for steps of about "
      "3 MB that the allocator takes at random points in runs of either "
      "size (`anon_mb_after_structures`). What remains on the `lmdb` "
      "input is the reader's: its key index, about 0.14 KB per entry of "
      "one LMDB file, taken when the file is opened "
      "(`matsci_jax.data.lmdb_reader`; the shards of a folder are opened "
      "one at a time), and `file_rss_mb`, the LMDB pages mapped by mmap: "
      "clean page cache, which the kernel reclaims under pressure.",
      save=args.record)


if __name__ == "__main__":
  main()
