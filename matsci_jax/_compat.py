"""Compatibility shims for the supported jax versions, kept in one place.

jraph 0.0.6.dev0 still calls `jax.tree_map` and friends, which jax removed in
favour of `jax.tree_util`. Aliasing them here (imported by every module that
imports jraph) keeps jraph working on jax 0.10 and 0.11. Not imported by the
package's `__init__`: data-only processes (converter workers) never load
jax.
"""

import jax

_TREE_ALIASES = {
    "tree_map": jax.tree_util.tree_map,
    "tree_leaves": jax.tree_util.tree_leaves,
    "tree_flatten": jax.tree_util.tree_flatten,
    "tree_unflatten": jax.tree_util.tree_unflatten,
    "tree_structure": jax.tree_util.tree_structure,
}


def install() -> None:
  """Adds the removed `jax.tree_*` aliases that jraph uses, if missing."""
  for name, fn in _TREE_ALIASES.items():
    try:
      getattr(jax, name)
    except AttributeError:
      setattr(jax, name, fn)


install()


def varying_axes(tree) -> tuple[str, ...]:
  """The mesh axes any array of `tree` varies over inside `shard_map`
  (none outside it)."""
  axes = set()
  for leaf in jax.tree_util.tree_leaves(tree):
    aval = jax.typeof(leaf)
    mat = getattr(aval, "mat", None)  # jax >= 0.10; `vma` before.
    axes |= set(mat.varying if mat is not None
                else getattr(aval, "vma", None) or ())
  return tuple(sorted(axes))


def to_varying(x, axes: tuple[str, ...]):
  """Marks a value replicated over mesh `axes` as device-local inside
  `shard_map` (`jax.lax.pcast` in newer jax, `pvary` before)."""
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)
