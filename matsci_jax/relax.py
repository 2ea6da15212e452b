"""Batched structure relaxation (IS2RS-style) with FIRE in JAX.

    results = relax.relax(trained, list_of_atoms, fmax=0.05, steps=300)

Many structures relax at once in one padded batch: each step evaluates the
model's energies and forces for the whole batch and moves every unconverged
structure by one FIRE step (Bitzek et al., PRL 97, 170201 (2006), with the
parameters and update order of `ase.optimize.FIRE`, so a structure follows
the same path as under ASE's FIRE with `matsci_jax.ase.Calculator`). The
FIRE state is per structure: time step, mixing and the count of downhill
steps. Graphs are rebuilt on the host after every step (the model's cutoff
and neighbour cap decide the edges; vesin makes this cheap) and padded to a
bucketed budget, so that the jitted functions compile once per bucket.
Fixed atoms (`FixAtoms`) get zero force and never move.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from matsci_jax import checkpoints
from matsci_jax.data import batching
from matsci_jax.energy import make_energy_and_forces_fn


@dataclasses.dataclass(frozen=True)
class FireParams:
  """FIRE settings, with `ase.optimize.FIRE`'s defaults (Å, ASE time units)."""
  dt: float = 0.1
  maxstep: float = 0.2
  dtmax: float = 1.0
  n_min: int = 5
  finc: float = 1.1
  fdec: float = 0.5
  astart: float = 0.1
  fa: float = 0.99


class FireState(NamedTuple):
  """Per-batch FIRE state (padded like the batch).

  Attributes:
    positions: float32 [n_node, 3] in Å.
    velocities: float32 [n_node, 3].
    dt: float32 [n_graph] time step per structure.
    a: float32 [n_graph] velocity mixing per structure.
    n_downhill: int32 [n_graph] steps since the last uphill reset.
    started: bool [n_graph], False before a structure's first step.
  """
  positions: jax.Array
  velocities: jax.Array
  dt: jax.Array
  a: jax.Array
  n_downhill: jax.Array
  started: jax.Array

  @classmethod
  def create(cls, positions, n_graph: int, params: FireParams) -> "FireState":
    return cls(positions=jnp.asarray(positions, jnp.float32),
               velocities=jnp.zeros_like(positions, jnp.float32),
               dt=jnp.full(n_graph, params.dt, jnp.float32),
               a=jnp.full(n_graph, params.astart, jnp.float32),
               n_downhill=jnp.zeros(n_graph, jnp.int32),
               started=jnp.zeros(n_graph, bool))


def fire_step(state: FireState, forces: jax.Array, node_graph: jax.Array,
              active: jax.Array, params: FireParams = FireParams()
              ) -> FireState:
  """One FIRE step of every active structure.

  Args:
    state: the FIRE state.
    forces: float [n_node, 3] in eV/Å, zero on fixed and padding atoms.
    node_graph: int [n_node] structure index of each node (sorted).
    active: bool [n_graph]; inactive structures (converged, padding) keep
      their state.
    params: FIRE settings.

  Returns:
    The next state.
  """
  p = params
  n_graph = state.dt.shape[0]

  def per_graph(x):  # Sum over each structure's atoms and coordinates.
    return jax.ops.segment_sum(jnp.sum(x, -1), node_graph, n_graph,
                               indices_are_sorted=True)

  f = forces.astype(jnp.float32)
  v = state.velocities
  vf = per_graph(f * v)
  f_norm = jnp.sqrt(per_graph(f * f))
  v_norm = jnp.sqrt(per_graph(v * v))
  downhill = state.started & (vf > 0.0)
  uphill = state.started & ~downhill
  # Downhill: mix the velocity towards the force; after n_min such steps,
  # lengthen the step and mix less. Uphill: stop, shorten, reset mixing.
  mix = jnp.where(downhill, state.a, 0.0)[node_graph, None]
  scale = (v_norm / jnp.where(f_norm > 0, f_norm, 1.0))[node_graph, None]
  v = jnp.where(downhill[node_graph, None], (1.0 - mix) * v + mix * f * scale,
                v)
  v = jnp.where(uphill[node_graph, None], 0.0, v)
  grow = downhill & (state.n_downhill > p.n_min)
  dt = jnp.where(grow, jnp.minimum(state.dt * p.finc, p.dtmax), state.dt)
  dt = jnp.where(uphill, state.dt * p.fdec, dt)
  a = jnp.where(grow, state.a * p.fa, state.a)
  a = jnp.where(uphill, p.astart, a)
  n_downhill = jnp.where(downhill, state.n_downhill + 1,
                         jnp.where(uphill, 0, state.n_downhill))
  v = v + dt[node_graph, None] * f
  dr = dt[node_graph, None] * v
  dr_norm = jnp.sqrt(per_graph(dr * dr))
  limit = jnp.where(dr_norm > p.maxstep, p.maxstep / dr_norm, 1.0)
  dr = dr * limit[node_graph, None]

  on = active[node_graph, None]
  return FireState(
      positions=jnp.where(on, state.positions + dr, state.positions),
      velocities=jnp.where(on, v, state.velocities),
      dt=jnp.where(active, dt, state.dt), a=jnp.where(active, a, state.a),
      n_downhill=jnp.where(active, n_downhill, state.n_downhill),
      started=state.started | active)


