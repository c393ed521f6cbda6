"""SmolVLM / Idefics3 (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``) built from config
classes: random weights, no download.

``build_idefics3(out_dir, Idefics3Spec(...))`` returns (model, processor) and, with ``out_dir``, writes a folder
that loads like a Hugging Face SmolVLM / Idefics3 checkpoint, offline (``AutoModelForImageTextToText``; the
processor with ``vlmzip.adapters.idefics3.load_processor``, which is ``AutoProcessor`` where transformers can build
it). The architecture is the real one (SigLIP-like tower without CLS, run on every tile and on the downscaled
global image -> pixel shuffle of ``scale_factor`` x ``scale_factor`` patches -> one linear projection -> Llama
decoder); only the sizes are the spec's. The processor is the family's own: the PIL image processor resizes an
image to ``longest_edge``, cuts it into ``image_size`` tiles and adds the global image; the prompt writes
``<fake_token_around_image><row_i_col_j>`` + ``image_seq_len`` placeholders per tile and
``<fake_token_around_image><global-img>`` + placeholders for the global image.

``model_class`` picks the class: "idefics3" (``Idefics3ForConditionalGeneration``, what HuggingFaceTB/SmolVLM-Instruct
ships) or "smolvlm" (``SmolVLMForConditionalGeneration``, SmolVLM2). ``special_tags``: whether ``<global-img>`` and
``<row_i_col_j>`` are single special tokens (SmolVLM2's tokenizer) or ordinary text of several tokens
(SmolVLM-Instruct's, whose vocabulary adds only ``<fake_token_around_image>``, ``<image>`` and
``<end_of_utterance>`` to SmolLM2's 49152). ``arch:smolvlm-2b`` is SmolVLM-Instruct's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaConfig,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from ..adapters.idefics3 import ImageOnlySmolVLMProcessor
from .llava import finish, instantiate
from .registry import Arch, register_arch
from .words import BASE_WORDS, word_tokenizer

# The tile tags of the processors: rows and columns 1..6 (``Idefics3Processor.row_col_ids``).
TILE_TAGS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<fake_token_around_image>", "<image>",
                  "<end_of_utterance>"]
# The words of the tags when they are text (SmolVLM-Instruct's tokenizer): "<row_1_col_1>" -> < row _ 1 _ col _ 1 >.
TAG_WORDS = ("row", "col", "global", "img")

# SmolVLM's chat format (the released template, images only): "<|im_start|>User:<image>question<end_of_utterance>\n
# Assistant: answer<end_of_utterance>\n".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CLASSES = {"idefics3": (Idefics3ForConditionalGeneration, Idefics3Config, Idefics3VisionConfig),
           "smolvlm": (SmolVLMForConditionalGeneration, SmolVLMConfig, SmolVLMVisionConfig)}
PROCESSORS = {"idefics3": "Idefics3Processor", "smolvlm": "SmolVLMProcessor"}


@dataclass
class Idefics3Spec:
    """Every knob of a SmolVLM / Idefics3 built from config: class, tiles, tower, connector, language model,
    tokenizer. ``text_layers`` sets the decoder depth.

    ``image_size``: the tower's input and the tile side in pixels (the processor's ``max_image_size``);
    ``longest_edge``: what the processor resizes an image's longest edge to before tiling (None: 2 tiles,
    ``2 * image_size``), so an image is cut into up to (longest_edge / image_size)^2 tiles plus its global image;
    ``scale_factor``: the connector's pixel shuffle, (image_size / patch_size / scale_factor)^2 tokens per tile.
    """

    model_class: str = "idefics3"  # "idefics3" or "smolvlm"
    image_size: int = 63
    patch_size: int = 7
    scale_factor: int = 3
    longest_edge: int | None = None
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int | None = None  # default 4 * vision_hidden
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int | None = None  # default 4 * text_hidden
    rope_theta: float = 10_000.0
    max_positions: int = 4096
    vocab_size: int | None = None  # pad the LM vocabulary to this size (SmolVLM-Instruct: 49155)
    special_tags: bool = True  # <global-img> / <row_i_col_j> as single special tokens (SmolVLM2) or text
    words: tuple[str, ...] = tuple(BASE_WORDS)
    seed: int = 0

    @property
    def image_seq_len(self) -> int:
        """Placeholders per tile (and for the global image): the pixel-shuffled patch grid."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


