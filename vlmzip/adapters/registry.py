"""The adapter registry: a transformers model class maps to the adapter of its family.

Each family's file calls :func:`register_adapter` on its adapter class (like the methods' ``register``);
:func:`adapter_for` finds the adapter of a model instance.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..paths import import_package_modules
from .base import Adapter

_ADAPTERS: dict[str, type[Adapter]] = {}
_SUPPORT = {"base", "registry"}  # the contract and the registry, not families


def _load_families() -> None:
    """Import every family file of this package once (each registers its adapter)."""
    import_package_modules(__package__, Path(__file__).parent, _SUPPORT)


def register_adapter(adapter: type[Adapter]) -> type[Adapter]:
    """Add a family's adapter (one call per family file). Family names are unique; a model class belongs to
    one family."""
    if not adapter.family or not adapter.model_classes:
        raise ValueError(f"{adapter.__name__} needs a family name and the model classes it takes")
    if adapter.family in _ADAPTERS:
        raise ValueError(f"an adapter for family {adapter.family!r} is already registered")
    taken = {cls for other in _ADAPTERS.values() for cls in other.model_classes}
    clash = [cls.__name__ for cls in adapter.model_classes if cls in taken]
    if clash:
        raise ValueError(f"{', '.join(clash)} already belong to another family's adapter")
    _ADAPTERS[adapter.family] = adapter
    return adapter


def families() -> dict[str, type[Adapter]]:
    """Every registered adapter by family name (a copy)."""
    _load_families()
    return dict(_ADAPTERS)


def supported_classes() -> list[str]:
    """Names of the transformers classes vlmzip can compress."""
    return [cls.__name__ for adapter in families().values() for cls in adapter.model_classes]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for this model instance (its exact class first, then a subclass of a supported one); a
    clear error lists the supported classes otherwise."""
    _load_families()
    for exact in (True, False):
        for adapter in _ADAPTERS.values():
            if (type(model) in adapter.model_classes) if exact else isinstance(model, adapter.model_classes):
                return adapter(model)
    raise ValueError(
        f"vlmzip does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_classes())}. Load the model with one of these classes "
        "(e.g. LlavaForConditionalGeneration.from_pretrained(path))."
    )
