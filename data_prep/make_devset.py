"""Builds the EMT dev set (OC20-like S2EF and IS2RE) into a folder.

    python -m data_prep.make_devset --output data/devset [--seed 0] \
        [--num-systems 300] [--workers N] [--overwrite]

This is the command line of `matsci_jax.data.devset.build_devset`; see that
module for what the dev set holds.
"""

from __future__ import annotations

import argparse

from matsci_jax.data import devset


def main(argv: list[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(
      description="Build the EMT dev set (OC20-like S2EF and IS2RE).")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-systems", type=int, default=None,
                      help=f"default {devset.DEFAULT_NUM_SYSTEMS}")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: all CPUs)")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild an existing dev set")
  args = parser.parse_args(argv)
  s = devset.build_devset(args.output, seed=args.seed,
                          num_systems=args.num_systems, workers=args.workers,
                          overwrite=args.overwrite)
  print(f"dev set in {args.output}: "
        f"{s['s2ef_train'] + s['s2ef_val']} S2EF frames "
        f"({s['s2ef_train']} train / {s['s2ef_val']} val), "
        f"{s['is2re_train'] + s['is2re_val']} IS2RE systems "
        f"({s['is2re_train']} train / {s['is2re_val']} val), "
        f"generated in {s['seconds']:.1f} s, "
        f"{s['total_seconds']:.1f} s in total")


# Worker processes import this module under spawn: build only when run.
if __name__ == "__main__":
  main()
