"""Model-family adapters: one file per family, each registering its adapter with ``register_adapter``;
``adapter_for`` picks the one for a model instance.

Importing this package imports every family file in it (so a new family is one new file here), in name order.
"""

import importlib
import pkgutil

from .base import Adapter
from .registry import adapter_for, families, register_adapter, supported_classes

_SUPPORT = {"base", "registry"}  # the contract and the registry, not families
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SUPPORT):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Adapter", "adapter_for", "families", "register_adapter", "supported_classes"]