def check_spec(spec: Idefics3Spec) -> None:
    """A clear error for sizes the family cannot lay out."""
    if spec.model_class not in CLASSES:
        raise ValueError(f"model_class must be one of {sorted(CLASSES)}, got {spec.model_class!r}")
    side = spec.image_size // spec.patch_size
    if side % spec.scale_factor:
        raise ValueError(
            f"the patch grid of image_size {spec.image_size} / patch_size {spec.patch_size} ({side} per side) must be "
            f"a multiple of scale_factor {spec.scale_factor} (the connector's pixel shuffle)"
        )


def build_tokenizer(words: list[str] | tuple[str, ...], special_tags: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with SmolVLM's special tokens (no begin-of-text token: the chat
    template writes ``<|im_start|>``); the tile tags are special tokens too with ``special_tags``, else text."""
    specials = SPECIAL_TOKENS + (["<global-img>", *TILE_TAGS] if special_tags else [])
    return word_tokenizer([*words, *TAG_WORDS], specials, unk="<unk>", eos_token="<end_of_utterance>",
                          pad_token="<|im_end|>", padding_side="left", chat_template=CHAT_TEMPLATE)


def build_processor(spec: Idefics3Spec, tokenizer: PreTrainedTokenizerFast) -> Any:
    """The family's processor with its PIL image processor: resize to ``longest_edge``, ``image_size`` tiles plus
    the global image; ``Idefics3Processor``, or for SmolVLM its processor without the video part."""
    kwargs = dict(size={"longest_edge": spec.longest_edge or 2 * spec.image_size},
                  max_image_size={"longest_edge": spec.image_size}, do_image_splitting=True)
    if spec.model_class == "smolvlm":
        return ImageOnlySmolVLMProcessor(image_processor=SmolVLMImageProcessorPil(**kwargs), tokenizer=tokenizer,
                                         image_seq_len=spec.image_seq_len, chat_template=CHAT_TEMPLATE)
    return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**kwargs), tokenizer=tokenizer,
                             image_seq_len=spec.image_seq_len, chat_template=CHAT_TEMPLATE)


def idefics3_config(spec: Idefics3Spec, tokenizer: PreTrainedTokenizerFast) -> Idefics3Config:
    """The transformers Idefics3Config / SmolVLMConfig (SigLIP-like vision + Llama text) for these sizes."""
    check_spec(spec)
    _, config_class, vision_class = CLASSES[spec.model_class]
    vision = vision_class(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        vocab_size=max(len(tokenizer), spec.vocab_size or 0),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return config_class(
        vision_config=vision, text_config=text, scale_factor=spec.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_idefics3(
    out_dir: str | Path | None = None,
    spec: Idefics3Spec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Build a randomly initialised SmolVLM / Idefics3 + processor (weights created directly on ``device`` in
    ``dtype``); save both to ``out_dir`` when given."""
    spec = spec or Idefics3Spec()
    tokenizer = build_tokenizer(spec.words, spec.special_tags)
    processor = build_processor(spec, tokenizer)
    config = idefics3_config(spec, tokenizer)
    model = instantiate(CLASSES[spec.model_class][0], config, spec.seed, device, dtype)
    finish(model, processor, tokenizer, out_dir, processor_class=PROCESSORS[spec.model_class])
    return model, processor


register_arch(Arch(
    "smolvlm-2b", "idefics3", build_idefics3,
    # HuggingFaceTB/SmolVLM-Instruct (config.json, preprocessor_config.json), Idefics3ForConditionalGeneration:
    # SigLIP so400m-patch14-384 tower (27 layers x 1152, 16 heads, intermediate 4304), scale_factor 3 -> 81 tokens
    # per 384 px tile; SmolLM2-1.7B text (24 layers x 2048, 32 heads, 32 KV heads, intermediate 8192, vocab 49155,
    # rope theta 273768, 16k context); images resized to a 1536 px longest edge -> up to 4 x 4 tiles + global.
    Idefics3Spec(model_class="idefics3", image_size=384, patch_size=14, scale_factor=3, longest_edge=1536,
                 vision_hidden=1152, vision_layers=27, vision_heads=16, vision_intermediate=4304,
                 text_hidden=2048, text_layers=24, text_heads=32, text_kv_heads=32, text_intermediate=8192,
                 rope_theta=273_768.0, max_positions=16_384, vocab_size=49155, special_tags=False),
    "SmolVLM-Instruct (~2B): SigLIP so400m at 384 px tiles, pixel shuffle 3 -> 81 tokens per tile + global image, "
    "SmolLM2-1.7B",
))
