"""OC20 metrics, accumulated exactly over padded batches.

Each batch yields sums and counts (`batch_sums`); `finalize` turns their
totals into metrics, so that the result does not depend on how structures
were packed into batches:

* energy_mae: mean |E_pred - E| over structures (eV);
* energy_per_atom_mae: mean |E_pred - E| / atoms over structures (eV/atom,
  every atom of the structure counted, as interatomic-potential
  benchmarks report it);
* force_mae: mean |F_pred - F| over force components of counted atoms (eV/Å);
* force_cos: mean cosine between predicted and true forces per counted atom;
* efwt: share of structures with |dE| < 0.02 eV and every counted force
  component within 0.03 eV/Å (OC20's "energy and forces within threshold");
* ewt (IS2RE): share with |dE| < 0.02 eV;
* stress_mae: mean |sigma_pred - sigma| over stress components of
  structures with stress (eV/Å^3).

A metric whose count is zero (forces or stress of a data source that has
none) is left out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ENERGY_THRESHOLD = 0.02
FORCE_THRESHOLD = 0.03


def batch_sums(graph, energy_pred, energy_true, forces_pred=None,
               force_mask=None, stress_pred=None, stress_mask=None) -> dict:
  """Sums and counts of one batch (arrays; jit-friendly)."""
  gmask = graph.globals["mask"]
  e_err = jnp.abs(energy_pred - energy_true)
  e_err = jnp.where(gmask, e_err, 0.0)
  atoms = jnp.maximum(graph.n_node, 1).astype(e_err.dtype)
  out = {
      "energy_abs": jnp.sum(e_err),
      "energy_abs_per_atom": jnp.sum(e_err / atoms),
      "energy_ok": jnp.sum(gmask & (e_err < ENERGY_THRESHOLD)),
      "graphs": jnp.sum(gmask),
  }
  if forces_pred is not None:
    f_true = graph.nodes["forces"]
    m = force_mask
    diff = jnp.where(m[:, None], jnp.abs(forces_pred - f_true), 0.0)
    dot = jnp.sum(forces_pred * f_true, -1)
    norms = (jnp.linalg.norm(forces_pred, axis=-1)
             * jnp.linalg.norm(f_true, axis=-1))
    cos = jnp.where(m & (norms > 0), dot / jnp.where(norms > 0, norms, 1.0),
                    0.0)
    n_graph = gmask.shape[0]
    worst = jax.ops.segment_max(jnp.max(diff, axis=-1), graph.nodes["graph"],
                                num_segments=n_graph, indices_are_sorted=True)
    worst = jnp.maximum(worst, 0.0)  # Structures without counted atoms.
    out.update(
        force_abs=jnp.sum(diff),
        force_components=3 * jnp.sum(m),
        force_cos=jnp.sum(cos),
        force_atoms=jnp.sum(m),
        efwt_ok=jnp.sum(gmask & (e_err < ENERGY_THRESHOLD)
                        & (worst < FORCE_THRESHOLD)),
    )
  if stress_pred is not None:
    diff = jnp.abs(stress_pred - graph.globals["stress"])
    out.update(stress_abs=jnp.sum(jnp.where(stress_mask[:, None, None], diff,
                                            0.0)),
               stress_components=9 * jnp.sum(stress_mask))
  return out


def accumulate(total: dict | None, sums: dict) -> dict:
  """Adds one batch's sums (fetched to host as numpy) to a running total."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  if total is None:
    return sums
  return {k: total[k] + sums[k] for k in total}


def finalize(total: dict) -> dict:
  """Metrics from accumulated sums."""
  graphs = max(float(total["graphs"]), 1.0)
  out = {"energy_mae": float(total["energy_abs"]) / graphs,
         "energy_per_atom_mae": float(total["energy_abs_per_atom"]) / graphs,
         "ewt": float(total["energy_ok"]) / graphs,
         "num_structures": int(total["graphs"])}
  if "force_abs" in total and total["force_components"] > 0:
    out.update(
        force_mae=float(total["force_abs"]) / max(float(
            total["force_components"]), 1.0),
        force_cos=float(total["force_cos"]) / max(float(total["force_atoms"]),
                                                  1.0),
        efwt=float(total["efwt_ok"]) / graphs)
  if total.get("stress_components", 0) > 0:
    out["stress_mae"] = (float(total["stress_abs"])
                         / float(total["stress_components"]))
  return out
