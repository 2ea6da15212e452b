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

from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import jraph
import numpy as np
from jax.sharding import PartitionSpec as P

from matsci_jax import _compat  # noqa: F401  (jraph needs it)

NUM_ELEMENTS = 119


@flax.struct.dataclass
class Normalizer:
  """Target scaling from training-split statistics.

  With several data sources (`stack`), every field but `reference_tag`
  gains a leading source axis [num_sources, ...], and each structure uses
  its source's entries (`globals["source"]` of a batch; 0 when absent).

  Attributes:
    scale: eV per unit of per-atom model output; also the unit of the
      normalised loss.
    shift: eV added per atom.
    element_energies: float [119], reference energy per element in eV.
    graph_scale: eV per unit of per-structure model output (the spread of
      structure energies after the element references).
    graph_shift: eV added per structure.
    stress_scale: eV/Å^3, the unit of the normalised stress loss (the
      training split's stress RMS).
    reference_tag: -1 to apply `element_energies` to every atom, or the OC20
      tag of the atoms they apply to (2: adsorbate).
  """
  scale: jax.Array
  shift: jax.Array
  element_energies: jax.Array
  graph_scale: jax.Array = 1.0
  graph_shift: jax.Array = 0.0
  stress_scale: jax.Array = 1.0
  reference_tag: int = flax.struct.field(pytree_node=False, default=-1)

  @classmethod
  def identity(cls) -> "Normalizer":
    return cls(scale=jnp.float32(1.0), shift=jnp.float32(0.0),
               element_energies=jnp.zeros(NUM_ELEMENTS, jnp.float32),
               graph_scale=jnp.float32(1.0), graph_shift=jnp.float32(0.0),
               stress_scale=jnp.float32(1.0))

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
    stress_scale = jnp.float32(_positive(stats.get("stress_rms")))
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
          stress_scale=stress_scale, reference_tag=2)
    for z, value in energy["element_references"].items():
      refs[int(z)] = value
    mean_atoms = max(stats["mean_atoms"], 1.0)
    scale = stats.get("force_rms") if target == "energy" else None
    if not scale:
      scale = energy["residual_std"] / np.sqrt(mean_atoms)
    return cls(scale=jnp.float32(_positive(scale)),
               shift=jnp.float32(energy["residual_mean"] / mean_atoms),
               element_energies=jnp.asarray(refs),
               graph_scale=jnp.float32(_positive(energy["residual_std"])),
               graph_shift=jnp.float32(0.0), stress_scale=stress_scale)

  @classmethod
  def stack(cls, normalizers: Sequence["Normalizer"]) -> "Normalizer":
    """One normaliser of several sources, each structure using its own
    source's entries.

    Raises:
      ValueError: the sources apply their references to different atoms
        (`reference_tag`).
    """
    tags = {n.reference_tag for n in normalizers}
    if len(tags) > 1:
      raise ValueError(
          "sources differ in which atoms carry reference energies (OC20 "
          "adsorbate-only references on some, all atoms on others); a "
          "structure-level model needs the same kind on every source")
    stacked = jax.tree_util.tree_map(
        lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs]),
        *normalizers)
    return stacked.replace(reference_tag=tags.pop())

  @property
  def num_sources(self) -> int | None:
    """Sources of a stacked normaliser; None for a single one."""
    return (None if jnp.ndim(self.scale) == 0
            else int(jnp.shape(self.scale)[0]))

  def source(self, index: int) -> "Normalizer":
    """The normaliser of one source of a stacked one (itself when single)."""
    if self.num_sources is None:
      return self
    return jax.tree_util.tree_map(lambda x: x[index], self)

  def per_graph(self, field: str, graph) -> jax.Array:
    """`field` for each structure of a batch: a scalar (one source) or
    [n_graph]."""
    value = getattr(self, field)
    if jnp.ndim(value) == 0:
      return value
    return value[graph_sources(graph)]

  def per_node(self, field: str, graph) -> jax.Array:
    """`field` for each atom of a batch: a scalar or [n_node]."""
    value = self.per_graph(field, graph)
    return value if jnp.ndim(value) == 0 else value[graph.nodes["graph"]]

  def to_dict(self) -> dict:
    """The JSON form (lists per source for a stacked normaliser)."""
    out = {k: np.asarray(getattr(self, k)).tolist() for k in (
        "scale", "shift", "element_energies", "graph_scale", "graph_shift",
        "stress_scale")}
    out["reference_tag"] = int(self.reference_tag)
    return out

  @classmethod
  def from_dict(cls, d: dict) -> "Normalizer":
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return cls(scale=f32(d["scale"]), shift=f32(d["shift"]),
               element_energies=f32(d["element_energies"]),
               graph_scale=f32(d.get("graph_scale", 1.0)),
               graph_shift=f32(d.get("graph_shift", 0.0)),
               stress_scale=f32(d.get("stress_scale", 1.0)),
               reference_tag=int(d.get("reference_tag", -1)))


