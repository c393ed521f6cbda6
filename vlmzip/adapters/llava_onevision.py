"""Adapter for ``transformers.LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision): images and videos.

LLaVA-OneVision is LLaVA-NeXT's anyres layout on a SigLIP tower, with a pooled high-resolution grid and single-crop
images in multi-image prompts: :class:`LlavaOnevisionAdapter` builds on
:class:`~vlmzip.adapters.llava_next.LlavaNextAdapter` (the same tower wrapper, feature layer, projector, crop grid
from ``image_grid_pinpoints``, even budget split and VisionZip crop layout) and owns what differs.

Model quirks this file owns:
- SigLIP tower without CLS: the projector is fed ``hidden_states[vision_feature_layer]`` (-1 in the released
  config) with the "full" strategy, every crop sending its side x side patches (27 x 27 = 729 at 384 px);
  "default" would drop a patch (it drops a CLS token SigLIP does not have) and is a ValueError, as is a list of
  feature layers.
- anyres_max_N (``config.vision_aspect_ratio``): the processor cuts a single image into a base crop (the whole
  image resized) and a grid of high-resolution crops (the best of ``image_grid_pinpoints`` for its size, up to
  6 x 6 crops in the released model). HF's packing (``pack_image_features``): the base crop's patches; then the
  high-resolution grid in raster order with the padding rows / columns removed (``unpad_image``), bilinearly
  interpolated to (int(h // r), int(w // r)) when r = sqrt(h * w / (N * side^2)) > 1.1 (the grid holds more than
  about N crops' patches); one ``image_newline`` token after each row; all in one run of placeholders.
  ``vanilla_count`` is the processor's own arithmetic (``_get_number_of_features``).
- Multi-image prompts: when a row of the batch holds several images (the processor's ``batch_num_images``),
  each of them is one crop (padded to a square, not cut) followed by one newline token: side^2 + 1
  placeholders. Without ``batch_num_images`` every image is cut (what HF's model does).
- Route: an instance-level ``get_image_features`` on ``model.model`` returns K_i projected tokens for image i;
  runtime.py shrinks each placeholder run from N_i to K_i before the model sees it.
- Positions: 1-D (Qwen2 LLM), contiguous over the shrunk sequence (what the released VisionZip code does).
- Videos: ``pixel_values_videos`` (videos, frames, 3, H, W), every video of a call with the same frame count; each
  frame is one crop through the tower, its patches projected, then shrunk 2 x 2 by ``apply_pooling`` (bilinear
  interpolation to ceil(side / 2) a side: 27 x 27 -> 14 x 14 = 196 tokens per frame at 384 px); one ``image_newline``
  token after the video's frames; one run of ``<video>`` placeholders. Route: an instance-level
  ``get_video_features`` (:class:`OnevisionVideoFeatures`).
- Processor: transformers' video processors need torchvision. Where it is missing, ``load_processor`` builds
  ``LlavaOnevisionProcessor`` with the torchvision-free video processor (:class:`OnevisionPilVideoProcessor`: the
  saved settings, each frame resized and normalised with the PIL image-processor backend (bicubic resampling
  differs from torchvision's by rounding), the same (videos, frames, 3, H, W) layout and placeholder expansion),
  with the checkpoint's own chat template.

What a compressed video sends (its budget: ``tokens=N`` per video, ``ratio=r`` of its count, ``tokens_per_frame=M``;
the budget counts frame tokens, the video's newline token is always sent after them):
- Keep-all: HF's own video features.
- Selection acts on the pooled tokens, the ones the vanilla model sends, as on LLaVA-NeXT-Video
  (``adapters/llava_next_video.py``): the frame is the unit (every pooled token mixes patches of one frame only,
  unlike the image grid's pooling across crops), the signals (received attention, keys) are shrunk by the same
  bilinear interpolation, and kept tokens are not pooled again. HF pools after the projector, so the pooled tokens
  exist in the LLM's space only: every pre-LLM method, merging ones included, works on the projected pooled tokens.
- ``scope=frame``: each frame an even share, selected with the frame's own signals; ``scope=video``: the method
  chooses across the video's joined frames.
- In-LLM methods see HF's vanilla video tokens, the newline included, as visual tokens.

What a compressed image sends (K_i = the image's budget):
- Keep-all (K_i >= N_i, e.g. ``ratio=1.0``): exactly HF's own packing (unpadding, pooling and newline tokens).
- Otherwise K_i is split evenly over the image's units, the remainder going to the first ones (the VisionZip
  authors' split on LLaVA-NeXT), each unit is compressed on its own (units with the same share in one batched
  method call), and no newline tokens are sent. A unit is one crop as the tower encodes it: its side x side
  SigLIP patches of the feature layer (the base crop, each high-resolution crop, or the single crop of an image in
  a multi-image prompt). Where HF pools the high-resolution grid, a unit is still a crop's own (unpooled) patches
  and a compressed image is not pooled: the pooling resamples the whole unpadded grid across crop borders by a
  non-integer factor, so a pooled token belongs to no single crop and has no attention or key of its own in the
  tower, while a crop's patches carry the signals the methods rank by (VisionZip's received attention and keys)
  and each of them, projected, is a token the vanilla model computes. Units are whole crops, padding included
  (no unpadding), as in the LLaVA-NeXT adapter.
  - VisionZip (arXiv 2412.04467): SigLIP has no CLS, so a patch's dominance is the attention it receives in the
    feature layer, averaged over heads and over all queries of its crop (VisionZip's rule for encoders without
    CLS, ``methods/visionzip.py``; the signal vlmzip's Qwen-VL adapter hands it too). Layout: the authors'
    released LLaVA-NeXT layout (``llava_arch.py``) without its CLS tokens: the base crop's tokens as VisionZip
    emits them (dominant, then contextual); the high-resolution crops' dominant patches in raster order over the
    whole high-resolution grid; then all high-resolution crops' contextual tokens, crop by crop.
  - Every other method: each crop's selected tokens in the method's order, base crop first, then the
    high-resolution crops in raster order of the crop grid.
  A budget that cannot be split (fewer tokens than units, or more than the units' patches hold, which only the
  newline tokens make possible) is a ValueError naming the image's vanilla count.
- In-LLM methods (FastV, SparseVLM, ...) see HF's vanilla packing, pooled grid and newline tokens included, as
  visual tokens.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
from transformers.utils import is_torchvision_available

from ..budgets import split_evenly
from ..methods.base import Selection
from ..sequence import Item
from ..views import ImageView, pixels_to_image
from .base import feature_kwargs, set_instance_attr
from .llava import LlavaImageFeatures
from .llava_next import LlavaNextAdapter, LlavaNextImageFeatures, host_sizes, unpadded_grid
from .llava_next_video import (
    PilFrames,
    TakesPilVideos,
    pooled_frames,
    processor_parts,
    saved_video_processor,
    select_videos,
    sent_features,
    video_offset,
)
from .registry import register_adapter

# HF pools the high-resolution grid when its side ratio to N crops' worth exceeds this (pack_image_features).
POOL_THRESHOLD = 1.1
# Processor settings saved with a checkpoint that the image-only processor takes back.
PROCESSOR_KEYS = ("num_image_tokens", "vision_feature_select_strategy", "image_token", "video_token",
                  "vision_aspect_ratio")


def max_crops(vision_aspect_ratio: str) -> int:
    """N of ``anyres_max_N``, the crops' worth of patches above which HF pools the high-resolution grid; a clear
    error for any other value (HF's own code parses nothing else)."""
    found = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if found is None or int(found[1]) < 1:
        raise ValueError(
            f"vision_aspect_ratio={vision_aspect_ratio!r}: vlmzip lays out LLaVA-OneVision's 'anyres_max_N' only "
            "(N >= 1, e.g. the released 'anyres_max_9')"
        )
    return int(found[1])


def pooled_grid(rows: int, cols: int, side: int, crops: int) -> tuple[int, int]:
    """(rows, cols) of the unpadded high-resolution grid after HF's anyres_max pooling: unchanged unless it holds
    more than ``POOL_THRESHOLD^2`` times ``crops`` crops of side x side patches, then divided by the side ratio
    and floored (``pack_image_features`` and the processor's ``_get_unpadded_features``)."""
    ratio = math.sqrt(rows * cols / (crops * side**2))
    if ratio > POOL_THRESHOLD:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def patched_images(count: int, batch_num_images: Any) -> list[bool]:
    """Which of ``count`` images HF cuts into crops: all without ``batch_num_images`` (images per row), else
    those alone in their row (a row of several images sends each as one crop)."""
    if batch_num_images is None:
        return [True] * count
    if isinstance(batch_num_images, torch.Tensor):
        batch_num_images = batch_num_images.tolist()
    patched = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if len(patched) != count:
        raise ValueError(
            f"batch_num_images {list(batch_num_images)} counts {len(patched)} images, but image_sizes has {count}; "
            "pass the processor's outputs together"
        )
    return patched


class OnevisionPilVideoProcessor(PilFrames, LlavaOnevisionVideoProcessor):
    """LLaVA-OneVision's video processor computed with PIL (transformers' needs torchvision): each frame resized to
    the tower's square input, rescaled and normalised."""


class PilOnevisionProcessor(TakesPilVideos, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` with the torchvision-free video processor: the same placeholder expansion
    (``<image>`` -> the processor's count per image, from ``image_sizes`` and ``batch_num_images``; ``<video>`` ->
    frames x ceil(side / 2)^2 + 1 newline) and the same outputs (input_ids, attention_mask, pixel_values,
    image_sizes, batch_num_images, pixel_values_videos (videos, frames, 3, H, W))."""


def load_processor(folder: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)`` where torchvision is installed (transformers' video processor
    needs it); otherwise ``LlavaOnevisionProcessor`` with the torchvision-free video processor, built from the saved
    image processor, tokenizer, processor settings and the checkpoint's own chat template."""
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(folder)
    settings, tokenizer, template, images = processor_parts(folder, ImportError("torchvision is not installed"))
    if settings.get("video_processor"):
        videos = saved_video_processor(OnevisionPilVideoProcessor, settings)
    else:  # a checkpoint saved without a video processor: frames as the image processor sizes a crop
        videos = OnevisionPilVideoProcessor(size=dict(images.size), image_mean=images.image_mean,
                                            image_std=images.image_std)
    return PilOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                 chat_template=template, **{k: settings[k] for k in PROCESSOR_KEYS if k in settings})


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """vlmzip's view of one ``LlavaOnevisionForConditionalGeneration`` instance (images and videos compressed)."""

    family = "llava-onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration,)
    takes_videos = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.aspect_ratio = self.config.vision_aspect_ratio
        self.max_crops = max_crops(self.aspect_ratio)
        self.video_token_id = int(self.config.video_token_id)
        self.pooled_side = math.ceil(self.side / 2)  # apply_pooling's bilinear 2 x 2 shrink of a video frame

    # -- counts ---------------------------------------------------------------------------------------

    def packed_grid(self, image_size: Any) -> tuple[int, int]:
        """(rows, cols) of the high-resolution tokens HF sends for a single image of ``image_size`` (height,
        width): the crop grid's patches, unpadded, then pooled under anyres_max_N."""
        size = tuple(int(v) for v in image_size)
        rows, cols = unpadded_grid(size, self.crop_grid(size), self.side)
        return pooled_grid(rows, cols, self.side, self.max_crops)

    def vanilla_count(self, image_size: Any, patched: bool = True) -> int:
        """Placeholders the processor writes for one image: base crop + packed grid + one newline per row (cut
        images), or one crop + one newline (an image of a multi-image row)."""
        if not patched:
            return self.layout.vanilla + 1
        rows, cols = self.packed_grid(image_size)
        return self.layout.vanilla + rows * cols + rows

    def image_crops(self, image_size: Any, patched: bool = True) -> int:
        """Crops the tower encodes for one image: the base crop and the high-resolution grid, or one."""
        return self.num_crops(image_size) if patched else 1

    def frame_tokens(self) -> int:
        """Tokens the vanilla model sends per video frame: the pooled grid, ceil(side / 2)^2 (14 x 14 = 196 at
        384 px); a video sends its frames' tokens and one newline token."""
        return self.pooled_side**2

    def has_images(self, call: dict[str, Any]) -> bool:
        """True when the call carries images or videos to encode."""
        return call.get("pixel_values") is not None or call.get("pixel_values_videos") is not None

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Each image's single run of placeholders, counted from ``image_sizes`` and ``batch_num_images`` as the
        processor counts them; then each video's run: frames x pooled tokens + 1 newline."""
        items = []
        if call.get("pixel_values") is not None:
            sizes = call.get("image_sizes")
            if sizes is None:
                raise ValueError("LLaVA-OneVision needs image_sizes with pixel_values; pass the processor's "
                                 "image_sizes")
            sizes = host_sizes(sizes)
            patched = patched_images(len(sizes), call.get("batch_num_images"))
            items = [Item(self.image_token_id, (self.vanilla_count(size, p),))
                     for size, p in zip(sizes, patched, strict=True)]
        videos = call.get("pixel_values_videos")
        if videos is None:
            return items
        if videos.dim() != 5:
            raise ValueError(f"pixel_values_videos of shape {tuple(videos.shape)}; expected (videos, frames, 3, H, W)")
        frames = int(videos.shape[1])
        return items + [Item(self.video_token_id, (frames * self.frame_tokens() + 1,), frames=frames)] * len(videos)

    def split(self, item: Item, keep: int, number: int, method: str) -> tuple[int, ...]:
        """A video keeps its budget's tokens for its frames plus its newline token (the budget counts frame
        tokens); an image keeps its budget."""
        if item.token_id == self.video_token_id:
            return (min(keep, item.vanilla - 1) + 1,)
        return super().split(item, keep, number, method)

    def install(self, state: Any) -> list[Any]:
        """Shadow ``get_image_features`` and ``get_video_features`` of ``model.model`` on this instance."""
        return [set_instance_attr(self.inner, "get_image_features", OnevisionImageFeatures(self, state)),
                set_instance_attr(self.inner, "get_video_features", OnevisionVideoFeatures(self, state))]

    def pool_signal(self, grid: torch.Tensor) -> torch.Tensor:
        """A per-patch signal map (B, C, side, side) -> per pooled token: the same bilinear shrink
        ``apply_pooling`` applies to the frame's tokens."""
        return F.interpolate(grid, size=[self.pooled_side, self.pooled_side], mode="bilinear")

    def load_processor(self, folder: Any) -> Any:
        return load_processor(folder)

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """Every crop as the tower sees it: the base crop (the whole image), then the high-resolution crops in
        raster order of their grid, padding included (one crop for an image of a multi-image row)."""
        size = host_sizes(inputs["image_sizes"])[0]
        patched = patched_images(len(inputs["image_sizes"]), inputs.get("batch_num_images"))[0]
        if not patched:
            picture = pixels_to_image(inputs["pixel_values"][0][0], image_processor)
            total = self.vanilla_count(size, patched=False)
            return ImageView(inputs, total, [picture], [self.layout],
                             caption=f"The image as the model sees it (one padded crop): all {total} visual tokens")
        view = super().view(inputs, image_processor)
        grid = unpadded_grid(tuple(size), self.crop_grid(size), self.side)
        pooled = self.packed_grid(size)
        if pooled != grid:
            view.caption += (f" (the {grid[0]} x {grid[1]} unpadded high-resolution patches pooled to "
                             f"{pooled[0]} x {pooled[1]})")
        return view


class OnevisionImageFeatures(LlavaNextImageFeatures):
    """``get_image_features`` of a compressed LLaVA-OneVision: pooler_output is a list of (K_i, D_lm) tensors."""

    def __call__(
        self,
        pixel_values: torch.Tensor,
        image_sizes: Any,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        self.check(vision_feature_layer, vision_feature_select_strategy)
        adapter, state = self.adapter, self.state
        if vision_aspect_ratio is not None and vision_aspect_ratio != adapter.aspect_ratio:
            raise ValueError(
                f"this model was compressed for vision_aspect_ratio {adapter.aspect_ratio!r}, got "
                f"{vision_aspect_ratio!r}; decompress, change the config, and compress again"
            )
        sizes = host_sizes(image_sizes)
        patched = patched_images(len(sizes), batch_num_images)
        crops = [adapter.image_crops(size, p) for size, p in zip(sizes, patched, strict=True)]
        if pixel_values.dim() == 5:  # (images, max crops, 3, H, W), padded: keep each image's own crops
            pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops, strict=True)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected 4 or 5 dimensions")
        if pixel_values.shape[0] != sum(crops):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} crops, but the images' sizes need "
                             f"{sum(crops)}; pass the processor's pixel_values, image_sizes and batch_num_images")
        counts = [adapter.vanilla_count(size, p) for size, p in zip(sizes, patched, strict=True)]
        keeps = [state.pre_keep(n, i) for i, n in enumerate(counts)]
        shares = [None if keep >= n else self.shares(i, n, keep, c)
                  for i, (n, keep, c) in enumerate(zip(counts, keeps, crops, strict=True))]
        needs = state.needs() if any(s is not None for s in shares) else frozenset()
        tokens, projector, projected = adapter.encode(state, pixel_values, needs, kwargs)

        starts = [sum(crops[:i]) for i in range(len(crops))]
        crop_keeps = [keep for i, share in enumerate(shares) for keep in (share or [None] * crops[i])]
        units = [(i, j) for i in range(len(crops)) for j in range(crops[i])]
        chosen = state.select_rows(tokens, crop_keeps, units)
        sent = {id(c[0]): c[0].features if projected else projector(c[0].features) for c in chosen if c is not None}
        whole = self.keep_all_features(tokens.hidden, shares, crops, starts, projector, projected)
        features: list[torch.Tensor] = []
        for i, share in enumerate(shares):
            if share is None:
                packed, _ = adapter.inner.pack_image_features(
                    [whole[i]], sizes[i : i + 1], image_newline=adapter.inner.image_newline,
                    vision_aspect_ratio=adapter.aspect_ratio,
                )
                features.append(packed[0])
            else:
                parts = [(*chosen[starts[i] + j], sent[id(chosen[starts[i] + j][0])]) for j in range(crops[i])]
                features.append(self.assemble(parts, adapter.crop_grid(sizes[i])))
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=features)

    def keep_all_features(self, hidden: torch.Tensor, shares: list[list[int] | None], crops: list[int],
                          starts: list[int], projector: nn.Module, projected: bool) -> dict[int, torch.Tensor]:
        """The projected (crops_i, side^2, D_lm) tokens of every image sent whole, by image number: the crops of
        those images projected in one call (all of ``hidden``, as HF does, when no image is compressed)."""
        whole = [i for i, share in enumerate(shares) if share is None]
        if not whole:
            return {}
        rows = [r for i in whole for r in range(starts[i], starts[i] + crops[i])]
        batch = hidden if len(rows) == hidden.shape[0] else hidden[torch.tensor(rows, device=hidden.device)]
        out = batch if projected else projector(batch)
        at, found = 0, {}
        for i in whole:
            found[i] = out[at : at + crops[i]]
            at += crops[i]
        return found

    def shares(self, image: int, vanilla: int, keep: int, crops: int) -> list[int]:
        """Each crop's share of image ``image``'s ``keep`` tokens (clear error when it cannot be split)."""
        per_crop = self.adapter.layout.vanilla
        if not crops <= keep <= crops * per_crop:
            raise ValueError(
                f"{self.state.name}: a budget of {keep} visual tokens for image {image} of this batch (vanilla count "
                f"{vanilla}: HF's packing of {crops} crop(s) of {per_crop} tokens, with newline tokens) cannot be "
                f"split over its crops; it needs between {crops} and {crops * per_crop} tokens (use ratio=1.0 to "
                "keep every token)"
            )
        return split_evenly(keep, crops)

    def assemble(self, parts: list[tuple[Selection, int, torch.Tensor]], grid: tuple[int, int]) -> torch.Tensor:
        """One image's tokens from its crops' selections (base crop first; a single-crop image: its tokens as
        the method sends them); see the module docstring."""
        if len(parts) == 1:
            selection, row, features = parts[0]
            return features[row]
        return super().assemble(parts, grid)


class OnevisionVideoFeatures(LlavaImageFeatures):
    """``get_video_features`` of a compressed LLaVA-OneVision: pooler_output is (V, K + 1, D_lm), each video's kept
    tokens then its newline token (every video of a call keeps the same count: one budget, one frame count)."""

    def __call__(self, pixel_values_videos: torch.Tensor, vision_feature_layer: int | None = None,
                 vision_feature_select_strategy: str | None = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        self.check(vision_feature_layer, vision_feature_select_strategy)
        adapter, state = self.adapter, self.state
        inner = adapter.inner
        videos, frames = int(pixel_values_videos.shape[0]), int(pixel_values_videos.shape[1])
        frame_tokens = frames * adapter.frame_tokens()
        keeps = [state.pre_keep(frame_tokens + 1, v, frames) for v in range(videos)]
        keeps = [None if keep >= frame_tokens else keep for keep in keeps]
        if all(keep is None for keep in keeps):
            return type(inner).get_video_features(inner, pixel_values_videos, vision_feature_layer=vision_feature_layer,
                                                  vision_feature_select_strategy=vision_feature_select_strategy,
                                                  **kwargs)
        tokens = adapter.tower.run(pixel_values_videos.flatten(0, 1), adapter.layout, state.needs(),
                                   **feature_kwargs(kwargs))
        # HF projects each frame's patches, then shrinks the grid: the pooled tokens exist in the LLM's space only
        hidden = inner.apply_pooling(inner.multi_modal_projector(tokens.hidden))
        pooled = pooled_frames(tokens, adapter.side, hidden, adapter.pool_signal, adapter.pooled_side)
        chosen = select_videos(state, pooled, frames, keeps, video_offset(state, adapter.image_token_id))
        newline = inner.image_newline.to(hidden.dtype)[None]
        cache: dict[int, torch.Tensor] = {}
        features = []
        for v, picked in enumerate(chosen):
            sent = (hidden[v * frames : (v + 1) * frames].flatten(0, 1) if picked is None
                    else sent_features(picked[0], None, cache))
            features.append(torch.cat([sent, newline], dim=0))
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=torch.stack(features))


register_adapter(LlavaOnevisionAdapter)
