"""Models: Flax modules mapping a padded graph batch to per-atom outputs."""

from matsci_jax.models import egnn, gala, megnet  # noqa: F401  (registration)
from matsci_jax.models.registry import from_config, get, names, register

__all__ = ["from_config", "get", "names", "register"]
