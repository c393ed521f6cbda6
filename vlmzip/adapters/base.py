"""What every model-family adapter provides to vlmzip's generic machinery (api.py).

An adapter knows, for one family of Hugging Face VLM classes: the per-image token layout, where the
image placeholders sit in the LLM sequence, how to run the vision tower and capture the signals a
method needs (with forward hooks on this one instance), and how to hand the chosen tokens back to the
model. It holds no algorithm: it calls ``select(VisionTokens) -> Selection`` and projects the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ..methods.base import Selection, TokenLayout, VisionTokens

SelectFn = Callable[[VisionTokens], Selection]


class Adapter(Protocol):
    """The contract between a model family and vlmzip (see adapters/llava.py for the reference)."""

    family: str
    layout: TokenLayout
    image_token_id: int
    pad_token_id: int

    def placeholders_per_image(self) -> int:
        """Placeholder tokens the processor writes per image (the vanilla count)."""
        ...

    def sequence_modules(self) -> list[nn.Module]:
        """The modules whose ``forward`` takes ``input_ids`` with image placeholders, outermost first."""
        ...

    def install(self, select: SelectFn, needs: frozenset[str]) -> Callable[[], None]:
        """Make this instance send ``select``'s tokens to the LLM; returns a function that undoes it."""
        ...

    def vision_tokens(self, pixel_values: torch.Tensor, needs: frozenset[str]) -> VisionTokens:
        """Run the vision tower on (B, 3, H, W) pixels and return its tokens plus the needed signals."""
        ...


def set_instance_attr(obj: object, name: str, value: object) -> Callable[[], None]:
    """Set ``obj.name`` on the instance only (shadowing the class attribute); return the undo."""
    had = name in vars(obj)
    previous = vars(obj).get(name)

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    setattr(obj, name, value)
    return undo
