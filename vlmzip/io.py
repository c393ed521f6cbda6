"""Loading models, processors and images from disk, with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import AutoModelForImageTextToText

from .adapters import adapter_for
from .paths import CHECKPOINT_DIR, checkpoint_dir
from .text import check_utf8

ARCH_PREFIX = "arch:"


def default_model_dir() -> Path:
    """The default model: the lab mini-VLM that ships inside the package (``vlmzip.lab.load()``)."""
    shipped = checkpoint_dir()
    if shipped is None:
        raise ValueError(
            f"this install of vlmzip has no lab checkpoint ({CHECKPOINT_DIR}); pass --model DIR of a saved "
            "checkpoint, or reinstall vlmzip with its package data"
        )
    return shipped


def load_model(
    path: str | Path | None, device: str = "cpu", dtype: str = "float32", layers: int | None = None
) -> tuple[nn.Module, object]:
    """Load (model, processor) from a checkpoint folder (default: the shipped lab mini-VLM), offline.

    ``arch:NAME`` (e.g. ``arch:llava-1.5-7b``) builds that real architecture with random weights in
    memory, for speed measurements: prefill cost depends on the shapes, not on the weights. ``layers``
    builds its LLM with that many decoder layers (every layer costs the same, so a reduced-depth
    model's timings scale; say so wherever they are reported).
    """
    if isinstance(path, str) and path.startswith(ARCH_PREFIX):
        from .builders import build_arch

        return build_arch(path[len(ARCH_PREFIX) :], device=device, dtype=dtype, layers=layers)
    if layers is not None:
        raise ValueError("--layers applies to arch:NAME models built from config, not to a checkpoint folder")
    folder = Path(path) if path else default_model_dir()
    config = folder / "config.json"
    if not config.exists():
        raise ValueError(f"{folder} is not a model folder (no config.json); pass --model DIR of a saved checkpoint")
    import json  # a broken config.json is named here, before transformers' own errors

    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err}): the checkpoint in {folder} is broken or incomplete "
                         "(an interrupted save or copy?); save or copy it again") from None
    except OSError as err:
        raise ValueError(f"cannot read {config}: {err.strerror or err}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{config} is not a model config (a JSON object): the checkpoint in {folder} is broken")
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    except OSError as err:  # missing or truncated weight files
        raise ValueError(f"cannot load the checkpoint in {folder}: {err}") from None
    adapter = adapter_for(model)  # fail early, with the list of supported classes
    return model, adapter.load_processor(folder)


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB; a clear ``ValueError`` if it is missing, cannot be decoded, or is too
    large to decode safely (PIL's decompression-bomb guard: over twice ``Image.MAX_IMAGE_PIXELS``).

    16-bit and 32-bit greyscale (modes ``I;16``, ``I``) are scaled to 8 bits by their bit depth (16 bits, or
    32 for values beyond 65535) and float images (``F``) with values in [0, 1] by 255, where a plain
    ``convert("RGB")`` would clip them to white or black. 16-bit colour PNGs PIL already reads as 8-bit.
    """
    import re

    import numpy as np

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"image path {p} is a directory; pass an image file (PNG or JPEG)")
    if not p.is_file():
        raise ValueError(f"image file {p} does not exist")
    try:
        with Image.open(p) as img:
            if not (img.mode.startswith("I") or img.mode == "F"):
                return img.convert("RGB")
            values = np.nan_to_num(np.asarray(img, dtype=np.float64))
            if img.mode == "F":
                top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
            else:
                top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2.0**31 - 1
            grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found[1]):,} pixels" if found else str(err)
        raise ValueError(f"image {p} is too large to decode safely ({size}, over PIL's limit of "
                         f"{2 * Image.MAX_IMAGE_PIXELS:,} against decompression bombs); pass a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {p}: {err}; pass a valid PNG or JPEG file") from None


def chat_prompt(processor: object, question: str) -> str:
    """The model's own chat format for one image + question (LLaVA-1.5 format if it has no template).

    A clear ``ValueError`` for a question that is not valid UTF-8 text (bytes a shell passed on undecoded,
    which Python keeps as lone surrogates and no tokenizer accepts)."""
    check_utf8(question, "the prompt")
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def batch_inputs(
    processor: object, images: list[Image.Image], questions: list[str], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch of (image, question), left padded, on the model's device and dtype.

    A clear ``ValueError`` when the longest prompt (image tokens and chat template included) leaves no room
    for an answer in the model's context (``max_position_embeddings`` of its text config)."""
    texts = [chat_prompt(processor, q) for q in questions]
    # one list of images per prompt: some processors (SmolVLM's) read a flat list as one prompt's images
    inputs = processor(images=[[image] for image in images], text=texts, return_tensors="pt", padding=True)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = inputs["input_ids"].shape[1]
    if context is not None and longest >= context:
        mask = inputs.get("attention_mask")
        row = int(mask.sum(dim=1).argmax()) if mask is not None else 0
        which = f"question {row + 1} of the batch" if len(questions) > 1 else "the prompt"
        raise ValueError(
            f"{which} takes {longest} tokens (image tokens and chat template included), which leaves no room for "
            f"an answer in the model's context of {context} tokens (max_position_embeddings); shorten the question"
        )
    param = next(model.parameters())
    inputs = inputs.to(param.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


@torch.no_grad()
def generate_answers(
    model: nn.Module, processor: object, images: list[Image.Image], questions: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers to a batch of (image, question), decoded without special tokens and stripped.

    A clear ``ValueError`` when prompt + ``max_new_tokens`` exceed the model's context (positions past
    ``max_position_embeddings`` give no reliable answer)."""
    inputs = batch_inputs(processor, images, questions, model)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and inputs["input_ids"].shape[1] + max_new_tokens > context:
        room = context - inputs["input_ids"].shape[1]
        raise ValueError(
            f"the prompt takes {inputs['input_ids'].shape[1]} tokens and the answer up to {max_new_tokens} more, over "
            f"the model's context of {context} tokens (max_position_embeddings); allow at most {room} new tokens "
            "(--max-new-tokens) or shorten the question"
        )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
