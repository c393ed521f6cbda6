"""Model-family adapters: one file per family; ``adapter_for`` picks the one for a model instance."""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter)


def supported_classes() -> list[str]:
    """Names of the transformers classes vlmzip can compress."""
    return [cls.__name__ for adapter in ADAPTERS for cls in adapter.model_classes]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for this model instance; a clear error lists the supported classes otherwise."""
    for adapter in ADAPTERS:
        if type(model) in adapter.model_classes:
            return adapter(model)
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes):
            return adapter(model)
    raise ValueError(
        f"vlmzip does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_classes())}. Load the model with one of these classes "
        "(e.g. LlavaForConditionalGeneration.from_pretrained(path))."
    )


__all__ = ["Adapter", "adapter_for", "supported_classes"]
