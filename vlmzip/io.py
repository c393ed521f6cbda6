"""Loading models, processors and images from disk, with clear errors; the processor inputs of a batch of
questions about images and videos, and greedy answers to them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText

from .adapters import adapter_for
from .api import is_compressed, state_of
from .images import read_image
from .paths import CHECKPOINT_DIR, checkpoint_dir
from .text import check_utf8
from .video import Video

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


class ContextError(ValueError):
    """A prompt (or prompt + answer) longer than the model's context (``max_position_embeddings``)."""


Visual = Image.Image | Video  # one image, or the sampled frames of one video
Row = Image.Image | Video | Sequence[Image.Image | Video]  # what one question is asked about, in order


def takes_videos(model: nn.Module) -> bool:
    """Whether the model's processor takes ``videos=`` and its adapter compresses them (``Adapter.takes_videos``);
    otherwise a video reaches the model as its frames, one image each (:func:`batch_visual_inputs`)."""
    return bool(getattr(adapter_for(model), "takes_videos", False))


def row_visuals(row: Row) -> list[Visual]:
    """A row's visuals as a list: one image or video, or a sequence of them (a clear error for anything else)."""
    visuals = [row] if isinstance(row, (Image.Image, Video)) else list(row)
    for visual in visuals:
        if not isinstance(visual, (Image.Image, Video)):
            raise ValueError(f"a question is asked about PIL images and vlmzip.video.Video objects, got "
                             f"{type(visual).__name__}; read images with vlmzip.io.read_image and videos with "
                             "vlmzip.video.read_video")
    return visuals


def content_kinds(visuals: Sequence[Visual], videos: bool) -> list[str]:
    """The chat-template content items of a row's visuals: ``"video"`` per video when the model takes videos
    (``videos``), else ``"image"`` per frame of it; ``"image"`` per image."""
    kinds: list[str] = []
    for visual in visuals:
        if isinstance(visual, Video):
            kinds += ["video"] if videos else ["image"] * len(visual)
        else:
            kinds.append("image")
    return kinds


def chat_prompt(processor: object, question: str, kinds: Sequence[str] = ("image",)) -> str:
    """The model's own chat format for visuals + question (LLaVA-1.5 format if it has no template).

    ``kinds``: the content items before the question, in order, ``"image"`` or ``"video"`` (default: one image);
    a video sent as images is one ``"image"`` per frame, with no text between them (:func:`content_kinds`).
    A clear ``ValueError`` for a question that is not valid UTF-8 text (bytes a shell passed on undecoded,
    which Python keeps as lone surrogates and no tokenizer accepts)."""
    check_utf8(question, "the prompt")
    if getattr(processor, "chat_template", None):
        content = [{"type": kind} for kind in kinds]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return "USER: " + "".join(f"<{kind}>\n" for kind in kinds) + f"{question} ASSISTANT:"