def _positive(value) -> float:
  """`value` when it is a positive finite number, else 1."""
  return (float(value) if value is not None and np.isfinite(value)
          and value > 0 else 1.0)


def graph_sources(graph) -> jax.Array:
  """int32 [n_graph]: each structure's data source (0 without sources)."""
  source = graph.globals.get("source")
  if source is None:
    return jnp.zeros(graph.globals["mask"].shape, jnp.int32)
  return source


def _select_head(out: jax.Array, sources: jax.Array) -> jax.Array:
  """Model outputs [n] (one head) or [n, heads] -> [n], each row's head
  chosen by its source [n]."""
  if out.ndim == 1:
    return out
  return jnp.take_along_axis(out, sources[:, None], axis=1)[:, 0]


def _references(normalizer: Normalizer, graph) -> jax.Array:
  """Per-atom reference energies [n_node] (adsorbate atoms only when the
  normaliser's references are adsorbate-only)."""
  z = graph.nodes["atomic_numbers"]
  if normalizer.num_sources is None:
    refs = normalizer.element_energies[z]
  else:
    node_sources = graph_sources(graph)[graph.nodes["graph"]]
    refs = normalizer.element_energies[node_sources, z]
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
    out = _select_head(out, graph_sources(graph)[graph.nodes["graph"]])
    per_atom = (normalizer.per_node("shift", graph)
                + _references(normalizer, graph)
                + normalizer.per_node("scale", graph) * out)
    return jnp.where(graph.nodes["mask"], per_atom, 0.0)

  return atom_energies


