r"""Command line of scaling studies: run a sweep, fit its power laws.

    python -m matsci_jax.scaling sweep --config=configs/scaling.py \
        --out DIR [--parallel N]
    python -m matsci_jax.scaling fit DIR [--metric val/force_mae] \
        [--which final|best] [--bootstrap 500] [--seed 0]
    python -m matsci_jax.scaling run DIR/runs/NAME [--data-only]

`sweep` trains every run of the grid not yet in DIR/runs.jsonl (see
`matsci_jax.scaling.sweep`) and exits with status 1 when a run failed,
after the others; `fit` prints the fitted exponents with their intervals,
writes DIR/fit.json and draws the figures (see `matsci_jax.scaling.fit`
and `plots`). `run` trains one run of a sweep from its folder's
sweep_run.json, as `sweep --parallel N` does in each subprocess.
"""

from __future__ import annotations

import argparse
import sys

_EPILOG = __doc__.split("\n\n", 1)[1]


def _parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m matsci_jax.scaling",
      description="Scaling studies: a grid of trainings and power-law fits.",
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = p.add_subparsers(dest="command", required=True)
  s = commands.add_parser("sweep", help="run the grid of trainings")
  s.add_argument("--config", required=True,
                 help="sweep config, path[:arg] (e.g. configs/scaling.py)")
  s.add_argument("--out", required=True,
                 help="output folder; an existing one continues its sweep")
  s.add_argument("--parallel", type=int, default=None,
                 help="runs at once, each in a subprocess on its own device "
                 "(default: 1 on CPUs, in this process; else one per GPU or "
                 "TPU chip)")
  f = commands.add_parser("fit", help="fit power laws, draw the figures")
  f.add_argument("dir", help="the sweep's output folder")
  f.add_argument("--metric", default=None,
                 help="metric to fit (default: val/force_mae, else "
                 "val/energy_mae)")
  f.add_argument("--which", default="final", choices=("final", "best"),
                 help="each run's last evaluation, or its best")
  f.add_argument("--bootstrap", type=int, default=500,
                 help="resamples for the 95%% intervals")
  f.add_argument("--seed", type=int, default=0, help="resampling seed")
  r = commands.add_parser("run", help="train one run of a sweep")
  r.add_argument("workdir", help="the run's folder, DIR/runs/NAME")
  r.add_argument("--data-only", action="store_true",
                 help="only build the dev sets the run reads")
  return p.parse_args(argv)


def _sweep(args) -> int:
  from matsci_jax.scaling import sweep
  try:
    outcome = sweep.run_sweep(sweep.load(args.config), args.out,
                              parallel=args.parallel)
  except sweep.SweepError as e:
    sys.exit(f"error: {e}")
  if outcome.failed:
    lines = [f"  {name}: {log}" for name, log in outcome.failed]
    print(f"error: {len(outcome.failed)} of {len(outcome.runs)} runs "
          "failed (started again, the sweep resumes them):\n"
          + "\n".join(lines), file=sys.stderr)
    return 1
  print(f"{len(outcome.runs)} runs recorded in {args.out}/runs.jsonl")
  return 0


def _fit(args) -> int:
  from matsci_jax.scaling import fit, plots
  try:
    result = fit.fit_directory(args.dir, metric=args.metric, which=args.which,
                               bootstrap=args.bootstrap, seed=args.seed)
  except fit.FitError as e:
    sys.exit(f"error: {e}")
  print(fit.format_table(result))
  for path in plots.plot_directory(args.dir, result):
    print(path)
  return 0


def _run(args) -> int:
  import json
  import os

  from matsci_jax.scaling import sweep
  path = os.path.join(args.workdir, sweep.RUN_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      run = sweep.Run.from_spec(json.load(f))
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f"error: {path}: not a run of a sweep ({e})")
  try:
    if args.data_only:
      sweep.prepare_data(run)
    else:
      sweep.execute(run, args.workdir)
  except sweep.SweepError as e:
    sys.exit(f"error: {e}")
  return 0


def main(argv=None) -> int:
  from absl import logging
  # Library INFO logs (checkpointing) would bury the progress lines.
  logging.set_verbosity(logging.WARNING)
  args = _parse_args(argv)
  return {"sweep": _sweep, "fit": _fit, "run": _run}[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
