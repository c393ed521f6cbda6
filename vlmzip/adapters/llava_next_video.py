"""Adapter for ``transformers.LlavaNextVideoForConditionalGeneration`` (LLaVA-NeXT-Video): images and videos.

Images are LLaVA-NeXT's (anyres crops, the same tower, projector and packing): :class:`LlavaNextVideoAdapter` builds
on :class:`~vlmzip.adapters.llava_next.LlavaNextAdapter`, and compressed images are laid out exactly as there.

Model quirks this file owns (videos):
- A video is ``pixel_values_videos`` (videos, frames, 3, H, W): every video of a call has the same frame count.
  Each frame goes through the CLIP tower alone (a unit: CLS + side x side patches), the CLS is dropped
  (strategy "default"), the patches are pooled by ``vision_resampler`` (``spatial_pool_mode`` average / max / conv,
  stride 2: 24 x 24 -> 12 x 12 = 144 tokens per frame at 336 px) and projected; a video is one run of ``<video>``
  placeholders, frames one after the other, no newline tokens.
- Route: instance-level ``get_image_features`` (LLaVA-NeXT's) and ``get_video_features`` on ``model.model``; a video
  is one :class:`~vlmzip.sequence.Item` of ``frames`` frames whose placeholder run runtime.py shrinks.

What a compressed video sends (its budget: ``tokens=N`` per video, ``ratio=r`` of its count, ``tokens_per_frame=M``):
- Keep-all: HF's own video features, unchanged.
- Selection acts on the *pooled* tokens, the ones the vanilla model sends, with pooled signals: a pooled token
  summarises one 2 x 2 block of one frame, so its CLS attention and key are the block's mean (the same pooling
  applied to the signal maps; for "max" / "conv" pooling the block mean too), and the frame's CLS token is kept
  in front as a prefix the methods may choose (VisionZip keeps it among its dominant tokens, as on images). So
  the budget is the final count per frame (at most 144), a kept token is exactly one the vanilla model sends,
  and nothing is pooled again after selection. (The OneVision image adapter selects among a crop's unpooled
  patches instead because its pooling resamples across crop borders, so a pooled token belongs to no crop;
  here every pooled token belongs to one frame and one block, the same rule: select among tokens that belong
  to one unit, send them as they are.)
- ``scope=frame`` (default): each frame an even share of the video's budget (136 over 8 frames -> 17 each),
  selected frame by frame with the frame's own signals; the video sends its frames' tokens in frame order.
  ``scope=video``: the frames' pooled tokens are joined into one unit (``VisionTokens.joined``; the frames' CLS
  attention becomes the received attention, CLS tokens not sent) and the method chooses the video's budget
  across all of them.
- In-LLM methods (FastV, SparseVLM, ...) see HF's vanilla video tokens as visual tokens, ``tokens=N`` per video.
- Processor: transformers' video processors need torchvision. Where it is missing, ``load_processor`` builds
  ``LlavaNextVideoProcessor`` with :class:`LlavaNextVideoPilVideoProcessor`: the same settings (saved as
  transformers' own video processor config), frames resized / cropped / normalised one by one with the PIL
  image-processor backend instead of torchvision's tensor ops (bicubic resampling of the two libraries differs
  by rounding), the same (videos, frames, 3, H, W) layout and placeholder expansion. Frames are sampled by the
  caller: the processor takes the frames it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    ProcessorMixin,
)
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor
from transformers.utils import is_torchvision_available

from ..methods.base import TokenLayout, VisionTokens
from ..runtime import current_call
from ..sequence import Item
from .base import feature_kwargs, set_instance_attr
from .llava import LlavaImageFeatures
from .llava_next import LlavaNextAdapter, LlavaNextImageFeatures
from .registry import register_adapter

# Settings of a transformers video processor that the PIL frame processor takes over.
FRAME_SETTINGS = ("size", "crop_size", "resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")
# Video-processor arguments that sample frames: the caller samples them (vlmzip.io), not this processor. (The
# frames' timing, ``video_metadata``, is taken and unused, as by transformers' processor when it does not sample:
# these models have no time positions.)
SAMPLING = ("do_sample_frames", "num_frames", "fps")


# -- torchvision-free video processing ------------------------------------------------------------------------


def _frames_of(video: Any) -> list[Any]:
    """One video as a list of frames (PIL images or (H, W, C) arrays)."""
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4:
            raise ValueError(f"a video array must be (frames, height, width, channels), got shape {tuple(video.shape)}")
        return [np.asarray(frame) for frame in video]
    if isinstance(video, (list, tuple)) and video:
        return list(video)
    raise ValueError("a video must be a non-empty list of frames (PIL images) or a (frames, H, W, C) array")


def batched_videos(videos: Any) -> list[list[Any]]:
    """``videos=`` as transformers' processors take it -> a list of videos, each a list of frames: a list of
    videos, one video (a list of PIL frames or a 4-D array), or a list of 4-D arrays."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        return [_frames_of(videos)] if videos.ndim == 4 else [_frames_of(v) for v in videos]
    if isinstance(videos, (list, tuple)) and videos and isinstance(videos[0], Image.Image):
        return [list(videos)]
    if not isinstance(videos, (list, tuple)) or not videos:
        raise ValueError("videos must be a list of videos, each a list of frames (PIL images)")
    return [_frames_of(v) for v in videos]


