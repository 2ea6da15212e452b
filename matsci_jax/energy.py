"""Energies and forces from a per-atom model, as pure functions.

E_graph = sum over its real atoms of (scale * model_i + shift + ref[Z_i]),
where `ref` are per-element reference energies fitted on the training split,
so the network learns only a residual of order one, and forces are
F = -dE/dpositions, computed with `jax.grad` inside the jitted step.

Structure-level (intensive) models give one output per structure instead:
E_graph = graph_shift + sum of references + graph_scale * model_graph. On
OC20-style adsorption energies their references count only the adsorbate
atoms (see `data.statistics`), since a sum over slab atoms would add a term
that grows with the slab and that an intensive readout cannot cancel.
"""

from __future__ import annotations

from typing import Callable

import flax
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from matsci_jax import _compat  # noqa: F401  (jraph needs it)

NUM_ELEMENTS = 119


@flax.struct.dataclass
class Normalizer:
  """Target scaling from training-split statistics.

  Attributes:
    scale: eV per unit of per-atom model output; also the unit of the
      normalised loss.
    shift: eV added per atom.
    element_energies: float [119], reference energy per element in eV.
    graph_scale: eV per unit of per-structure model output (the spread of
      structure energies after the element references).
    graph_shift: eV added per structure.
    reference_tag: -1 to apply `element_energies` to every atom, or the OC20
      tag of the atoms they apply to (2: adsorbate).
  """
  scale: jax.Array
  shift: jax.Array
  element_energies: jax.Array
  graph_scale: jax.Array = 1.0
  graph_shift: jax.Array = 0.0
  reference_tag: int = flax.struct.field(pytree_node=False, default=-1)

  @classmethod
  def identity(cls) -> "Normalizer":
    return cls(scale=jnp.float32(1.0), shift=jnp.float32(0.0),
               element_energies=jnp.zeros(NUM_ELEMENTS, jnp.float32),
               graph_scale=jnp.float32(1.0))

  @classmethod
  def from_statistics(cls, stats: dict, target: str = "energy",
                      per_graph: bool = False) -> "Normalizer":
    """Builds a normaliser from a split's statistics (see data.statistics).

    The scale is the force RMS when forces exist (then forces come out of the
    network at order one), else the residual energy spread per sqrt(atom).
    With `per_graph` (a structure-level model) and a split whose structures
    all carry OC20 tags, the adsorbate-only reference fit is used.
    """
    energy = stats.get(target)
    refs = np.zeros(NUM_ELEMENTS, np.float32)
    if not energy:
      return cls.identity()
    fit = energy.get("adsorbate_fit") if per_graph else None
    if fit:
      for z, value in fit["element_references"].items():
        refs[int(z)] = value
      std = fit["residual_std"]
      std = float(std) if np.isfinite(std) and std > 0 else 1.0
      # The loss unit stays the force RMS when there are forces.
      scale = stats.get("force_rms") if target == "energy" else None
      if not (scale and np.isfinite(scale) and scale > 0):
        scale = std / np.sqrt(max(stats["mean_atoms"], 1.0))
      return cls(
          scale=jnp.float32(scale),
          shift=jnp.float32(0.0), element_energies=jnp.asarray(refs),
          graph_scale=jnp.float32(std),
          graph_shift=jnp.float32(fit["constant"] + fit["residual_mean"]),
          reference_tag=2)
    for z, value in energy["element_references"].items():
      refs[int(z)] = value
    mean_atoms = max(stats["mean_atoms"], 1.0)
    scale = stats.get("force_rms") if target == "energy" else None
    if not scale:
      scale = energy["residual_std"] / np.sqrt(mean_atoms)
    scale = float(scale) if scale and np.isfinite(scale) and scale > 0 else 1.0
    graph_scale = energy["residual_std"]
    if not (np.isfinite(graph_scale) and graph_scale > 0):
      graph_scale = 1.0
    return cls(scale=jnp.float32(scale),
               shift=jnp.float32(energy["residual_mean"] / mean_atoms),
               element_energies=jnp.asarray(refs),
               graph_scale=jnp.float32(graph_scale))

  def to_dict(self) -> dict:
    return {"scale": float(self.scale), "shift": float(self.shift),
            "element_energies": np.asarray(self.element_energies).tolist(),
            "graph_scale": float(self.graph_scale),
            "graph_shift": float(self.graph_shift),
            "reference_tag": int(self.reference_tag)}

  @classmethod
  def from_dict(cls, d: dict) -> "Normalizer":
    return cls(scale=jnp.float32(d["scale"]), shift=jnp.float32(d["shift"]),
               element_energies=jnp.asarray(d["element_energies"],
                                            jnp.float32),
               graph_scale=jnp.float32(d.get("graph_scale", 1.0)),
               graph_shift=jnp.float32(d.get("graph_shift", 0.0)),
               reference_tag=int(d.get("reference_tag", -1)))


def _references(normalizer: Normalizer, graph) -> jax.Array:
  """Per-atom reference energies [n_node] (adsorbate atoms only when the
  normaliser's references are adsorbate-only)."""
  refs = normalizer.element_energies[graph.nodes["atomic_numbers"]]
  if normalizer.reference_tag >= 0:
    refs = jnp.where(graph.nodes["tags"] == normalizer.reference_tag,
                     refs, 0.0)
  return refs


def make_atom_energies_fn(model, normalizer: Normalizer) -> Callable:
  """Returns `fn(params, graph, positions=None) -> float32 [n_node]`.

  Per-atom energy contributions in eV (zero on padding atoms), which sum to
  `make_energy_fn`'s structure energies. Only per-atom models have them.
  """
  if model.per_graph_output:
    raise ValueError(f"{type(model).__name__} predicts one energy per "
                     "structure; it has no per-atom contributions")

  def atom_energies(params, graph: jraph.GraphsTuple, positions=None):
    out = model.apply(params, graph, positions).astype(jnp.float32)
    per_atom = (normalizer.shift + _references(normalizer, graph)
                + normalizer.scale * out)
    return jnp.where(graph.nodes["mask"], per_atom, 0.0)

  return atom_energies


def make_energy_fn(model, normalizer: Normalizer) -> Callable:
  """Returns `energy_fn(params, graph, positions=None) -> float32 [n_graph]`.

  Structure energies in eV (zero on padding graphs). Models give per-atom
  outputs [n_node], or per-structure outputs [n_graph] when they have
  `per_graph_output = True` (non-extensive readouts).
  """

  per_graph = model.per_graph_output

  def energy_fn(params, graph: jraph.GraphsTuple, positions=None):
    out = model.apply(params, graph, positions).astype(jnp.float32)
    mask = graph.nodes["mask"]
    # Sums stay in float32 whatever precision the model computes in.
    per_atom = normalizer.shift + _references(normalizer, graph)
    if not per_graph:
      per_atom = per_atom + normalizer.scale * out
    per_atom = jnp.where(mask, per_atom, 0.0)
    n_graph = graph.globals["mask"].shape[0]
    energies = jax.ops.segment_sum(per_atom, graph.nodes["graph"],
                                   num_segments=n_graph,
                                   indices_are_sorted=True)
    if per_graph:  # Structure-level models (e.g. a Set2Set readout).
      energies = energies + jnp.where(
          graph.globals["mask"],
          normalizer.graph_shift + normalizer.graph_scale * out, 0.0)
    return energies

  return energy_fn


def make_energy_and_forces_fn(model, normalizer: Normalizer) -> Callable:
  """Returns `fn(params, graph) -> (energies [n_graph], forces [n_node, 3])`.

  Forces are minus the gradient of the summed energy: every atom's force
  depends only on its own structure's energy, so one backward pass gives all.
  """
  energy_fn = make_energy_fn(model, normalizer)

  def energy_and_forces(params, graph):
    positions = graph.nodes["positions"].astype(jnp.float32)

    def total(pos):
      energies = energy_fn(params, graph, pos)
      return jnp.sum(jnp.where(graph.globals["mask"], energies, 0.0)), energies

    grad, energies = jax.grad(total, has_aux=True)(positions)
    forces = -grad * graph.nodes["mask"][:, None]
    return energies, forces

  return energy_and_forces
