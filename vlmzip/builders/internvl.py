"""InternVL (``InternVLForConditionalGeneration``, InternVL3 layout) built from config classes: random weights.

``build_internvl(out_dir, InternVLSpec(...))`` returns (model, processor) and, with ``out_dir``, writes a folder
that loads like a Hugging Face InternVL checkpoint, offline (``AutoModelForImageTextToText.from_pretrained(dir)``;
the processor with ``vlmzip.adapters.internvl.load_processor``, which is ``AutoProcessor`` where transformers can
build InternVL's video processor). The architecture is the real one (InternViT with CLS, layer scale and
absolute positions -> pixel shuffle -> LayerNorm + 2-layer GELU MLP projector -> Qwen2 decoder); only the sizes
are the spec's. The processor is InternVL's with the PIL GOT-OCR2 image processor: each image is cut into up to
``max_patches`` tiles of ``image_size`` px on the grid closest to its aspect ratio, plus a thumbnail when there
is more than one tile, so images of different shapes get different tile and token counts.
``arch:internvl3-8b`` is InternVL3-8B's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from ..adapters.internvl import ImageOnlyInternVLProcessor
from .llava import finish, instantiate
from .registry import Arch, register_arch
from .words import BASE_WORDS, word_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# The roles InternVL's processor reads from its tokenizer (tokenizer.context_image_token, ...).
NAMED_TOKENS = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>",
                "video_token": "<video>"}

# The chat format of the converted InternVL3 checkpoints (transformers' convert_internvl_weights_to_hf.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class InternVLSpec:
    """Every knob of an InternVL built from config: tiles, vision tower, pixel shuffle, language model, words.

    ``image_size``: the tile side in pixels (the tower's input); ``min_patches`` / ``max_patches``: the tile
    counts the processor may cut an image into (a thumbnail is added when it cuts more than one).
    ``text_layers`` sets the decoder depth.
    """

    image_size: int = 64
    patch_size: int = 8
    downsample_ratio: float = 0.5
    min_patches: int = 1
    max_patches: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int | None = None  # default 4 * vision_hidden
    vision_attention_bias: bool = True
    use_qk_norm: bool = False  # InternViT-6B: True
    vision_norm: str = "layer_norm"  # InternViT-6B: "rms_norm"
    vision_feature_layer: int = -1
    select_strategy: str = "default"
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int | None = None  # default 4 * text_hidden
    rope_theta: float = 1_000_000.0
    max_positions: int = 4096
    vocab_size: int | None = None  # pad the LM vocabulary to this size (real models: 151674)
    words: tuple[str, ...] = tuple(BASE_WORDS)
    seed: int = 0

    def tokens_per_tile(self) -> int:
        """Visual tokens a tile sends: (image_size / patch_size * downsample_ratio) ** 2 (InternVL3: 256)."""
        return round((self.image_size // self.patch_size * self.downsample_ratio) ** 2)


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with InternVL's special tokens (no begin-of-text token)."""
    return word_tokenizer(words, SPECIAL_TOKENS, unk="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          padding_side="left", chat_template=CHAT_TEMPLATE, extra_special_tokens=NAMED_TOKENS)


def build_processor(spec: InternVLSpec, tokenizer: PreTrainedTokenizerFast) -> ImageOnlyInternVLProcessor:
    """InternVL's processor (PIL GOT-OCR2 tiling image processor, no video processor) for these sizes."""
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size}, crop_to_patches=True,
        min_patches=spec.min_patches, max_patches=spec.max_patches,
    )
    return ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      image_seq_length=spec.tokens_per_tile(), chat_template=CHAT_TEMPLATE)


def internvl_config(spec: InternVLSpec, tokenizer: PreTrainedTokenizerFast) -> InternVLConfig:
    """The transformers InternVLConfig (InternViT + Qwen2) for these sizes and this tokenizer."""
    vision = InternVLVisionConfig(
        hidden_size=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        attention_bias=spec.vision_attention_bias,
        use_qk_norm=spec.use_qk_norm,
        norm_type=spec.vision_norm,
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
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=spec.tokens_per_tile(),
        downsample_ratio=spec.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_internvl(
    out_dir: str | Path | None = None,
    spec: InternVLSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[InternVLForConditionalGeneration, ImageOnlyInternVLProcessor]:
    """Build a randomly initialised InternVL + processor (weights created directly on ``device`` in ``dtype``);
    save both to ``out_dir`` when given."""
    spec = spec or InternVLSpec()
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    model = instantiate(InternVLForConditionalGeneration, internvl_config(spec, tokenizer), spec.seed, device, dtype)
    model.generation_config.bos_token_id = None
    finish(model, processor, tokenizer, out_dir, processor_class="InternVLProcessor")
    return model, processor


register_arch(Arch(
    "internvl3-8b", "internvl", build_internvl,
    # InternVL3-8B (OpenGVLab/InternVL3-8B-hf): InternViT-300M-448px-V2.5 (24 layers x 1024, 16 heads, MLP 4096,
    # patch 14, 448 px tiles, qkv bias, no QK-norm, feature layer -1) -> pixel shuffle 0.5 (256 tokens per tile)
    # -> MLP projector (LayerNorm 4096 -> 3584 -> 3584) -> Qwen2.5-7B (28 layers x 3584, 28 heads, 4 KV heads,
    # MLP 18944, vocab 151674, rope theta 1e6, context 32768); 1 to 12 tiles per image plus a thumbnail.
    InternVLSpec(image_size=448, patch_size=14, downsample_ratio=0.5, min_patches=1, max_patches=12,
                 vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
                 text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
                 max_positions=32768, vocab_size=151674),
    "InternVL3-8B: InternViT-300M 448 px tiles + thumbnail, pixel shuffle to 256 tokens per tile, Qwen2.5-7B",
))
