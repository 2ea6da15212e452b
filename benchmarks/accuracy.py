r"""Accuracy of every model at equal steps, on DFT data and on the dev set.

    python -m benchmarks.accuracy [--steps 600] [--eval-every 50]
        [--models egnn megnet gala nequip] [--datasets lips devset]
        [--thresholds 0.30 0.20 0.15] [--record]

Every model trains with its own `configs/s2ef.py:<model>` config (learning
rate, clipping, EMA, batches of 8 structures), each for the same number
of steps, on
* lips: matsciml's LiPS dev set (`../shared/data/matsciml_lips_devset`:
  200 DFT frames of a Li27P12S44 AIMD run, 83 atoms each), converted once
  with a seeded 160/40 train/val split (`--val-fraction 0.2 --split-seed
  0`), graphs of every neighbour within 6 Å and point clouds of 16 slots;
* devset: the built-in EMT dev set (adsorbates on slabs).

The validation split is evaluated with the EMA parameters every
`--eval-every` steps and at the end: energy MAE per atom (eV/atom) and
force MAE (eV/Å). Training seconds count every step but the first (its
compilation is reported apart) and no evaluation, so structures/s is what
training costs. Time to accuracy: the training seconds and steps at which
a model first reaches each LiPS validation force MAE of `--thresholds` on
that schedule (None: not within the steps), so that models of different
speeds compare on what a user pays.

Prints JSON; `--record` writes it to benchmarks/RESULTS.md. The runs take
about 25 minutes on two cores.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax

from benchmarks import _results
from configs import s2ef
from matsci_jax import train
from matsci_jax.config_checks import check_config
from matsci_jax.data.converter import convert
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec

LIPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "data", "matsciml_lips_devset")
MODELS = ("egnn", "megnet", "gala", "nequip")
DATASETS = ("lips", "devset")


def convert_lips(folder: str) -> str:
  """LiPS with its seeded 160/40 split, graphs and point clouds."""
  if not os.path.isdir(LIPS):
    sys.exit(f"needs the LiPS fixture at {LIPS}")
  spec = GraphSpec(cutoff=6.0, max_neighbors=0, representation="both",
                   point_cloud=PointCloudSpec(cutoff=6.0, num_neighbors=16))
  convert([LIPS], folder, task="s2ef", graph_spec=spec, workers=1,
          val_fraction=0.2, split_seed=0, progress=False)
  return folder


def train_curve(model: str, data_path: str, steps: int,
                eval_every: int) -> dict:
  """Trains `model` on `data_path` for `steps` steps, evaluating on the
  validation split on schedule; its learning curve and costs."""
  config = s2ef.get_config(model)
  config.data.path = data_path
  config.train.num_steps = steps
  config.train.progress_bar = False
  config.train.plots = False
  check_config(config)
  job = train.build(config)
  batches = iter(job.train_data.dataset)
  state, curve, seconds = job.state, [], 0.0
  started = time.perf_counter()
  for step in range(steps):
    state, metrics = job.train_step(
        state, job.strategy.place_train(next(batches)))
    jax.block_until_ready(metrics)
    now = time.perf_counter()
    if step == 0:
      compile_seconds = now - started
    else:
      seconds += now - started
    done = step + 1
    if done % eval_every == 0 or done == steps:
      val = train.evaluate(job.eval_step, state.ema_params, job.eval_data[0],
                           job.strategy)
      curve.append({"step": done, "train_seconds": round(seconds, 2),
                    "energy_per_atom_mae": val["energy_per_atom_mae"],
                    "force_mae": val["force_mae"]})
      print(json.dumps({"model": model, **curve[-1]}), file=sys.stderr,
            flush=True)
    started = time.perf_counter()
  structures, _ = job.train_data.seen(steps)
  return {
      "model": model, "num_params": job.num_params, "steps": steps,
      "val_structures": val["num_structures"],
      "energy_per_atom_mae": curve[-1]["energy_per_atom_mae"],
      "force_mae": curve[-1]["force_mae"],
      "steps_per_s": (steps - 1) / seconds,
      # Structures of the timed steps (all but the first).
      "structures_per_s": structures * (steps - 1) / steps / seconds,
      "compile_seconds": round(compile_seconds, 1), "curve": curve}


def time_to_accuracy(curve: list[dict], thresholds) -> dict:
  """Per force-MAE threshold, the first evaluation at or below it."""
  out = {}
  for t in thresholds:
    hit = next((c for c in curve if c["force_mae"] <= t), None)
    out[f"{t:g}"] = (None if hit is None else
                     {"step": hit["step"], "seconds": hit["train_seconds"]})
  return out


def markdown(results: dict) -> str:
  runs = results["runs"]
  lines = ["| model | parameters | structures/s (LiPS) | LiPS force MAE "
           "| LiPS energy MAE | dev-set force MAE | dev-set energy MAE |",
           "|---|---|---|---|---|---|---|"]
  for model in results["models"]:
    lips, dev = runs.get(f"lips/{model}"), runs.get(f"devset/{model}")

    def cell(run, key, fmt):
      return "-" if run is None else format(run[key], fmt)

    first = lips or dev
    lines.append(
        f"| {model} | {first['num_params']:,} | "
        f"{cell(lips, 'structures_per_s', '.1f')} | "
        f"{cell(lips, 'force_mae', '.3f')} eV/Å | "
        f"{cell(lips, 'energy_per_atom_mae', '.4f')} eV/atom | "
        f"{cell(dev, 'force_mae', '.3f')} eV/Å | "
        f"{cell(dev, 'energy_per_atom_mae', '.4f')} eV/atom |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="+", default=list(MODELS),
                 choices=list(MODELS))
  p.add_argument("--datasets", nargs="+", default=list(DATASETS),
                 choices=list(DATASETS))
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--thresholds", type=float, nargs="+",
                 default=[0.30, 0.20, 0.15])
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  if args.steps < 2 or args.eval_every < 1:
    p.error("--steps must be at least 2 (the first is not timed) and "
            "--eval-every at least 1")
  results = {"steps": args.steps, "eval_every": args.eval_every,
             "models": args.models, "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    paths = {"devset": "devset"}
    if "lips" in args.datasets:
      paths["lips"] = convert_lips(os.path.join(tmp, "lips"))
    for dataset in args.datasets:
      for model in args.models:
        run = train_curve(model, paths[dataset], args.steps, args.eval_every)
        if dataset == "lips":
          run["time_to_force_mae"] = time_to_accuracy(run["curve"],
                                                      args.thresholds)
        results["runs"][f"{dataset}/{model}"] = run
  table = markdown(results)
  print(table, file=sys.stderr)
  _results.report(
      "accuracy", "Accuracy at equal steps (LiPS DFT and the EMT dev set)",
      results,
      f"`python -m benchmarks.accuracy --record`: {args.steps} steps of "
      "batches of 8 per model and dataset, each model with its "
      "configs/s2ef.py config; validation MAEs with the EMA parameters "
      "(see the script).\n\n" + table, save=args.record)


if __name__ == "__main__":
  main()
