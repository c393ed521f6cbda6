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

from ..io import batch_visual_inputs
from ..video import Video


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


def video_inputs(processor: Any, clips: list[list[Image.Image]], questions: list[str],
                 model: nn.Module) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch of (clip, question), left padded, on the model's device, pixels in its dtype
    (``vlmzip.io.batch_visual_inputs`` with each clip as a video of those frames). A clear error when the longest
    prompt leaves no room for an answer in the model's context."""
    videos = [Video(frames=tuple(clip), indices=tuple(range(len(clip))), total=len(clip), fps=None, timestamps=None,
                    source="the bench's synthetic clip") for clip in clips]
    return batch_visual_inputs(processor, videos, questions, model)
