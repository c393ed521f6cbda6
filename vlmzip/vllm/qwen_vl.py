"""Qwen2-VL (``Qwen2VLForConditionalGeneration``), Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) and Qwen3-VL
(``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``) in vLLM with a vlmzip pre-LLM method.

As vlmzip does on transformers (``vlmzip/adapters/qwen_vl.py``):
- what is compressed: each image's merged tokens (the PatchMerger's output, what the LLM sees), one unit per image
  with layout ``TokenLayout(0, (h / merge, w / merge), send_prefix=True)``; "vision" and "projector" stage methods
  both receive them (the merger is Qwen's projector);
- the count: the processor answers each image's placeholder count with its budget (``_get_prompt_updates``, from
  the image's grid, which the image's size gives before the tower runs), so the KV cache holds only the kept tokens;
- Qwen3-VL's DeepStack: the tower returns each merged token's features followed by those of its DeepStack levels
  (one (N, D * (1 + L)) tensor), which vLLM adds to the hidden states of its first decoder layers; the method ranks
  and merges the first D channels and every level follows the same selection and merge weights
  (``Selection.apply``), as on transformers;
- the signals (no CLS): forward hooks on the signal block (Qwen2.5-VL: the last full-attention block,
  ``max(fullatt_block_indexes)``, the others attend within windows; Qwen2-VL, Qwen3-VL: the last block) take its fused
  ``qkv`` output (keys, before RoPE) and the rotary embedding's output (q and k as the block's attention sees
  them); ``received_attention`` of a merged token is the attention its ``merge^2`` patches receive in that block
  (mean over heads and over the queries of its image, summed over the group), on Qwen2.5-VL mapped from the
  blocks' window order back to the merger's with the tower's own ``reverse_indices``;
- positions (M-RoPE): every kept token keeps the (t, h, w) position it has in the vanilla sequence (a merged token
  its target's), text after an image keeps its vanilla position (gaps where tokens were dropped), and decoding
  continues at the vanilla positions.

How positions reach the LLM: vLLM lays out a request's M-RoPE positions when the request arrives, before the tower
has chosen the tokens (:meth:`VlmzipQwen2_5_VL.get_mrope_input_positions`: text at its vanilla positions, each
item's placeholders at the item's first position). As vLLM's own pruning does for EVS videos
(``SupportsMultiModalPruning``), each item's embeddings then carry every sent token's position relative to its item
in extra channels; :meth:`VlmzipQwen2_5_VL.embed_input_ids` strips them where the engine merges the item's
embeddings into the prompt and ``forward`` adds them to those slots' positions. (EVS has the engine rewrite the
stored positions through ``recompute_mrope_positions`` instead; vLLM's CPU runner never enables that call, so the
plugin does not rely on it.) Pipeline parallelism is refused: a later stage has no embeddings to read them from.
Videos, and images passed as embeddings, are sent whole, at their vanilla positions (a Qwen3-VL video is one run of
placeholders per temporal patch, after its timestamp text, each run at its own positions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property, partial
from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from .. import signals
from ..methods import TokenLayout, VisionTokens
from . import settings as vz
from .tower import over_all_heads

# each relative position travels as two small integers (hi * BASE + lo), exact in bf16 / fp16
BASE = 128
CHANNELS = 6  # (t, h, w) x (hi, lo)


class VlmzipQwenInfo:
    """Qwen-VL's processing info (a mixin before vLLM's class); with vlmzip on, an image's token count is its
    budget."""

    @cached_property
    def vlmzip(self) -> vz.Settings | None:
        return vz.from_config(self.get_hf_config())  # start-up errors for bad knobs

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        vanilla = super().get_num_image_tokens(**kwargs)
        return vanilla if self.vlmzip is None else self.vlmzip.keep(vanilla)


class VlmzipQwenProcessor:
    """Qwen-VL's processor (a mixin before vLLM's class): an image's placeholders are its budget; the method and
    budget are in every item's cache identity."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[Any]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        found = self.info.vlmzip
        if found is None:
            return updates
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def image_tokens(item_idx: int, token: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            vanilla = int(item["image_grid_thw"].data.prod()) // merge**2
            embeds = item.get("image_embeds") if hasattr(item, "get") else None
            return [token] * (vanilla if embeds is not None else found.keep(vanilla))

        out = []
        for update in updates:
            if update.modality == "image":
                token = update.target[0]
                update = PromptReplacement(modality="image", target=update.target,
                                           replacement=partial(image_tokens, token=token))
            out.append(update)
        return out

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)
        found = self.info.vlmzip
        return {modality: [vz.salted(h, found) for h in items] for modality, items in hashes.items()}


