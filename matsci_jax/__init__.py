"""matsci_jax: JAX/Flax machine learning on atomistic materials data."""

from matsci_jax import _compat  # noqa: F401  (must run before jraph is used)

__version__ = "0.1.0"
