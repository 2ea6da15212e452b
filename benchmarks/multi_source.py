r"""Training on two datasets at once against training on each alone.

    python -m benchmarks.multi_source [--steps N] [--seeds 0 1 2] [--record]

Run from the repository root. Sources: the built-in EMT slab dev set (S2EF,
"slabs"; built on first use, cached) and matsciml's LiPS dev set (DFT AIMD
of Li27P12S44, "lips"; needs `../shared/data`), converted here with the dev
set's graph settings, 160 train / 40 val. Four runs of the S2EF EGNN laptop
config (configs/s2ef.py:egnn), the same seed and `--steps` each, through
`train.train_and_evaluate`, for each of `--seeds` (parameters and data
order; one seed's differences are within seed noise at 1,000 steps):
* shared: both sources, one energy head (`model.heads = "shared"`);
* per_source: both sources, one energy head each on a shared encoder;
* slabs_alone, lips_alone: one source (`data.path`).
Every run keeps one normaliser per source, fitted on its training split.
Runs are compared at equal steps (equal numbers of batches), not at equal
numbers of structures per source: a mixed run draws the sources in
proportion to weight x size (weights 1, `data.sampling_temperature` 1), so
it sees far fewer LiPS structures than the LiPS-alone run (the JSON gives
each source's share; `--sampling-temperature 0` gives equal shares).
Prints JSON with each run's validation force MAE (eV/Å) and energy MAE (eV)
per source, the trivial baselines, and wall time (start-up, compilation and
evaluation included); `--record` also writes it to benchmarks/RESULTS.md
with a markdown table (the mean over seeds and their range). One seed of
the four runs takes about 4 minutes on 2 cores.
"""

import argparse
import csv
import json
import os
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIPS = os.path.join(ROOT, "..", "shared", "data", "matsciml_lips_devset")
# Source names, as metrics name them (val/<name>/force_mae).
SLABS, LIPS_NAME = "slabs", "lips"
# Run -> (its sources, config.model.heads where there are several).
RUNS = {
    "shared": ((SLABS, LIPS_NAME), "shared"),
    "per_source": ((SLABS, LIPS_NAME), "per_source"),
    "slabs_alone": ((SLABS,), "shared"),
    "lips_alone": ((LIPS_NAME,), "shared"),
}
METRICS = ("force_mae", "energy_mae")
TITLE = "Several datasets in one run (dev set + LiPS)"


def _config(paths: dict, names: tuple, heads: str, steps: int,
            temperature: float | None, seed: int):
  """configs/s2ef.py:egnn for `steps` steps on the sources `names`."""
  import ml_collections
  from configs import s2ef
  config = s2ef.get_config("egnn")
  config.train.num_steps = steps
  config.train.seed = config.data.seed = seed  # Parameters, data order.
  # One evaluation and one checkpoint, at the end.
  config.train.eval_every = config.train.checkpoint_every = steps
  config.train.progress_bar = False
  if len(names) == 1:
    config.data.path = paths[names[0]]
    return config
  config.data.sources = ml_collections.ConfigDict(
      {n: {"path": paths[n], "weight": 1.0} for n in names})
  config.model.heads = heads
  if temperature is not None:
    config.data.sampling_temperature = temperature
  config.train.best_metric = " + ".join(f"val/{n}/force_mae" for n in names)
  return config


def _training_structures(workdir: str) -> int:
  """Structures the run trained on, from its logged rates: each log window
  of `log_every` steps at `structures_per_s` x `step_time_s` per step."""
  rate, step_time = {}, {}
  with open(os.path.join(workdir, "metrics.csv")) as f:
    for row in csv.DictReader(f):
      if row["metric"] == "perf/structures_per_s":
        rate[int(row["step"])] = float(row["value"])
      elif row["metric"] == "perf/step_time_s":
        step_time[int(row["step"])] = float(row["value"])
  total, last = 0.0, 0
  for step in sorted(rate):
    total += rate[step] * step_time[step] * (step - last)
    last = step
  return round(total)


def _run(name: str, seed: int, paths: dict, args, share: dict,
         workdir: str) -> dict:
  """One training run; its validation errors per source."""
  from matsci_jax import train
  names, heads = RUNS[name]
  config = _config(paths, names, heads, args.steps, args.sampling_temperature,
                   seed)
  t0 = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  m, base = result["metrics"], result["baselines"]
  structures = _training_structures(workdir)
  out = {"run": name, "seed": seed, "sources": list(names),
         "heads": heads if len(names) > 1 else "one source",
         "steps": result["step"], "wall_s": round(wall, 1),
         "training_structures": structures,
         "recompiles_after_warmup": result["recompiles_after_warmup"]}
  for n in names:
    prefix = f"val/{n}" if len(names) > 1 else "val"
    out[n] = {k: round(float(m[f"{prefix}/{k}"]), 4) for k in METRICS}
    # Expected from the sampler's shares (the log counts all sources).
    out[n]["training_structures"] = round(
        structures * (share[n] if len(names) > 1 else 1.0))
    out[n]["baselines"] = {k: round(v, 4) for k, v in base[prefix].items()}
  return out


def _mean(values: list) -> float:
  return sum(values) / len(values)


