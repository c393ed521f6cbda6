"""Adapter for ``transformers.VideoLlavaForConditionalGeneration`` (Video-LLaVA: images and videos).

Model quirks this file owns:
- Two CLIP towers of one config: ``image_tower`` for images, ``video_tower`` for the frames of videos; one
  projector for both. Images are LLaVA-1.5's layout (``vision_feature_layer``, ``"default"`` drops the CLS:
  256 tokens at 224 px); a video of F frames sends every frame's tokens of the feature layer, CLS included
  (transformers' port: 257 per frame, 2,056 for 8 frames, ``video_seq_length``; the papers count the 8 x 256 =
  2,048 patches).
- The processor expands ``<image>`` into one run of 256 placeholders and ``<video>`` into one run of F * 257
  video placeholders; the model ``masked_scatter``s image features into the first and video features into the
  second, so ``get_image_features`` / ``get_video_features`` must return (items, K, D) tensors, not lists (every
  image of a call has the same count, and so has every video: one budget, one frame count).
- Route: instance-level ``get_image_features`` and ``get_video_features`` on ``model.model``; runtime.py
  shrinks both kinds of runs. A video is one :class:`~vlmzip.sequence.Item` of F frames; its budget is spread
  over its frames (``scope=frame``, each frame its even share chosen from its own 257 tokens with its own CLS
  attention) or spent over the whole video (``scope=video``: the frames' 256 patches joined into one unit of
  F * 256, ranked by each frame's CLS attention; the frames' CLS tokens are not candidates there).
- Positions: 1-D, contiguous over the shrunk sequence, as for LLaVA.
- The processor: transformers' Video-LLaVA video processor needs torchvision; where it cannot load,
  :func:`load_processor` builds :class:`FrameVideoLlavaProcessor`, which processes each frame with the slow
  (PIL / numpy) Video-LLaVA image processor: the same resize, crop and normalisation, the same
  ``pixel_values_videos`` (V, F, 3, 224, 224) and the same placeholder expansion.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    VideoLlavaForConditionalGeneration,
    VideoLlavaProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import ProcessorMixin

from ..methods.base import TokenLayout, VisionTokens
from ..runtime import current_call
from ..sequence import Item
from .base import Adapter, set_instance_attr
from .llava import ClipLikeTower, LlavaAdapter, LlavaImageFeatures, check_strategy
from .registry import register_adapter


class FrameVideoProcessor:
    """Video-LLaVA's video preprocessing without torchvision: every frame through the image processor (resize
    the shortest edge, centre crop, rescale, normalise), frames of a video stacked: ``pixel_values_videos`` of
    shape (V, F, 3, H, W). Every video of one call needs the same frame count (they share one tensor)."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, videos: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        videos = as_video_list(videos)
        counts = sorted({len(v) for v in videos})
        if len(counts) > 1:
            raise ValueError(
                f"the videos of one call have {', '.join(map(str, counts))} frames; Video-LLaVA batches videos in "
                "one tensor, so pass the same number of frames for every video (sample them with the same --frames)"
            )
        arrays = []
        for video in videos:
            out = self.image_processor(list(video), return_tensors="np", return_legacy_image_output=False)
            arrays.append(np.asarray(out["pixel_values"]))
        return BatchFeature({"pixel_values_videos": np.stack(arrays)}, tensor_type=return_tensors)


def as_video_list(videos: Any) -> list[list[Any]]:
    """``videos=`` as a list of videos, each a list (or array) of frames: one video's frames (a list of PIL images
    or an (F, H, W, 3) array) becomes a list of one video."""
    if isinstance(videos, np.ndarray) or isinstance(videos, torch.Tensor):
        return [list(videos)] if videos.ndim == 4 else [list(v) for v in videos]
    if not isinstance(videos, (list, tuple)) or not videos:
        raise ValueError("videos= takes a list of videos, each a list of frames (PIL images or H x W x 3 arrays)")
    if all(isinstance(v, (list, tuple)) or (hasattr(v, "ndim") and v.ndim == 4) for v in videos):
        out = [list(v) for v in videos]
    else:
        out = [list(videos)]
    if any(len(v) == 0 for v in out):
        raise ValueError("a video of videos= has no frames; pass at least one frame per video")
    return out


