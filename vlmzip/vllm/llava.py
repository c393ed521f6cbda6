"""LLaVA-1.5 (``LlavaForConditionalGeneration``) in vLLM with a vlmzip pre-LLM method.

The plugin registers :class:`VlmzipLlava` for the architecture; without a ``vlmzip`` config entry it is vLLM's own
class, unchanged. With one:
- the processing info answers each image's token count with the budget (``get_num_image_tokens``, from the image's
  size, before the tower runs), so vLLM puts that many placeholders in the prompt and the KV cache holds only them;
- ``_process_image_input`` runs the tower with every token (CLS included), captures the feature layer's q / k when
  the method needs attention, runs the method, and returns the kept tokens projected (a "projector"-stage method
  selects after the projector), the same tokens vlmzip sends on transformers;
- each image's cache identity carries the method and budget (:func:`vlmzip.vllm.settings.salted`).
Positions are 1-D and contiguous over the shorter prompt, as vlmzip (and the released VisionZip code) do.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..methods import TokenLayout
from . import settings as vz
from .tower import Tower

SUPPORTED_TOWERS = ("clip_vision_model", "siglip_vision_model")


def llava_layout(config: Any) -> TokenLayout:
    """The token layout of one LLaVA image (clear error for a configuration vlmzip cannot lay out)."""
    vision = config.vision_config
    if vision.model_type not in SUPPORTED_TOWERS:
        raise ValueError(f"vlmzip in vLLM: LLaVA with a {vision.model_type!r} tower is not supported; supported "
                         f"towers: {', '.join(SUPPORTED_TOWERS)}")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vlmzip in vLLM: vision_feature_layer={config.vision_feature_layer!r} concatenates "
                         "several layers; vlmzip needs a single feature layer (e.g. -2 as in LLaVA-1.5)")
    strategy = config.vision_feature_select_strategy
    has_cls = vision.model_type == "clip_vision_model"
    if strategy not in ("default", "full") or (strategy == "default" and not has_cls):
        raise ValueError(f"vlmzip in vLLM: unsupported vision_feature_select_strategy {strategy!r} for this tower")
    side = vision.image_size // vision.patch_size
    return TokenLayout(num_prefix=int(has_cls), grid=(side, side), send_prefix=strategy == "full")


def checked_settings(config: Any) -> vz.Settings | None:
    """The config's vlmzip settings, checked against this model (the budget fits an image): start-up errors."""
    found = vz.from_config(config)
    if found is not None:
        found.keep(llava_layout(config).vanilla, "an image of this model")
    return found


class VlmzipLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info; with vlmzip on, an image's token count is its budget."""

    @cached_property
    def vlmzip(self) -> vz.Settings | None:
        return checked_settings(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        vanilla = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return vanilla if self.vlmzip is None else self.vlmzip.keep(vanilla)


class VlmzipLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """LLaVA's processor with the method and budget in every image's cache identity."""

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)
        found = self.info.vlmzip
        return {modality: [vz.salted(h, found) for h in items] for modality, items in hashes.items()}


@MULTIMODAL_REGISTRY.register_processor(
    VlmzipLlavaMultiModalProcessor, info=VlmzipLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VlmzipLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with a ``vlmzip`` config entry, each image sends its budget of tokens to the LLM."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vlmzip = checked_settings(self.config)
        if self.vlmzip is not None:
            self.vlmzip_layout = llava_layout(self.config)
            self.vlmzip_tower = Tower(self.vision_tower, self.vlmzip_layout)
            self.vlmzip_tower.check(self.vlmzip.spec.needs, self.vlmzip.method)

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        found = self.vlmzip
        if found is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.stack(list(pixel_values))
        tokens = self.vlmzip_tower.run(pixel_values, found.spec.needs, feature_select_strategy="full")
        projected = found.spec.stage == "projector"
        if projected:
            tokens.hidden = self.multi_modal_projector(tokens.hidden)
        keep = found.keep(self.vlmzip_layout.vanilla)
        features = vz.select(found, tokens, keep).features
        return features if projected else self.multi_modal_projector(features)
