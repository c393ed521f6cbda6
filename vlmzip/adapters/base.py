"""What every model-family adapter provides to vlmzip's generic machinery (runtime.py, llm_hooks.py).

An adapter knows, for one family of Hugging Face VLM classes: how many placeholder tokens each image of
a call has (its vanilla count), how to run the vision tower and capture the signals a method needs
(forward hooks on this one instance), how to cut an image into units (crops) and put the chosen tokens
back together, where the LLM's decoder layers are, and how positions work (1-D, or Qwen's M-RoPE). It
holds no algorithm: it calls ``state.select(VisionTokens, keep) -> Selection`` on each unit batch.

Objects an adapter sets on the model must be instances of module-level classes (not closures), so a
compressed model can be deep-copied and pickled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods.base import TokenLayout


class Adapter:
    """The contract between a model family and vlmzip (adapters/llava.py is the reference)."""

    family: str = ""
    model_classes: tuple[type, ...] = ()
    image_token_id: int
    pad_token_id: int

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def has_images(self, call: dict[str, Any]) -> bool:
        """True when this call carries images to encode (pixel values)."""
        return call.get("pixel_values") is not None

    def image_counts(self, call: dict[str, Any]) -> list[int]:
        """The vanilla placeholder count of every image in ``call``, in the processor's order."""
        raise NotImplementedError

    def static_tokens_per_image(self) -> int | None:
        """The vanilla count when every image has the same one (LLaVA-1.5), else None."""
        return None

    def unit_layout(self) -> TokenLayout:
        """The layout of one base image / crop (grid and prefix), e.g. for scaling the papers' budgets."""
        raise NotImplementedError

    def sequence_modules(self) -> list[nn.Module]:
        """The modules whose ``forward`` takes ``input_ids`` with image placeholders, outermost first."""
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        """The decoder stack (has ``.layers`` and ``.config``)."""
        raise NotImplementedError

    def install(self, state: Any) -> list[Any]:
        """Make this instance send ``state.select``'s tokens to the LLM; returns the undo records."""
        raise NotImplementedError

    def prepare_call(self, state: Any, call: dict[str, Any], original_ids: torch.Tensor, shrunk: Any) -> None:
        """Fix anything position-related in a shrunk forward ``call`` (default: 1-D positions, nothing to do)."""

    def prepare_generate(self, state: Any, kwargs: dict[str, Any], original_ids: torch.Tensor, shrunk: Any) -> None:
        """The same for a shrunk ``generate`` call."""

    def load_processor(self, folder: Any) -> Any:
        """The processor saved with this model in ``folder`` (default: ``AutoProcessor``)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder)

    def describe_positions(self) -> str:
        return "1-D positions, renumbered contiguously over the shrunk sequence (as the released VisionZip code)"


def set_instance_attr(obj: object, name: str, value: object) -> Any:
    """Set ``obj.name`` on the instance only (shadowing the class attribute); returns the undo record."""
    from ..runtime import InstanceAttr

    return InstanceAttr(obj, name, value)