class QwenTower:
    """vLLM's Qwen2-VL / Qwen2.5-VL vision tower seen by the plugin: run it, with the signal block's q / k captured by
    hooks."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.merge = int(visual.spatial_merge_size)
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        block = len(visual.blocks) - 1
        if self.windowed:
            full = [int(i) for i in visual.fullatt_block_indexes]
            if not full:
                raise ValueError("vlmzip in vLLM: this Qwen2.5-VL tower has no full-attention block "
                                 "(fullatt_block_indexes is empty), so no attention over a whole image to score tokens")
            block = max(full) % len(visual.blocks)
        self.attn = visual.blocks[block].attn
        self.num_heads = int(self.attn.num_attention_heads_per_partition)  # this rank's heads (tensor parallel)
        self.head_dim = int(self.attn.hidden_size_per_attention_head)
        self.tp_size = int(getattr(self.attn, "tp_size", 1))

    def run(self, pixel_values: torch.Tensor, grids: list[list[int]],
            needs: frozenset[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(P, C * T * p * p) patches of the images with grids (t, h, w) -> (merged tokens (N, D), received
        attention (N,), keys (N, Dh)), all in the merger's output order (signals None when not needed)."""
        meta = self.visual.prepare_encoder_metadata(grids)
        store: dict[str, torch.Tensor] = {}
        handles = []
        if needs:
            def keep_qkv(module: nn.Module, args: Any, output: Any) -> None:
                store["qkv"] = output[0] if isinstance(output, tuple) else output

            def keep_rotated(module: nn.Module, args: Any, output: Any) -> None:
                store["rotated"] = output

            handles = [self.attn.qkv.register_forward_hook(keep_qkv),
                       self.attn.apply_rotary_emb.register_forward_hook(keep_rotated)]
        try:
            merged = self.visual(pixel_values, grid_thw=grids, encoder_metadata=meta)
        finally:
            for handle in handles:
                handle.remove()
        if not needs:
            return merged, None, None
        heads, dim, unit = self.num_heads, self.head_dim, self.merge**2
        qkv = store["qkv"].reshape(-1, 3, heads, dim).float()  # (S, 3, H, Dh), the blocks' (window) order
        length = qkv.shape[0]
        order = meta["reverse_indices"].to(qkv.device) if self.windowed else slice(None)
        keys = received = None
        if "keys" in needs:  # mean over heads (this rank's, then all ranks')
            keys = qkv[:, 1].mean(dim=1).view(length // unit, unit, dim).mean(dim=1)[order]
            keys = over_all_heads(keys, self.tp_size, mean=True)
        if "received_attention" in needs:
            rotated = store["rotated"].reshape(2, length, heads, dim).float()  # q, k after the rotary embedding
            q, k = rotated[0].transpose(0, 1), rotated[1].transpose(0, 1)  # (H, S, Dh)
            parts, at = [], 0
            for t, h, w in grids:  # attention segments: each temporal patch of each image
                for _ in range(int(t)):
                    n = int(h) * int(w)
                    parts.append(signals.segment_received_attention(q[:, at : at + n], k[:, at : at + n], dim**-0.5))
                    at += n
            received = torch.cat(parts).view(length // unit, unit).sum(dim=1)[order]
            received = over_all_heads(received, self.tp_size, mean=True)
        return merged, received, keys


def relative_positions(grid: Sequence[int], merge: int, t_factor: float = 1.0) -> tuple[torch.Tensor, int]:
    """(3, N) M-RoPE positions of an item's N merged tokens relative to its first one (raster order; a video's
    time axis scaled by ``t_factor`` as vLLM's vanilla positions do) and its extent (the vanilla position after it,
    relative)."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    index = torch.arange(t * h * w)
    tt = (index // (h * w)).double().mul(t_factor).long() if t_factor != 1.0 else index // (h * w)
    rel = torch.stack([tt, (index // w) % h, index % w])
    return rel, int(rel.max()) + 1


def with_positions(features: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """(K, D) features + their (3, K) relative positions as ``CHANNELS`` extra channels -> (K, D + CHANNELS)."""
    if rel.numel() and int(rel.max()) >= BASE * BASE:
        raise ValueError(f"vlmzip in vLLM: an item spans {int(rel.max())} positions, more than the {BASE * BASE} "
                         "the plugin carries")
    coded = torch.stack([rel // BASE, rel % BASE], dim=1).reshape(CHANNELS, -1).t()  # (K, 6)
    return torch.cat([features, coded.to(device=features.device, dtype=features.dtype)], dim=1)


def read_positions(embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split :func:`with_positions`' output into (features (K, D), relative positions (3, K))."""
    coded = embedding[:, -CHANNELS:].round().long().t().reshape(3, 2, -1)
    return embedding[:, :-CHANNELS], coded[:, 0] * BASE + coded[:, 1]


class VlmzipQwen:
    """vLLM's Qwen-VL (a mixin before vLLM's class); with a ``vlmzip`` config entry, each image sends its budget of
    tokens to the LLM, each at its vanilla M-RoPE position."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vlmzip = vz.from_config(self.config)
        if self.vlmzip is None:
            return
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.get_video_pruning_spec() is not None:
            raise ValueError("vlmzip in vLLM: --video-pruning-rate (vLLM's EVS) and vlmzip both prune and place "
                             "visual tokens; use one of them on a server")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("vlmzip in vLLM: Qwen-VL with vlmzip cannot run pipeline-parallel (the kept tokens' "
                             "positions travel with the first stage's embeddings); use tensor or data parallelism")
        self.vlmzip_tower = QwenTower(self.visual)
        self.merge = self.vlmzip_tower.merge
        # Qwen3-VL: the width of a token's own features, before its DeepStack levels (None: no DeepStack)
        self.vlmzip_width = int(self.visual_dim) if getattr(self, "use_deepstack", False) else None
        self.vlmzip_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's visual slots, positions

    # -- encoder ------------------------------------------------------------------------------------

    def vlmzip_images(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        """Each image's kept tokens (K_i, D) with their positions in extra channels (:func:`with_positions`);
        Qwen3-VL: D = the token's own features and its DeepStack levels', selected and merged in step."""
        found = self.vlmzip
        assert found is not None
        grids = [[int(v) for v in g] for g in image_input["image_grid_thw"].tolist()]
        if image_input["type"] == "image_embeds":  # sent whole (the processor gave them their vanilla count)
            out = []
            for emb, grid in zip(super()._process_image_input(image_input), grids, strict=True):
                out.append(with_positions(emb, relative_positions(grid, self.merge)[0]))
            return tuple(out)
        pixel_values = image_input["pixel_values"]
        # the pixels the tower sees (vLLM may send them unnormalised and normalise them on the device): the
        # content seeds of vlmzip's sampling methods hash these, as on transformers
        normalized = self.visual.input_norm(pixel_values.to(device=self.visual.device), self.visual.dtype)
        unit = self.merge**2
        counts = [t * h * w // unit for t, h, w in grids]
        keeps = [found.keep(n) for n in counts]
        needs = found.spec.needs if any(k < n for k, n in zip(keeps, counts, strict=True)) else frozenset()
        merged, received, keys = self.vlmzip_tower.run(pixel_values, grids, needs)
        out, at, patch_at = [], 0, 0
        for grid, n, keep in zip(grids, counts, keeps, strict=True):
            t, h, w = grid
            layout = TokenLayout(0, (t * h // self.merge, w // self.merge), send_prefix=True)
            own, deep = merged[at : at + n], None
            if self.vlmzip_width is not None:  # Qwen3-VL: (n, D) own features, (n, D * L) DeepStack levels
                own, deep = own[:, : self.vlmzip_width], own[:, self.vlmzip_width :]
            tokens = VisionTokens(
                hidden=own.unsqueeze(0), layout=layout,
                keys=None if keys is None else keys[at : at + n].unsqueeze(0),
                received_attention=None if received is None else received[at : at + n].unsqueeze(0),
                seeds=signals.content_seeds(normalized[patch_at : patch_at + n * unit].unsqueeze(0)),
            )
            chosen = vz.select(found, tokens, keep)
            features = chosen.features[0]
            if deep is not None:
                features = torch.cat([features, chosen.apply(deep.unsqueeze(0))[0].to(features.dtype)], dim=1)
            rel = relative_positions(grid, self.merge)[0]
            out.append(with_positions(features, rel[:, chosen.indices[0].cpu()]))
            at += n
            patch_at += n * unit
        return tuple(out)

    def vlmzip_videos(self, video_input: Any) -> tuple[torch.Tensor, ...]:
        """Each video's tokens, sent whole, with their vanilla positions in extra channels."""
        grids = [[int(v) for v in g] for g in video_input["video_grid_thw"].tolist()]
        out = []
        for i, (emb, grid) in enumerate(zip(self._process_video_input(video_input), grids, strict=True)):
            out.append(with_positions(emb, self.video_positions(video_input, i, grid)))
        return tuple(out)

    def video_positions(self, video_input: Any, i: int, grid: list[int]) -> torch.Tensor:
        """(3, N) positions of video ``i``'s merged tokens relative to its run of placeholders (Qwen2-VL /
        Qwen2.5-VL: one run; its time axis at ``second_per_grid_ts * tokens_per_second`` per temporal patch)."""
        seconds = video_input.get("second_per_grid_ts")
        per_second = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        factor = (1.0 if seconds is None else float(seconds[i])) * per_second
        return relative_positions(grid, self.merge, factor)[0]

    def embed_multimodal(self, **kwargs: object) -> Any:
        if self.vlmzip is None:
            return super().embed_multimodal(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, data in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if data is None:
                continue
            # Qwen2.5-VL names the modalities "image" / "video", Qwen2-VL "images" / "videos"
            out += self.vlmzip_images(data) if modality.startswith("image") else self.vlmzip_videos(data)
        return out

    # -- positions ----------------------------------------------------------------------------------

    def placeholder_runs(self, input_tokens: list[int], mm_features: list[Any]) -> list[tuple[int, int, int]]:
        """(prompt index, placeholders, extent) of each run of visual placeholders in the prompt, in order; extent:
        the positions the run spans in the vanilla sequence (Qwen2-VL / Qwen2.5-VL: one run per item)."""
        lengths = {int(f.mm_position.offset): int(f.mm_position.length) for f in mm_features}
        merge = self.merge
        return [(offset, lengths[offset], relative_positions((t, h * merge, w * merge), merge, factor)[1])
                for offset, t, h, w, factor in self.iter_mm_grid_thw(mm_features)]

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """(3, N) positions of the shrunk prompt and the decode delta: text at its vanilla positions (gaps where
        tokens were dropped), each run of placeholders at the run's first position (``forward`` adds each sent
        token's own offset), decoding at the vanilla positions."""
        if self.vlmzip is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        parts: list[torch.Tensor] = []
        st, nxt = 0, 0  # next prompt index, next position
        for offset, length, extent in self.placeholder_runs(input_tokens, mm_features):
            text = offset - st
            parts.append(torch.arange(nxt, nxt + text).expand(3, -1))
            base = nxt + text
            parts.append(torch.full((3, length), base))
            st, nxt = offset + length, base + extent
        if st < len(input_tokens):
            parts.append(torch.arange(nxt, nxt + len(input_tokens) - st).expand(3, -1))
            nxt += len(input_tokens) - st
        positions = torch.cat(parts, dim=1).long() if parts else torch.zeros(3, 0, dtype=torch.long)
        return positions, nxt - len(input_tokens)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """The prompt's embeddings with this step's visual tokens merged in; notes each visual slot's relative
        position (stripped from the embeddings) for ``forward``."""
        if self.vlmzip is None:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        self.vlmzip_slots = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) and is_multimodal is not None:
            split = [read_positions(emb) for emb in multimodal_embeddings]
            multimodal_embeddings = [features for features, _ in split]
            slots = is_multimodal.to(input_ids.device).nonzero().flatten()
            rel = torch.cat([rel for _, rel in split], dim=1).to(input_ids.device)
            if slots.numel() != rel.shape[1]:
                raise RuntimeError(f"vlmzip in vLLM: {rel.shape[1]} visual tokens for {slots.numel()} slots")
            self.vlmzip_slots = (slots, rel)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> Any:
        """vLLM's forward, the visual slots of this step at their kept tokens' own positions."""
        if self.vlmzip is not None and self.vlmzip_slots is not None:
            slots, rel = self.vlmzip_slots
            self.vlmzip_slots = None
            positions = positions.clone()
            positions[:, slots] += rel.to(positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


class VlmzipQwen2_5_VLProcessingInfo(VlmzipQwenInfo, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info with vlmzip's image counts."""


class VlmzipQwen2_5_VLMultiModalProcessor(VlmzipQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with vlmzip's image counts and cache identities."""


@MULTIMODAL_REGISTRY.register_processor(
    VlmzipQwen2_5_VLMultiModalProcessor, info=VlmzipQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VlmzipQwen2_5_VL(VlmzipQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with vlmzip."""


class VlmzipQwen2VLProcessingInfo(VlmzipQwenInfo, Qwen2VLProcessingInfo):
    """Qwen2-VL's processing info with vlmzip's image counts."""


class VlmzipQwen2VLMultiModalProcessor(VlmzipQwenProcessor, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor with vlmzip's image counts and cache identities."""


@MULTIMODAL_REGISTRY.register_processor(
    VlmzipQwen2VLMultiModalProcessor, info=VlmzipQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class VlmzipQwen2VL(VlmzipQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with vlmzip."""


class VlmzipQwen3:
    """What Qwen3-VL changes (a mixin before :class:`VlmzipQwen`): a video is one run of placeholders per temporal
    patch, after its timestamp text, each patch's tokens at (0, row, column) from the run's first position."""

    def placeholder_runs(self, input_tokens: list[int], mm_features: list[Any]) -> list[tuple[int, int, int]]:
        runs = []
        for feature in mm_features:
            if feature.modality == "image":
                _, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
                runs.append((int(feature.mm_position.offset), int(feature.mm_position.length),
                             max(h, w) // self.merge))
        videos = [feature for feature in mm_features if feature.modality == "video"]
        config = self.config
        for offset, h, w, n in self._iter_mm_grid_hw(
            input_tokens, videos, video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            spatial_merge_size=self.merge,
        ):
            runs.append((offset, n, max(h, w)))
        return sorted(runs)

    def video_positions(self, video_input: Any, i: int, grid: list[int]) -> torch.Tensor:
        t, h, w = grid
        return relative_positions((1, h, w), self.merge)[0].repeat(1, t)


class VlmzipQwen3VLProcessingInfo(VlmzipQwenInfo, Qwen3VLProcessingInfo):
    """Qwen3-VL's processing info with vlmzip's image counts."""


class VlmzipQwen3VLMultiModalProcessor(VlmzipQwenProcessor, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's (and Qwen3-VL-MoE's) processor with vlmzip's image counts and cache identities."""


@MULTIMODAL_REGISTRY.register_processor(
    VlmzipQwen3VLMultiModalProcessor, info=VlmzipQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class VlmzipQwen3VL(VlmzipQwen3, VlmzipQwen, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with vlmzip."""


class VlmzipQwen3VLMoeProcessingInfo(VlmzipQwenInfo, Qwen3VLMoeProcessingInfo):
    """Qwen3-VL-MoE's processing info with vlmzip's image counts."""


@MULTIMODAL_REGISTRY.register_processor(
    VlmzipQwen3VLMultiModalProcessor, info=VlmzipQwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class VlmzipQwen3VLMoe(VlmzipQwen3, VlmzipQwen, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE (its language model's MLPs mixtures of experts) with vlmzip."""
