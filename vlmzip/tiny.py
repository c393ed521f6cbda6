"""Small LLaVA checkpoints built from config classes (random weights, no download).

``build_llava(out_dir, TinyLlavaConfig(...))`` writes a directory that loads like any Hugging Face
LLaVA checkpoint: ``LlavaForConditionalGeneration.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)``, offline. The architecture is the real one (CLIP ViT with CLS ->
2-layer GELU MLP projector -> Llama decoder); only the sizes are small. Used by the tests, and as
``vlmzip run``'s default model until the trained lab model exists.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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

BASE_WORDS = (
    "user assistant what is in the image describe this picture a an of and or to on at left right above "
    "below how many there color shape yes no"
).split()


@dataclass
class TinyLlavaConfig:
    """Every knob of a small LLaVA: vision tower, projector, language model, tokenizer words."""

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


# Real architectures with random weights: prefill cost is set by the shapes, not by the weights.
ARCHITECTURES: dict[str, TinyLlavaConfig] = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 1024 wide) + Llama-2-7B (32 layers, 4096 wide).
    "llava-1.5-7b": TinyLlavaConfig(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
        max_positions=4096, vocab_size=32064,
    ),
}


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over ``words`` + single characters, with LLaVA's specials.

    Text is lower-cased and split on whitespace and punctuation; an unknown word becomes ``<unk>``.
    """
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *(w.lower() for w in words), *string.ascii_lowercase, *string.digits,
                  *string.punctuation]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens(SPECIAL_TOKENS)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(cfg: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LlavaProcessor: CLIP-style resize + centre crop to ``image_size``, one placeholder per sent token."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy=cfg.select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def clip_vision_config(cfg: TinyLlavaConfig) -> CLIPVisionConfig:
    """The CLIP tower's config for these sizes (shared by the LLaVA and LLaVA-NeXT builders)."""
    return CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate or 4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )


def llama_text_config(cfg: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama LM's config for these sizes and this tokenizer (shared by the LLaVA and LLaVA-NeXT builders)."""
    return LlamaConfig(
        vocab_size=max(len(tokenizer), cfg.vocab_size or 0),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate or 4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def llava_config(cfg: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The transformers LlavaConfig (CLIP vision + Llama text) for these sizes and this tokenizer."""
    vision, text = clip_vision_config(cfg), llama_text_config(cfg, tokenizer)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.select_strategy,
        projector_hidden_act="gelu",
        image_seq_length=patches + (1 if cfg.select_strategy == "full" else 0),
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava(
    out_dir: str | Path | None = None,
    cfg: TinyLlavaConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a randomly initialised LLaVA + processor (weights created directly on ``device`` in
    ``dtype``); save both to ``out_dir`` when given."""
    cfg = cfg or TinyLlavaConfig()
    tokenizer = build_tokenizer(cfg.words)
    processor = build_processor(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(cfg, tokenizer), dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor
