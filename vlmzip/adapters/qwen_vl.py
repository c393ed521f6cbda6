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
  same grid and budget go to the method in one batched call. Videos are not compressed: their tokens,
  positions and placeholders stay as in the vanilla model.
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
     images (text, videos, a later turn on a cache) use HF's own code unchanged.
  Passing ``position_ids`` together with images, or new images on a filled cache, is an error.
- Processor: transformers' Qwen processor needs torchvision for its video processor. Where it cannot be
  built, ``load_processor`` builds the same processor without video support, with the checkpoint's own
  chat template (never another one: a checkpoint without a template is a clear error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

from .. import kvcache, sequence, signals
from ..llm_hooks import rotate_half
from ..methods.base import TokenLayout, VisionTokens
from ..runtime import current_call
from ..sequence import Item
from ..views import ImageView, pixels_to_image
from .base import Adapter, captured, feature_kwargs, set_instance_attr
from .registry import register_adapter

# The representative image of ``unit_layout``: a 448 x 448 image (each image has its own grid).
REPRESENTATIVE_SIDE = 448
# Query rows per chunk when rebuilding a segment's attention (bounds memory at H x chunk x n floats).
QUERY_CHUNK = 1024


@dataclass
class PendingCall:
    """One prefill between its shrink and its positions: the unshrunk layout and the selections (host)."""

    ids: torch.Tensor  # (B, L) the caller's ids
    mask: torch.Tensor | None  # (B, L) the caller's attention mask, or None
    columns: torch.Tensor  # (B, L') source column of each shrunk slot, -1 = added padding
    image_grid_thw: torch.Tensor
    video_grid_thw: torch.Tensor | None
    extra: dict[str, Any]  # further get_rope_index inputs (Qwen2.5-VL: second_per_grid_ts)
    indices: list[torch.Tensor] | None = None  # per image (processor order): kept merged-token indices


def segment_received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, n, Dh) queries and keys of one attention segment -> (n,) attention each key receives,
    mean over heads and queries (float32; queries processed in chunks, never a full H x n x n tensor
    beyond ``QUERY_CHUNK`` rows)."""
    heads, n, _ = q.shape
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    for start in range(0, n, QUERY_CHUNK):
        probs = torch.softmax((q[:, start : start + QUERY_CHUNK] @ k.transpose(-1, -2)) * scale, dim=-1)
        total += probs.sum(dim=(0, 1))
    return total / (heads * n)


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
                segment_received_attention(q_rot[:, a:b], k_rot[:, a:b], float(attn.scaling))
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


def load_processor(folder: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)`` where transformers can build the Qwen processor (its video
    processor needs torchvision); otherwise the same processor without video support, built from the saved
    image processor, tokenizer and the checkpoint's own chat template."""
    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as err:
        reason = err
    template = checkpoint_chat_template(folder)
    if template is None:
        raise ValueError(
            f"cannot build the processor of {folder} ({type(reason).__name__}: {reason}), and the checkpoint has no "
            "chat template of its own for the image-only processor vlmzip builds instead; install torchvision so "
            "transformers can build Qwen's processor, or add the model's chat template to the folder"
        )
    return ImageOnlyQwenProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                  tokenizer=AutoTokenizer.from_pretrained(folder), chat_template=template)


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
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                     Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration,
                     Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.tower = QwenTower(self.inner.visual)
        self.merge = self.tower.merge
        self.patch_size = int(self.config.vision_config.patch_size)
        self.video_token_id = int(self.config.video_token_id)

    def items(self, call: dict[str, Any]) -> list[Item]:
        """One run of t * h * w / merge^2 placeholders per image, from ``image_grid_thw`` (one host sync)."""
        grids = call.get("image_grid_thw")
        if grids is None:
            raise ValueError("Qwen-VL images need image_grid_thw alongside pixel_values; pass the processor's outputs")
        return [Item(self.image_token_id, (int(t * h * w) // self.merge**2,), frames=int(t))
                for t, h, w in grids.tolist()]

    def unit_layout(self) -> TokenLayout:
        """The merged grid of a 448 x 448 image (a representative size; each image has its own grid)."""
        side = REPRESENTATIVE_SIDE // (self.patch_size * self.merge)
        return TokenLayout(num_prefix=0, grid=(side, side), send_prefix=True)

    def vision_module(self) -> nn.Module:
        return self.tower.visual

    def install(self, state: Any) -> list[Any]:
        """Instance-level image features (compressing), M-RoPE positions and generate-time positions; on Qwen3-VL
        also the DeepStack additions of the first decoder layers, in step with in-LLM pruning."""
        undo = [
            set_instance_attr(self.inner, "get_image_features", QwenImageFeatures(self, state)),
            set_instance_attr(self.inner, "get_video_features", QwenVideoFeatures(self.inner)),
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
        video = kwargs.get("video_grid_thw")
        extra = {k: kwargs[k] for k in ("second_per_grid_ts",) if kwargs.get(k) is not None}
        call.note = PendingCall(
            ids=ids, mask=mask, columns=shrunk.columns, image_grid_thw=kwargs["image_grid_thw"].cpu(),
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
        items = self.items({"image_grid_thw": pending.image_grid_thw})
        indices = pending.indices or []
        if len(indices) != len(items):
            raise RuntimeError(f"recorded {len(indices)} image selections for {len(items)} images")
        kept = [(int(i.numel()),) for i in indices]
        source = torch.arange(ids.shape[1]).expand(ids.shape[0], -1).clone()
        removed = torch.zeros(ids.shape[0], 1, dtype=deltas.dtype)
        for span in sequence.image_spans(ids, items, kept):
            source[span.row, span.start : span.start + span.kept] = span.start + indices[span.image]
            removed[span.row] += span.vanilla - span.kept
        slot_source = source.gather(1, columns.clamp(min=0))
        gathered = full.gather(2, slot_source.unsqueeze(0).expand(3, -1, -1))
        gathered = gathered.masked_fill((columns < 0).unsqueeze(0), 0)
        repeat = batch // ids.shape[0]
        gathered = gathered.repeat_interleave(repeat, dim=1)
        deltas = (deltas.cpu() + removed).repeat_interleave(repeat, dim=0)
        return gathered.to(device), deltas.to(device)


class QwenImageFeatures:
    """``get_image_features`` of a compressed Qwen-VL: pooler_output is a tuple of (K_i, D) per image."""

    def __init__(self, adapter: QwenVLAdapter, state: Any) -> None:
        self.adapter, self.state = adapter, state

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                 **kwargs: Any) -> BaseModelOutputWithPooling:
        if image_grid_thw is None:
            raise ValueError("Qwen-VL images need image_grid_thw alongside pixel_values; pass the processor's outputs")
        adapter, state = self.adapter, self.state
        out, received, keys = adapter.tower.run(pixel_values, image_grid_thw, state.needs(), **feature_kwargs(kwargs))
        merged = out.pooler_output
        grids = [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
        unit = adapter.merge**2
        sizes = [t * h * w // unit for t, h, w in grids]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, grid in enumerate(grids):
            groups.setdefault(grid, []).append(i)
        features: list[torch.Tensor | None] = [None] * len(sizes)
        indices: list[torch.Tensor | None] = [None] * len(sizes)
        deepstack = getattr(out, "deepstack_features", None)  # Qwen3-VL: (N, D) features of several tower layers
        deep: list[list[torch.Tensor | None]] = [[None] * len(sizes) for _ in deepstack or ()]
        for (t, h, w), members in groups.items():
            layout = TokenLayout(num_prefix=0, grid=(t * h // adapter.merge, w // adapter.merge), send_prefix=True)

            def stack(x: torch.Tensor | None, rows: list[int] = members) -> torch.Tensor | None:
                return None if x is None else torch.stack([x[starts[i] : starts[i] + sizes[i]] for i in rows])

            pixels = torch.stack([pixel_values[starts[i] * unit : (starts[i] + sizes[i]) * unit] for i in members])
            tokens = VisionTokens(
                hidden=stack(merged), layout=layout, keys=stack(keys), received_attention=stack(received),
                seeds=signals.content_seeds(pixels),
            )
            keeps = [state.pre_keep(sizes[i], i) for i in members]
            chosen = state.select_rows(tokens, keeps, [(i, 0) for i in members])
            for i, (selection, row) in zip(members, chosen, strict=True):
                features[i] = selection.features[row]
                indices[i] = selection.indices[row].detach().cpu()
            for selection, rows in _rows_of(chosen, members):  # the same selection and merges for every layer
                for layer, feats in enumerate(deepstack or ()):
                    for r, mixed in zip(rows, selection.apply(stack(feats, rows)), strict=True):
                        deep[layer][r] = mixed
        call = current_call(state)
        if call is not None and isinstance(call.note, PendingCall):
            call.note.indices = indices
        if deepstack is None:
            return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=tuple(features))
        return type(out)(last_hidden_state=out.last_hidden_state, pooler_output=tuple(features),
                         deepstack_features=[tuple(layer) for layer in deep])


class QwenVideoFeatures:
    """``get_video_features`` of a compressed Qwen-VL: videos are not compressed. Qwen3-VL's own video path calls
    ``get_image_features``, which the compressing override replaces on the instance; this runs the class's own
    image path on the video instead (the same tower call Qwen2-VL's video path makes)."""

    def __init__(self, inner: nn.Module) -> None:
        self.inner = inner

    def __call__(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        return type(self.inner).get_image_features(self.inner, pixel_values_videos, video_grid_thw, **kwargs)


def _rows_of(chosen: list[tuple[Any, int]], members: list[int]) -> list[tuple[Any, list[int]]]:
    """Each distinct selection of ``select_rows``' answer with the images (``members``) of its rows, in row order."""
    found: dict[int, tuple[Any, list[int]]] = {}
    for i, (selection, _) in zip(members, chosen, strict=True):
        found.setdefault(id(selection), (selection, []))[1].append(i)
    return list(found.values())


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
        pending = None
        if call is not None and isinstance(call.note, PendingCall):
            pending, call.note = call.note, None  # used by the prefill only
        cache_length = kvcache.full_length(cache)  # of the whole sequence, also when layer 0 holds only kept slots
        # generate encodes the images before the prefill and passes their features instead of pixels and
        # grids: the grids come from the pending call, noted when the caller's call was shrunk
        usable = (pending is not None and pending.indices is not None and input_ids is not None
                  and cache_length == 0 and input_ids.shape[1] == pending.columns.shape[1]
                  and input_ids.shape[0] % pending.ids.shape[0] == 0)
        if pending is not None and pending.indices is not None and cache_length > 0:
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
                            video_grid_thw=video_grid_thw, attention_mask=attention_mask, cache=cache, **extra)
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
        if model_kwargs.get("pixel_values") is not None:
            return None
        model = self.adapter.model
        return type(model)._prepare_position_ids_for_generation(model, inputs_tensor, model_kwargs)


register_adapter(QwenVLAdapter)
