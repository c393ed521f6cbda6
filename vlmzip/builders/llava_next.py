"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres) built from config classes: random weights.

``build_llava_next(out_dir, LlavaNextSpec(...))`` returns (model, processor) and, with ``out_dir``, writes a
folder that loads like any Hugging Face LLaVA-NeXT checkpoint, offline. The architecture is the real one
(CLIP ViT with CLS -> 2-layer GELU MLP projector -> Llama decoder, plus the learned ``image_newline``);
each image is cut into a base crop and a grid of high-resolution crops chosen among ``grid_pinpoints``, so
images of different aspect ratios get different crop counts and token counts. ``arch:llava-next-7b`` is
LLaVA-NeXT-7B's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .llava import (
    CHAT_TEMPLATE,
    LlavaSpec,
    build_tokenizer,
    clip_vision_config,
    finish,
    instantiate,
    llama_text_config,
)
from .registry import Arch, register_arch

# LLaVA-NeXT's pinpoints, (height, width) in units of the crop size (336 px for the real model).
PINPOINT_CROPS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


@dataclass
class LlavaNextSpec(LlavaSpec):
    """A LLaVA-NeXT: LlavaSpec's knobs plus the anyres resolutions.

    ``grid_pinpoints``: the (height, width) resolutions an image may be resized to before it is cut into
    ``image_size`` crops; None = LLaVA-NeXT's five (1x2, 2x1, 2x2, 3x1, 1x3 crops) at this ``image_size``.
    """

    image_size: int = 84
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    def pinpoints(self) -> list[list[int]]:
        """The pinpoints in pixels, as ``LlavaNextConfig.image_grid_pinpoints`` takes them."""
        if self.grid_pinpoints is not None:
            return [list(p) for p in self.grid_pinpoints]
        return [[h * self.image_size, w * self.image_size] for h, w in PINPOINT_CROPS]


def build_processor(spec: LlavaNextSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaNextProcessor:
    """LlavaNextProcessor with the PIL image processor: base crop + high-resolution crops per image."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=spec.pinpoints(),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def llava_next_config(spec: LlavaNextSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaNextConfig:
    """The transformers LlavaNextConfig (CLIP vision + Llama text + pinpoints) for these sizes."""
    vision, text = clip_vision_config(spec), llama_text_config(spec, tokenizer)
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        image_grid_pinpoints=spec.pinpoints(),
        projector_hidden_act="gelu",
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava_next(
    out_dir: str | Path | None = None,
    spec: LlavaNextSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Build a randomly initialised LLaVA-NeXT + processor (weights created directly on ``device`` in
    ``dtype``); save both to ``out_dir`` when given."""
    spec = spec or LlavaNextSpec()
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    model = instantiate(LlavaNextForConditionalGeneration, llava_next_config(spec, tokenizer), spec.seed, device,
                        dtype)
    finish(model, processor, tokenizer, out_dir)
    return model, processor


register_arch(Arch(
    "llava-next-7b", "llava-next", build_llava_next,
    # LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): CLIP ViT-L/14-336 (24 layers, 1024 wide) + Vicuna-7B (32 x 4096).
    LlavaNextSpec(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                  text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
                  max_positions=4096, vocab_size=32064,
                  grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))),
    "LLaVA-NeXT-7B (Vicuna): anyres, base crop + up to 2x2 high-resolution crops of 576 tokens",
))
