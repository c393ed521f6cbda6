"""LLaVA (``LlavaForConditionalGeneration``, LLaVA-1.5 layout) built from config classes: random weights.

``build_llava(out_dir, LlavaSpec(...))`` returns (model, processor) and, with ``out_dir``, writes a folder
that loads like any Hugging Face LLaVA checkpoint, offline (``LlavaForConditionalGeneration.from_pretrained``
and ``AutoProcessor.from_pretrained``). The architecture is the real one (CLIP ViT with CLS -> 2-layer GELU
MLP projector -> Llama decoder); only the sizes are the spec's. The lab mini-VLM is this architecture,
trained; ``arch:llava-1.5-7b`` is LLaVA-1.5-7B's shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .registry import Arch, register_arch
from .words import BASE_WORDS, word_tokenizer

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

# LLaVA-1.5's conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# The same Vicuna format with videos too ("USER: <video>\n{question} ASSISTANT:"): Video-LLaVA, LLaVA-NeXT-Video.
VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class LlavaSpec:
    """Every knob of a LLaVA built from config: vision tower, projector, language model, tokenizer words."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 2048
    vision_feature_layer: int = -2
    select_strategy: str = "default"
    text_intermediate: int | None = None  # default 4 * text_hidden
    vision_intermediate: int | None = None  # default 4 * vision_hidden
    vocab_size: int | None = None  # pad the LM vocabulary to this size (real models: ~32k)
    words: tuple[str, ...] = tuple(BASE_WORDS)
    seed: int = 0


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with LLaVA's special tokens (``<s>`` before every text)."""
    return word_tokenizer(words, SPECIAL_TOKENS, unk="<unk>", bos="<s>", eos_token="</s>", pad_token="<pad>",
                          padding_side="left", chat_template=CHAT_TEMPLATE)


def build_processor(spec: LlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LlavaProcessor: CLIP-style resize + centre crop to ``image_size``, one placeholder per sent token."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def clip_vision_config(spec: LlavaSpec) -> CLIPVisionConfig:
    """The CLIP tower's config for these sizes (shared by the LLaVA and LLaVA-NeXT builders)."""
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )


def llama_text_config(spec: LlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama LM's config for these sizes and this tokenizer (shared by the LLaVA and LLaVA-NeXT builders)."""
    return LlamaConfig(
        vocab_size=max(len(tokenizer), spec.vocab_size or 0),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def llava_config(spec: LlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The transformers LlavaConfig (CLIP vision + Llama text) for these sizes and this tokenizer."""
    vision, text = clip_vision_config(spec), llama_text_config(spec, tokenizer)
    patches = (spec.image_size // spec.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        projector_hidden_act="gelu",
        image_seq_length=patches + (1 if spec.select_strategy == "full" else 0),
        pad_token_id=tokenizer.pad_token_id,
    )


def instantiate(cls: type, config: object, seed: int, device: str | torch.device, dtype: torch.dtype) -> Any:
    """A ``cls`` model of ``config`` with random weights drawn from ``seed``, created directly on ``device`` in
    ``dtype`` (``"meta"``: shapes only), in eval mode (shared by every builder)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype).eval()


def finish(model: torch.nn.Module, processor: object, tokenizer: PreTrainedTokenizerFast,
           out_dir: str | Path | None, processor_class: str | None = None) -> None:
    """Set the generation config's pad / eos tokens from ``tokenizer`` and save model and processor to
    ``out_dir`` when given (shared by every builder). ``processor_class``: the family's real processor class
    to record in ``processor_config.json`` where the saved processor is an image-only stand-in, so that
    ``AutoProcessor`` builds the real one wherever it can."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        if processor_class is not None:
            path = out / "processor_config.json"
            config = json.loads(path.read_text()) if path.exists() else {}
            config["processor_class"] = processor_class
            path.write_text(json.dumps(config, indent=2) + "\n")


def build_llava(
    out_dir: str | Path | None = None,
    spec: LlavaSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a randomly initialised LLaVA + processor (weights created directly on ``device`` in
    ``dtype``); save both to ``out_dir`` when given."""
    spec = spec or LlavaSpec()
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    model = instantiate(LlavaForConditionalGeneration, llava_config(spec, tokenizer), spec.seed, device, dtype)
    finish(model, processor, tokenizer, out_dir)
    return model, processor


register_arch(Arch(
    "llava-1.5-7b", "llava", build_llava,
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 1024 wide) + Llama-2-7B (32 layers, 4096 wide).
    LlavaSpec(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
              text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
              max_positions=4096, vocab_size=32064),
    "LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama-2-7B, 576 visual tokens per image",
))
