"""What a model's vision tower sees of an image: the pictures of its units, read back from the processor's
pixels (normalisation and rescaling undone), so that a figure shows the model's own resize, crop or padding.

Adapters build an :class:`ImageView` (they know how their processor lays out pixels: one picture, a base
crop and a grid of crops, flattened patches); ``vlmzip.viz`` draws on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .methods.base import TokenLayout


@dataclass
class ImageView:
    """One image as a model's vision tower receives it.

    - ``inputs``: the processor's batch for it (one prompt), what the model is run on;
    - ``total``: visual tokens the vanilla model sends for it;
    - ``pictures``: every unit the tower encodes (the image; or LLaVA-NeXT's base crop then its
      high-resolution crops), as the tower sees it, in unit order;
    - ``layouts``: each unit's token layout (its grid, and a CLS token before it or not);
    - ``grid``: (rows, cols) of the units after the first, drawn as a grid beside it (LLaVA-NeXT's
      high-resolution crops), or None for one picture;
    - ``caption``: what the picture shows, in words.
    """

    inputs: dict[str, Any]
    total: int
    pictures: list[Image.Image]
    layouts: list[TokenLayout]
    grid: tuple[int, int] | None = None
    caption: str = ""

    @property
    def image(self) -> Image.Image:
        """The first unit's picture (the whole image, or LLaVA-NeXT's base crop)."""
        return self.pictures[0]


def pixels_to_image(pixel_values: Any, image_processor: Any) -> Image.Image:
    """One (3, H, W) tensor of processor output back to the picture the vision tower sees (normalisation
    and rescaling undone)."""
    x = pixel_values.detach().float().cpu().numpy()
    if getattr(image_processor, "do_normalize", False):
        mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(-1, 1, 1)
        x = x * std + mean
    if getattr(image_processor, "do_rescale", False):
        x = x / image_processor.rescale_factor
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8).transpose(1, 2, 0))
