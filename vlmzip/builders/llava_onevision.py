"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) built from config classes: random weights.

``build_llava_onevision(out_dir, LlavaOnevisionSpec(...))`` returns (model, processor) and, with ``out_dir``,
writes a folder that loads like a Hugging Face LLaVA-OneVision checkpoint, offline
(``AutoModelForImageTextToText.from_pretrained(dir)``; the processor with
``vlmzip.adapters.llava_onevision.load_processor``, which is ``AutoProcessor`` where torchvision is installed).
The architecture is the real one (SigLIP tower without CLS -> 2-layer GELU MLP projector -> Qwen2 decoder, plus
the learned ``image_newline``); each single image is cut into a base crop and a grid of high-resolution crops
chosen among the pinpoints, and a high-resolution grid larger than ``vision_aspect_ratio`` allows (``anyres_max_N``)
is pooled, so images of different sizes get different crop and token counts; a video's frames are one crop each,
their projected patches shrunk 2 x 2 (bilinear), one newline token after the video. ``arch:llava-onevision-7b``
is LLaVA-OneVision-Qwen2-7B's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from ..adapters.llava_onevision import OnevisionPilVideoProcessor, PilOnevisionProcessor
from .llava import finish, instantiate
from .registry import Arch, register_arch
from .words import BASE_WORDS, word_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<image>", "<video>"]

# LLaVA-OneVision's Qwen conversation format ("qwen_1_5"): images (then videos) before the text of a turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}<video>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def square_grids(n: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) grid of 1..n crops a side, rows first (the released pinpoints: n = 6)."""
    return tuple((rows, cols) for rows in range(1, n + 1) for cols in range(1, n + 1))


# The small models' crop grids: 1 x 1 to 2 x 2 and 1 x 3 / 3 x 1 (with anyres_max_2, the 2 x 2 and 1 x 3 grids
# are pooled, the 1 x 2 ones are not).
SMALL_GRIDS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


@dataclass
class LlavaOnevisionSpec:
    """Every knob of a LLaVA-OneVision built from config: SigLIP tower, projector, Qwen2 LLM, anyres crops, words.

    ``image_size``: the side of a crop in pixels (the tower's input); ``grid_crops``: the (rows, cols) crop grids a
    single image may be cut into (its pinpoints are these times ``image_size``; the released model: every grid of
    1..6 crops a side, :func:`square_grids`); ``vision_aspect_ratio``: ``anyres_max_N``, a high-resolution grid of
    more than about N crops' patches is pooled to N crops' worth. ``text_layers``: the decoder depth.
    """

    image_size: int = 98
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int | None = None  # default 4 * vision_hidden
    vision_feature_layer: int = -1
    select_strategy: str = "full"
    text_hidden: int = 64
    text_layers: int = 5
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int | None = None  # default 4 * text_hidden
    rope_theta: float = 1_000_000.0
    max_positions: int = 4096
    vocab_size: int | None = None  # pad the LM vocabulary to this size (the released model: 152064)
    grid_crops: tuple[tuple[int, int], ...] = SMALL_GRIDS
    vision_aspect_ratio: str = "anyres_max_2"
    words: tuple[str, ...] = tuple(BASE_WORDS)
    seed: int = 0

    def pinpoints(self) -> list[list[int]]:
        """The pinpoints in pixels, (height, width), as ``LlavaOnevisionConfig.image_grid_pinpoints`` takes them."""
        return [[rows * self.image_size, cols * self.image_size] for rows, cols in self.grid_crops]

    @property
    def patches_per_crop(self) -> int:
        """Tokens the tower gives one crop (no CLS): (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with LLaVA-OneVision's (Qwen's) special tokens, no begin-of-text."""
    return word_tokenizer(words, SPECIAL_TOKENS, unk="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          padding_side="left", chat_template=CHAT_TEMPLATE)


def build_processor(spec: LlavaOnevisionSpec, tokenizer: PreTrainedTokenizerFast) -> PilOnevisionProcessor:
    """LLaVA-OneVision's processor (PIL image processor: base crop + high-resolution crops per single image, one
    padded square crop per image of a multi-image prompt; video frames resized to one square crop by the
    torchvision-free video processor) for these sizes."""
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size}, image_grid_pinpoints=spec.pinpoints(),
    )
    videos = OnevisionPilVideoProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                        image_mean=image_processor.image_mean, image_std=image_processor.image_std)
    return PilOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=videos,
        num_image_tokens=spec.patches_per_crop,
        vision_feature_select_strategy=spec.select_strategy, chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio=spec.vision_aspect_ratio,
    )


def onevision_config(spec: LlavaOnevisionSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaOnevisionConfig:
    """The transformers LlavaOnevisionConfig (SigLIP vision + Qwen2 text + pinpoints) for these sizes."""
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=max(len(tokenizer), spec.vocab_size or 0),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        image_grid_pinpoints=spec.pinpoints(),
        vision_aspect_ratio=spec.vision_aspect_ratio,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava_onevision(
    out_dir: str | Path | None = None,
    spec: LlavaOnevisionSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaOnevisionForConditionalGeneration, PilOnevisionProcessor]:
    """Build a randomly initialised LLaVA-OneVision + processor (weights created directly on ``device`` in
    ``dtype``; ``"meta"``: shapes only); save both to ``out_dir`` when given."""
    spec = spec or LlavaOnevisionSpec()
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    model = instantiate(LlavaOnevisionForConditionalGeneration, onevision_config(spec, tokenizer), spec.seed,
                        device, dtype)
    model.generation_config.bos_token_id = None
    finish(model, processor, tokenizer, out_dir, processor_class="LlavaOnevisionProcessor")
    return model, processor


register_arch(Arch(
    "llava-onevision-7b", "llava-onevision", build_llava_onevision,
    # LLaVA-OneVision-Qwen2-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf): SigLIP so400m-patch14-384 (27 layers as
    # its hub config lists them, 1152 wide, 16 heads, MLP 4304; the original code drops the last layer, which is
    # transformers' LlavaOnevisionConfig default of 26) without head, vision_feature_layer -1, "full" strategy,
    # 384 px crops of 27 x 27 = 729 patches; Qwen2-7B (28 layers x 3584, 28 heads, 4 KV heads, MLP 18944,
    # vocab 152064, rope_theta 1e6, 32768 positions); anyres_max_9 over the 6 x 6 pinpoints 384..2304 px.
    LlavaOnevisionSpec(image_size=384, patch_size=14, vision_hidden=1152, vision_layers=27, vision_heads=16,
                       vision_intermediate=4304, text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4,
                       text_intermediate=18944, max_positions=32768, vocab_size=152064, grid_crops=square_grids(6),
                       vision_aspect_ratio="anyres_max_9"),
    "LLaVA-OneVision-7B (Qwen2): SigLIP, anyres_max_9, base crop + up to 6 x 6 crops of 729 tokens "
    "(bilinearly shrunk beyond 9 crops' worth)",
))
