"""Video-LLaVA (``VideoLlavaForConditionalGeneration``) built from config classes: random weights.

``build_video_llava(out_dir, VideoLlavaSpec(...))`` returns (model, processor) and, with ``out_dir``, writes a
folder that loads offline (``VideoLlavaForConditionalGeneration.from_pretrained``; the processor with
``vlmzip.adapters.video_llava.load_processor``, which is ``AutoProcessor`` where transformers can build
Video-LLaVA's video processor). The architecture is the real one (two CLIP ViT towers, images and videos, ->
one 2-layer GELU MLP projector -> Llama decoder); only the sizes are the spec's. ``arch:video-llava-7b`` is
Video-LLaVA-7B's shapes (LanguageBind towers: CLIP ViT-L/14 at 224 px, 256 patches + CLS per frame; Vicuna-7B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, VideoLlavaConfig, VideoLlavaForConditionalGeneration
from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

from ..adapters.video_llava import FrameVideoLlavaProcessor
from .llava import VIDEO_CHAT_TEMPLATE, LlavaSpec, clip_vision_config, finish, instantiate, llama_text_config
from .registry import Arch, register_arch
from .words import word_tokenizer

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]

CHAT_TEMPLATE = VIDEO_CHAT_TEMPLATE  # Vicuna's format with videos


@dataclass
class VideoLlavaSpec(LlavaSpec):
    """LLaVA's knobs at Video-LLaVA's defaults (224 px towers), plus the frames a video has by default (what
    ``video_seq_length`` records: frames x (patches + CLS))."""

    image_size: int = 224
    frames: int = 8


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with Video-LLaVA's special tokens (``<s>`` before every text)."""
    return word_tokenizer(words, SPECIAL_TOKENS, unk="<unk>", bos="<s>", eos_token="</s>", pad_token="<pad>",
                          padding_side="left", chat_template=CHAT_TEMPLATE)


def build_processor(spec: VideoLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> FrameVideoLlavaProcessor:
    """Video-LLaVA's processor (its PIL image processor for images and, frame by frame, for videos)."""
    image_processor = VideoLlavaImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return FrameVideoLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                                    vision_feature_select_strategy=spec.select_strategy,
                                    num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def video_llava_config(spec: VideoLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> VideoLlavaConfig:
    """The transformers VideoLlavaConfig (CLIP vision for both towers + Llama text) for these sizes."""
    patches = (spec.image_size // spec.patch_size) ** 2
    return VideoLlavaConfig(
        vision_config=clip_vision_config(spec),
        text_config=llama_text_config(spec, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        projector_hidden_act="gelu",
        image_seq_length=patches + (1 if spec.select_strategy == "full" else 0),
        video_seq_length=spec.frames * (patches + 1),
        pad_token_id=tokenizer.pad_token_id,
    )


def build_video_llava(
    out_dir: str | Path | None = None,
    spec: VideoLlavaSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[VideoLlavaForConditionalGeneration, FrameVideoLlavaProcessor]:
    """Build a randomly initialised Video-LLaVA + processor (weights created directly on ``device`` in
    ``dtype``); save both to ``out_dir`` when given."""
    spec = spec or VideoLlavaSpec()
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    model = instantiate(VideoLlavaForConditionalGeneration, video_llava_config(spec, tokenizer), spec.seed, device,
                        dtype)
    finish(model, processor, tokenizer, out_dir, processor_class="VideoLlavaProcessor")
    return model, processor


register_arch(Arch(
    "video-llava-7b", "video-llava", build_video_llava,
    # Video-LLaVA-7B: two LanguageBind CLIP ViT-L/14 towers at 224 px (24 layers, 1024 wide) + Vicuna-7B
    # (Llama, 32 layers, 4096 wide); a video is 8 frames of 256 patches + CLS.
    VideoLlavaSpec(image_size=224, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                   text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
                   max_positions=4096, vocab_size=32064, frames=8),
    "Video-LLaVA-7B: two CLIP ViT-L/14-224 towers (images, videos) + Vicuna-7B; 256 tokens per image, "
    "8 frames x 257 per video",
))