def make_energy_fn(model, normalizer: Normalizer, *,
                   mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Returns `energy_fn(params, graph, positions=None) -> float32 [n_graph]`.

  Structure energies in eV (zero on padding graphs). Models give per-atom
  outputs [n_node], or per-structure outputs [n_graph] when they have
  `per_graph_output = True` (non-extensive readouts). With `mesh`, edges
  are split over its devices (`shard_edges`) and the function takes
  `(params, graph)` only.
  """
  if mesh is not None:
    return shard_edges(make_energy_fn, model, normalizer, mesh)

  per_graph = model.per_graph_output

  def energy_fn(params, graph: jraph.GraphsTuple, positions=None):
    out = model.apply(params, graph, positions).astype(jnp.float32)
    sources = graph_sources(graph)
    out = _select_head(out, sources if per_graph
                       else sources[graph.nodes["graph"]])
    mask = graph.nodes["mask"]
    # Sums stay in float32 whatever precision the model computes in.
    per_atom = normalizer.per_node("shift", graph) + _references(
        normalizer, graph)
    if not per_graph:
      per_atom = per_atom + normalizer.per_node("scale", graph) * out
    per_atom = jnp.where(mask, per_atom, 0.0)
    n_graph = graph.globals["mask"].shape[0]
    energies = jax.ops.segment_sum(per_atom, graph.nodes["graph"],
                                   num_segments=n_graph,
                                   indices_are_sorted=True)
    if per_graph:  # Structure-level models (e.g. a Set2Set readout).
      energies = energies + jnp.where(
          graph.globals["mask"],
          normalizer.per_graph("graph_shift", graph)
          + normalizer.per_graph("graph_scale", graph) * out, 0.0)
    return energies

  return energy_fn


def make_energy_and_forces_fn(model, normalizer: Normalizer, *,
                              mesh: jax.sharding.Mesh | None = None
                              ) -> Callable:
  """Returns `fn(params, graph) -> (energies [n_graph], forces [n_node, 3])`.

  Forces are minus the gradient of the summed energy: every atom's force
  depends only on its own structure's energy, so one backward pass gives all.

  Args:
    model: an `EnergyModel`.
    normalizer: its targets' `Normalizer`.
    mesh: split each batch's edges over all devices of this mesh, atoms
      replicated (`shard_edges`), for structures whose edges do not fit one
      device; None runs on one device.
  """
  if mesh is not None:
    return shard_edges(make_energy_and_forces_fn, model, normalizer, mesh)
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


def cell_volumes(graph) -> jax.Array:
  """float32 [n_graph]: |det(cell)| of each structure (0 without a cell)."""
  return jnp.abs(jnp.linalg.det(graph.globals["cell"].astype(jnp.float32)))


def make_energy_forces_stress_fn(model, normalizer: Normalizer, *,
                                 mesh: jax.sharding.Mesh | None = None
                                 ) -> Callable:
  """Returns `fn(params, graph) -> (energies [n_graph], forces [n_node, 3],
  stress [n_graph, 3, 3])`.

  Stress is the strain derivative of the energy, sigma = (1/V) dE/d(eps)
  at eps = 0 (eV/Å^3, ASE's sign convention: positive under tension). A
  symmetric strain per structure deforms positions and cell alike,
  r -> r (1 + eps) and cell -> cell (1 + eps) (rows are lattice vectors),
  so edges to periodic images, built from the stored integer cell shifts,
  deform with them. Forces and stress come from one `jax.grad` call.
  Structures without a cell (volume 0) and padding get zero stress.
  `mesh` splits edges over devices as in `make_energy_and_forces_fn`.
  """
  if mesh is not None:
    return shard_edges(make_energy_forces_stress_fn, model, normalizer, mesh)
  energy_fn = make_energy_fn(model, normalizer)

  def energy_forces_stress(params, graph):
    positions = graph.nodes["positions"].astype(jnp.float32)
    cell = graph.globals["cell"].astype(jnp.float32)
    strain = jnp.zeros_like(cell)

    def total(pos, strain):
      sym = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
      deformed = graph._replace(globals=dict(
          graph.globals, cell=cell + cell @ sym))
      pos = pos + jnp.einsum("ni,nij->nj", pos, sym[graph.nodes["graph"]])
      energies = energy_fn(params, deformed, pos)
      return jnp.sum(jnp.where(graph.globals["mask"], energies, 0.0)), energies

    (d_pos, d_strain), energies = jax.grad(total, argnums=(0, 1),
                                           has_aux=True)(positions, strain)
    forces = -d_pos * graph.nodes["mask"][:, None]
    volume = cell_volumes(graph)
    real = graph.globals["mask"] & (volume > 0)
    stress = jnp.where(real[:, None, None],
                       d_strain / jnp.where(real, volume, 1.0)[:, None, None],
                       0.0)
    return energies, forces, stress

  return energy_forces_stress


def edges_per_row(model) -> int:
  """Edges that must stay together on a device: a point-cloud model's K
  slots of a centre, else 1."""
  return int(model.num_neighbors) if model.representation == "point_cloud" \
      else 1


def shard_edges(make_fn: Callable, model, normalizer: Normalizer,
                mesh: jax.sharding.Mesh) -> Callable:
  """`make_fn(model, normalizer)`'s function with edges split over `mesh`.

  Inside `jax.shard_map` every device holds the parameters and all atoms,
  and a contiguous slice of the edges (padded with masked edges to a whole
  number per device, whole point-cloud rows each); the model sums its edge
  work locally and then over all mesh axes (`models.edge_sums`), so every
  device computes the same energies, and `jax.grad` brings the forces'
  per-device parts together through the transpose of those sums. Memory per
  device is that of all atoms plus its share of the edges; pass batches
  placed by `split_edges`, or every device first receives all edges.

  Args:
    make_fn: `make_energy_and_forces_fn` or another factory of
      `fn(params, graph)` whose outputs are per structure or per atom.
    model: the `EnergyModel`.
    normalizer: its `Normalizer`.
    mesh: the devices; edges split over all its axes.

  Returns:
    `fn(params, graph)` with the outputs of the unsharded function,
    replicated on the mesh's devices.
  """
  from matsci_jax.models import edge_sums  # Models import this module.

  axes = tuple(mesh.axis_names)
  fn = make_fn(model.clone(edge_axis=axes), normalizer)
  multiple = mesh.size * edges_per_row(model)

  def sharded(params, graph):
    graph = edge_sums.pad_edges(graph, multiple)
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(), _edge_specs(graph, P(
        axes), P())), out_specs=P())(params, graph)

  return sharded


def split_edges(graph, model, mesh: jax.sharding.Mesh):
  """A padded batch of numpy arrays placed as `shard_edges` splits it: its
  edges padded on the host to a whole number per device and split over the
  mesh, everything else replicated, so that no device holds all edges."""
  from matsci_jax.models import edge_sums  # Models import this module.

  graph = edge_sums.pad_edges(graph, mesh.size * edges_per_row(model))
  shardings = _edge_specs(graph, jax.sharding.NamedSharding(
      mesh, P(tuple(mesh.axis_names))), jax.sharding.NamedSharding(mesh, P()))
  return jax.device_put(graph, shardings)


def _edge_specs(graph, split, replicated):
  """`graph`'s tree of specs or shardings: edges `split`, the rest
  `replicated`."""
  return graph._replace(
      nodes=replicated, edges=split, globals=replicated, senders=split,
      receivers=split, n_node=replicated, n_edge=replicated)
