"""Builds an EMT dev set into a folder: OC20-like slabs, or bulk cells.

    python -m data_prep.make_devset --output data/devset [--seed 0] \
        [--num-systems 300] [--workers N] [--overwrite]
    python -m data_prep.make_devset --kind bulk --output data/bulk_devset \
        [--seed 0] [--num-structures 400] [--workers N] [--overwrite]

`--kind slab` (the default) is the command line of
`matsci_jax.data.devset.build_devset`: adsorbates on slabs, S2EF and IS2RE
(`OUTPUT/s2ef`, `OUTPUT/is2re`). `--kind bulk` is that of
`matsci_jax.data.bulk_devset.build_bulk_devset`: strained, rattled fcc
metals and alloys with energy, forces and stress (`OUTPUT/s2ef`). See those
modules for what the dev sets hold.
"""

from __future__ import annotations

import argparse

from matsci_jax.data import bulk_devset, devset

KINDS = ("slab", "bulk")


def main(argv: list[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(
      description="Build an EMT dev set: OC20-like slabs (S2EF and IS2RE) "
      "or bulk cells with stress (S2EF).")
  parser.add_argument("--kind", choices=KINDS, default="slab",
                      help="slab (default) or bulk")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-systems", type=int, default=None,
                      help=f"slab systems (default "
                      f"{devset.DEFAULT_NUM_SYSTEMS})")
  parser.add_argument("--num-structures", type=int, default=None,
                      help=f"bulk structures (default "
                      f"{bulk_devset.DEFAULT_NUM_STRUCTURES})")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: all CPUs)")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild an existing dev set")
  args = parser.parse_args(argv)
  if args.kind == "bulk":
    if args.num_systems is not None:
      parser.error("--num-systems counts slab systems; a bulk dev set takes "
                   "--num-structures")
    num = (bulk_devset.DEFAULT_NUM_STRUCTURES if args.num_structures is None
           else args.num_structures)
    s = bulk_devset.build_bulk_devset(
        args.output, seed=args.seed, num_structures=num,
        workers=args.workers, overwrite=args.overwrite, progress=True)
    print(f"bulk dev set in {args.output}: "
          f"{s['s2ef_train'] + s['s2ef_val']} structures with stress "
          f"({s['s2ef_train']} train / {s['s2ef_val']} val), "
          f"generated in {s['seconds']:.1f} s, "
          f"{s['total_seconds']:.1f} s in total")
    return
  if args.num_structures is not None:
    parser.error("--num-structures counts bulk structures; a slab dev set "
                 "takes --num-systems")
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
