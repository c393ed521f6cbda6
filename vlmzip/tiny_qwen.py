"""Small Qwen2-VL / Qwen2.5-VL checkpoints built from config classes (random weights, no download).

``build_qwen_vl(out_dir, TinyQwenConfig(...), version="2" | "2.5")`` writes a directory that loads like
a Hugging Face Qwen-VL checkpoint, offline: ``AutoModelForImageTextToText.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)``. The architecture is the real one (ViT with 2-D RoPE -> 2x2
PatchMerger -> Qwen2 decoder with M-RoPE; Qwen2.5: window attention with full-attention blocks at
``fullatt_block_indexes``); only the sizes are small. The processor is the Qwen2-VL one with the PIL
image processor and small ``min_pixels`` / ``max_pixels``, so images of different sizes get different
grids. No video processor is saved (it needs torchvision); videos are passed as ``pixel_values_videos``
+ ``video_grid_thw`` by the caller.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .tiny import BASE_WORDS

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
class TinyQwenConfig:
    """Every knob of a small Qwen-VL: version, vision tower, merger, language model, processor pixels, words.

    ``text_layers`` sets the decoder depth: ``replace(ARCHITECTURES_QWEN[name], text_layers=4)`` builds a
    real architecture with a reduced text depth (e.g. for CPU benches).
    """

    version: str = "2"  # "2": Qwen2-VL, "2.5": Qwen2.5-VL
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
    words: tuple[str, ...] = tuple(BASE_WORDS)
    seed: int = 0


# Real architectures with random weights (prefill cost is set by the shapes, not by the weights).
# ``replace(ARCHITECTURES_QWEN[name], text_layers=4)`` builds the same model with reduced text depth.
ARCHITECTURES_QWEN: dict[str, TinyQwenConfig] = {
    # Qwen2-VL-7B-Instruct: ViT 32 x 1280 (16 heads, quick-GELU MLP x4) -> merger -> Qwen2-7B text
    # (28 layers x 3584, 28 heads, 4 KV heads, intermediate 18944), mrope_section [16, 24, 24].
    "qwen2-vl-7b": TinyQwenConfig(
        version="2", patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16, text_hidden=3584,
        text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944, mrope_section=(16, 24, 24),
        max_positions=32768, vocab_size=152064, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
    ),
    # Qwen2.5-VL-7B-Instruct: ViT 32 x 1280 (16 heads, SwiGLU 3420, window 112 px, full attention at
    # blocks 7, 15, 23, 31) -> merger -> the same 7B text shapes; tokens_per_second 2.
    "qwen2.5-vl-7b": TinyQwenConfig(
        version="2.5", patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16,
        vision_intermediate=3420, window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2,
        text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
        mrope_section=(16, 24, 24), max_positions=128000, vocab_size=152064, min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
    ),
}


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over ``words`` + single characters, with Qwen's special tokens."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *(w.lower() for w in words), *string.ascii_lowercase, *string.digits,
                  *string.punctuation]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def default_mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (t, h, w) as Qwen does (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def qwen_config(cfg: TinyQwenConfig, tokenizer: PreTrainedTokenizerFast, version: str | None = None) -> Qwen2VLConfig:
    """The transformers Qwen2VLConfig / Qwen2_5_VLConfig for these sizes and this tokenizer."""
    version = version or cfg.version
    head_dim = cfg.text_hidden // cfg.text_heads
    section = list(cfg.mrope_section) if cfg.mrope_section else default_mrope_section(head_dim)
    text = dict(
        vocab_size=max(len(tokenizer), cfg.vocab_size or 0),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate or 4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": section},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(
        depth=cfg.vision_layers, num_heads=cfg.vision_heads, patch_size=cfg.patch_size,
        spatial_merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    if version == "2":
        vision = dict(common, embed_dim=cfg.vision_hidden, hidden_size=cfg.text_hidden, mlp_ratio=4)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if version == "2.5":
        vision = dict(
            common, hidden_size=cfg.vision_hidden, out_hidden_size=cfg.text_hidden,
            intermediate_size=cfg.vision_intermediate or 2 * cfg.vision_hidden, window_size=cfg.window_size,
            fullatt_block_indexes=list(cfg.fullatt_block_indexes), tokens_per_second=cfg.tokens_per_second,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    raise ValueError(f"version must be '2' or '2.5', got {version!r}")


class ImageOnlyQwenProcessor(Qwen2VLProcessor):
    """The Qwen2-VL processor without a video processor (transformers' needs torchvision).

    Same placeholder expansion (``<|image_pad|>`` -> t*h*w / merge^2 tokens per image) and the same
    outputs (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw); used when
    ``AutoProcessor`` cannot build the full processor on this machine.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_processor(cfg: TinyQwenConfig, tokenizer: PreTrainedTokenizerFast):
    """The Qwen2-VL processor (PIL image processor, no video processor) for these sizes."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
    )
    return ImageOnlyQwenProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained(path)`` where transformers can build the Qwen processor (it needs
    torchvision for its video processor); otherwise the same processor without video support, from the
    saved image processor, tokenizer and chat template."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, ValueError, TypeError, OSError):
        return ImageOnlyQwenProcessor(
            image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path),
            chat_template=CHAT_TEMPLATE,
        )


def _name_processor(out: Path, name: str) -> None:
    """Record the real processor class, so ``AutoProcessor`` builds it where torchvision is installed."""
    path = out / "processor_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config["processor_class"] = name
    path.write_text(json.dumps(config, indent=2) + "\n")


def build_qwen_vl(
    out_dir: str | Path | None = None,
    cfg: TinyQwenConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    version: str | None = None,
):
    """Build a randomly initialised Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``; default: the
    config's ``version``) + processor (weights created directly on ``device`` in ``dtype``); save both to
    ``out_dir`` when given."""
    cfg = cfg or TinyQwenConfig()
    version = version or cfg.version
    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    tokenizer = build_tokenizer(cfg.words)
    processor = build_processor(cfg, tokenizer)
    config = qwen_config(cfg, tokenizer, version)
    cls = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        _name_processor(out, "Qwen2VLProcessor" if version == "2" else "Qwen2_5_VLProcessor")
    return model, processor
