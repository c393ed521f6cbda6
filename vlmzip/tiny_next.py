"""Small LLaVA-NeXT (anyres) checkpoints built from config classes (random weights, no download).

``build_llava_next(out_dir, TinyLlavaNextConfig(...))`` writes a directory that loads like any Hugging
Face LLaVA-NeXT checkpoint: ``LlavaNextForConditionalGeneration.from_pretrained(dir)`` (or
``AutoModelForImageTextToText``) and ``AutoProcessor.from_pretrained(dir)``, offline. The architecture is
the real one (CLIP ViT with CLS -> 2-layer GELU MLP projector -> Llama decoder, plus the learned
``image_newline``); each image is cut into a base crop and a grid of high-resolution crops chosen among
``grid_pinpoints``, so images of different aspect ratios get different crop counts and token counts.

``ARCHITECTURES_NEXT`` holds the real LLaVA-NeXT-7B (Vicuna-7B) shapes; a reduced-depth build is one field:
``dataclasses.replace(ARCHITECTURES_NEXT["llava-next-7b"], text_layers=4)``.
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

from .tiny import CHAT_TEMPLATE, TinyLlavaConfig, build_tokenizer, clip_vision_config, llama_text_config

# LLaVA-NeXT's pinpoints, (height, width) in units of the crop size (336 px for the real model).
PINPOINT_CROPS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


@dataclass
class TinyLlavaNextConfig(TinyLlavaConfig):
    """A small LLaVA-NeXT: TinyLlavaConfig's knobs plus the anyres resolutions.

    ``grid_pinpoints``: the (height, width) resolutions an image may be resized to before it is cut into
    ``image_size`` crops; None = LLaVA-NeXT's five (1x2, 2x1, 2x2, 3x1, 1x3 crops) at this ``image_size``.
    """

    image_size: int = 84
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    def pinpoints(self) -> list[list[int]]:
        if self.grid_pinpoints is not None:
            return [list(p) for p in self.grid_pinpoints]
        return [[h * self.image_size, w * self.image_size] for h, w in PINPOINT_CROPS]


ARCHITECTURES_NEXT: dict[str, TinyLlavaNextConfig] = {
    # LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): CLIP ViT-L/14-336 (24 layers, 1024 wide) + Vicuna-7B (32 x 4096).
    "llava-next-7b": TinyLlavaNextConfig(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
        max_positions=4096, vocab_size=32064,
        grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    ),
}


def build_next_processor(cfg: TinyLlavaNextConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaNextProcessor:
    """LlavaNextProcessor with the PIL image processor: base crop + high-resolution crops per image."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_grid_pinpoints=cfg.pinpoints(),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy=cfg.select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def llava_next_config(cfg: TinyLlavaNextConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaNextConfig:
    """The transformers LlavaNextConfig (CLIP vision + Llama text + pinpoints) for these sizes."""
    vision, text = clip_vision_config(cfg), llama_text_config(cfg, tokenizer)
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.select_strategy,
        image_grid_pinpoints=cfg.pinpoints(),
        projector_hidden_act="gelu",
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava_next(
    out_dir: str | Path | None = None,
    cfg: TinyLlavaNextConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Build a randomly initialised LLaVA-NeXT + processor (weights created directly on ``device`` in
    ``dtype``); save both to ``out_dir`` when given."""
    cfg = cfg or TinyLlavaNextConfig()
    tokenizer = build_tokenizer(cfg.words)
    processor = build_next_processor(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(llava_next_config(cfg, tokenizer), dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor
