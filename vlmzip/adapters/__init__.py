"""Model-family adapters: one file per family, each registering its adapter with ``register_adapter``;
``adapter_for`` picks the one for a model instance.

The registry imports every family file of this package the first time it is asked (so a new family is one new
file here), in name order.
"""

from .base import Adapter
from .registry import adapter_for, families, register_adapter, supported_classes

__all__ = ["Adapter", "adapter_for", "families", "register_adapter", "supported_classes"]