def batch_inputs(
    processor: object, images: list[Image.Image], questions: list[str], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch of (image, question), left padded, on the model's device and dtype
    (:func:`batch_visual_inputs` with one image per question)."""
    return batch_visual_inputs(processor, [[image] for image in images], questions, model)


def batch_visual_inputs(
    processor: object, rows: Sequence[Row], questions: list[str], model: nn.Module, check_context: bool = True
) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch of (visuals, question), left padded, on the model's device and dtype.

    Each row is an image, a :class:`~vlmzip.video.Video`, or a sequence of them (several images, several videos,
    both), placed before the question in order. A model that takes videos (:func:`takes_videos`) gets
    ``processor(text=..., videos=[[frames of video 1], ...], images=..., return_tensors="pt", padding=True)``
    and a ``{"type": "video"}`` content item per video; any other model gets each video as its frames, one
    image each (a multi-image prompt, frames in time order, no text between them).

    A clear ``ValueError`` when the longest prompt (visual tokens and chat template included, as many as the LLM
    receives: after a compressed model's pre-LLM stage) leaves no room for an answer in the model's context
    (``max_position_embeddings`` of its text config); ``check_context=False`` skips that check."""
    if len(rows) != len(questions):
        raise ValueError(f"got {len(rows)} rows of visuals for {len(questions)} questions; give one per question")
    videos = takes_videos(model)
    per_row = [row_visuals(row) for row in rows]
    texts = [chat_prompt(processor, q, content_kinds(v, videos)) for q, v in zip(questions, per_row, strict=True)]
    images = [[frame for visual in row for frame in _as_images(visual, videos)] for row in per_row]
    clips = [list(visual.frames) for row in per_row for visual in row if isinstance(visual, Video)] if videos else []
    call: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if any(images):
        # one list of images per prompt: some processors (SmolVLM's) read a flat list as one prompt's images
        call["images"] = images
    if clips:
        call["videos"] = clips
        # the frames' timing, as transformers' processors take it (Qwen-VL's time positions come from it)
        call["video_metadata"] = [video_metadata(visual) for row in per_row for visual in row
                                  if isinstance(visual, Video)]
    inputs = processor(**call)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    lengths = llm_lengths(model, inputs)
    longest = max(lengths)
    if check_context and context is not None and longest >= context:
        row = lengths.index(longest)
        which = f"question {row + 1} of the batch" if len(questions) > 1 else "the prompt"
        frames = sum(len(v) for v in per_row[row] if isinstance(v, Video))
        fix = "shorten the question"
        if frames:
            fix = (f"sample fewer frames (--frames; this prompt has {frames}), or compress the visual tokens "
                   "(--tokens per video, --tokens-per-frame), or shorten the question")
        raise ContextError(
            f"{which} takes {longest} tokens (visual tokens and chat template included), which leaves no room for "
            f"an answer in the model's context of {context} tokens (max_position_embeddings); {fix}"
        )
    param = next(model.parameters())
    inputs = inputs.to(param.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(param.dtype)
    return inputs


def video_metadata(video: Video) -> dict[str, Any]:
    """A video's timing as transformers' processors take it (``video_metadata``): its frame count, rate and length
    and which frames were sampled (fps None for a folder of frames: the processor's default rate applies)."""
    duration = None if not video.fps else video.total / video.fps
    return {"total_num_frames": video.total, "fps": video.fps, "duration": duration,
            "frames_indices": list(video.indices)}


def _as_images(visual: Visual, videos: bool) -> list[Image.Image]:
    """The images a visual adds to the processor's ``images``: itself, its frames (a model that does not take
    videos), or none (a video, for a model that does)."""
    if isinstance(visual, Video):
        return [] if videos else list(visual.frames)
    return [visual]


def llm_lengths(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[int]:
    """Per row of a processor batch: the tokens the LLM receives, padding excluded. On a compressed model, each
    image's (video's) placeholders count as many as its pre-LLM stage keeps, so that a prompt too long for the
    context before compression (many frames) is measured as the LLM will see it."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    lengths = (mask.sum(dim=1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    if not is_compressed(model):
        return [int(n) for n in lengths]
    state = state_of(model)
    items = state.adapter.items(inputs)
    # items are numbered row by row per placeholder token (a family may number a call's images, then its videos)
    for token in dict.fromkeys(item.token_id for item in items):
        left = [int((ids[row] == token).sum()) for row in range(ids.shape[0])]  # placeholders not yet matched
        row = 0
        for number, item in enumerate(items):
            if item.token_id != token:
                continue
            while row < ids.shape[0] and left[row] < item.vanilla:
                row += 1
            if row == ids.shape[0]:
                break  # placeholders not where this walk expects them: fall back to the counts so far
            left[row] -= item.vanilla
            lengths[row] -= item.vanilla - sum(state.item_keep(item, number))
    return [int(n) for n in lengths]


@torch.no_grad()
def generate_answers(
    model: nn.Module, processor: object, rows: Sequence[Row], questions: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers to a batch of (visuals, question), decoded without special tokens and stripped. Each row
    is an image, a :class:`~vlmzip.video.Video`, or a sequence of them (:func:`batch_visual_inputs`).

    A clear ``ValueError`` when prompt + ``max_new_tokens`` exceed the model's context (positions past
    ``max_position_embeddings`` give no reliable answer)."""
    inputs = batch_visual_inputs(processor, rows, questions, model)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(llm_lengths(model, inputs))
    if context is not None and longest + max_new_tokens > context:
        room = context - longest
        raise ContextError(
            f"the prompt takes {longest} tokens and the answer up to {max_new_tokens} more, over "
            f"the model's context of {context} tokens (max_position_embeddings); allow at most {room} new tokens "
            "(--max-new-tokens) or shorten the question"
        )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


__all__ = [
    "ARCH_PREFIX", "ContextError", "Row", "Visual", "batch_inputs", "batch_visual_inputs", "chat_prompt",
    "content_kinds", "default_model_dir", "generate_answers", "llm_lengths", "load_model", "read_image",
    "row_visuals", "takes_videos",
]  # fmt: skip