def process_frames(video_processor: Any, videos: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
    """What ``video_processor`` (a transformers video processor) returns for ``videos``, computed without
    torchvision: each frame resized, centre-cropped, rescaled and normalised with the PIL image-processor backend
    under the video processor's own settings (keyword arguments override them as in transformers), the frames of
    each video stacked. Returns ``pixel_values_videos`` (videos, frames, 3, H, W). Every video of one call must have
    the same frame count (the model takes one stacked tensor)."""
    for name in SAMPLING:
        if kwargs.get(name) not in (None, False):
            raise ValueError(f"{name}={kwargs[name]!r}: this processor takes the frames it is given; sample the "
                             "frames before calling it (e.g. vlmzip's video reader, --frames)")
    settings = {name: kwargs.get(name, getattr(video_processor, name, None)) for name in FRAME_SETTINGS}
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in settings.items() if v is not None}
    frames_processor = PilBackend(**settings)
    clips = batched_videos(videos)
    counts = [len(clip) for clip in clips]
    if len(set(counts)) > 1:
        raise ValueError(f"the videos of one call have different frame counts {counts}; the model takes them as one "
                         "(videos, frames, 3, H, W) tensor: sample the same number of frames from each, or call the "
                         "processor once per video")
    processed = [np.stack([np.asarray(f) for f in frames_processor(clip)["pixel_values"]]) for clip in clips]
    shapes = {p.shape[1:] for p in processed}
    if len(shapes) > 1:
        raise ValueError(f"the videos' frames have different processed shapes {sorted(shapes)}; resize the frames "
                         "of every video to one size first")
    return BatchFeature(data={"pixel_values_videos": np.stack(processed)}, tensor_type=return_tensors)