@dataclasses.dataclass
class Relaxed:
  """One relaxed structure.

  Attributes:
    atoms: a copy of the input at the final positions, with a
      SinglePointCalculator holding the final energy and forces.
    energy: final energy in eV.
    fmax: final largest force norm on a free atom, eV/Å.
    steps: FIRE steps taken.
    converged: fmax fell below the requested threshold.
  """
  atoms: object
  energy: float
  fmax: float
  steps: int
  converged: bool


# Module-level jits keyed on the (hashable) model: repeated `relax` calls,
# as `predict --relax` makes batch after batch, reuse their compilations.
@functools.partial(jax.jit, static_argnames="model")
def _energies_and_free_forces(model, normalizer, params, graph):
  energies, forces = make_energy_and_forces_fn(model, normalizer)(params,
                                                                  graph)
  free = graph.nodes["mask"] & ~graph.nodes["fixed"]
  return energies, jnp.where(free[:, None], forces, 0.0)


_fire_step = jax.jit(fire_step, static_argnames="params")


def relax(trained: checkpoints.Trained, structures: Sequence, *,
          fmax: float = 0.05, steps: int = 300,
          params: FireParams = FireParams()) -> list[Relaxed]:
  """Relaxes structures together with FIRE under a trained S2EF model.

  Args:
    trained: a loaded S2EF model (`checkpoints.load`).
    structures: `ase.Atoms` (not modified).
    fmax: convergence threshold on the largest free-atom force, eV/Å.
    steps: the most FIRE steps per structure.
    params: FIRE settings.

  Returns:
    One `Relaxed` per structure, in order.
  """
  if not trained.task.forces:
    raise ValueError(f"relaxation needs forces; the model in "
                     f"{trained.workdir} was trained on {trained.task.name}")
  atoms = [a.copy() for a in structures]
  n = len(atoms)
  counts = np.array([len(a) for a in atoms])
  starts = np.concatenate([[0], np.cumsum(counts)])

  def evaluate():
    examples = [trained.example(a) for a in atoms]
    budget = batching.bucket_budget(examples, n_graph=n + 1)
    graph = batching.collate(examples, budget)
    energies, forces = _energies_and_free_forces(
        trained.model, trained.normalizer, trained.params, graph)
    return graph, energies, forces

  graph, energies, forces = evaluate()
  state = FireState.create(graph.nodes["positions"], n + 1, params)
  # Fixed atoms keep their exact (float64) input positions.
  free = np.asarray(graph.nodes["mask"] & ~graph.nodes["fixed"])
  done = np.zeros(n, bool)
  taken = np.zeros(n, int)
  for k in range(steps + 1):
    norms = np.linalg.norm(np.asarray(forces), axis=1)
    worst = np.array([norms[starts[i]:starts[i + 1]].max(initial=0.0)
                      for i in range(n)])
    done |= worst < fmax
    if done.all() or k == steps:
      break
    active = np.concatenate([~done, [False]])
    taken += ~done
    state = _fire_step(state, forces, graph.nodes["graph"], active,
                       params=params)
    positions = np.asarray(state.positions, np.float64)
    for i, a in enumerate(atoms):
      if not done[i]:
        moved = free[starts[i]:starts[i + 1]]
        a.positions[moved] = positions[starts[i]:starts[i + 1]][moved]
    graph, energies, forces = evaluate()

  energies, forces = np.asarray(energies), np.asarray(forces)
  out = []
  for i, a in enumerate(atoms):
    f = forces[starts[i]:starts[i + 1]].astype(np.float64)
    a.calc = SinglePointCalculator(a, energy=float(energies[i]), forces=f)
    out.append(Relaxed(atoms=a, energy=float(energies[i]),
                       fmax=float(worst[i]), steps=int(taken[i]),
                       converged=bool(done[i])))
  return out
