"""Adapter for ``transformers.LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6, anyres).

LLaVA-NeXT is LLaVA (same tower, feature layer, strategy and projector: :class:`LlavaNextAdapter` builds on
:class:`~vlmzip.adapters.llava.LlavaAdapter`) with several crops per image. Model quirks this file owns:
- Each image is cut by the processor into a *base* crop (the whole image resized to the tower's input)
  and a grid of high-resolution crops (``image_sizes`` and ``image_grid_pinpoints`` decide the grid);
  every crop goes through the CLIP tower alone (a unit of ``unit_layout()``: CLS + side x side patches).
- HF's vanilla packing per image: the base crop's patches, then the high-resolution grid in raster order
  with the padding rows / columns removed (``unpad_image``) and one ``image_newline`` token after each
  row, all in one run of placeholders. So the vanilla count N_i depends on the image's size; ``items``
  computes it as the processor does.
- Route: an instance-level ``get_image_features`` on ``model.model`` returns K_i projected tokens for
  image i; runtime.py shrinks each placeholder run from N_i to K_i before the model sees it.
- Positions: 1-D, contiguous over the shrunk sequence (what the released VisionZip code does).

What a compressed image sends (K_i = the image's budget):
- Keep-all (K_i >= N_i, e.g. ``ratio=1.0``): exactly HF's own packing (unpadding and newline tokens).
- Otherwise K_i is split evenly over the image's crops (base crop + high-resolution crops), the
  remainder going to the first crops (the VisionZip authors' 160 = 5 x 32), each crop is compressed on
  its own (crops with the same share in one batched method call), and no newline tokens are sent:
  - VisionZip (the method marks its dominant tokens, ``Selection.dominant``): the authors' released
    layout (``llava_arch.py``): the base crop's tokens as VisionZip emits them (dominant, CLS
    included, then contextual); then the high-resolution crops' dominant patches in raster order over
    the whole high-resolution grid (no unpadding); then each high-resolution crop's CLS token; then all
    high-resolution crops' contextual tokens, crop by crop.
  - Every other method (random, spatial, ...): each crop's selected tokens in the method's order,
    concatenated base crop first, then the high-resolution crops in raster order of the crop grid.
  A budget that cannot be split (fewer tokens than crops, or more than the crops' patches hold, which
  only the newline tokens make possible) is a ValueError naming the image's vanilla count.
- In-LLM methods (FastV) see HF's vanilla packing, newline tokens included, as visual tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..budgets import split_evenly
from ..methods.base import Selection
from ..methods.visionzip import crop_layout
from ..sequence import Item
from ..views import ImageView, pixels_to_image
from .base import set_instance_attr
from .llava import LlavaAdapter, LlavaImageFeatures
from .registry import register_adapter


def host_sizes(image_sizes: Any) -> list[list[int]]:
    """``image_sizes`` ((N, 2) tensor, on any device, or a list of pairs) as host ints: one copy, not one per value."""
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.tolist()
    return [[int(v) for v in size] for size in image_sizes]


def unpadded_grid(image_size: tuple[int, int], grid: tuple[int, int], side: int) -> tuple[int, int]:
    """(rows, cols) of patches HF keeps of a (grid[0] * side, grid[1] * side) crop grid for an image of
    ``image_size`` (height, width) after removing the padding (``unpad_image``'s arithmetic)."""
    height, width = image_size
    rows, cols = grid[0] * side, grid[1] * side
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_height) // 2)
    else:
        new_width = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_width) // 2)
    return rows, cols


class LlavaNextAdapter(LlavaAdapter):
    """vlmzip's view of one ``LlavaNextForConditionalGeneration`` instance."""

    family = "llava-next"
    model_classes = (LlavaNextForConditionalGeneration,)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.strategy == "full" and self.tower.has_cls:
            raise ValueError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' and a CLS encoder cannot pack its crops "
                "(side x side + 1 tokens per crop); use 'default'"
            )
        self.crop_size = self.config.vision_config.image_size
        self.pinpoints = self.config.image_grid_pinpoints

    # -- counts ---------------------------------------------------------------------------------------

    def crop_grid(self, image_size: Any) -> tuple[int, int]:
        """(rows, cols) of high-resolution crops HF cuts an image of ``image_size`` (height, width) into."""
        size = [int(v) for v in image_size]
        return get_anyres_image_grid_shape(size, self.pinpoints, self.crop_size)

    def num_crops(self, image_size: Any) -> int:
        """Crops of one image, the base crop included (what HF's ``image_size_to_num_patches`` says)."""
        return image_size_to_num_patches([int(v) for v in image_size], self.pinpoints, self.crop_size)

    def vanilla_count(self, image_size: Any) -> int:
        """Placeholders HF's processor writes for one image: base crop + unpadded grid + one newline per row."""
        rows, cols = unpadded_grid(tuple(int(v) for v in image_size), self.crop_grid(image_size), self.side)
        return self.layout.vanilla + rows * cols + rows

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Each image's single run of placeholders, counted from ``image_sizes`` as the processor counts them."""
        sizes = call.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values; pass the processor's image_sizes")
        return [Item(self.image_token_id, (self.vanilla_count(size),)) for size in host_sizes(sizes)]

    def static_tokens_per_image(self) -> None:
        return None

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        return [set_instance_attr(self.inner, "get_image_features", LlavaNextImageFeatures(self, state))]

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """Every crop as the tower sees it: the base crop (the whole image), then the high-resolution crops in
        raster order of their grid, padding included."""
        size = inputs["image_sizes"][0].tolist()
        crops = self.num_crops(size)
        pictures = [pixels_to_image(inputs["pixel_values"][0][j], image_processor) for j in range(crops)]
        rows, cols = self.crop_grid(size)
        total = self.items(inputs)[0].vanilla
        caption = (f"As the model sees it: the base crop (the whole image) and {rows} x {cols} high-resolution "
                   f"crops; the vanilla model sends {total} visual tokens for them")
        return ImageView(inputs, total, pictures, [self.layout] * crops, grid=(rows, cols), caption=caption)


