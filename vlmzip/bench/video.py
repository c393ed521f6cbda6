"""The video input ``vlmzip bench`` times: a synthetic clip (the bench's image moving across F frames), through the
model's own processor (``processor(text=..., videos=[[frames], ...])`` and its chat template's ``{"type": "video"}``).

Generic over every family whose adapter has ``takes_videos``: a video model (``adapter.default_frames`` set, e.g.
Video-LLaVA's 8) is timed on a clip by default, any other on ``--frames F``.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageChops
from torch import nn


def synthetic_clip(image: Image.Image, frames: int) -> list[Image.Image]:
    """``frames`` RGB frames of ``image`` shifted right by an equal step each (wrapping round): a clip whose frames
    differ, the same on every machine."""
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame, got --frames {frames}")
    image = image.convert("RGB")
    return [ImageChops.offset(image, f * image.width // frames, 0) for f in range(frames)]


def bench_frames(adapter: Any, frames: int | None) -> int | None:
    """The frames of the clip the bench times on this model: ``frames`` when given (a clear error where the adapter
    does not compress videos), else the model's default (a video model's frame count; None: an image)."""
    if frames is None:
        return getattr(adapter, "default_frames", None)
    if not adapter.takes_videos:
        raise ValueError(
            f"--frames times a video input, but vlmzip does not compress videos of this model ({adapter.family}); "
            "drop --frames to time an image"
        )
    return frames


def video_prompt(processor: Any, question: str) -> str:
    """The model's chat format for one video + question."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def video_inputs(processor: Any, clips: list[list[Image.Image]], questions: list[str],
                 model: nn.Module) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch of (clip, question), left padded, on the model's device, pixels in its dtype.
    A clear error when the longest prompt leaves no room for an answer in the model's context."""
    texts = [video_prompt(processor, q) for q in questions]
    inputs = processor(text=texts, videos=clips, return_tensors="pt", padding=True)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = inputs["input_ids"].shape[1]
    if context is not None and longest >= context:
        raise ValueError(
            f"the prompt takes {longest} tokens ({len(clips[0])} frames' tokens and chat template included), which "
            f"leaves no room for an answer in the model's context of {context} tokens (max_position_embeddings); "
            "time fewer --frames"
        )
    param = next(model.parameters())
    inputs = inputs.to(param.device)
    for key in list(inputs.keys()):
        if key.startswith("pixel_values") and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(param.dtype)
    return inputs
