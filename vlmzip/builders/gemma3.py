"""Gemma 3 (``Gemma3ForConditionalGeneration``) built from config classes: random weights, no download.

``build_gemma3(out_dir, Gemma3Spec(...))`` returns (model, processor) and, with ``out_dir``, writes a folder that
loads like a Hugging Face Gemma 3 checkpoint, offline (``AutoModelForImageTextToText.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)``). The architecture is the real one: a SigLIP tower without CLS token ->
``Gemma3MultiModalProjector`` (average pooling of the patch grid to ``mm_tokens_per_image`` tokens, RMSNorm,
projection) -> the Gemma 3 decoder (interleaved sliding-window and global layers, bidirectional attention over
each run of image tokens); only the sizes are the spec's. The processor is the real ``Gemma3Processor`` with the
PIL image processor (pan-and-scan crops when called with ``do_pan_and_scan=True``) and the word tokenizer of
:mod:`vlmzip.builders.words` with Gemma's special tokens and chat format. ``arch:gemma-3-12b`` is
Gemma-3-12B-it's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from .llava import finish, instantiate
from .registry import Arch, register_arch
from .words import BASE_WORDS, word_tokenizer

BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, IMAGE]
# The words of the text Gemma3Processor writes around pan-and-scan crops ("Here is the original image ... and here
# are some crops to help you see better ..."), and the model's chat role.
GEMMA_WORDS = ("here", "original", "are", "some", "crops", "help", "you", "see", "better", "model")

# Gemma 3's chat format (the released template without its system-prompt handling): one image part is written
# as <start_of_image>, which the processor expands into the image's placeholders.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass
class Gemma3Spec:
    """Every knob of a Gemma 3 built from config: SigLIP tower, pooled tokens per image, Gemma 3 decoder, words.

    ``image_size / patch_size`` patches per side are average-pooled to ``sqrt(mm_tokens_per_image)`` per side (the
    pooling kernel must divide them). ``sliding_window_pattern``: every that-many-th decoder layer is global, the
    others slide over ``sliding_window`` tokens (Gemma 3: 6, i.e. 5 local : 1 global). ``text_layers`` sets the
    decoder depth.
    """

    image_size: int = 96
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int | None = None  # default 4 * vision_hidden
    mm_tokens_per_image: int = 36
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int | None = None  # default text_hidden // text_heads
    text_intermediate: int | None = None  # default 4 * text_hidden
    sliding_window: int = 32
    sliding_window_pattern: int = 3
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    rope_linear_factor: float | None = None  # Gemma-3 4B/12B/27B: linear scaling 8.0 of the global layers' RoPE
    max_positions: int = 4096
    vocab_size: int | None = None  # pad the LM vocabulary to this size (Gemma 3: 262208)
    words: tuple[str, ...] = tuple(BASE_WORDS) + GEMMA_WORDS
    seed: int = 0

    def check(self) -> Gemma3Spec:
        """This spec, or a clear error when the pooling cannot turn the patch grid into the token grid."""
        patches = self.image_size // self.patch_size
        side = round(self.mm_tokens_per_image**0.5)
        if side * side != self.mm_tokens_per_image or self.image_size % self.patch_size or patches % side:
            raise ValueError(
                f"mm_tokens_per_image={self.mm_tokens_per_image} must be a square whose side divides the "
                f"{self.image_size} / {self.patch_size} patches per side"
            )
        return self


def build_tokenizer(words: list[str] | tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with Gemma 3's special tokens: ``<bos>`` comes from the chat template
    (none added when encoding), the image tokens are named as Gemma3Processor reads them."""
    return word_tokenizer(
        words, SPECIAL_TOKENS, unk="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        padding_side="left", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE},
    )


def build_processor(spec: Gemma3Spec, tokenizer: PreTrainedTokenizerFast) -> Gemma3Processor:
    """Gemma3Processor: the image resized to ``image_size`` squared (and, with ``do_pan_and_scan=True`` in the call,
    its crops), ``mm_tokens_per_image`` placeholders between <start_of_image> and <end_of_image> per picture."""
    image_processor = Gemma3ImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                           image_seq_length=spec.mm_tokens_per_image)


def gemma3_config(spec: Gemma3Spec, tokenizer: PreTrainedTokenizerFast) -> Gemma3Config:
    """The transformers Gemma3Config (SigLIP vision + Gemma 3 text) for these sizes and this tokenizer."""
    spec.check()
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, vision_use_head=False, layer_norm_eps=1e-6,
    )
    head_dim = spec.head_dim or spec.text_hidden // spec.text_heads
    full = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_linear_factor is not None:
        full = {"rope_type": "linear", "rope_theta": spec.rope_theta, "factor": spec.rope_linear_factor}
    layer_types = ["full_attention" if (i + 1) % spec.sliding_window_pattern == 0 else "sliding_attention"
                   for i in range(spec.text_layers)]
    text = Gemma3TextConfig(
        vocab_size=max(len(tokenizer), spec.vocab_size or 0), hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 4 * spec.text_hidden, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads, head_dim=head_dim,
        query_pre_attn_scalar=head_dim, sliding_window=spec.sliding_window, layer_types=layer_types,
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": spec.rope_local_theta}},
        max_position_embeddings=spec.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=spec.mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI), eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), pad_token_id=tokenizer.pad_token_id,
    )


def draw_projection(model: Gemma3ForConditionalGeneration) -> None:
    """Draw the projector's projection weight like the other weights (normal, ``initializer_range``): transformers
    initialises it to zeros (a trained checkpoint fills it), which would send every image to a random model as the
    same zero tokens."""
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.normal_(mean=0.0, std=model.config.initializer_range)


def build_gemma3(
    out_dir: str | Path | None = None,
    spec: Gemma3Spec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """Build a randomly initialised Gemma 3 + processor (weights created directly on ``device`` in ``dtype``); save
    both to ``out_dir`` when given. Generation stops at ``<eos>`` or ``<end_of_turn>``, as Gemma 3's does."""
    spec = (spec or Gemma3Spec()).check()
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    model = instantiate(Gemma3ForConditionalGeneration, gemma3_config(spec, tokenizer), spec.seed, device, dtype)
    draw_projection(model)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    finish(model, processor, tokenizer, None)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor


register_arch(Arch(
    "gemma-3-12b", "gemma3", build_gemma3,
    # Gemma-3-12B-it: SigLIP so400m-patch14 at 896 px (27 layers, 1152 wide, 16 heads, MLP 4304; 64 x 64 patches
    # pooled 4 x 4 to 256 tokens) + Gemma 3 text 12B (48 layers x 3840, 16 heads, 8 KV heads, head_dim 256,
    # MLP 15360, vocab 262208, sliding window 1024, 5 local : 1 global layers, global RoPE 1e6 with linear
    # scaling 8, local RoPE 1e4, query_pre_attn_scalar 256).
    Gemma3Spec(image_size=896, patch_size=14, vision_hidden=1152, vision_layers=27, vision_heads=16,
               vision_intermediate=4304, mm_tokens_per_image=256, text_hidden=3840, text_layers=48, text_heads=16,
               text_kv_heads=8, head_dim=256, text_intermediate=15360, sliding_window=1024,
               sliding_window_pattern=6, rope_linear_factor=8.0, max_positions=131072, vocab_size=262208),
    "Gemma-3-12B-it: SigLIP 896 px, 4 x 4 average pooling to 256 tokens per image (and per pan-and-scan crop)",
))
