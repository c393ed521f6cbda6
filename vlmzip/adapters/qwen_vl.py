"""Adapter for the Qwen-VL families: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration`` (and its MoE), ``Qwen3_5ForConditionalGeneration`` (and its MoE).

Model quirks this file owns:
- Qwen3-VL: patch 16, the same 2x2 merge and M-RoPE positions (videos carry timestamps as text), and DeepStack:
  the tower also returns, for each of a few of its layers, features of every merged token
  (``deepstack_features``), which the LLM adds to the hidden states at the visual tokens after its first decoder
  layers. A token dropped before the LLM is dropped from every DeepStack level; merging methods merge each level
  with the same weights (``Selection.apply``); keep-all sends the model's own features. In-LLM methods prune the
  additions in step with the hidden states (``DeepstackAdditions``). The MoE variant differs only in its MLPs.
- Qwen3.5: Qwen3-VL's image path without DeepStack, an LLM whose layers are mostly linear attention (Gated
  DeltaNet, a recurrent state that cannot drop tokens): pre-LLM methods work; in-LLM methods are refused.
- Dynamic resolution: image i of a call has its own patch grid ``image_grid_thw[i] = (t, h, w)``; the
  vision tower packs every image's patches into one sequence (attention stays inside each image's
  ``cu_seqlens`` segment) and the 2x2 PatchMerger turns each group of ``merge^2`` consecutive patches
  into one LLM token. The processor expands ``<|image_pad|>`` into one run of ``t*h*w / merge^2``
  placeholders.
- What is compressed: the merged tokens (the PatchMerger's output, what the LLM sees), image by image,
  each as one unit with layout ``TokenLayout(0, (t*h/merge, w/merge), send_prefix=True)``. Both "vision"
  and "projector" stage methods receive these tokens (the merger is Qwen's projector). Images with the
  same grid and budget go to the method in one batched call.
- Videos (``video_grid_thw`` (t, h, w), t temporal patches of ``temporal_patch_size`` frames): each temporal patch
  is one unit (a "frame" of the video budgets, ``Item.frames = t``) with its own grid and signals (the tower
  attends within a temporal patch); ``scope=video`` joins a video's patches into one unit. Qwen2-VL / Qwen2.5-VL
  write a video as one run of t*h*w / merge^2 placeholders; Qwen3-VL / Qwen3.5 as one run per patch after its
  timestamp text, so each patch keeps its own even share (``split``) and ``scope=video`` is refused there.
- Signals (no CLS): ``received_attention`` of a merged token = the attention its ``merge^2`` patches
  receive in the tower's signal block (summed over the group), each patch's share being the mean over
  heads and over the queries of its image's attention segment; ``keys`` = that block's keys (the fused
  ``qkv`` output, before RoPE), mean over heads, mean over the group. The signal block is the last
  block (Qwen2-VL, Qwen3-VL, Qwen3.5) or the last full-attention block, ``max(fullatt_block_indexes)`` (Qwen2.5-VL: the
  other blocks attend within windows). Qwen2.5-VL reorders merge groups by window before its blocks;
  the captured signals are mapped back to the merger's output order with the inverse of the same
  ``window_index`` the tower uses.
- Positions (M-RoPE). Every kept token keeps the (t, h, w) position it has in the vanilla (unshrunk)
  sequence; a merged token takes its target's (``Selection.indices``); text after an image keeps its
  vanilla position, so the positions have gaps where tokens were dropped. How:
  1. ``prepare`` (after runtime.py shrank the placeholder runs) notes on the call (``Call.note``) the
     caller's unshrunk ids and mask and the shrunk sequence's source columns.
  2. The ``get_image_features`` override records each image's selected indices on that note.
  3. An instance-level ``model.model.compute_3d_position_ids`` (called by the HF forward right after the
     image features, when no ``position_ids`` were passed) runs the model's own ``get_rope_index`` on the
     unshrunk ids, then gathers each shrunk slot's position from its source column (an image slot's
     source is the image's run start + the selected token's index). It sets ``model.model.rope_deltas``
     to the vanilla deltas plus the tokens dropped from each row, so HF's decode rule (1-D index in the
     shrunk sequence, ``cumsum(attention_mask) - 1``, + rope_deltas) gives every later token its vanilla
     position. Text-only calls on a cache use that rule in ``decode_positions`` (HF's own branch, but
     taking the mask's count for the new tokens only: transformers 5.24 returns the whole mask's length
     there, which breaks a masked decode step that reaches it).
  4. ``generate`` computes positions before the first forward, when the selection is not known yet: an
     instance-level ``_prepare_position_ids_for_generation`` returns None for calls with images, so the
     prefill and every decode step go through step 3 / HF's rope_deltas branch (generate encodes the
     images up front and drops pixel_values and image_grid_thw from the prefill, so step 3 takes the
     grids from the note of step 1; rows expanded for beams repeat their row's positions). Calls without
     images or videos (text, a later turn on a cache) use HF's own code unchanged.
  Passing ``position_ids`` together with images, or new images on a filled cache, is an error.
- Processor: transformers' Qwen processor needs torchvision for its video processor. Where it cannot be
  built, ``load_processor`` builds transformers' own processor class of the model type with
  :class:`QwenVideoProcessorPil` (PIL resize, transformers' patch layout) as its video processor, with the
  checkpoint's own chat template (never another one: a checkpoint without a template is a clear error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import SizeDict
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_video_resize
from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin
from transformers.video_utils import make_batched_metadata
from transformers.vision_utils import get_vision_window_index

from .. import kvcache, sequence, signals
from ..budgets import split_frames
from ..llm_hooks import rotate_half
from ..methods.base import TokenLayout, VisionTokens
from ..runtime import current_call
from ..sequence import Item
from ..views import ImageView, pixels_to_image
from .base import Adapter, captured, feature_kwargs, set_instance_attr
from .registry import register_adapter

# The representative image of ``unit_layout``: a 448 x 448 image (each image has its own grid).
REPRESENTATIVE_SIDE = 448
# Query rows per chunk when rebuilding a segment's attention: ``signals.segment_received_attention``.
QUERY_CHUNK = signals.QUERY_CHUNK


@dataclass
class PendingCall:
    """One prefill between its shrink and its positions: the unshrunk layout and the selections (host)."""

    ids: torch.Tensor  # (B, L) the caller's ids
    mask: torch.Tensor | None  # (B, L) the caller's attention mask, or None
    columns: torch.Tensor  # (B, L') source column of each shrunk slot, -1 = added padding
    image_grid_thw: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    extra: dict[str, Any]  # further get_rope_index inputs (Qwen2.5-VL: second_per_grid_ts)
    # per modality ("image", "video"), per item in processor order: kept merged-token indices within the item
    # (a video's index f * N + i is token i of its temporal patch f)
    indices: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def ready(self) -> bool:
        """Every image and video of the call has its selection recorded."""
        return (self.image_grid_thw is None or "image" in self.indices) and \
            (self.video_grid_thw is None or "video" in self.indices)


class QwenTower:
    """The Qwen vision tower seen by vlmzip: run it once and capture the signal block's q/k with hooks."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.merge = int(visual.spatial_merge_size)
        blocks = visual.blocks
        full = getattr(visual, "fullatt_block_indexes", None)
        self.windowed = full is not None
        if self.windowed:
            if not full:
                raise ValueError("this Qwen2.5-VL tower has no full-attention block (fullatt_block_indexes is empty)")
            self.block = max(int(i) for i in full) % len(blocks)
        else:
            self.block = len(blocks) - 1
        self.attn = blocks[self.block].attn

    def run(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, needs: frozenset[str],
            **kwargs: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        """Run the tower; returns (its output, per merged token received attention (N,), keys (N, Dh)),
        the signals in the merger's output order, or None when not needed."""
        with captured({"qkv": self.attn.qkv}, inputs={"attn": self.attn}, active=bool(needs)) as store:
            out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw, **kwargs)
        if not needs:
            return out, None, None
        received, keys = self.signals(store, grid_thw, needs)
        return out, received, keys

    def signals(self, captured: dict[str, Any], grid_thw: torch.Tensor,
                needs: frozenset[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(received attention (N,), keys (N, Dh)) per merged token from the signal block's captured q/k."""
        attn = self.attn
        qkv = captured["qkv"]
        args, kwargs = captured["attn"]
        length = qkv.shape[0]
        heads = attn.num_heads
        q, k, _ = qkv.float().reshape(length, 3, heads, -1).unbind(1)  # (S, H, Dh) each, the block's order
        unit = self.merge**2
        keys = k.mean(dim=1).view(length // unit, unit, -1).mean(dim=1) if "keys" in needs else None
        received = None
        if "received_attention" in needs:
            cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            position_embeddings = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            cos, sin = (t.float().unsqueeze(-2) for t in position_embeddings)
            q_rot = (q * cos + rotate_half(q) * sin).transpose(0, 1)  # (H, S, Dh)
            k_rot = (k * cos + rotate_half(k) * sin).transpose(0, 1)
            bounds = cu_seqlens.tolist()
            per_patch = torch.cat([
                signals.segment_received_attention(q_rot[:, a:b], k_rot[:, a:b], float(attn.scaling))
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ])
            received = per_patch.view(length // unit, unit).sum(dim=1)
        if self.windowed:  # the blocks see merge groups in window order; the merger's output is un-reordered
            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=self.merge, window_size=self.visual.window_size,
                patch_size=self.visual.patch_size,
            )
            order = torch.argsort(window_index.to(qkv.device))
            keys = None if keys is None else keys[order]
            received = None if received is None else received[order]
        return received, keys


class ImageOnlyQwenProcessor(Qwen2VLProcessor):
    """The Qwen2-VL processor without a video processor (transformers' needs torchvision).

    Same placeholder expansion (``<|image_pad|>`` -> t*h*w / merge^2 tokens per image) and the same
    outputs (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw); used when
    ``AutoProcessor`` cannot build the full processor on a machine without torchvision.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


# transformers' video processor defaults where a checkpoint saves no video settings of its own are the image
# processor's (its legacy fallback to preprocessor_config.json); these keys are what the video path reads.
VIDEO_KEYS = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
              "rescale_factor", "resample")


class QwenVideoProcessorPil(VideoProcessorMixin):
    """Qwen's video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) without torchvision: the frames it is given ->
    ``pixel_values_videos`` (t * h * w, C * T * p * p) and ``video_grid_thw`` (t, h, w) per video, laid out as
    transformers' ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` lay them out.

    Per video: the target size from the same ``smart_resize`` (Qwen2: per frame within ``size``; Qwen3: the
    clip's frames counted, ``whole_clip=True``), every frame resized with the PIL image processor's resize
    (PIL bicubic; transformers' resizes with torchvision, so pixel values differ by interpolation rounding),
    rescaled and normalised in NumPy, the last frame repeated to a multiple of ``temporal_patch_size``, then
    patchified in transformers' order. Frames are not sampled here (pass the frames to use); a caller with the
    frames' timing passes ``video_metadata`` (fps, frame indices) as to transformers' processor: Qwen2.5-VL's
    ``second_per_grid_ts`` and Qwen3-VL's timestamps come from it (without it transformers assumes 24 fps).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    do_sample_frames = False
    num_frames = None
    fps = None
    return_metadata = False

    def __init__(self, image_processor: Any, whole_clip: bool = False, **settings: Any) -> None:
        super().__init__()
        self.image_processor = image_processor
        self.whole_clip = whole_clip
        for key in VIDEO_KEYS:
            value = settings.get(key)
            setattr(self, key, getattr(image_processor, key) if value is None else value)
        size = dict(self.size)
        if settings.get("min_pixels") is not None:
            size["shortest_edge"] = settings["min_pixels"]
        if settings.get("max_pixels") is not None:
            size["longest_edge"] = settings["max_pixels"]
        self.size = size

    def to_dict(self) -> dict[str, Any]:
        """The settings (what transformers would save), without the image processor it resizes with."""
        out = super().to_dict()
        out.pop("image_processor", None)
        return out

    def target_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame of a ``frames``-frame video of ``height`` x ``width`` is resized to."""
        factor = int(self.patch_size) * int(self.merge_size)
        low, high = int(self.size["shortest_edge"]), int(self.size["longest_edge"])
        if self.whole_clip:
            return qwen3_video_resize(frames, height, width, temporal_factor=int(self.temporal_patch_size),
                                      factor=factor, min_pixels=low, max_pixels=high)
        return qwen2_smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)

    def preprocess(self, videos: Any, video_metadata: Any = None, return_metadata: bool = False,
                   return_tensors: Any = None, do_sample_frames: bool | None = None, num_frames: int | None = None,
                   fps: float | None = None, **kwargs: Any) -> BatchFeature:
        """``videos``: a list of videos, each a list of PIL frames (or (H, W, C) uint8 arrays); one video may be
        passed as its list of frames. Returns pixel_values_videos, video_grid_thw (and video_metadata)."""
        if do_sample_frames or num_frames is not None or fps is not None:
            raise ValueError(
                "this torchvision-free Qwen video processor takes the frames it is given and does not sample them: "
                "sample the frames first (e.g. vlmzip's --frames), pass them as videos=[[frame, ...], ...], and "
                "pass video_metadata (fps, frames_indices) for their timing"
            )
        clips = _video_list(videos)
        if video_metadata is None:  # transformers' default: the frames as given, fps unknown
            video_metadata = [{"total_num_frames": len(frames), "fps": None, "duration": None,
                               "frames_indices": list(range(len(frames)))} for frames in clips]
        metadata = make_batched_metadata(clips, video_metadata=video_metadata)
        patches, grids = [], []
        for number, frames in enumerate(clips):
            arrays = [_frame_array(frame, number) for frame in frames]
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise ValueError(f"video {number} has frames of different sizes {sorted(shapes)}; give every frame "
                                 "of a video the same size")
            _, height, width = arrays[0].shape
            target = SizeDict(*self.target_size(len(arrays), height, width))
            processed = []
            for a in arrays:
                a = PilBackend.resize(self.image_processor, a, size=target, resample=self.resample)
                a = PilBackend.rescale(self.image_processor, a, float(self.rescale_factor))
                processed.append(PilBackend.normalize(self.image_processor, a, self.image_mean, self.image_std))
            clip, grid = patchify_video(np.stack(processed).astype(np.float32), int(self.patch_size),
                                        int(self.merge_size), int(self.temporal_patch_size))
            patches.append(clip)
            grids.append(grid)
        data: dict[str, Any] = {"pixel_values_videos": np.concatenate(patches),
                                "video_grid_thw": np.array(grids, dtype=np.int64)}
        out = BatchFeature(data=data, tensor_type=return_tensors)
        if return_metadata:
            out["video_metadata"] = metadata
        return out


def patchify_video(frames: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, list[int]]:
    """(F, C, H, W) normalised frames -> (t * h * w, C * temporal * patch * patch) patches and the grid [t, h, w]:
    transformers' Qwen video ``patchify`` (the last frame repeated up to a multiple of ``temporal``; merge groups
    of ``merge`` x ``merge`` patches consecutive, the ``temporal`` frames of a patch inside each row)."""
    if pad := -frames.shape[0] % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    count, channels, height, width = frames.shape
    t, h, w = count // temporal, height // patch, width // patch
    x = frames.reshape(t, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, channels * temporal * patch * patch), [t, h, w]


def _video_list(videos: Any) -> list[list[Any]]:
    """``videos`` as a list of videos, each a list of frames (one video may come as its list of frames)."""
    if isinstance(videos, (list, tuple)) and videos and not isinstance(videos[0], (list, tuple)) \
            and not (isinstance(videos[0], np.ndarray) and videos[0].ndim == 4):
        videos = [videos]
    if not isinstance(videos, (list, tuple)) or not videos:
        raise ValueError("videos must be a list of videos, each a list of frames (PIL images); got none")
    out = []
    for number, video in enumerate(videos):
        frames = list(video)
        if not frames:
            raise ValueError(f"video {number} has no frames; pass at least one frame per video")
        out.append(frames)
    return out


def _frame_array(frame: Any, video: int) -> np.ndarray:
    """A frame (PIL image or (H, W, C) uint8 array) -> (3, H, W) uint8 RGB."""
    if isinstance(frame, PIL.Image.Image):
        return np.moveaxis(np.asarray(frame.convert("RGB")), -1, 0)
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"a frame of video {video} has shape {array.shape}; frames are PIL images or (H, W, 3) "
                         "RGB arrays")
    return np.moveaxis(array, -1, 0)


def checkpoint_chat_template(folder: str | Path) -> str | None:
    """The chat template saved with a checkpoint (the processor's ``chat_template.jinja`` / ``.json``, else the
    tokenizer's), or None when it has none."""
    processor_dict, _ = ProcessorMixin.get_processor_dict(str(folder))
    template = processor_dict.get("chat_template")
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return template
    return getattr(AutoTokenizer.from_pretrained(folder), "chat_template", None) or None


class TorchvisionFreeVideo:
    """Lets a transformers Qwen processor take :class:`QwenVideoProcessorPil` as its video processor (transformers
    checks it against its torchvision video processor classes, which do not load without torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor":
            if not isinstance(argument, QwenVideoProcessorPil):
                raise TypeError(f"expected a QwenVideoProcessorPil video processor, got {type(argument).__name__}")
            return QwenVideoProcessorPil
        return super().check_argument_for_proper_class(argument_name, argument)


class Qwen2VLProcessorPil(TorchvisionFreeVideo, Qwen2VLProcessor):
    """transformers' Qwen2-VL processor with the torchvision-free video processor."""


class Qwen2_5_VLProcessorPil(TorchvisionFreeVideo, Qwen2_5_VLProcessor):
    """transformers' Qwen2.5-VL processor (``second_per_grid_ts``) with the torchvision-free video processor."""


class Qwen3VLProcessorPil(TorchvisionFreeVideo, Qwen3VLProcessor):
    """transformers' Qwen3-VL processor (timestamps between temporal patches) with the torchvision-free video
    processor."""


# The processor transformers builds for each model type (Qwen3.5 reuses Qwen3-VL's).
PROCESSOR_CLASSES = {"qwen2_vl": Qwen2VLProcessorPil, "qwen2_5_vl": Qwen2_5_VLProcessorPil}


def processor_class(model_type: str) -> type:
    """The torchvision-free processor class of a Qwen-VL ``model_type`` (Qwen3-VL's for the Qwen3 families)."""
    fallback = Qwen3VLProcessorPil if model_type.startswith("qwen3") else Qwen2VLProcessorPil
    return PROCESSOR_CLASSES.get(model_type, fallback)


def torchvision_free_processor(image_processor: Any, tokenizer: Any, chat_template: str | None, model_type: str,
                               video_settings: dict[str, Any] | None = None) -> ProcessorMixin:
    """transformers' own Qwen processor of ``model_type`` (its placeholder expansion: Qwen2.5-VL's
    ``second_per_grid_ts``, Qwen3-VL's timestamps) with :class:`QwenVideoProcessorPil` as its video processor."""
    video = QwenVideoProcessorPil(image_processor, whole_clip=model_type.startswith("qwen3"),
                                  **(video_settings or {}))
    cls = processor_class(model_type)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
               chat_template=chat_template)


def load_processor(folder: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)`` where transformers can build the Qwen processor (its video
    processor needs torchvision); otherwise the same processor class with a torchvision-free video processor
    (:class:`QwenVideoProcessorPil`, the checkpoint's saved video settings, else its image processor's), built
    from the saved image processor, tokenizer and the checkpoint's own chat template."""
    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as err:
        reason = err
    template = checkpoint_chat_template(folder)
    if template is None:
        raise ValueError(
            f"cannot build the processor of {folder} ({type(reason).__name__}: {reason}), and the checkpoint has no "
            "chat template of its own for the torchvision-free processor vlmzip builds instead; install torchvision "
            "so transformers can build Qwen's processor, or add the model's chat template to the folder"
        )
    try:
        settings, _ = BaseVideoProcessor.get_video_processor_dict(str(folder))
    except OSError:
        settings = {}
    model_type = str(AutoConfig.from_pretrained(folder).model_type)
    return torchvision_free_processor(AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                                      template, model_type, {k: v for k, v in settings.items()
                                                             if k in (*VIDEO_KEYS, "min_pixels", "max_pixels")})


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], merge: int, patch: int, temporal: int,
               channels: int = 3) -> torch.Tensor:
    """The (C, h * patch, w * patch) picture of one frame from Qwen's flattened patches (h * w, C * T * P * P),
    which the processor lays out as (h / merge, w / merge, merge, merge, C, T, P, P); the first of the T
    frames of each temporal patch (an image repeats itself T times)."""
    h, w = grid
    x = patches.reshape(h // merge, w // merge, merge, merge, channels, temporal, patch, patch)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch, w * patch)


class QwenVLAdapter(Adapter):
    """vlmzip's view of one Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense or MoE) / Qwen3.5 instance."""

    family = "qwen-vl"
    rope_axes = 3
    takes_videos = True
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                     Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration,
                     Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.tower = QwenTower(self.inner.visual)
        self.merge = self.tower.merge
        self.patch_size = int(self.config.vision_config.patch_size)
        self.video_token_id = int(self.config.video_token_id)
        # Qwen3-VL / Qwen3.5 write a timestamp before each temporal patch: a video is one run per patch
        self.video_runs_per_patch = str(self.config.model_type).startswith("qwen3")
        self.state: Any = None

    def has_images(self, call: dict[str, Any]) -> bool:
        """True when the call carries images or videos to encode."""
        return call.get("pixel_values") is not None or call.get("pixel_values_videos") is not None

    def items(self, call: dict[str, Any]) -> list[Item]:
        """The images (one run of t * h * w / merge^2 placeholders each, from ``image_grid_thw``), then the videos
        (``video_grid_thw``: frames = t temporal patches; one run, or one run per patch on Qwen3-VL / Qwen3.5)."""
        images, videos = call.get("image_grid_thw"), call.get("video_grid_thw")
        if call.get("pixel_values") is not None and images is None:
            raise ValueError("Qwen-VL images need image_grid_thw alongside pixel_values; pass the processor's outputs")
        if call.get("pixel_values_videos") is not None and videos is None:
            raise ValueError("Qwen-VL videos need video_grid_thw alongside pixel_values_videos; pass the processor's "
                             "outputs")
        unit = self.merge**2
        out = [Item(self.image_token_id, (int(t * h * w) // unit,), frames=int(t))
               for t, h, w in (images.tolist() if images is not None else [])]
        for t, h, w in videos.tolist() if videos is not None else []:
            n = int(h * w) // unit
            runs = (n,) * int(t) if self.video_runs_per_patch else (int(t) * n,)
            out.append(Item(self.video_token_id, runs, frames=int(t)))
        return out

    def split(self, item: Item, keep: int, number: int, method: str) -> tuple[int, ...]:
        """A Qwen3-VL video (one run per temporal patch): each patch's even share of ``keep`` (scope=frame)."""
        if len(item.segments) == 1:
            return (keep,)
        pre = None if self.state is None else self.state.pre
        if pre is not None and pre.budget is not None and pre.budget.scope == "video":
            raise ValueError(self.scope_video_error())
        if keep < item.frames:
            raise ValueError(
                f"{keep} tokens cannot be split over the {item.frames} frames of video {number} of this batch (each "
                f"temporal patch is its own run of placeholders and keeps at least one token); pass tokens >= "
                f"{item.frames}"
            )
        return tuple(split_frames(keep, item.frames, f"video {number} of this batch"))

    def scope_video_error(self) -> str:
        return (f"scope=video cannot be used on {type(self.model).__name__} videos: its processor writes a timestamp "
                "before each temporal patch, so a video is one run of placeholders per patch and each patch must "
                "keep its own count; use scope=frame (the default)")

    def unit_layout(self) -> TokenLayout:
        """The merged grid of a 448 x 448 image (a representative size; each image has its own grid)."""
        side = REPRESENTATIVE_SIDE // (self.patch_size * self.merge)
        return TokenLayout(num_prefix=0, grid=(side, side), send_prefix=True)

    def vision_module(self) -> nn.Module:
        return self.tower.visual

    def install(self, state: Any) -> list[Any]:
        """Instance-level image and video features (compressing), M-RoPE positions and generate-time positions; on
        Qwen3-VL also the DeepStack additions of the first decoder layers, in step with in-LLM pruning."""
        self.state = state
        undo = [
            set_instance_attr(self.inner, "get_image_features", QwenImageFeatures(self, state)),
            set_instance_attr(self.inner, "get_video_features", QwenVideoFeatures(self, state)),
            set_instance_attr(self.inner, "compute_3d_position_ids", QwenPositions(self, state)),
            set_instance_attr(self.model, "_prepare_position_ids_for_generation", QwenGenerationPositions(self)),
        ]
        lm = self.language_model()
        if state.llm and hasattr(lm, "_deepstack_process"):
            undo.append(set_instance_attr(lm, "_deepstack_process", DeepstackAdditions(lm, state)))
        return undo

    def load_processor(self, folder: Any) -> Any:
        return load_processor(folder)

    def describe_positions(self) -> str:
        return (
            "M-RoPE (t, h, w): every kept token keeps its vanilla position (a merged token its target's), "
            "text after an image keeps its vanilla position (gaps where tokens were dropped), and rope_deltas "
            "continue decoding at the vanilla positions"
        )

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """The first image at the size the tower sees it (resized to whole merged patches), one unit whose grid is
        its merged tokens."""
        t, h, w = (int(v) for v in inputs["image_grid_thw"][0].tolist())
        patches = inputs["pixel_values"][: t * h * w]
        temporal = int(self.config.vision_config.temporal_patch_size)
        picture = pixels_to_image(unpatchify(patches[: h * w], (h, w), self.merge, self.patch_size, temporal),
                                  image_processor)
        total = self.items(inputs)[0].vanilla
        layout = TokenLayout(num_prefix=0, grid=(t * h // self.merge, w // self.merge), send_prefix=True)
        caption = (f"The image as the model sees it ({picture.width} x {picture.height} px): all {total} visual "
                   f"tokens, one per {self.merge} x {self.merge} patches")
        return ImageView(inputs, total, [picture], [layout], caption=caption)

    # -- positions --------------------------------------------------------------------------------

    def prepare(self, call: Any, kwargs: dict[str, Any], original_ids: torch.Tensor, shrunk: Any) -> None:
        """Note the unshrunk layout of this prefill on the call; positions are built once the selection is known."""
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "a compressed Qwen-VL model computes its M-RoPE positions itself (kept tokens keep their vanilla "
                "positions); call it without position_ids"
            )
        ids = original_ids.cpu()
        mask = None
        if shrunk.attention_mask is not None:  # the caller's mask: shrunk slots map back, dropped ones were 1
            mask = torch.ones_like(ids)
            for b in range(ids.shape[0]):
                valid = shrunk.columns[b] >= 0
                mask[b, shrunk.columns[b][valid]] = shrunk.attention_mask[b][valid].to(mask.dtype)
        image, video = kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")
        if kwargs.get("pixel_values") is None:
            image = None
        if kwargs.get("pixel_values_videos") is None:
            video = None
        extra = {k: kwargs[k] for k in ("second_per_grid_ts",) if kwargs.get(k) is not None}
        call.note = PendingCall(
            ids=ids, mask=mask, columns=shrunk.columns, image_grid_thw=None if image is None else image.cpu(),
            video_grid_thw=None if video is None else video.cpu(),
            extra={k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
        )

    def positions(self, pending: PendingCall, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, L') M-RoPE positions of the shrunk prefill and (B, 1) rope deltas, from the unshrunk layout.

        ``batch`` may be a multiple of the caller's rows (generate expands them for beams and
        ``num_return_sequences``): each row's positions are repeated as generate repeats the row.
        """
        ids, mask, columns = pending.ids, pending.mask, pending.columns
        mm_types = torch.zeros_like(ids, dtype=torch.int)
        mm_types[ids == self.image_token_id] = 1
        mm_types[ids == self.video_token_id] = 2
        full, deltas = self.inner.get_rope_index(
            ids, mm_token_type_ids=mm_types, image_grid_thw=pending.image_grid_thw,
            video_grid_thw=pending.video_grid_thw, attention_mask=mask, **pending.extra,
        )
        items = self.items({"image_grid_thw": pending.image_grid_thw, "video_grid_thw": pending.video_grid_thw})
        indices = pending.indices.get("image", []) + pending.indices.get("video", [])
        if len(indices) != len(items):
            raise RuntimeError(f"recorded {len(indices)} selections for {len(items)} images and videos")
        kept = []  # per item, per run: a video with one run per temporal patch keeps patch f's tokens in run f
        for item, chosen in zip(items, indices, strict=True):
            if len(item.segments) == 1:
                kept.append((int(chosen.numel()),))
            else:
                n = item.segments[0]
                kept.append(tuple(int(((chosen >= f * n) & (chosen < (f + 1) * n)).sum())
                                  for f in range(len(item.segments))))
        source = torch.arange(ids.shape[1]).expand(ids.shape[0], -1).clone()
        removed = torch.zeros(ids.shape[0], 1, dtype=deltas.dtype)
        for span in sequence.image_spans(ids, items, kept):
            before = kept[span.image][: span.segment]
            chosen = indices[span.image][sum(before) : sum(before) + span.kept]
            offset = sum(items[span.image].segments[: span.segment])  # the run's first token within the item
            source[span.row, span.start : span.start + span.kept] = span.start + chosen - offset
            removed[span.row] += span.vanilla - span.kept
        slot_source = source.gather(1, columns.clamp(min=0))
        gathered = full.gather(2, slot_source.unsqueeze(0).expand(3, -1, -1))
        gathered = gathered.masked_fill((columns < 0).unsqueeze(0), 0)
        repeat = batch // ids.shape[0]
        gathered = gathered.repeat_interleave(repeat, dim=1)
        deltas = (deltas.cpu() + removed).repeat_interleave(repeat, dim=0)
        return gathered.to(device), deltas.to(device)


class QwenFeatures:
    """The compressing image / video features of a Qwen-VL: run the tower once on every image (or video) of the
    call, select each one's tokens with the pre-LLM method, return pooler_output as a tuple of (K_i, D) per item
    (Qwen3-VL: DeepStack features selected and merged in step).

    A unit is one temporal patch (an image has one): its merged tokens, grid (h / merge, w / merge). A video's
    budget is spread over its temporal patches (``scope=frame``, each one its even share, ranked by its own
    signals), or chosen across all of them (``scope=video``: one joined unit of t * N tokens, index f * N + i =
    token i of patch f). A video's kept tokens are sent patch by patch, in the order the method returns them.
    """

    def __init__(self, adapter: QwenVLAdapter, state: Any, kind: str) -> None:
        self.adapter, self.state, self.kind = adapter, state, kind

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        """(P, C * T * p * p) patches of every item, (n, 3) grids -> the model output with selected features."""
        adapter, state, kind = self.adapter, self.state, self.kind
        if grid_thw is None:
            name = "image_grid_thw" if kind == "image" else "video_grid_thw"
            raise ValueError(f"Qwen-VL {kind}s need {name} alongside their pixel values; pass the processor's outputs")
        out, received, keys = adapter.tower.run(pixel_values, grid_thw, state.needs(), **feature_kwargs(kwargs))
        merged = out.pooler_output
        grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
        unit = adapter.merge**2
        call = current_call(state)
        pending = call.note if call is not None and isinstance(call.note, PendingCall) else None
        first = 0  # the call's number of the first item here (videos come after the images)
        if kind == "video" and pending is not None and pending.image_grid_thw is not None:
            first = len(pending.image_grid_thw)
        # every unit (one temporal patch of one item): (item, patch, start row in merged, tokens N, grid)
        units: list[tuple[int, int, int, int, tuple[int, int]]] = []
        at = 0
        for i, (t, h, w) in enumerate(grids):
            n = h * w // unit
            units += [(i, f, at + f * n, n, (h // adapter.merge, w // adapter.merge)) for f in range(t)]
            at += t * n
        per_unit: list[int | None] = [None] * len(units)  # tokens each unit keeps (None: chosen with its video)
        joined: dict[tuple[int, int, int], list[int]] = {}  # scope=video items by grid
        keeps: dict[int, int] = {}
        u = 0
        for i, (t, h, w) in enumerate(grids):
            n = h * w // unit
            number = first + i
            keep = state.pre_keep(t * n, number, t)
            keeps[i] = keep
            if keep >= t * n:
                shares: list[int] | None = [n] * t
            elif t == 1:
                shares = [keep]
            else:
                shares = state.frame_keeps(keep, t, number)
                if shares is None and adapter.video_runs_per_patch:
                    raise ValueError(adapter.scope_video_error())
            if shares is None:
                joined.setdefault((t, h, w), []).append(i)
            else:
                per_unit[u : u + t] = shares
            u += t

        def rows_of(x: torch.Tensor | None, members: list[int]) -> torch.Tensor | None:
            if x is None:
                return None
            return torch.stack([x[units[m][2] : units[m][2] + units[m][3]] for m in members])

        def pixels_of(members: list[int]) -> torch.Tensor:
            return torch.stack([pixel_values[units[m][2] * unit : (units[m][2] + units[m][3]) * unit]
                                for m in members])

        deepstack = getattr(out, "deepstack_features", None)  # Qwen3-VL: (N, D) features of several tower layers
        chosen: list[tuple[Any, int] | None] = [None] * len(units)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for m, (_, _, _, _, grid) in enumerate(units):
            if per_unit[m] is not None:
                by_grid.setdefault(grid, []).append(m)
        for grid, members in by_grid.items():
            tokens = VisionTokens(
                hidden=rows_of(merged, members), layout=TokenLayout(0, grid, send_prefix=True),
                keys=rows_of(keys, members), received_attention=rows_of(received, members),
                seeds=signals.content_seeds(pixels_of(members)),
            )
            answer = state.select_rows(tokens, [per_unit[m] for m in members],
                                       [(first + units[m][0], units[m][1]) for m in members])
            for m, pair in zip(members, answer, strict=True):
                chosen[m] = pair
        features: list[torch.Tensor | None] = [None] * len(grids)
        indices: list[torch.Tensor | None] = [None] * len(grids)
        deep: list[list[torch.Tensor | None]] = [[None] * len(grids) for _ in deepstack or ()]
        unit_deep = [[None] * len(units) for _ in deepstack or ()]
        for selection, members in _members_of(chosen):
            for layer, feats in enumerate(deepstack or ()):
                for m, mixed in zip(members, selection.apply(rows_of(feats, members)), strict=True):
                    unit_deep[layer][m] = mixed
        u = 0
        for i, (t, h, w) in enumerate(grids):
            n = h * w // unit
            if per_unit[u] is not None:
                parts = [chosen[u + f] for f in range(t)]
                features[i] = torch.cat([sel.features[row] for sel, row in parts])
                indices[i] = torch.cat([sel.indices[row].detach().cpu() + f * n
                                        for f, (sel, row) in enumerate(parts)])
                for layer in range(len(deep)):
                    deep[layer][i] = torch.cat([unit_deep[layer][u + f] for f in range(t)])
            u += t
        for (t, h, w), items in joined.items():  # scope=video: each video one unit of its patches, joined
            starts = {i: next(m for m, x in enumerate(units) if x[0] == i) for i in items}
            members = [starts[i] + f for i in items for f in range(t)]
            grid = (h // adapter.merge, w // adapter.merge)
            frames = VisionTokens(
                hidden=rows_of(merged, members), layout=TokenLayout(0, grid, send_prefix=True),
                keys=rows_of(keys, members), received_attention=rows_of(received, members),
                seeds=signals.content_seeds(pixels_of(members)),
            ).joined(t)
            answer = state.select_rows(frames, [keeps[i] for i in items], [(first + i, 0) for i in items])
            for i, (selection, row) in zip(items, answer, strict=True):
                features[i] = selection.features[row]
                indices[i] = selection.indices[row].detach().cpu()
            for selection, videos in _members_of(answer):
                for layer, feats in enumerate(deepstack or ()):
                    whole = torch.stack([rows_of(feats, members[v * t : (v + 1) * t]).flatten(0, 1) for v in videos])
                    for v, mixed in zip(videos, selection.apply(whole), strict=True):
                        deep[layer][items[v]] = mixed
        if pending is not None:
            pending.indices[kind] = [i for i in indices if i is not None]
        if deepstack is None:
            return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=tuple(features))
        return type(out)(last_hidden_state=out.last_hidden_state, pooler_output=tuple(features),
                         deepstack_features=[tuple(layer) for layer in deep])


class QwenImageFeatures(QwenFeatures):
    """``get_image_features`` of a compressed Qwen-VL: pooler_output is a tuple of (K_i, D) per image."""

    def __init__(self, adapter: QwenVLAdapter, state: Any) -> None:
        super().__init__(adapter, state, "image")

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                 **kwargs: Any) -> BaseModelOutputWithPooling:
        return self.encode(pixel_values, image_grid_thw, kwargs)


class QwenVideoFeatures(QwenFeatures):
    """``get_video_features`` of a compressed Qwen-VL: pooler_output is a tuple of (K_v, D) per video."""

    def __init__(self, adapter: QwenVLAdapter, state: Any) -> None:
        super().__init__(adapter, state, "video")

    def __call__(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None,
                 **kwargs: Any) -> BaseModelOutputWithPooling:
        return self.encode(pixel_values_videos, video_grid_thw, kwargs)


def _members_of(chosen: list[tuple[Any, int] | None]) -> list[tuple[Any, list[int]]]:
    """Each distinct selection of ``select_rows``' answers with its units, in the selection's row order."""
    found: dict[int, tuple[Any, list[tuple[int, int]]]] = {}
    for m, pair in enumerate(chosen):
        if pair is not None:
            found.setdefault(id(pair[0]), (pair[0], []))[1].append((pair[1], m))
    return [(selection, [m for _, m in sorted(rows)]) for selection, rows in found.values()]


class DeepstackAdditions:
    """``_deepstack_process`` of a compressed Qwen3-VL's language model: after each of its first decoder layers
    the model adds the tower's DeepStack features at the visual tokens (``visual_pos_masks``, (B, L) over the
    LLM's input). Once an in-LLM method has pruned, the hidden states hold only the kept slots: each kept visual
    token gets its own addition, every other slot (text, padding, a token a method inserted) none."""

    def __init__(self, lm: nn.Module, state: Any) -> None:
        self.lm, self.state = lm, state

    def __call__(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                 visual_embeds: torch.Tensor) -> torch.Tensor:
        original = type(self.lm)._deepstack_process.__get__(self.lm)
        step = self.state.current_step()
        slots = None if step is None else step.current_slots()
        if slots is None:  # nothing pruned yet in this call: the hidden states hold the whole input
            return original(hidden_states, visual_pos_masks, visual_embeds)
        q_idx, real = slots
        masks = visual_pos_masks.to(hidden_states.device)
        rank = (masks.flatten().long().cumsum(0) - 1).view_as(masks)  # row of each visual token in visual_embeds
        here = masks.gather(1, q_idx) & real
        return original(hidden_states, here, visual_embeds[rank.gather(1, q_idx)[here]])


class QwenPositions:
    """``model.model.compute_3d_position_ids`` of a compressed Qwen-VL: prefills with recorded selections get
    their vanilla positions gathered for the kept tokens (and shifted rope_deltas); all else is HF's own."""

    def __init__(self, adapter: QwenVLAdapter, state: Any) -> None:
        self.adapter, self.state = adapter, state

    def __call__(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, cache: Any = None, **extra: Any) -> torch.Tensor | None:
        adapter = self.adapter
        inner = adapter.inner
        call = current_call(self.state)
        # transformers before 5.20 (the one vLLM 0.32 pins) names the cache past_key_values here
        cache_name = "past_key_values" if "past_key_values" in extra else "cache"
        cache = extra.pop("past_key_values", cache)
        pending = None
        if call is not None and isinstance(call.note, PendingCall):
            pending, call.note = call.note, None  # used by the prefill only
        cache_length = kvcache.full_length(cache)  # of the whole sequence, also when layer 0 holds only kept slots
        # generate encodes the images before the prefill and passes their features instead of pixels and
        # grids: the grids come from the pending call, noted when the caller's call was shrunk
        usable = (pending is not None and pending.ready() and input_ids is not None
                  and cache_length == 0 and input_ids.shape[1] == pending.columns.shape[1]
                  and input_ids.shape[0] % pending.ids.shape[0] == 0)
        if pending is not None and pending.indices and cache_length > 0:
            raise ValueError(
                "a compressed Qwen-VL model takes images in the first call on a cache only (their positions "
                "come from the whole unshrunk prompt); start a new cache for a prompt with new images"
            )
        if not usable:
            if (cache_length > 0 and inner.rope_deltas is not None and inputs_embeds is not None
                    and not _has_vision(extra)):
                return decode_positions(inner.rope_deltas, attention_mask, cache_length, inputs_embeds.shape[:2],
                                        inputs_embeds.device)
            original = type(inner).compute_3d_position_ids.__get__(inner)
            return original(input_ids=input_ids, inputs_embeds=inputs_embeds, image_grid_thw=image_grid_thw,
                            video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                            **{cache_name: cache}, **extra)
        positions, deltas = adapter.positions(pending, input_ids.shape[0], input_ids.device)
        inner.rope_deltas = deltas
        return positions


def _has_vision(extra: dict[str, Any]) -> bool:
    types = extra.get("mm_token_type_ids")
    return types is not None and bool((types != 0).any())


def decode_positions(rope_deltas: torch.Tensor, attention_mask: torch.Tensor | None, cache_length: int,
                     shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(3, B, Q) positions of Q new text tokens after a cached prefix: their 1-D index in the (shrunk)
    sequence plus ``rope_deltas`` (HF's own branch, with the mask's cumulative count taken for the new
    tokens only)."""
    batch, q_len = shape
    if attention_mask is not None and attention_mask.ndim == 2:
        index = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -q_len:]
    else:
        index = torch.arange(cache_length, cache_length + q_len, device=device).expand(batch, -1)
    delta = rope_deltas.repeat_interleave(batch // rope_deltas.shape[0], dim=0).to(device)
    return (index.to(device) + delta).unsqueeze(0).expand(3, -1, -1)


class QwenGenerationPositions:
    """``_prepare_position_ids_for_generation`` of a compressed Qwen-VL: None for calls with images (their
    positions are built in the prefill, once the selection is known), HF's own otherwise."""

    def __init__(self, adapter: QwenVLAdapter) -> None:
        self.adapter = adapter

    def __call__(self, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor | None:
        if model_kwargs.get("pixel_values") is not None or model_kwargs.get("pixel_values_videos") is not None:
            return None
        model = self.adapter.model
        return type(model)._prepare_position_ids_for_generation(model, inputs_tensor, model_kwargs)


register_adapter(QwenVLAdapter)