def _cell(values: list) -> str:
  """The mean of errors, and their range when there are several."""
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{_mean(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def _table(runs: list) -> str:
  """Markdown: a row per run (validation MAE per source over the seeds, the
  structures of each source it trained on, wall time) and a row of trivial
  baselines."""
  rows = ["| run | slabs force MAE (eV/Å) | slabs energy MAE (eV) | "
          "lips force MAE (eV/Å) | lips energy MAE (eV) | "
          "structures trained on (slabs / lips) | wall (s) |",
          "|" + "---|" * 7]
  baseline = {}
  for name in dict.fromkeys(r["run"] for r in runs):
    seeds = [r for r in runs if r["run"] == name]
    cells, seen = [name], []
    for n in (SLABS, LIPS_NAME):
      if n in seeds[0]:
        cells += [_cell([r[n][k] for r in seeds]) for k in METRICS]
        count = _mean([r[n]["training_structures"] for r in seeds])
        seen.append(f"{count:.0f}")
        baseline[n] = seeds[0][n]["baselines"]
      else:
        cells += ["–", "–"]
        seen.append("0")
    wall = _mean([r["wall_s"] for r in seeds])
    rows.append("| " + " | ".join(cells + [" / ".join(seen), f"{wall:.0f}"])
                + " |")
  cells = ["zero forces, mean energy"]
  for n in (SLABS, LIPS_NAME):
    b = baseline.get(n)
    cells += ([f"{b['zero_force_mae']:.4f}", f"{b['mean_energy_mae']:.4f}"]
              if b else ["–", "–"])
  rows.append("| " + " | ".join(cells + ["–", "–"]) + " |")
  return "\n".join(rows)


def _notes(flags: str, result: dict, table: str) -> str:
  """The text above the recorded JSON: the command, what is compared, and
  the table."""
  work = result["workload"]
  lips = work["sources"][LIPS_NAME]["share_of_mixed_training"]
  return (
      f"`python -m benchmarks.multi_source {flags}`: the EGNN laptop config, "
      f"{work['steps']} steps per run, seeds "
      f"{', '.join(map(str, work['seeds']))}; validation MAE per source "
      f"(force eV/Å, energy eV per structure; the mean over seeds, their "
      f"range in brackets). Runs are compared at equal steps (equal numbers "
      f"of batches), not equal data: mixed runs draw LiPS for "
      f"{100 * lips:.1f}% of their structures (sampling temperature "
      f"{work['sampling_temperature']:g}), and a LiPS batch holds about 3x "
      f"the atoms of a slab batch. Wall time includes compilation and "
      f"evaluation.\n\n" + table)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=1000,
                 help="training steps of every run")
  p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
  p.add_argument("--sampling-temperature", type=float, default=None,
                 help="of the mixed runs (default: the config's, 1: in "
                 "proportion to size; 0: equal shares)")
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="of parameters and data order, a set of runs each "
                 "(default: the config's seed)")
  p.add_argument("--record", action="store_true")
  args = p.parse_args()
  if not os.path.isdir(LIPS):
    sys.exit(f"needs the LiPS fixture at {LIPS}")
  sys.path.insert(0, ROOT)

  from benchmarks import _results
  from configs import s2ef
  from matsci_jax import inputs
  from matsci_jax.data import converter, dataset_io
  from matsci_jax.data.devset import DEVSET_GRAPH_SPEC
  from matsci_jax.data.pipeline import MixtureSampler

  config = s2ef.get_config("egnn")
  config.train.progress_bar = False
  seeds = args.seeds or [config.train.seed]
  temperature = (config.data.sampling_temperature
                 if args.sampling_temperature is None
                 else args.sampling_temperature)
  with tempfile.TemporaryDirectory() as tmp:
    lips = os.path.join(tmp, "lips")
    converter.convert([LIPS], lips, task="s2ef", workers=1, val_fraction=0.2,
                      split_seed=0, progress=False,
                      graph_spec=DEVSET_GRAPH_SPEC.select("graph"))
    paths = {SLABS: inputs.SLAB_DEVSET, LIPS_NAME: lips}
    # Builds the dev set now, if it is not cached, outside the timed runs.
    folders = {SLABS: inputs.dataset_folder(config, inputs.SLAB_DEVSET),
               LIPS_NAME: lips}
    splits = {n: dataset_io.Dataset(f).metadata["splits"]
              for n, f in folders.items()}
    names = sorted(folders)
    share = dict(zip(names, MixtureSampler(
        [splits[n]["train"]["num_structures"] for n in names],
        [1.0] * len(names), temperature).probabilities.tolist()))
    result = {
        "workload": {
            "config": "configs/s2ef.py:egnn", "steps": args.steps,
            "batch_size": config.data.batch_size, "seeds": seeds,
            "sampling_temperature": temperature,
            "comparison": "equal steps (equal numbers of batches): a mixed "
                          "run shares its batches between the sources, an "
                          "alone run gives them all to its source",
            "sources": {n: {"train": splits[n]["train"]["num_structures"],
                            "val": splits[n]["val"]["num_structures"],
                            "share_of_mixed_training": round(share[n], 4)}
                        for n in names}},
        "runs": []}
    for seed in seeds:
      for name in args.runs:
        run = _run(name, seed, paths, args, share,
                   os.path.join(tmp, f"{name}_{seed}"))
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
  table = _table(result["runs"])
  print(table)
  _results.report("multi_source", TITLE, result,
                  _notes(shlex.join(sys.argv[1:]), result, table),
                  save=args.record)


if __name__ == "__main__":
  main()
