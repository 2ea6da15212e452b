r"""bf16 against float32 on the dev set: prediction error and training.

    python -m benchmarks.precision [--model egnn] [--steps N] [--record]

Trains the main command's S2EF config (configs/s2ef.py, built-in EMT dev
set) twice, with `precision` "float32" and "bf16", then reports:
* evaluation: the float32-trained EMA parameters evaluated on the
  validation split in float32 and in bf16 (bf16 dense layers; float32
  parameters, positions, sums, energies and forces): the bf16-minus-float32
  differences of energies and forces, beside each one's error against the
  EMT targets;
* training: the final validation metrics and throughput of each run.
Prints JSON; `--record` writes it to benchmarks/RESULTS.md.
"""

import argparse
import csv
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _throughput(workdir: str) -> float:
  """Mean training structures/s over the logged windows."""
  with open(os.path.join(workdir, "metrics.csv")) as f:
    values = [float(r["value"]) for r in csv.DictReader(f)
              if r["metric"] == "perf/structures_per_s"]
  return sum(values) / max(len(values), 1)


def compare(workdir: str) -> dict:
  """bf16 against float32 predictions of one trained model on val."""
  import jax
  import numpy as np

  from matsci_jax import checkpoints, train
  from matsci_jax.data import dataset_io, pipeline

  runs = {p: checkpoints.load(workdir, checkpoint="latest", precision=p)
          for p in ("float32", "bf16")}
  trained = runs["float32"]
  split = dataset_io.Dataset(trained.dataset).split("val")
  loader, _ = pipeline.batch_dataset(
      split, train._budget(trained.config, split.sizes), shuffle=False)
  fns = {p: jax.jit(t.energy_and_forces) for p, t in runs.items()}
  free_only = trained.config.loss.free_atoms_only
  energy, forces = {p: [] for p in fns}, {p: [] for p in fns}
  atoms, target_e, target_f = [], [], []
  for batch in loader:
    graphs = np.asarray(batch.globals["mask"])
    nodes = np.asarray(batch.nodes["mask"])
    if free_only:
      nodes = nodes & ~np.asarray(batch.nodes["fixed"])
    for p, fn in fns.items():
      e, f = jax.device_get(fn(runs[p].params, batch))
      energy[p].append(e[graphs])
      forces[p].append(f[nodes])
    atoms.append(np.asarray(batch.n_node)[graphs])
    target_e.append(np.asarray(batch.globals["energy"])[graphs])
    target_f.append(np.asarray(batch.nodes["forces"])[nodes])
  energy = {p: np.concatenate(v).astype(np.float64) for p, v in energy.items()}
  forces = {p: np.concatenate(v).astype(np.float64) for p, v in forces.items()}
  atoms = np.concatenate(atoms)
  target_e, target_f = np.concatenate(target_e), np.concatenate(target_f)
  de = np.abs(energy["bf16"] - energy["float32"])
  df = forces["bf16"] - forces["float32"]
  f32 = forces["float32"]
  # Direction agreement where the force is not tiny (below 0.05 eV/Å its
  # direction is noise).
  norms = np.linalg.norm(f32, axis=1)
  big = norms > 0.05
  cos = np.sum(forces["bf16"][big] * f32[big], 1) / (
      np.linalg.norm(forces["bf16"][big], axis=1) * norms[big])
  return {
      "structures": int(len(de)), "force_rows": int(len(f32)),
      "energy_mae_vs_emt_ev": {
          p: float(np.mean(np.abs(energy[p] - target_e)))
          for p in energy},
      "force_mae_vs_emt_ev_per_a": {
          p: float(np.mean(np.abs(forces[p] - target_f)))
          for p in forces},
      "energy_diff_mean_ev": float(de.mean()),
      "energy_diff_max_ev": float(de.max()),
      "energy_diff_mean_mev_per_atom": float(1e3 * np.mean(de / atoms)),
      "force_diff_mae_ev_per_a": float(np.mean(np.abs(df))),
      "force_diff_max_ev_per_a": float(np.abs(df).max()),
      "force_diff_relative": float(np.linalg.norm(df) / np.linalg.norm(f32)),
      "force_cos_mean_above_0.05_ev_per_a": float(cos.mean()),
      "force_cos_min_above_0.05_ev_per_a": float(cos.min()),
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="egnn")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps (default: the config's)")
  p.add_argument("--record", action="store_true")
  args = p.parse_args()

  from benchmarks import _results
  from configs import s2ef
  from matsci_jax import train

  result = {"workload": {"config": f"configs/s2ef.py:{args.model}",
                         "steps": args.steps or "config"}, "training": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for precision in ("float32", "bf16"):
      config = s2ef.get_config(args.model)
      config.train.num_steps = args.steps or config.train.num_steps
      config.train.progress_bar = False
      config.precision = precision
      workdir = os.path.join(tmp, precision)
      run = train.train_and_evaluate(config, workdir)
      result["training"][precision] = {
          "val/energy_mae": run["metrics"]["val/energy_mae"],
          "val/force_mae": run["metrics"]["val/force_mae"],
          "structures_per_s": round(_throughput(workdir), 2),
          "recompiles_after_warmup": run["recompiles_after_warmup"]}
      print(precision, result["training"][precision], flush=True)
    result["evaluation_of_float32_model"] = compare(
        os.path.join(tmp, "float32"))
  _results.report(
      "precision", "Mixed precision (bf16) against float32", result,
      "`python -m benchmarks.precision --record`: the S2EF main command "
      "trained in float32 and in bf16; then the float32-trained model "
      "evaluated on the validation split in both precisions. CPUs without "
      "bf16 matrix units run bf16 slower than float32; the accuracy figures "
      "hold on any device.", save=args.record)


if __name__ == "__main__":
  main()
