"""Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Model quirks this file owns:
- Dynamic resolution: image i of a call has its own patch grid ``image_grid_thw[i] = (t, h, w)``; the
  vision tower packs every image's patches into one sequence (attention stays inside each image's
  ``cu_seqlens`` segment) and the 2x2 PatchMerger turns each group of ``merge^2`` consecutive patches
  into one LLM token. The processor expands ``<|image_pad|>`` into ``t*h*w / merge^2`` placeholders.
- What is compressed: the merged tokens (the PatchMerger's output, what the LLM sees), image by image,
  each as one unit with layout ``TokenLayout(0, (t*h/merge, w/merge), send_prefix=True)``. Both "vision"
  and "projector" stage methods receive these tokens (the merger is Qwen's projector). Images with the
  same grid and budget go to the method in one batched call. Videos are not compressed: their tokens,
  positions and placeholders stay as in the vanilla model.
- Signals (no CLS): ``received_attention`` of a merged token = the attention its ``merge^2`` patches
  receive in the tower's signal block (summed over the group), each patch's share being the mean over
  heads and over the queries of its image's attention segment; ``keys`` = that block's keys (the fused
  ``qkv`` output, before RoPE), mean over heads, mean over the group. The signal block is the last
  block (Qwen2-VL) or the last full-attention block, ``max(fullatt_block_indexes)`` (Qwen2.5-VL: the
  other blocks attend within windows). Qwen2.5-VL reorders merge groups by window before its blocks;
  the captured signals are mapped back to the merger's output order with the inverse of the same
  ``window_index`` the tower uses.
- Positions (M-RoPE). Every kept token keeps the (t, h, w) position it has in the vanilla (unshrunk)
  sequence; a merged token takes its target's (``Selection.indices``); text after an image keeps its
  vanilla position, so the positions have gaps where tokens were dropped. How:
  1. ``prepare_call`` / ``prepare_generate`` (after runtime.py shrank the placeholder runs) note, per
     thread, the caller's unshrunk ids and mask and the shrunk sequence's source columns.
  2. The ``get_image_features`` override records each image's selected indices.
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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

from .. import sequence, signals
from ..llm_hooks import rotate_half
from ..methods.base import TokenLayout, VisionTokens
from .base import Adapter, set_instance_attr

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


_LOCAL = threading.local()


def _table() -> dict[int, PendingCall]:
    table = getattr(_LOCAL, "table", None)
    if table is None:
        table = _LOCAL.table = {}
    return table


def _set_pending(adapter: QwenVLAdapter, pending: PendingCall) -> None:
    _table()[id(adapter)] = pending


def _peek_pending(adapter: QwenVLAdapter) -> PendingCall | None:
    return _table().get(id(adapter))


def _take_pending(adapter: QwenVLAdapter) -> PendingCall | None:
    return _table().pop(id(adapter), None)


class _Store:
    """A forward hook that stores the module's output under ``name``."""

    def __init__(self, store: dict[str, Any], name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.store[self.name] = output


class _StoreInputs:
    """A forward pre-hook (with kwargs) that stores the attention's segments and rotary embeddings."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.store["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        self.store["position_embeddings"] = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)


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
        captured: dict[str, Any] = {}
        handles = []
        if needs:
            handles.append(self.attn.register_forward_pre_hook(_StoreInputs(captured), with_kwargs=True))
            handles.append(self.attn.qkv.register_forward_hook(_Store(captured, "qkv")))
        try:
            out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not needs:
            return out, None, None
        received, keys = self.signals(captured, grid_thw, needs)
        return out, received, keys

    def signals(self, captured: dict[str, Any], grid_thw: torch.Tensor,
                needs: frozenset[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        attn = self.attn
        qkv = captured["qkv"]
        length = qkv.shape[0]
        heads = attn.num_heads
        q, k, _ = qkv.float().reshape(length, 3, heads, -1).unbind(1)  # (S, H, Dh) each, the block's order
        unit = self.merge**2
        keys = k.mean(dim=1).view(length // unit, unit, -1).mean(dim=1) if "keys" in needs else None
        received = None
        if "received_attention" in needs:
            cos, sin = (t.float().unsqueeze(-2) for t in captured["position_embeddings"])
            q_rot = (q * cos + rotate_half(q) * sin).transpose(0, 1)  # (H, S, Dh)
            k_rot = (k * cos + rotate_half(k) * sin).transpose(0, 1)
            bounds = captured["cu_seqlens"].tolist()
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


class QwenVLAdapter(Adapter):
    """vlmzip's view of one Qwen2-VL / Qwen2.5-VL instance."""

    family = "qwen-vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.inner = model.model
        config = model.config
        self.tower = QwenTower(self.inner.visual)
        self.merge = self.tower.merge
        self.patch_size = int(config.vision_config.patch_size)
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        pad = getattr(config.text_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    def image_counts(self, call: dict[str, Any]) -> list[int]:
        """t * h * w / merge^2 per image, from ``image_grid_thw`` (one host sync per prefill)."""
        grids = call.get("image_grid_thw")
        if grids is None:
            raise ValueError("Qwen-VL images need image_grid_thw alongside pixel_values; pass the processor's outputs")
        return [int(t * h * w) // self.merge**2 for t, h, w in grids.tolist()]

    def static_tokens_per_image(self) -> None:
        return None

    def unit_layout(self) -> TokenLayout:
        """The merged grid of a 448 x 448 image (a representative size; each image has its own grid)."""
        side = REPRESENTATIVE_SIDE // (self.patch_size * self.merge)
        return TokenLayout(num_prefix=0, grid=(side, side), send_prefix=True)

    def sequence_modules(self) -> list[nn.Module]:
        return [self.model, self.inner]

    def language_model(self) -> nn.Module:
        return self.inner.language_model

    def install(self, state: Any) -> list[Any]:
        """Instance-level image features (compressing), M-RoPE positions and generate-time positions."""
        return [
            set_instance_attr(self.inner, "get_image_features", QwenImageFeatures(self, state)),
            set_instance_attr(self.inner, "compute_3d_position_ids", QwenPositions(self)),
            set_instance_attr(self.model, "_prepare_position_ids_for_generation", QwenGenerationPositions(self)),
        ]

    # -- positions --------------------------------------------------------------------------------

    def prepare_call(self, state: Any, call: dict[str, Any], original_ids: torch.Tensor, shrunk: Any) -> None:
        """Note the unshrunk layout of this prefill; positions are built once the selection is known."""
        self._note(call, original_ids, shrunk)

    def prepare_generate(self, state: Any, kwargs: dict[str, Any], original_ids: torch.Tensor, shrunk: Any) -> None:
        self._note(kwargs, original_ids, shrunk)

    def _note(self, call: dict[str, Any], original_ids: torch.Tensor, shrunk: sequence.Shrunk) -> None:
        if call.get("position_ids") is not None:
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
        video = call.get("video_grid_thw")
        extra = {k: call[k] for k in ("second_per_grid_ts",) if call.get(k) is not None}
        _set_pending(self, PendingCall(
            ids=ids, mask=mask, columns=shrunk.columns, image_grid_thw=call["image_grid_thw"].cpu(),
            video_grid_thw=None if video is None else video.cpu(),
            extra={k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
        ))

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
        counts = self.image_counts({"image_grid_thw": pending.image_grid_thw})
        indices = pending.indices or []
        if len(indices) != len(counts):
            raise RuntimeError(f"recorded {len(indices)} image selections for {len(counts)} images")
        kept = [int(i.numel()) for i in indices]
        source = torch.arange(ids.shape[1]).expand(ids.shape[0], -1).clone()
        removed = torch.zeros(ids.shape[0], 1, dtype=deltas.dtype)
        for span in sequence.image_spans(ids, self.image_token_id, counts, kept):
            source[span.row, span.start : span.start + span.kept] = span.start + indices[span.image]
            removed[span.row] += span.vanilla - span.kept
        slot_source = source.gather(1, columns.clamp(min=0))
        gathered = full.gather(2, slot_source.unsqueeze(0).expand(3, -1, -1))
        gathered = gathered.masked_fill((columns < 0).unsqueeze(0), 0)
        repeat = batch // ids.shape[0]
        gathered = gathered.repeat_interleave(repeat, dim=1)
        deltas = (deltas.cpu() + removed).repeat_interleave(repeat, dim=0)
        return gathered.to(device), deltas.to(device)

    def load_processor(self, folder: Any) -> Any:
        """``AutoProcessor`` where transformers can build Qwen's (its video processor needs torchvision);
        otherwise the same processor without video support (``vlmzip.tiny_qwen.load_processor``)."""
        from ..tiny_qwen import load_processor

        return load_processor(folder)

    def describe_positions(self) -> str:
        return (
            "M-RoPE (t, h, w): every kept token keeps its vanilla position (a merged token its target's), "
            "text after an image keeps its vanilla position (gaps where tokens were dropped), and rope_deltas "
            "continue decoding at the vanilla positions"
        )


class QwenImageFeatures:
    """``get_image_features`` of a compressed Qwen-VL: pooler_output is a tuple of (K_i, D) per image."""

    def __init__(self, adapter: QwenVLAdapter, state: Any) -> None:
        self.adapter, self.state = adapter, state

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                 **kwargs: Any) -> BaseModelOutputWithPooling:
        if image_grid_thw is None:
            raise ValueError("Qwen-VL images need image_grid_thw alongside pixel_values; pass the processor's outputs")
        adapter, state = self.adapter, self.state
        needs = state.pre.spec.needs if state.pre is not None else frozenset()
        kwargs.pop("return_dict", None)
        out, received, keys = adapter.tower.run(pixel_values, image_grid_thw, needs, **kwargs)
        merged = out.pooler_output
        grids = [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
        unit = adapter.merge**2
        sizes = [t * h * w // unit for t, h, w in grids]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        patch_starts = [s * unit for s in starts]
        groups: dict[tuple[tuple[int, int, int], int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault((grids[i], state.pre_keep(size, i)), []).append(i)
        features: list[torch.Tensor | None] = [None] * len(sizes)
        indices: list[torch.Tensor | None] = [None] * len(sizes)
        for ((t, h, w), keep), members in groups.items():
            layout = TokenLayout(num_prefix=0, grid=(t * h // adapter.merge, w // adapter.merge), send_prefix=True)

            def stack(x: torch.Tensor | None, members: list[int] = members) -> torch.Tensor | None:
                return None if x is None else torch.stack([x[starts[i] : starts[i] + sizes[i]] for i in members])

            pixels = torch.stack([pixel_values[patch_starts[i] : patch_starts[i] + sizes[i] * unit] for i in members])
            tokens = VisionTokens(
                hidden=stack(merged), layout=layout, keys=stack(keys), received_attention=stack(received),
                seeds=signals.content_seeds(pixels),
            )
            chosen = state.select(tokens, keep)
            for row, i in enumerate(members):
                features[i] = chosen.features[row]
                indices[i] = chosen.indices[row].detach().cpu()
        pending = _peek_pending(adapter)
        if pending is not None:
            pending.indices = indices
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=tuple(features))


class QwenPositions:
    """``model.model.compute_3d_position_ids`` of a compressed Qwen-VL: prefills with recorded selections get
    their vanilla positions gathered for the kept tokens (and shifted rope_deltas); all else is HF's own."""

    def __init__(self, adapter: QwenVLAdapter) -> None:
        self.adapter = adapter

    def __call__(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, cache: Any = None, **extra: Any) -> torch.Tensor | None:
        adapter = self.adapter
        inner = adapter.inner
        pending = _take_pending(adapter)
        cache_length = 0 if cache is None else int(cache.get_seq_length())
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
