"""Computation precision of a model: "float32", or "bf16" mixed precision.

With "bf16" the dense layers compute in bfloat16 while parameters,
positions, residual streams, sums, energies and forces stay float32 (each
model's `dtype` field decides which layers; see `registry.EnergyModel`).
"""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bf16": jnp.bfloat16}
PRECISIONS = tuple(DTYPES)


def apply(model, precision: str):
  """`model` computing in `precision` (one of `PRECISIONS`)."""
  if precision not in DTYPES:
    raise ValueError(f"precision must be one of {PRECISIONS}, got "
                     f"{precision!r}")
  if precision == "float32":
    return model
  return model.clone(dtype=DTYPES[precision])
