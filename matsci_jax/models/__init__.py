"""Models: Flax modules mapping a padded graph batch to per-atom outputs."""

# Imported to register them.
from matsci_jax.models import egnn, gala, megnet, nequip  # noqa: F401
from matsci_jax.models.registry import (EnergyModel, from_config, get,
                                        model_class, names, register)

__all__ = ["EnergyModel", "from_config", "get", "model_class", "names",
           "register"]
