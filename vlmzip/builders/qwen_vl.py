"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL built from config classes: random weights, no download.

``build_qwen_vl(out_dir, QwenVLSpec(...), version="2" | "2.5" | "3")`` returns (model, processor) and, with
``out_dir``, writes a folder that loads like a Hugging Face Qwen-VL checkpoint, offline
(``AutoModelForImageTextToText.from_pretrained(dir)``; the processor with ``vlmzip.adapters.qwen_vl.load_processor``,
which is ``AutoProcessor`` where transformers can build Qwen's video processor). The architecture is the real
one (ViT with 2-D RoPE -> 2x2 PatchMerger -> Qwen2 decoder with M-RoPE; Qwen2.5: window attention with
full-attention blocks at ``fullatt_block_indexes``; Qwen3: learned position embeddings, DeepStack mergers of the
blocks at ``deepstack_layers`` added to the first decoder layers, a Qwen3 decoder); only the sizes are the
spec's. The processor is transformers' Qwen processor of the version with the PIL image processor (the spec's
``min_pixels`` / ``max_pixels``, so images of different sizes get different grids) and vlmzip's torchvision-free
video processor; the saved ``processor_config.json`` holds the video settings transformers' own video processor
reads. ``arch:qwen2-vl-7b``, ``arch:qwen2.5-vl-7b``
and ``arch:qwen3-vl-8b`` are the released shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..adapters.qwen_vl import VIDEO_KEYS, ImageOnlyQwenProcessor, torchvision_free_processor
from .llava import finish, instantiate
from .registry import Arch, register_arch
from .words import BASE_WORDS, word_tokenizer

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat format (the image / video parts as the released template writes them).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class QwenVLSpec:
    """Every knob of a Qwen-VL built from config: version, vision tower, merger, language model, processor
    pixels, words. ``text_layers`` sets the decoder depth."""

    version: str = "2"  # "2": Qwen2-VL, "2.5": Qwen2.5-VL, "3": Qwen3-VL
    patch_size: int = 8
    merge_size: int = 2
    temporal_patch_size: int = 2
    vision_hidden: int = 32  # Qwen2-VL: embed_dim; Qwen2.5-VL: hidden_size
    vision_layers: int = 4
    vision_heads: int = 2
    vision_intermediate: int | None = None  # Qwen2.5-VL MLP width (default 2 * vision_hidden)
    window_size: int = 32  # Qwen2.5-VL: window side in pixels (here 2 x 2 merged tokens)
    fullatt_block_indexes: tuple[int, ...] = (1, 2)  # Qwen2.5-VL: the last block stays windowed
    tokens_per_second: int = 2
    deepstack_layers: tuple[int, ...] = (0, 1)  # Qwen3-VL: the tower blocks whose features go to decoder layers 0..
    position_grid: int = 8  # Qwen3-VL: side of the learned position-embedding grid (resampled to each image)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int | None = None  # default 4 * text_hidden
    mrope_section: tuple[int, int, int] | None = None  # default: head_dim / 2 split 1/4, 3/8, 3/8
    rope_theta: float = 1_000_000.0
    max_positions: int = 4096
    vocab_size: int | None = None  # pad the LM vocabulary to this size (real models: 152064)
    min_pixels: int = 32 * 32
    max_pixels: int = 128 * 128
    video_min_pixels: int | None = None  # a video frame's pixel bounds (default: the images'; Qwen3-VL: the clip's)
    video_max_pixels: int | None = None
    words: tuple[str, ...] = tuple(BASE_WORDS)
    seed: int = 0


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with Qwen's special tokens (no begin-of-text token)."""
    return word_tokenizer(words, SPECIAL_TOKENS, unk="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          padding_side="left", chat_template=CHAT_TEMPLATE)


def default_mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (t, h, w) as Qwen does (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


VERSIONS = {"2": Qwen2VLForConditionalGeneration, "2.5": Qwen2_5_VLForConditionalGeneration,
            "3": Qwen3VLForConditionalGeneration, "3-moe": Qwen3VLMoeForConditionalGeneration,
            "3.5": Qwen3_5ForConditionalGeneration}
PROCESSORS = {"2": "Qwen2VLProcessor", "2.5": "Qwen2_5_VLProcessor", "3": "Qwen3VLProcessor",
              "3-moe": "Qwen3VLProcessor", "3.5": "Qwen3VLProcessor"}


def check_version(version: str) -> str:
    """``version`` if it is "2" (Qwen2-VL), "2.5" (Qwen2.5-VL), "3" (Qwen3-VL), "3-moe" (Qwen3-VL-MoE) or "3.5"
    (Qwen3.5: linear-attention layers between full-attention ones, no DeepStack); a clear error otherwise."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    return version


def qwen_config(spec: QwenVLSpec, tokenizer: PreTrainedTokenizerFast, version: str | None = None) -> Qwen2VLConfig:
    """The transformers Qwen2VLConfig / Qwen2_5_VLConfig for these sizes and this tokenizer."""
    version = check_version(version or spec.version)
    head_dim = spec.text_hidden // spec.text_heads
    section = list(spec.mrope_section) if spec.mrope_section else default_mrope_section(head_dim)
    text = dict(
        vocab_size=max(len(tokenizer), spec.vocab_size or 0),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": section},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(
        depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    if version == "2":
        vision = dict(common, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden, mlp_ratio=4)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if version.startswith("3"):
        vision = dict(common, hidden_size=spec.vision_hidden, out_hidden_size=spec.text_hidden,
                      intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
                      num_position_embeddings=spec.position_grid**2)
        # real Qwen3-VL configs say so; transformers always interleaves the sections, vLLM reads the flag
        text = dict(text, head_dim=head_dim, rope_parameters={**text["rope_parameters"], "mrope_interleaved": True})
        if version == "3.5":  # three linear-attention (Gated DeltaNet) layers to each full-attention one
            text.update(layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                     for i in range(spec.text_layers)], linear_num_key_heads=spec.text_kv_heads,
                        linear_num_value_heads=spec.text_heads, linear_key_head_dim=head_dim,
                        linear_value_head_dim=head_dim)
            return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        vision["deepstack_visual_indexes"] = list(spec.deepstack_layers)
        if version == "3-moe":  # every decoder layer a mixture of experts
            # norm_topk_prob: as real configs say (transformers always renormalises the top-k weights; vLLM reads it)
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text["intermediate_size"] // 2,
                        decoder_sparse_step=1, norm_topk_prob=True)
            return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    vision = dict(
        common, hidden_size=spec.vision_hidden, out_hidden_size=spec.text_hidden,
        intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden, window_size=spec.window_size,
        fullatt_block_indexes=list(spec.fullatt_block_indexes), tokens_per_second=spec.tokens_per_second,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_processor(spec: QwenVLSpec, tokenizer: PreTrainedTokenizerFast) -> ImageOnlyQwenProcessor:
    """The Qwen2-VL processor (PIL image processor, no video processor) for these sizes: what is saved."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
    )
    return ImageOnlyQwenProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def video_settings(spec: QwenVLSpec, version: str) -> dict:
    """The video processor config saved with the model (``processor_config.json``'s ``video_processor``), as
    transformers saves Qwen's: the image processor's normalisation, ``size`` from the spec's video pixel bounds
    (Qwen3-VL: bounds on the whole clip's pixels), no frame sampling (the frames passed are the frames used)."""
    image = build_processor(spec, build_tokenizer(spec.words)).image_processor
    kind = "Qwen3VLVideoProcessor" if version.startswith("3") else "Qwen2VLVideoProcessor"
    low = spec.video_min_pixels or spec.min_pixels
    high = spec.video_max_pixels or spec.max_pixels
    return {
        "video_processor_type": kind, "size": {"shortest_edge": low, "longest_edge": high},
        "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size, "merge_size": spec.merge_size,
        "image_mean": list(image.image_mean), "image_std": list(image.image_std),
        "rescale_factor": image.rescale_factor, "resample": int(image.resample), "do_resize": True,
        "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "do_sample_frames": False,
        "cap_pixels_per_frame": False,
    }


def build_qwen_vl(
    out_dir: str | Path | None = None,
    spec: QwenVLSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    version: str | None = None,
):
    """Build a randomly initialised Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``; default: the
    spec's ``version``) + processor (weights created directly on ``device`` in ``dtype``); save both to
    ``out_dir`` when given. The processor returned takes images and videos (transformers' Qwen processor of the
    version with vlmzip's torchvision-free video processor)."""
    spec = spec or QwenVLSpec()
    version = check_version(version or spec.version)
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    config = qwen_config(spec, tokenizer, version)
    model = instantiate(VERSIONS[version], config, spec.seed, device, dtype)
    model.generation_config.bos_token_id = None
    finish(model, processor, tokenizer, out_dir, processor_class=PROCESSORS[version])
    video = video_settings(spec, version)
    if out_dir is not None:
        path = Path(out_dir) / "processor_config.json"
        saved = json.loads(path.read_text())
        saved["video_processor"] = video
        path.write_text(json.dumps(saved, indent=2) + "\n")
    full = torchvision_free_processor(processor.image_processor, tokenizer, CHAT_TEMPLATE, config.model_type,
                                      {k: v for k, v in video.items() if k in VIDEO_KEYS})
    return model, full


_QWEN_7B_TEXT = dict(text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
                     mrope_section=(16, 24, 24), vocab_size=152064, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
ARCHS = (register_arch(Arch(
    "qwen2-vl-7b", "qwen-vl", build_qwen_vl,
    # Qwen2-VL-7B-Instruct: ViT 32 x 1280 (16 heads, quick-GELU MLP x4) -> merger -> Qwen2-7B text
    # (28 layers x 3584, 28 heads, 4 KV heads, intermediate 18944), mrope_section [16, 24, 24].
    QwenVLSpec(version="2", patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16,
               max_positions=32768, **_QWEN_7B_TEXT),
    "Qwen2-VL-7B: dynamic resolution, 2x2 merged tokens, M-RoPE",
)), register_arch(Arch(
    "qwen2.5-vl-7b", "qwen-vl", build_qwen_vl,
    # Qwen2.5-VL-7B-Instruct: ViT 32 x 1280 (16 heads, SwiGLU 3420, window 112 px, full attention at
    # blocks 7, 15, 23, 31) -> merger -> the same 7B text shapes; tokens_per_second 2.
    QwenVLSpec(version="2.5", patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16,
               vision_intermediate=3420, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
               tokens_per_second=2, max_positions=128000, **_QWEN_7B_TEXT),
    "Qwen2.5-VL-7B: dynamic resolution, windowed ViT, 2x2 merged tokens, M-RoPE",
)), register_arch(Arch(
    "qwen3-vl-8b", "qwen-vl", build_qwen_vl,
    # Qwen3-VL-8B-Instruct: ViT 27 x 1152 (16 heads, intermediate 4304, patch 16, 48 x 48 learned position grid,
    # DeepStack from blocks 8, 16, 24) -> merger -> Qwen3-8B text (36 layers x 4096, 32 heads, 8 KV heads, head
    # dim 128, intermediate 12288, vocab 151936), interleaved M-RoPE sections [24, 20, 20], rope theta 5e6.
    QwenVLSpec(version="3", patch_size=16, vision_hidden=1152, vision_layers=27, vision_heads=16,
               vision_intermediate=4304, deepstack_layers=(8, 16, 24), position_grid=48, text_hidden=4096,
               text_layers=36, text_heads=32, text_kv_heads=8, text_intermediate=12288, mrope_section=(24, 20, 20),
               rope_theta=5_000_000.0, max_positions=262144, vocab_size=151936,
               # the released processor's pixel-count bounds (its size "shortest_edge" / "longest_edge")
               min_pixels=256 * 256, max_pixels=4096 * 4096),
    "Qwen3-VL-8B: dynamic resolution, 2x2 merged tokens, DeepStack features in the first decoder layers, M-RoPE",
)))  # this family's arch: models
