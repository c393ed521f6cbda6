"""Model-family adapters: one file per family, each registered with ``register_adapter``; ``adapter_for``
picks the one for a model instance. Importing this package registers every built-in family."""

from . import llava, llava_next, qwen_vl  # noqa: F401  (registration)
from .base import Adapter
from .registry import adapter_for, families, register_adapter, supported_classes

__all__ = ["Adapter", "adapter_for", "families", "register_adapter", "supported_classes"]
