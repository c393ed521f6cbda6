"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``) built from config classes: random weights.

``build_llava_next_video(out_dir, LlavaNextVideoSpec(...))`` returns (model, processor) and, with ``out_dir``, writes
a folder that loads like a Hugging Face LLaVA-NeXT-Video checkpoint, offline (the processor with
``vlmzip.adapters.llava_next_video.load_processor``, which is ``AutoProcessor`` where torchvision is installed). The
architecture is the real one: LLaVA-NeXT's (CLIP ViT with CLS -> 2-layer GELU MLP projector -> Llama decoder, anyres
crops for images, the learned ``image_newline``) plus the video path, each frame through the tower, its patch grid
pooled 2 x 2 (``spatial_pool_mode`` average) and projected. ``arch:llava-next-video-7b`` is LLaVA-NeXT-Video-7B's
shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..adapters.llava_next_video import LlavaNextVideoPilVideoProcessor, PilLlavaNextVideoProcessor
from .llava import VIDEO_CHAT_TEMPLATE, clip_vision_config, finish, instantiate, llama_text_config
from .llava_next import LlavaNextSpec
from .llava_next import build_processor as build_image_processor_of
from .registry import Arch, register_arch
from .words import word_tokenizer

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]

CHAT_TEMPLATE = VIDEO_CHAT_TEMPLATE  # Vicuna's format with videos


@dataclass
class LlavaNextVideoSpec(LlavaNextSpec):
    """A LLaVA-NeXT-Video: LlavaNextSpec's knobs (tower, LLM, anyres pinpoints) plus the video pooling.

    ``image_size`` / ``patch_size`` must give an even patch grid (the processor counts side^2 // 4 tokens per frame,
    the 2 x 2 pooling floors): 112 / 14 -> 8 x 8 patches -> 16 tokens per frame.
    """

    image_size: int = 112
    text_layers: int = 5
    spatial_pool_mode: str = "average"
    spatial_pool_stride: int = 2

    @property
    def frame_tokens(self) -> int:
        """Tokens the model sends per video frame: the pooled patch grid."""
        return (self.image_size // self.patch_size // self.spatial_pool_stride) ** 2


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with LLaVA's special tokens and ``<video>``."""
    return word_tokenizer(words, SPECIAL_TOKENS, unk="<unk>", bos="<s>", eos_token="</s>", pad_token="<pad>",
                          padding_side="left", chat_template=CHAT_TEMPLATE)


def build_processor(spec: LlavaNextVideoSpec, tokenizer: PreTrainedTokenizerFast) -> PilLlavaNextVideoProcessor:
    """LlavaNextVideoProcessor: LLaVA-NeXT's PIL image processor for images; for videos, each frame resized to
    ``image_size`` on its short side and centre-cropped (the torchvision-free video processor)."""
    images = build_image_processor_of(spec, tokenizer).image_processor
    videos = LlavaNextVideoPilVideoProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    return PilLlavaNextVideoProcessor(
        video_processor=videos, image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        patch_size=spec.patch_size, vision_feature_select_strategy=spec.select_strategy,
        num_additional_image_tokens=1,
    )


def llava_next_video_config(spec: LlavaNextVideoSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaNextVideoConfig:
    """The transformers LlavaNextVideoConfig (CLIP vision + Llama text + pinpoints + pooling) for these sizes."""
    if (spec.image_size // spec.patch_size) % spec.spatial_pool_stride:
        raise ValueError(f"image_size / patch_size = {spec.image_size // spec.patch_size} patches a side must be a "
                         f"multiple of spatial_pool_stride={spec.spatial_pool_stride} (the processor counts "
                         "side^2 // 4 tokens per frame)")
    vision, text = clip_vision_config(spec), llama_text_config(spec, tokenizer)
    return LlavaNextVideoConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        image_grid_pinpoints=spec.pinpoints(),
        projector_hidden_act="gelu",
        spatial_pool_mode=spec.spatial_pool_mode,
        spatial_pool_stride=spec.spatial_pool_stride,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        video_seq_length=spec.frame_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava_next_video(
    out_dir: str | Path | None = None,
    spec: LlavaNextVideoSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaNextVideoForConditionalGeneration, PilLlavaNextVideoProcessor]:
    """Build a randomly initialised LLaVA-NeXT-Video + processor (weights created directly on ``device`` in
    ``dtype``; ``"meta"``: shapes only); save both to ``out_dir`` when given."""
    spec = spec or LlavaNextVideoSpec()
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    model = instantiate(LlavaNextVideoForConditionalGeneration, llava_next_video_config(spec, tokenizer), spec.seed,
                        device, dtype)
    finish(model, processor, tokenizer, out_dir, processor_class="LlavaNextVideoProcessor")
    return model, processor


register_arch(Arch(
    "llava-next-video-7b", "llava-next-video", build_llava_next_video,
    # LLaVA-NeXT-Video-7B (llava-hf/LLaVA-NeXT-Video-7B-hf): CLIP ViT-L/14-336 (24 layers, 1024 wide, 16 heads) +
    # Vicuna-7B (32 layers x 4096, 32 heads, MLP 11008, vocab 32064, 4096 positions); LLaVA-NeXT's anyres pinpoints
    # for images; videos: 336 px frames, 24 x 24 patches average-pooled 2 x 2 to 144 tokens per frame.
    LlavaNextVideoSpec(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                       text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
                       max_positions=4096, vocab_size=32064,
                       grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))),
    "LLaVA-NeXT-Video-7B (Vicuna): anyres images; video frames of 576 CLIP patches pooled 2 x 2 to 144 tokens",
))