class LlavaNextImageFeatures(LlavaImageFeatures):
    """``get_image_features`` of a compressed LLaVA-NeXT: pooler_output is a list of (K_i, D_lm) tensors."""

    def __call__(
        self,
        pixel_values: torch.Tensor,
        image_sizes: Any,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        self.check(vision_feature_layer, vision_feature_select_strategy)
        adapter, state = self.adapter, self.state
        image_sizes = host_sizes(image_sizes)
        crops = [adapter.num_crops(size) for size in image_sizes]
        if pixel_values.dim() == 5:  # (images, max crops, 3, H, W), padded: keep each image's own crops
            pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops, strict=True)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected 4 or 5 dimensions")
        counts = [adapter.vanilla_count(size) for size in image_sizes]
        keeps = [state.pre_keep(n, i) for i, n in enumerate(counts)]
        shares = [None if keep >= n else self.shares(i, n, keep, c)
                  for i, (n, keep, c) in enumerate(zip(counts, keeps, crops, strict=True))]
        needs = state.needs() if any(s is not None for s in shares) else frozenset()
        tokens, projector, projected = adapter.encode(state, pixel_values, needs, kwargs)

        starts = [sum(crops[:i]) for i in range(len(crops))]
        crop_keeps = [keep for i, share in enumerate(shares) for keep in (share or [None] * crops[i])]
        units = [(i, j) for i in range(len(crops)) for j in range(crops[i])]
        chosen = state.select_rows(tokens, crop_keeps, units)
        sent = {id(c[0]): c[0].features if projected else projector(c[0].features) for c in chosen if c is not None}
        vanilla_idx = tokens.vanilla_indices()
        features: list[torch.Tensor] = []
        for i, share in enumerate(shares):
            if share is None:
                hidden = tokens.hidden[starts[i] : starts[i] + crops[i], vanilla_idx]
                packed, _ = adapter.inner.pack_image_features(
                    [hidden if projected else projector(hidden)], image_sizes[i : i + 1],
                    vision_feature_select_strategy=self.configured[1], image_newline=adapter.inner.image_newline,
                )
                features.append(packed[0])
            else:
                parts = [(*chosen[starts[i] + j], sent[id(chosen[starts[i] + j][0])]) for j in range(crops[i])]
                features.append(self.assemble(parts, adapter.crop_grid(image_sizes[i])))
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=features)

    def shares(self, image: int, vanilla: int, keep: int, crops: int) -> list[int]:
        """Each crop's share of image ``image``'s ``keep`` tokens (clear error when it cannot be split)."""
        per_crop = self.adapter.layout.vanilla
        if not crops <= keep <= crops * per_crop:
            raise ValueError(
                f"{self.state.name}: a budget of {keep} visual tokens for image {image} of this batch "
                f"(vanilla count {vanilla}: {crops} crops of {per_crop} tokens plus newline tokens) cannot be split "
                f"over its crops; it needs between {crops} and {crops * per_crop} tokens (use ratio=1.0 to keep "
                "every token)"
            )
        return split_evenly(keep, crops)

    def assemble(self, parts: list[tuple[Selection, int, torch.Tensor]], grid: tuple[int, int]) -> torch.Tensor:
        """One image's tokens from its crops' selections (base crop first); see the module docstring.
        ``parts``: per crop, (its selection, its row in it, that selection's features as sent)."""
        crops = [(sent[row], sel.indices[row], sel.dominant) for sel, row, sent in parts]
        if any(dominant is None for _, _, dominant in crops):
            return torch.cat([features for features, _, _ in crops], dim=0)
        return self.visionzip_layout(crops, grid)

    def visionzip_layout(self, crops: list[tuple[torch.Tensor, torch.Tensor, int]],
                         grid: tuple[int, int]) -> torch.Tensor:
        """The released VisionZip order of one image's crops (``visionzip.crop_layout``)."""
        return crop_layout(crops, grid, self.adapter.layout.num_prefix, self.adapter.side)


register_adapter(LlavaNextAdapter)
