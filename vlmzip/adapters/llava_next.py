"""Adapter for ``transformers.LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6, anyres).

Model quirks this file owns:
- Each image is cut by the processor into a *base* crop (the whole image resized to the tower's input)
  and a grid of high-resolution crops (``image_sizes`` and ``image_grid_pinpoints`` decide the grid);
  every crop goes through the CLIP tower alone (a unit of ``unit_layout()``: CLS + side x side patches).
- HF's vanilla packing per image: the base crop's patches, then the high-resolution grid in raster order
  with the padding rows / columns removed (``unpad_image``) and one ``image_newline`` token after each
  row. So the vanilla count N_i depends on the image's size; ``image_counts`` computes it as the
  processor does.
- Route: an instance-level ``get_image_features`` on ``model.model`` returns K_i projected tokens for
  image i; runtime.py shrinks each placeholder run from N_i to K_i before the model sees it.
- Positions: 1-D, contiguous over the shrunk sequence (what the released VisionZip code does).

What a compressed image sends (K_i = the image's budget, ``state.pre_keep(N_i)``):
- Keep-all (K_i >= N_i, e.g. ``ratio=1.0``): exactly HF's own packing (unpadding and newline tokens).
- Otherwise K_i is split evenly over the image's crops (base crop + high-resolution crops), the
  remainder going to the first crops (the VisionZip authors' 160 = 5 x 32), each crop is compressed on
  its own (crops with the same share in one batched method call), and no newline tokens are sent:
  - VisionZip (the method marks its dominant tokens, ``Selection.dominant``): the authors' released
    layout (``llava_arch.py``): the base crop's tokens as VisionZip emits them (dominant, CLS
    included, then contextual); then the high-resolution crops' dominant patches in raster order over
    the whole high-resolution grid (no unpadding); then each high-resolution crop's CLS token; then all
    high-resolution crops' contextual tokens, crop by crop.
  - Every other method (random, spatial, ...): each crop's selected tokens in the method's order,
    concatenated base crop first, then the high-resolution crops in raster order of the crop grid.
  A budget that cannot be split (fewer tokens than crops, or more than the crops' patches hold, which
  only the newline tokens make possible) is a ValueError naming the image's vanilla count.
- In-LLM methods (FastV) see HF's vanilla packing, newline tokens included, as visual tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..methods.base import Selection, TokenLayout, VisionTokens
from .base import Adapter, set_instance_attr
from .llava import ClipLikeTower, check_strategy


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` crops, the remainder to the first crops: 162 over 5 -> 33, 33, 32, 32, 32."""
    base, extra = divmod(total, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]


def host_sizes(image_sizes: Any) -> list[list[int]]:
    """``image_sizes`` ((N, 2) tensor, on any device, or a list of pairs) as host ints: one copy, not one per value."""
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.tolist()
    return [[int(v) for v in size] for size in image_sizes]


def unpadded_grid(image_size: tuple[int, int], grid: tuple[int, int], side: int) -> tuple[int, int]:
    """(rows, cols) of patches HF keeps of a (grid[0] * side, grid[1] * side) crop grid for an image of
    ``image_size`` (height, width) after removing the padding (``unpad_image``'s arithmetic)."""
    height, width = image_size
    rows, cols = grid[0] * side, grid[1] * side
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_height) // 2)
    else:
        new_width = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_width) // 2)
    return rows, cols


class LlavaNextAdapter(Adapter):
    """vlmzip's view of one ``LlavaNextForConditionalGeneration`` instance."""

    family = "llava-next"
    model_classes = (LlavaNextForConditionalGeneration,)

    def __init__(self, model: LlavaNextForConditionalGeneration) -> None:
        super().__init__(model)
        self.inner = model.model
        config = model.config
        vcfg = config.vision_config
        self.tower = ClipLikeTower(self.inner.vision_tower, config.vision_feature_layer, vcfg.num_attention_heads)
        self.side = vcfg.image_size // vcfg.patch_size
        self.crop_size = vcfg.image_size
        self.pinpoints = config.image_grid_pinpoints
        strategy = config.vision_feature_select_strategy
        check_strategy(strategy, self.tower.has_cls)
        if strategy == "full" and self.tower.has_cls:
            raise ValueError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' and a CLS encoder cannot pack its crops "
                "(side x side + 1 tokens per crop); use 'default'"
            )
        self.layout = TokenLayout(num_prefix=int(self.tower.has_cls), grid=(self.side, self.side),
                                  send_prefix=strategy == "full")
        self.image_token_id = int(config.image_token_id)
        pad = getattr(config.text_config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    # -- counts ---------------------------------------------------------------------------------------

    def crop_grid(self, image_size: Any) -> tuple[int, int]:
        """(rows, cols) of high-resolution crops HF cuts an image of ``image_size`` (height, width) into."""
        size = [int(v) for v in image_size]
        return get_anyres_image_grid_shape(size, self.pinpoints, self.crop_size)

    def num_crops(self, image_size: Any) -> int:
        """Crops of one image, the base crop included (what HF's ``image_size_to_num_patches`` says)."""
        return image_size_to_num_patches([int(v) for v in image_size], self.pinpoints, self.crop_size)

    def vanilla_count(self, image_size: Any) -> int:
        """Tokens HF sends for one image: base crop + unpadded high-resolution grid + one newline per row."""
        if self.num_crops(image_size) == 1:
            return self.layout.vanilla + 1
        rows, cols = unpadded_grid(tuple(int(v) for v in image_size), self.crop_grid(image_size), self.side)
        return self.layout.vanilla + rows * cols + rows

    def image_counts(self, call: dict[str, Any]) -> list[int]:
        """Each image's vanilla placeholder count, from ``image_sizes`` (as the processor writes them)."""
        sizes = call.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values; pass the processor's image_sizes")
        return [self.vanilla_count(size) for size in host_sizes(sizes)]

    def static_tokens_per_image(self) -> None:
        return None

    def unit_layout(self) -> TokenLayout:
        return self.layout

    def sequence_modules(self) -> list[nn.Module]:
        """Outer model (takes labels) and the inner LlavaNextModel (may be called directly)."""
        return [self.model, self.inner]

    def language_model(self) -> nn.Module:
        return self.inner.language_model

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        return [set_instance_attr(self.inner, "get_image_features", LlavaNextImageFeatures(self, state))]


class LlavaNextImageFeatures:
    """``get_image_features`` of a compressed LLaVA-NeXT: pooler_output is a list of (K_i, D_lm) tensors."""

    def __init__(self, adapter: LlavaNextAdapter, state: Any) -> None:
        self.adapter, self.state = adapter, state
        config = adapter.model.config
        self.configured = (config.vision_feature_layer, config.vision_feature_select_strategy)

    def __call__(
        self,
        pixel_values: torch.Tensor,
        image_sizes: Any,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        asked = (
            self.configured[0] if vision_feature_layer is None else vision_feature_layer,
            self.configured[1] if vision_feature_select_strategy is None else vision_feature_select_strategy,
        )
        if asked != self.configured:
            raise ValueError(
                f"this model was compressed for vision_feature_layer/strategy {self.configured}, got {asked}; "
                "decompress, change the config, and compress again"
            )
        adapter, state = self.adapter, self.state
        image_sizes = host_sizes(image_sizes)
        crops = [adapter.num_crops(size) for size in image_sizes]
        if pixel_values.dim() == 5:  # (images, max crops, 3, H, W), padded: keep each image's own crops
            pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops, strict=True)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected 4 or 5 dimensions")
        counts = [adapter.vanilla_count(size) for size in image_sizes]
        keeps = [state.pre_keep(n, i) for i, n in enumerate(counts)]
        shares = [None if keep >= n else self.shares(i, n, keep, c)
                  for i, (n, keep, c) in enumerate(zip(counts, keeps, crops, strict=True))]

        compressing = any(s is not None for s in shares)
        needs = state.pre.spec.needs if state.pre is not None and compressing else frozenset()
        kwargs.pop("return_dict", None)
        tokens = adapter.tower.tokens(pixel_values, adapter.layout, needs, **kwargs)
        projector = adapter.inner.multi_modal_projector
        on_projected = state.pre is not None and state.pre.spec.stage == "projector"
        if on_projected:
            tokens.hidden = projector(tokens.hidden)

        starts = [sum(crops[:i]) for i in range(len(crops))]
        selected = self.select_crops(tokens, starts, shares, projector, on_projected)
        vanilla_idx = tokens.vanilla_indices()
        features: list[torch.Tensor] = []
        for i, share in enumerate(shares):
            if share is None:
                hidden = tokens.hidden[starts[i] : starts[i] + crops[i], vanilla_idx]
                packed, _ = adapter.inner.pack_image_features(
                    [hidden if on_projected else projector(hidden)], image_sizes[i : i + 1],
                    vision_feature_select_strategy=self.configured[1], image_newline=adapter.inner.image_newline,
                )
                features.append(packed[0])
            else:
                parts = [selected[starts[i] + j] for j in range(crops[i])]
                features.append(self.assemble(parts, adapter.crop_grid(image_sizes[i])))
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=features)

    def shares(self, image: int, vanilla: int, keep: int, crops: int) -> list[int]:
        """Each crop's share of image ``image``'s ``keep`` tokens (clear error when it cannot be split)."""
        per_crop = self.adapter.layout.vanilla
        if not crops <= keep <= crops * per_crop:
            raise ValueError(
                f"{self.state.name}: a budget of {keep} visual tokens for image {image} of this batch "
                f"(vanilla count {vanilla}: {crops} crops of {per_crop} tokens plus newline tokens) cannot be split "
                f"over its crops; it needs between {crops} and {crops * per_crop} tokens (use ratio=1.0 to keep "
                "every token)"
            )
        return split_evenly(keep, crops)

    def select_crops(self, tokens: VisionTokens, starts: list[int], shares: list[list[int] | None],
                     projector: nn.Module, on_projected: bool) -> dict[int, tuple[Selection, int]]:
        """Run the method on every crop of the compressed images, one batched call per distinct share.

        Returns crop number (over the whole call) -> (its selection with projected features, its row in it).
        """
        groups: dict[int, list[int]] = {}
        for start, share in zip(starts, shares, strict=True):
            for j, keep in enumerate(share or ()):
                groups.setdefault(keep, []).append(start + j)
        selected: dict[int, tuple[Selection, int]] = {}
        for keep, rows in groups.items():
            index = torch.tensor(rows, device=tokens.hidden.device)
            sub = VisionTokens(
                hidden=tokens.hidden[index], layout=tokens.layout,
                **{name: None if getattr(tokens, name) is None else getattr(tokens, name)[index]
                   for name in ("keys", "cls_attention", "received_attention", "seeds")},
            )
            chosen = self.state.select(sub, keep)
            if not on_projected:
                chosen.features = projector(chosen.features)
            for row, crop in enumerate(rows):
                selected[crop] = (chosen, row)
        return selected

    def assemble(self, parts: list[tuple[Selection, int]], grid: tuple[int, int]) -> torch.Tensor:
        """One image's tokens from its crops' selections (base crop first); see the module docstring."""
        crops = [(sel.features[row], sel.indices[row], sel.dominant) for sel, row in parts]
        if any(dominant is None for _, _, dominant in crops):
            return torch.cat([features for features, _, _ in crops], dim=0)
        return self.visionzip_layout(crops, grid)

    def visionzip_layout(self, crops: list[tuple[torch.Tensor, torch.Tensor, int]],
                         grid: tuple[int, int]) -> torch.Tensor:
        """The released VisionZip order: base crop as emitted; high-res dominant patches in raster order over
        the whole high-resolution grid; each high-res crop's CLS; all high-res contextual tokens.

        One sort does the middle part without a host sync: a dominant patch's key is its raster position in
        the whole grid, a prefix (CLS) token's key comes after every patch, in crop order.
        """
        layout, side = self.adapter.layout, self.adapter.side
        prefix, cols = layout.num_prefix, grid[1]
        grid_total = grid[0] * side * cols * side
        dominant_parts, keys, contextual = [], [], []
        for crop, (features, indices, dominant) in enumerate(crops[1:]):
            idx = indices[:dominant]
            patch = (idx - prefix).clamp(min=0)
            y, x = patch.div(side, rounding_mode="floor"), patch % side
            row, col = divmod(crop, cols)
            raster = (row * side + y) * (cols * side) + col * side + x
            keys.append(torch.where(idx < prefix, grid_total + crop * max(prefix, 1) + idx, raster))
            dominant_parts.append(features[:dominant])
            contextual.append(features[dominant:])
        order = torch.cat(keys).argsort(stable=True)
        return torch.cat([crops[0][0], torch.cat(dominant_parts)[order], *contextual], dim=0)
