"""Models: Flax modules mapping a padded graph batch to per-atom outputs."""

from matsci_jax.models import egnn  # noqa: F401  (registers "egnn")
from matsci_jax.models.registry import from_config, get, names, register

__all__ = ["from_config", "get", "names", "register"]
