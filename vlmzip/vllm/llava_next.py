"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres) in vLLM with a vlmzip pre-LLM method.

As vlmzip does on transformers (``vlmzip/adapters/llava_next.py``, whose packing this file reproduces on vLLM's
inputs): an image is a base crop plus a grid of high-resolution crops; its vanilla count is the base crop's patches,
the unpadded grid's patches and one newline token per grid row. With a budget K smaller than that:
- K is split evenly over the image's crops (the remainder to the first ones: VisionZip's 160 = 5 x 32), each crop
  is compressed on its own, and no newline tokens are sent;
- VisionZip's tokens are laid out as its authors' code does (base crop as emitted; the high-resolution crops'
  dominant patches in raster order over the whole grid; their CLS tokens; their contextual tokens), every other
  method's crop by crop, base crop first.
A budget that keeps everything sends vLLM's own packing (unpadding and newline tokens). The count is decided from
the image's size before the tower runs (``get_num_image_tokens``); a budget that cannot be split over an image's
crops is an error for that request naming the image's vanilla count.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..budgets import split_evenly
from ..methods import Selection
from ..methods.visionzip import crop_layout
from . import settings as vz
from .llava import llava_layout
from .tower import Tower


def checked_settings(config: Any) -> vz.Settings | None:
    """The config's vlmzip settings, checked against this model: start-up errors."""
    found = vz.from_config(config)
    if found is not None:
        layout = llava_layout(config)
        if config.vision_feature_select_strategy == "full" and layout.num_prefix:
            raise ValueError("vlmzip in vLLM: LLaVA-NeXT with vision_feature_select_strategy='full' and a CLS "
                             "encoder cannot pack its crops; use 'default'")
        found.keep(layout.vanilla, "a crop of this model")  # a tokens budget must fit at least one crop
    return found


def crop_shares(found: vz.Settings, vanilla: int, crops: int, per_crop: int) -> list[int] | None:
    """Each crop's share of an image's budget, None when the image keeps every token (clear error when the
    budget cannot be split over its crops)."""
    keep = found.keep(vanilla)
    if keep >= vanilla:
        return None
    if not crops <= keep <= crops * per_crop:
        raise ValueError(
            f"vlmzip in vLLM: {found.method}: a budget of {keep} visual tokens for an image with a vanilla count of "
            f"{vanilla} ({crops} crops of {per_crop} tokens plus newline tokens) cannot be split over its crops; it "
            f"needs between {crops} and {crops * per_crop} tokens (ratio=r sets each image's own share)"
        )
    return split_evenly(keep, crops)


class VlmzipLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info; with vlmzip on, an image's token count is its budget."""

    @cached_property
    def vlmzip(self) -> vz.Settings | None:
        return checked_settings(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        vanilla = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        found = self.vlmzip
        if found is None:
            return vanilla
        config = self.get_hf_config()
        rows, cols = get_anyres_image_grid_shape((image_height, image_width), config.image_grid_pinpoints,
                                                 config.vision_config.image_size)
        shares = crop_shares(found, vanilla, 1 + rows * cols, llava_layout(config).vanilla)
        return vanilla if shares is None else sum(shares)


class VlmzipLlavaNextMultiModalProcessor(LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's processor with the method and budget in every image's cache identity."""

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)
        found = self.info.vlmzip
        return {modality: [vz.salted(h, found) for h in items] for modality, items in hashes.items()}


@MULTIMODAL_REGISTRY.register_processor(
    VlmzipLlavaNextMultiModalProcessor, info=VlmzipLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VlmzipLlavaNext(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; with a ``vlmzip`` config entry, each image sends its budget of tokens to the LLM."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vlmzip = checked_settings(self.config)
        if self.vlmzip is not None:
            if self.select_layers is not None:
                raise ValueError("vlmzip in vLLM: LLaVA-NeXT with several feature layers is not supported")
            self.vlmzip_layout = llava_layout(self.config)
            self.vlmzip_tower = Tower(self.vision_tower, self.vlmzip_layout)
            self.vlmzip_tower.check(self.vlmzip.spec.needs, self.vlmzip.method)
            self.vlmzip_side = self.vlmzip_layout.grid[0]

    def vlmzip_vanilla(self, size: list[int]) -> tuple[int, tuple[int, int]]:
        """(vanilla count, high-resolution crop grid) of an image of ``size`` (height, width)."""
        rows, cols = get_anyres_image_grid_shape(tuple(size), self.config.image_grid_pinpoints,
                                                 self.config.vision_config.image_size)
        height, width = size
        h, w = rows * self.vlmzip_side, cols * self.vlmzip_side
        if width / height > w / h:
            h -= 2 * ((h - int(round(height * (w / width), 7))) // 2)
        else:
            w -= 2 * ((w - int(round(width * (h / height), 7))) // 2)
        return self.vlmzip_layout.vanilla + h * w + h, (rows, cols)

    def _process_image_input(self, image_input: Any) -> torch.Tensor | list[torch.Tensor]:
        found = self.vlmzip
        if found is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        images = list(pixel_values) if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
        sizes = [[int(v) for v in s] for s in image_input["image_sizes"].tolist()]
        layout = self.vlmzip_layout
        plans = [self.vlmzip_vanilla(size) for size in sizes]
        crops = [1 + rows * cols for _, (rows, cols) in plans]
        images = [pix[:n] for pix, n in zip(images, crops, strict=True)]
        shares = [crop_shares(found, vanilla, n, layout.vanilla) for (vanilla, _), n in zip(plans, crops, strict=True)]
        needs = found.spec.needs if any(s is not None for s in shares) else frozenset()
        tokens = self.vlmzip_tower.run(torch.cat(images), needs, feature_select_strategy="full")
        projected = found.spec.stage == "projector"
        if projected:
            tokens.hidden = self.multi_modal_projector(tokens.hidden)
        starts = [sum(crops[:i]) for i in range(len(crops))]
        keeps = [k for i, s in enumerate(shares) for k in (s or [None] * crops[i])]
        groups: dict[int, list[int]] = {}  # rows with the same share: one batched method call, as on transformers
        for row, keep in enumerate(keeps):
            if keep is not None:
                groups.setdefault(keep, []).append(row)
        chosen: list[tuple[Selection, int, torch.Tensor] | None] = [None] * len(keeps)
        for keep, rows in groups.items():
            sub = tokens if len(rows) == len(keeps) else tokens.rows(rows)
            selection = vz.select(found, sub, keep)
            sent = selection.features if projected else self.multi_modal_projector(selection.features)
            for at, row in enumerate(rows):
                chosen[row] = (selection, at, sent)
        vanilla_idx = tokens.vanilla_indices()
        out: list[torch.Tensor] = []
        for i, share in enumerate(shares):
            if share is None:
                hidden = tokens.hidden[starts[i] : starts[i] + crops[i], vanilla_idx]
                hidden = hidden if projected else self.multi_modal_projector(hidden)
                out.append(self._merge_image_patch_embeddings(torch.tensor(sizes[i]), hidden, strategy="spatial_unpad"))
            else:
                parts = [chosen[starts[i] + j] for j in range(crops[i])]
                out.append(self.vlmzip_assemble(parts, plans[i][1]))  # type: ignore[arg-type]
        return out

    def vlmzip_assemble(self, parts: list[tuple[Selection, int, torch.Tensor]], grid: tuple[int, int]) -> torch.Tensor:
        """One image's tokens from its crops' selections, base crop first (see the module docstring)."""
        crops = [(sent[row], sel.indices[row], sel.dominant) for sel, row, sent in parts]
        if any(dominant is None for _, _, dominant in crops):
            return torch.cat([features for features, _, _ in crops], dim=0)
        return crop_layout(crops, grid, self.vlmzip_layout.num_prefix, self.vlmzip_side)
