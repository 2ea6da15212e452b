r"""Converts OC20/matsciml LMDBs or ASE-readable files into graph datasets.

    python -m data_prep.convert --input train=PATH --input val=PATH \
        --output DIR --task s2ef [--cutoff 6.0] [--max-neighbors 50] \
        [--workers N] [--skip-bad] [--overwrite]

Inputs are LMDB files or shard folders (OC20 S2EF/IS2RE, matsciml), ASE
files (extxyz, traj, db, ...) or folders of them (OC20 `*.extxyz` + `*.txt`
chunks). `split=PATH` keeps the given splits; bare paths are split with a
seeded permutation (`--val-fraction`, `--test-fraction`, `--split-seed`).

The output folder is a tensorflow-datasets ArrayRecord dataset, one example
per structure, with periodic edges computed by vesin; see
`matsci_jax.data.dataset_io` for its layout and `matsci_jax.data.schema` for
the features. Energies, forces and stress (eV/Å^3, ASE's sign: extended XYZ
`stress=`/`virial=`, ASE databases, LMDB `stress`/`virial`) are stored when
the inputs have them; each must be present in all entries of a split or in
none. It is written to a temporary folder and moved into place only
when complete. A bad entry stops the run with an error naming the file, the
entry and the problem, unless `--skip-bad` is given, which skips it and lists
it in `skipped.jsonl`.

This is the command line of `matsci_jax.data.converter.convert`.
"""

from __future__ import annotations

import argparse
import sys

from matsci_jax.data import converter, schema
from matsci_jax.data.graph_spec import GraphSpec, PointCloudSpec
from matsci_jax.data.structure import DataError


def _parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m data_prep.convert",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", nargs="+", action="extend", required=True,
                 metavar="[SPLIT=]PATH",
                 help="LMDB file/folder or ASE-readable file/folder; "
                      "prefix SPLIT= to keep a given split")
  p.add_argument("--output", required=True, help="dataset folder to create")
  p.add_argument("--task", required=True, choices=schema.TASKS)
  p.add_argument("--cutoff", type=float, default=6.0,
                 help="neighbour radius in Å (default 6.0)")
  p.add_argument("--max-neighbors", type=int, default=50,
                 help="nearest neighbours kept per atom, 0 = all (default 50)")
  p.add_argument("--workers", type=int, default=None,
                 help="worker processes (default: all cores, at most one "
                 "per 1,000 entries)")
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--test-fraction", type=float, default=0.0)
  p.add_argument("--split-seed", type=int, default=0)
  p.add_argument("--skip-bad", action="store_true",
                 help="skip bad entries and list them in skipped.jsonl")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output folder")
  p.add_argument("--name", default=None, help="dataset name in file names")
  p.add_argument("--oc20-ref-energy", action="store_true",
                 help="subtract the reference energies of OC20 .txt files")
  p.add_argument("--ase-format", default=None,
                 help="ASE format name for files with unusual suffixes")
  p.add_argument("--examples-per-shard", type=int, default=10_000)
  p.add_argument("--representation", default="graph",
                 choices=schema.REPRESENTATIONS,
                 help="graph edges, point clouds, or both (default graph)")
  p.add_argument("--pc-cutoff", type=float, default=None,
                 help="point-cloud radius in Å (default: --cutoff)")
  p.add_argument("--pc-neighbors", type=int, default=16,
                 help="neighbour slots per point-cloud centre (default 16)")
  p.add_argument("--pc-bulk-samples", type=int, default=8,
                 help="bulk atoms sampled as extra centres (default 8)")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def _graph_spec(args: argparse.Namespace) -> GraphSpec:
  """The GraphSpec the flags ask for.

  Raises:
    ValueError: settings GraphSpec rejects (a cutoff <= 0, ...).
  """
  point_cloud = None
  if args.representation != "graph":
    # The bulk sample has always been seeded by --split-seed.
    point_cloud = PointCloudSpec(
        cutoff=float(args.pc_cutoff or args.cutoff),
        num_neighbors=args.pc_neighbors, bulk_samples=args.pc_bulk_samples,
        seed=args.split_seed)
  return GraphSpec(cutoff=args.cutoff, max_neighbors=args.max_neighbors,
                   representation=args.representation,
                   point_cloud=point_cloud)


def main(argv=None) -> int:
  args = _parse_args(argv)
  try:
    summary = converter.convert(
        args.input, args.output, task=args.task, graph_spec=_graph_spec(args),
        workers=args.workers, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, split_seed=args.split_seed,
        skip_bad=args.skip_bad, overwrite=args.overwrite, name=args.name,
        subtract_reference=args.oc20_ref_energy, ase_format=args.ase_format,
        examples_per_shard=args.examples_per_shard,
        progress=not args.no_progress)
  except (DataError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = ", ".join(f"{s}: {n}" for s, n in summary.counts.items())
  print(f"wrote {summary.output} ({counts}; skipped {summary.skipped}) in "
        f"{summary.seconds:.1f} s, "
        f"{summary.structures_per_second:.0f} structures/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