class PilFrames:
    """Mixin for a transformers video-processor class: ``__call__`` / ``preprocess`` without torchvision
    (:func:`process_frames`), saved under the transformers class's own name so ``AutoVideoProcessor`` builds the
    real one wherever torchvision is installed."""

    def __call__(self, videos: Any = None, **kwargs: Any) -> BatchFeature:
        return process_frames(self, videos, **kwargs)

    def preprocess(self, videos: Any = None, **kwargs: Any) -> BatchFeature:
        return process_frames(self, videos, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()  # type: ignore[misc]
        config["video_processor_type"] = real_class(type(self)).__name__
        return config


def real_class(cls: type) -> type:
    """The transformers class a :class:`PilFrames` subclass stands in for."""
    return next(base for base in cls.__mro__[1:] if base is not PilFrames and not issubclass(base, PilFrames))


class LlavaNextVideoPilVideoProcessor(PilFrames, LlavaNextVideoVideoProcessor):
    """LLaVA-NeXT-Video's video processor computed with PIL (transformers' needs torchvision)."""


class TakesPilVideos:
    """Mixin for a transformers processor class: accepts a :class:`PilFrames` video processor (transformers checks
    a video processor against its auto mapping, which is empty without torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, PilFrames):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


class PilLlavaNextVideoProcessor(TakesPilVideos, LlavaNextVideoProcessor):
    """``LlavaNextVideoProcessor`` with the torchvision-free video processor: the same placeholder expansion
    (``<video>`` -> frames x (side^2 // 4) placeholders) and outputs (``pixel_values_videos`` (videos, frames, 3,
    H, W) beside the image outputs)."""


def processor_parts(folder: str | Path, reason: Exception) -> tuple[dict[str, Any], Any, str, Any]:
    """(saved processor settings, tokenizer, chat template, image processor) of a checkpoint folder."""
    settings, _ = ProcessorMixin.get_processor_dict(str(folder))
    template = settings.get("chat_template")
    if isinstance(template, dict):
        template = template.get("default")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            f"cannot build the processor of {folder} ({type(reason).__name__}: {reason}), and the checkpoint has no "
            "chat template of its own for the processor vlmzip builds instead; install torchvision so transformers "
            "can build the model's own processor, or add the model's chat template to the folder"
        )
    return settings, tokenizer, template, AutoImageProcessor.from_pretrained(folder)


def saved_video_processor(cls: type, settings: dict[str, Any]) -> Any:
    """A :class:`PilFrames` video processor ``cls`` with the settings saved in a checkpoint's processor config
    (transformers' defaults for the class where none were saved)."""
    saved = settings.get("video_processor") or {}
    return cls(**{k: v for k, v in saved.items() if k != "video_processor_type"})


def load_processor(folder: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)`` where torchvision is installed; otherwise
    ``LlavaNextVideoProcessor`` with the torchvision-free video processor, from the saved settings."""
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(folder)
    settings, tokenizer, template, images = processor_parts(folder, ImportError("torchvision is not installed"))
    keys = ("patch_size", "vision_feature_select_strategy", "video_token", "image_token", "num_additional_image_tokens")
    return PilLlavaNextVideoProcessor(
        video_processor=saved_video_processor(LlavaNextVideoPilVideoProcessor, settings), image_processor=images,
        tokenizer=tokenizer, chat_template=template, **{k: settings[k] for k in keys if k in settings},
    )


# -- pooled frames --------------------------------------------------------------------------------------------


def pool_map(values: torch.Tensor, side: int, pool: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(B, side^2, C) or (B, side^2) per-patch values -> the same per pooled token: ``pool`` maps (B, C, side, side)
    to (B, C, s', s'); returns (B, s'^2, C) (or (B, s'^2))."""
    flat = values.ndim == 2
    grid = (values.unsqueeze(-1) if flat else values).float()
    grid = grid.reshape(grid.shape[0], side, side, -1).permute(0, 3, 1, 2)
    out = pool(grid).flatten(2).transpose(1, 2).to(values.dtype)
    return out.squeeze(-1) if flat else out


def pooled_frames(tokens: VisionTokens, side: int, hidden: torch.Tensor, pool: Callable[[torch.Tensor], torch.Tensor],
                  pooled_side: int) -> VisionTokens:
    """Frames' tokens after the model's spatial pooling: ``tokens`` (B frames, prefix + side^2 patches, with their
    signals), ``hidden`` (B, s'^2, D) the model's own pooled patch tokens; the signals pooled with ``pool`` (the
    block mean or the model's interpolation); prefix tokens (CLS) stay in front, unpooled, not sent by the vanilla
    model. Returns (B, prefix + s'^2, D) tokens on a (s', s') grid."""
    p = tokens.layout.num_prefix

    def pooled(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return torch.cat([t[:, :p], pool_map(t[:, p:], side, pool)], dim=1)

    hidden = torch.cat([tokens.hidden[:, :p].to(hidden.dtype), hidden], dim=1) if p else hidden
    return VisionTokens(hidden=hidden, layout=TokenLayout(p, (pooled_side, pooled_side), False),
                        keys=pooled(tokens.keys), cls_attention=pooled(tokens.cls_attention),
                        received_attention=pooled(tokens.received_attention), seeds=tokens.seeds)


def video_offset(state: Any, image_token_id: int) -> int:
    """The call's number of the first video: videos are numbered after the call's images."""
    call = current_call(state)
    if call is None or call.items is None:
        return 0
    return sum(1 for item in call.items if item.token_id == image_token_id)


def select_videos(state: Any, tokens: VisionTokens, frames: int, keeps: list[int | None], first: int
                  ) -> list[tuple[list[tuple[Any, int]], bool] | None]:
    """Run ``state``'s method on V videos of ``frames`` frames each: ``tokens`` (V * F frame units, video v's frames
    consecutive), ``keeps[v]`` the tokens video v sends (None: sent whole). ``first``: the call's number of video
    0 (for ``units``). Per video: (its selections in send order as (Selection, row) pairs, whether they are whole
    videos' joined units), or None. ``scope=frame``: one selection per frame (an even share each);
    ``scope=video``: one per video, over its joined frames."""
    videos = len(keeps)
    shares = [None if keep is None else state.frame_keeps(keep, frames, v) for v, keep in enumerate(keeps)]
    if any(keep is not None and share is None for keep, share in zip(keeps, shares, strict=True)):  # scope=video
        joined = tokens.joined(frames)
        chosen = state.select_rows(joined, keeps, [(first + v, 0) for v in range(videos)])
        return [None if c is None else ([c], True) for c in chosen]
    row_keeps = [k for v in range(videos) for k in (shares[v] or [None] * frames)]
    units = [(first + v, f) for v in range(videos) for f in range(frames)]
    chosen = state.select_rows(tokens, row_keeps, units)
    return [None if shares[v] is None else ([chosen[v * frames + f] for f in range(frames)], False)  # type: ignore
            for v in range(videos)]


def sent_features(picked: list[tuple[Any, int]], project: Callable[[torch.Tensor], torch.Tensor] | None,
                  cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """One video's tokens as sent: its selections' rows concatenated (projected with ``project`` unless None; each
    selection projected once, in ``cache``)."""
    parts = []
    for selection, row in picked:
        if id(selection) not in cache:
            cache[id(selection)] = selection.features if project is None else project(selection.features)
        parts.append(cache[id(selection)][row])
    return torch.cat(parts, dim=0)


# -- the adapter ----------------------------------------------------------------------------------------------


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """vlmzip's view of one ``LlavaNextVideoForConditionalGeneration`` instance (images and videos compressed)."""

    family = "llava-next-video"
    model_classes = (LlavaNextVideoForConditionalGeneration,)
    takes_videos = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.video_token_id = int(self.config.video_token_id)
        resampler = self.inner.vision_resampler
        self.stride = int(self.config.spatial_pool_stride)
        self.pool_mode = self.config.spatial_pool_mode
        if self.strategy != "default":
            raise ValueError("LLaVA-NeXT-Video pools each frame's patch grid, which needs "
                             "vision_feature_select_strategy='default' (the CLS token dropped)")
        self.pooled_side = (self.side - self.stride) // self.stride + 1  # AvgPool2d / MaxPool2d / Conv2d arithmetic
        self.resampler = resampler

    def has_images(self, call: dict[str, Any]) -> bool:
        """True when the call carries images or videos to encode."""
        return call.get("pixel_values") is not None or call.get("pixel_values_videos") is not None

    def frame_tokens(self) -> int:
        """Tokens the vanilla model sends per video frame (the pooled grid)."""
        return self.pooled_side**2

    def items(self, call: dict[str, Any]) -> list[Item]:
        """The call's images (LLaVA-NeXT's counts), then its videos: one run of frames x pooled tokens each."""
        images = super().items(call) if call.get("pixel_values") is not None else []
        videos = call.get("pixel_values_videos")
        if videos is None:
            return images
        if videos.dim() != 5:
            raise ValueError(f"pixel_values_videos of shape {tuple(videos.shape)}; expected (videos, frames, 3, H, W)")
        frames = int(videos.shape[1])
        return images + [Item(self.video_token_id, (frames * self.frame_tokens(),), frames=frames)] * videos.shape[0]

    def install(self, state: Any) -> list[Any]:
        """Shadow ``get_image_features`` and ``get_video_features`` of ``model.model`` on this instance."""
        return [set_instance_attr(self.inner, "get_image_features", LlavaNextImageFeatures(self, state)),
                set_instance_attr(self.inner, "get_video_features", NextVideoFeatures(self, state))]

    def load_processor(self, folder: Any) -> Any:
        return load_processor(folder)

    def pool_signal(self, grid: torch.Tensor) -> torch.Tensor:
        """A per-patch signal map (B, C, side, side) -> per pooled token: the mean over each pooled block."""
        return F.avg_pool2d(grid, kernel_size=self.stride, stride=self.stride)


class NextVideoFeatures(LlavaImageFeatures):
    """``get_video_features`` of a compressed LLaVA-NeXT-Video: pooler_output is a list of (K_v, D_lm) tensors."""

    def __call__(self, pixel_values_videos: torch.Tensor, vision_feature_layer: int | None = None,
                 vision_feature_select_strategy: str | None = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        self.check(vision_feature_layer, vision_feature_select_strategy)
        adapter, state = self.adapter, self.state
        videos, frames = int(pixel_values_videos.shape[0]), int(pixel_values_videos.shape[1])
        vanilla = frames * adapter.frame_tokens()
        keeps = [state.pre_keep(vanilla, v, frames) for v in range(videos)]
        keeps = [None if keep >= vanilla else keep for keep in keeps]
        if all(keep is None for keep in keeps):
            inner = adapter.inner
            return type(inner).get_video_features(inner, pixel_values_videos, vision_feature_layer=vision_feature_layer,
                                                  vision_feature_select_strategy=vision_feature_select_strategy,
                                                  **kwargs)
        pixels = pixel_values_videos.flatten(0, 1)
        tokens = adapter.tower.run(pixels, adapter.layout, state.needs(), **feature_kwargs(kwargs))
        hidden = adapter.resampler(tokens.hidden[:, adapter.layout.num_prefix:])
        pooled = pooled_frames(tokens, adapter.side, hidden, adapter.pool_signal, adapter.pooled_side)
        projector = adapter.inner.multi_modal_projector
        projected = state.pre is not None and state.pre.spec.stage == "projector"
        if projected:
            pooled.hidden = projector(pooled.hidden)
        chosen = select_videos(state, pooled, frames, keeps, video_offset(state, adapter.image_token_id))
        cache: dict[int, torch.Tensor] = {}
        features = []
        for v, picked in enumerate(chosen):
            if picked is None:
                whole = pooled.hidden[v * frames : (v + 1) * frames, pooled.layout.num_prefix:]
                features.append((whole if projected else projector(whole)).flatten(0, 1))
            else:
                features.append(sent_features(picked[0], None if projected else projector, cache))
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=features)


register_adapter(LlavaNextVideoAdapter)
