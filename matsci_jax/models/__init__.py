"""Models: Flax modules mapping a padded graph batch to per-atom outputs."""

from matsci_jax.models import egnn, gala, megnet  # noqa: F401  (registration)
from matsci_jax.models.registry import (EnergyModel, from_config, get,
                                        model_class, names, register)

__all__ = ["EnergyModel", "from_config", "get", "model_class", "names",
           "register"]