class FrameVideoLlavaProcessor(VideoLlavaProcessor):
    """The Video-LLaVA processor with :class:`FrameVideoProcessor` for videos (transformers' video processor
    needs torchvision). Same placeholder expansion (``<image>`` -> 256, ``<video>`` -> F * 257 with the
    defaults) and the same tensors; images come as ``pixel_values`` (transformers' image processor still names
    them ``pixel_values_images`` by default, a deprecated alias the model takes too)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, patch_size: int = 14,
                 vision_feature_select_strategy: str = "default", image_token: str = "<image>",
                 video_token: str = "<video>", chat_template: str | None = None,
                 num_additional_image_tokens: int = 1, **kwargs: Any) -> None:
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @property
    def video_processor(self) -> FrameVideoProcessor:
        return FrameVideoProcessor(self.image_processor)

    def _process_images(self, images: Any, **kwargs: Any) -> Any:
        return super()._process_images(images, **{**kwargs, "return_legacy_image_output": False})

    def _process_videos(self, videos: Any, **kwargs: Any) -> Any:
        videos = as_video_list(videos)
        processed = self.video_processor(videos, **kwargs)
        return processed, [self.replace_video_token(processed, video_idx=i) for i in range(len(videos))]


def load_processor(folder: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)`` where transformers can build Video-LLaVA's processor (its video
    processor needs torchvision); otherwise :class:`FrameVideoLlavaProcessor` from the saved image processor,
    tokenizer, chat template and processor settings."""
    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError, TypeError, OSError):
        pass
    processor_dict, _ = ProcessorMixin.get_processor_dict(str(folder))
    template = processor_dict.get("chat_template")
    if isinstance(template, dict):
        template = template.get("default")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = {k: processor_dict[k] for k in ("patch_size", "vision_feature_select_strategy", "image_token",
                                               "video_token", "num_additional_image_tokens") if k in processor_dict}
    return FrameVideoLlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=tokenizer,
                                    chat_template=template or getattr(tokenizer, "chat_template", None), **settings)


class VideoLlavaAdapter(LlavaAdapter):
    """vlmzip's view of one ``VideoLlavaForConditionalGeneration`` instance: LLaVA's images plus videos."""

    family = "video-llava"
    model_classes = (VideoLlavaForConditionalGeneration,)
    takes_videos = True
    default_frames = 8  # the papers' setting: 8 frames x 256 patches

    def __init__(self, model: nn.Module) -> None:
        Adapter.__init__(self, model)
        vcfg = self.config.vision_config
        layer, heads = self.config.vision_feature_layer, vcfg.num_attention_heads
        self.tower = ClipLikeTower(self.inner.image_tower, layer, heads)
        self.video_tower = ClipLikeTower(self.inner.video_tower, layer, heads)
        self.side = vcfg.image_size // vcfg.patch_size
        self.strategy = self.config.vision_feature_select_strategy
        check_strategy(self.strategy, self.tower.has_cls)
        prefix = int(self.tower.has_cls)
        self.layout = TokenLayout(num_prefix=prefix, grid=(self.side, self.side), send_prefix=self.strategy == "full")
        # every frame of a video: all of the feature layer's tokens are sent (CLS included)
        self.frame_layout = TokenLayout(num_prefix=prefix, grid=(self.side, self.side), send_prefix=True)
        self.video_token_id = int(self.config.video_token_id)

    # -- the images and videos of a call -------------------------------------------------------------

    @staticmethod
    def image_pixels(call: dict[str, Any]) -> torch.Tensor | None:
        """The call's image pixels (``pixel_values``, or the deprecated ``pixel_values_images``)."""
        pixels = call.get("pixel_values")
        return call.get("pixel_values_images") if pixels is None else pixels

    def has_images(self, call: dict[str, Any]) -> bool:
        """True when this call carries images or videos to encode."""
        return self.image_pixels(call) is not None or call.get("pixel_values_videos") is not None

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Every image (one run of 256) and video (one run of F * 257, ``frames=F``) of the call, row by row and
        left to right in each row as the prompt holds them (one host sync)."""
        images, videos = self.image_pixels(call), call.get("pixel_values_videos")
        image = Item(self.image_token_id, (self.layout.vanilla,))
        plain = [image] * (0 if images is None else int(images.shape[0]))
        if videos is not None:
            if videos.ndim != 5:
                raise ValueError(f"pixel_values_videos must be (videos, frames, 3, H, W), got {tuple(videos.shape)}")
            frames = int(videos.shape[1])
            plain += [Item(self.video_token_id, (frames * self.frame_layout.vanilla,), frames=frames)] * int(
                videos.shape[0])
        ids = call.get("input_ids")
        if ids is None or not plain:
            return plain
        kinds = {item.token_id: item for item in plain}
        ordered: list[Item] = []
        for row in ids.cpu():
            starts: list[tuple[int, Item]] = []
            for token_id, item in kinds.items():
                where = (row == token_id).nonzero().squeeze(1).tolist()
                if len(where) % item.vanilla:
                    return plain  # not this processor's prompt: image_spans says what is wrong
                starts += [(where[k], item) for k in range(0, len(where), item.vanilla)]
            ordered += [item for _, item in sorted(starts, key=lambda s: s[0])]
        same = sorted(i.token_id for i in ordered) == sorted(i.token_id for i in plain)
        return ordered if same else plain  # counts that do not match the pixels: image_spans says what is wrong

    def static_tokens_per_image(self) -> None:
        """None: an image sends 256 tokens but a video F * 257, so a budget is checked per image / video."""
        return None

    def vision_module(self) -> nn.Module:
        return self.tower.tower

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` and ``get_video_features`` on this instance."""
        return [set_instance_attr(self.inner, "get_image_features", VideoLlavaImageFeatures(self, state)),
                set_instance_attr(self.inner, "get_video_features", VideoLlavaVideoFeatures(self, state))]

    def load_processor(self, folder: Any) -> Any:
        return load_processor(folder)

    def encode_frames(self, state: Any, pixels: torch.Tensor, needs: frozenset[str],
                      kwargs: dict[str, Any]) -> tuple[VisionTokens, nn.Module, bool]:
        """Run the video tower on (V * F, 3, H, W) frames for ``state``'s method: (the frames' tokens, the
        projector, whether they are already projected)."""
        return self.encode(state, pixels, needs, kwargs, tower=self.video_tower, layout=self.frame_layout)


