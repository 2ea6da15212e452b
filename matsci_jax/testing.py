"""Test helpers for model developers: symmetry and gradient checks.

    from matsci_jax import testing
    testing.check_symmetries(energy_and_forces, params, atoms_list, cutoff=6.0)
    testing.check_forces_are_gradients(energy_and_forces, params, atoms)

`energy_and_forces(params, graph) -> (energies [n_graph], forces [n_node, 3])`
is what `matsci_jax.energy.make_energy_and_forces_fn` returns.
"""

from __future__ import annotations

import numpy as np

from matsci_jax.data.graphs import batch_examples, graph_from_atoms


def random_rotation(seed: int) -> np.ndarray:
  """A uniformly random proper rotation matrix [3, 3]."""
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def predict(fn, params, atoms_list, cutoff, max_neighbors=None,
            **graph_kwargs):
  """Energies [n] and per-structure forces of a list of `ase.Atoms`.

  `graph_kwargs` go to `graph_from_atoms` (e.g. representation="point_cloud",
  num_neighbors=K).
  """
  examples = [graph_from_atoms(a, cutoff, max_neighbors, **graph_kwargs)
              for a in atoms_list]
  graph = batch_examples(examples)
  energies, forces = fn(params, graph)
  energies, forces = np.asarray(energies), np.asarray(forces)
  out_f, start = [], 0
  for ex in examples:
    n = len(ex["atomic_numbers"])
    out_f.append(forces[start:start + n])
    start += n
  return energies[:len(examples)], out_f


def _transformed(atoms, seed):
  """(name, transformed atoms, how forces map, atom permutation) tuples."""
  rng = np.random.default_rng(seed)
  rot = random_rotation(seed)
  rotated = atoms.copy()
  rotated.positions = atoms.positions @ rot.T
  rotated.cell = atoms.cell.array @ rot.T
  shifted = atoms.copy()
  shifted.positions = atoms.positions + rng.normal(size=3) * 3.0
  perm = rng.permutation(len(atoms))
  permuted = atoms[perm]
  wrapped = atoms.copy()
  if atoms.pbc.any():
    # Move whole lattice vectors so that atoms leave the cell, then wrap.
    shift = rng.integers(-2, 3, size=(len(atoms), 3)) * atoms.pbc
    wrapped.positions = atoms.positions + shift @ atoms.cell.array
  return [("rotation", rotated, lambda f: f @ rot.T, None),
          ("translation", shifted, lambda f: f, None),
          ("permutation", permuted, lambda f: f[perm], perm),
          ("periodic wrap", wrapped, lambda f: f, None)]


def check_symmetries(fn, params, atoms_list, cutoff: float,
                     max_neighbors=None, seed: int = 0, atol: float = 1e-4,
                     rtol: float = 1e-5, **graph_kwargs):
  """Asserts invariant energies and equivariant forces.

  Checks rotation (cell rotated with the atoms), translation, permutation of
  atoms and moving atoms by lattice vectors (periodic wrap). Neighbour lists
  are rebuilt for every transformed structure, as a user's data would be.
  Use `max_neighbors=None` (and, for point clouds, K slots above the largest
  neighbour count and structures without tags): a neighbour cap breaks ties
  between equidistant atoms by index, which a permutation may change.

  Raises:
    AssertionError naming the symmetry and structure that failed.
  """
  energies, forces = predict(fn, params, atoms_list, cutoff, max_neighbors,
                             **graph_kwargs)
  for k, atoms in enumerate(atoms_list):
    for name, other, map_forces, _ in _transformed(atoms, seed + k):
      e, f = predict(fn, params, [other], cutoff, max_neighbors,
                     **graph_kwargs)
      np.testing.assert_allclose(
          e[0], energies[k], atol=atol, rtol=rtol,
          err_msg=f"energy not invariant under {name} (structure {k})")
      np.testing.assert_allclose(
          f[0], map_forces(forces[k]), atol=atol, rtol=rtol,
          err_msg=f"forces not equivariant under {name} (structure {k})")


def check_forces_are_gradients(fn, params, atoms, cutoff: float,
                               max_neighbors=None, delta: float = 1e-3,
                               atoms_to_check=(0, -1), atol: float = 2e-3,
                               **graph_kwargs):
  """Asserts forces equal central finite differences of the energy.

  Displacements are applied in float64 positions; the energy is float32, so
  `delta` must not be tiny. The neighbour list is kept fixed across the
  displacement (`max_neighbors=None` keeps it independent of tie breaks).
  """
  _, forces = predict(fn, params, [atoms], cutoff, max_neighbors,
                      **graph_kwargs)
  for i in atoms_to_check:
    for axis in range(3):
      es = []
      for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[i, axis] += sign * delta
        es.append(predict(fn, params, [moved], cutoff, max_neighbors,
                          **graph_kwargs)[0][0])
      fd = -(es[0] - es[1]) / (2 * delta)
      np.testing.assert_allclose(
          forces[0][i, axis], fd, atol=atol, rtol=1e-2,
          err_msg=f"force on atom {i} axis {axis} is not -dE/dx")