class VideoLlavaImageFeatures(LlavaImageFeatures):
    """``get_image_features`` of a compressed Video-LLaVA: pooler_output is an (images, K, D_lm) tensor."""

    def __call__(  # type: ignore[override]
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_values_images: torch.Tensor | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        pixels = pixel_values if pixel_values is not None else pixel_values_images
        if pixels is None:
            raise ValueError("get_image_features needs pixel_values (the processor's image pixels)")
        out = super().__call__(pixels, vision_feature_layer, vision_feature_select_strategy, **kwargs)
        out.pooler_output = torch.stack(out.pooler_output) if out.pooler_output else out.last_hidden_state[:, :0]
        return out


class VideoLlavaVideoFeatures:
    """``get_video_features`` of a compressed Video-LLaVA: pooler_output is a (videos, K, D_lm) tensor, each
    video's K tokens in frame order (scope=frame) or in the method's order over the whole video (scope=video)."""

    def __init__(self, adapter: VideoLlavaAdapter, state: Any) -> None:
        self.adapter, self.state = adapter, state
        self.configured = adapter.config.vision_feature_layer

    def video_numbers(self, videos: int) -> list[int]:
        """Each video's number among the items of the call in flight (for messages and recorded units)."""
        call = current_call(self.state)
        if call is not None and call.items is not None:
            numbers = [i for i, item in enumerate(call.items) if item.token_id == self.adapter.video_token_id]
            if len(numbers) == videos:
                return numbers
        return list(range(videos))

    def __call__(self, pixel_values_videos: torch.Tensor, vision_feature_layer: int | None = None,
                 **kwargs: Any) -> BaseModelOutputWithPooling:
        if vision_feature_layer is not None and vision_feature_layer != self.configured:
            raise ValueError(
                f"this model was compressed for vision_feature_layer {self.configured}, got {vision_feature_layer}; "
                "decompress, change the config, and compress again"
            )
        adapter, state = self.adapter, self.state
        if pixel_values_videos.ndim != 5:
            raise ValueError("pixel_values_videos must be (videos, frames, 3, H, W); pass the processor's output")
        videos, frames = int(pixel_values_videos.shape[0]), int(pixel_values_videos.shape[1])
        layout = adapter.frame_layout
        vanilla = frames * layout.vanilla
        numbers = self.video_numbers(videos)
        keep = state.pre_keep(vanilla, numbers[0] if numbers else 0, frames)  # one frame count, one budget
        per_frame = state.frame_keeps(keep, frames, numbers[0] if numbers else 0) if keep < vanilla else None
        whole = keep < vanilla and per_frame is None
        needs = state.needs()
        if whole and "received_attention" in needs:
            needs = needs | {"cls_attention"}  # a joined video's received attention is its frames' CLS attention
        pixels = pixel_values_videos.flatten(0, 1)
        tokens, projector, projected = adapter.encode_frames(state, pixels, needs, kwargs)
        if whole:
            features = self.whole_videos(tokens, keep, frames, numbers)
        else:
            keeps = (per_frame or [layout.vanilla] * frames) * videos
            units = [(numbers[v], f) for v in range(videos) for f in range(frames)]
            chosen = state.select_rows(tokens, keeps, units)
            rows = [sel.features[at] for sel, at in (c for c in chosen if c is not None)]
            features = torch.stack([torch.cat(rows[v * frames:(v + 1) * frames]) for v in range(videos)])
        if not projected:
            features = projector(features)
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=features)

    def whole_videos(self, tokens: VisionTokens, keep: int, frames: int, numbers: list[int]) -> torch.Tensor:
        """``scope=video``: each video's frames joined into one unit of F * N patches, ``keep`` chosen over it."""
        layout = self.adapter.frame_layout
        patches = frames * layout.num_patches
        if keep > patches:
            raise ValueError(
                f"scope=video chooses among a video's {patches} patch tokens ({frames} frames x "
                f"{layout.num_patches}; the frames' CLS tokens are not candidates), but the budget keeps {keep}; "
                f"pass tokens <= {patches}, or scope=frame"
            )
        joined = replace(tokens, layout=replace(layout, send_prefix=False)).joined(frames)
        chosen = self.state.select_rows(joined, [keep] * len(numbers), [(n, 0) for n in numbers])
        return torch.stack([sel.features[at] for sel, at in (c for c in chosen if c is not None)])


register_adapter(VideoLlavaAdapter)
