"""Adapter for ``transformers.InternVLForConditionalGeneration`` (InternVL2.5 / InternVL3 layout).

Model quirks this file owns:
- Tiles. The processor's image processor (GOT-OCR2's ``crop_to_patches``) resizes each image to the R x C grid of
  448 px tiles whose aspect ratio is closest to the image's (R * C between ``min_patches`` and ``max_patches``),
  cuts it in raster order and, when R * C > 1, appends a thumbnail (the whole image resized to one tile) LAST.
  ``pixel_values`` is (all tiles of all images of the call, 3, 448, 448), images in prompt order; the tile count
  of each image does not reach the model (the processor pops ``num_patches``).
- Placeholders. The processor writes each image as ``<img>`` + ``image_seq_length`` x tiles ``<IMG_CONTEXT>`` +
  ``</img>``: ONE run per image, the tiles' tokens back to back, 256 per tile (InternVL3). ``items`` reads each
  image's run from ``input_ids`` (the vanilla count, and tiles = count / tokens per tile) and checks that the
  runs account for every row of ``pixel_values``; tile rows belong to images in run order.
- Tower and features. InternViT prepends a CLS token (``InternVLVisionEmbeddings.cls_token``); the projector
  is fed ``last_hidden_state`` for ``vision_feature_layer == -1`` (InternVL3), else
  ``hidden_states[vision_feature_layer]``; strategy ``"default"`` drops the CLS token, then ``pixel_shuffle``
  (``downsample_ratio`` 0.5) concatenates each 2 x 2 block of patches, (2y, 2x), (2y, 2x+1), (2y+1, 2x),
  (2y+1, 2x+1), into one token of 4 x the width, row-major over the 16 x 16 grid, and the MLP projector
  (LayerNorm, Linear, GELU, Linear) maps it to the LLM. The group of patches behind each shuffled token is
  read off the model's own ``pixel_shuffle`` applied to patch numbers. Strategy ``"full"`` (CLS kept) cannot
  be laid out on the shuffle grid (transformers fails on it too): a clear error.
- Units and budgets. Each tile (the thumbnail too) is one unit of ``TokenLayout(0, (16, 16))``: pre-LLM methods
  choose among the shuffled tokens the LLM would receive (stage "vision": before the projector, as LLaVA's
  methods act on CLIP features; stage "projector": after it). Unit 0 is the whole image (the thumbnail, or the
  only tile), units 1.. the grid tiles in raster order (LLaVA-NeXT's base crop first, then its grid). An image's
  budget is split evenly over its tiles (``split_evenly``, the remainder to the first units, the thumbnail
  first); tiles with the same share go to the method in one batched call. A budget smaller than the image's
  tile count is a ValueError naming its vanilla count.
- What is sent. Tiles in the processor's order (grid tiles, thumbnail last), each tile's tokens in the order
  the method emits them (VisionZip: dominant, then contextual). An image sent whole (keep >= its count) is
  HF's own features. ``pooler_output``: HF's (tiles, 256, D) when every image is sent whole, else (K, 1, D)
  for the K tokens of all images: InternVL's forward needs one tensor, and generate's beam expansion splits it
  between rows only at first-dimension boundaries, which one token per row always offers.
- VisionZip's signals (arXiv 2412.04467), captured with forward hooks on the feature layer's attention (the
  outputs of its ``q_norm`` / ``k_norm``: the queries and keys it attends with, identities without QK-norm):
  a shuffled token's dominance = the CLS query's attention (softmax over CLS + patches, summed over heads)
  received by its 2 x 2 patches, summed; its key = the head-mean keys of its patches, averaged (as the Qwen
  adapter does for its 2 x 2 merged tokens). No CLS token is sent: InternVL drops it before the projector, so
  there is no projected CLS to send; every token sent is a shuffled patch token. The layout therefore has no
  prefix, and VisionZip ranks prefix-less tokens by ``received_attention``: that field carries the CLS
  dominance too (as does ``cls_attention``, which Cluster & Saliency reads).
- Videos. The processor writes each video frame as ``FrameN: <img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>`` (the
  image tokens) and merges the frames' pixels into ``pixel_values``: nothing in the model's inputs but the label's
  text (tokenizer-specific ids) tells a frame from a one-tile image. A compressed model runs on videos and treats
  each frame as an image of one tile (a budget applies to each frame as to an image); ``ratio=1.0`` leaves them
  as the vanilla model has them.
- Positions: 1-D, contiguous over the shrunk sequence (Qwen2 LLM; what the released VisionZip code does).
- Processor: transformers' InternVL processor needs torchvision for its video processor. Where it cannot be
  built, ``load_processor`` builds the same processor without video support, with the checkpoint's own chat
  template (a checkpoint without one is a clear error).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    ProcessorMixin,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import sequence, signals
from ..budgets import split_evenly
from ..methods.base import TokenLayout, VisionTokens
from ..runtime import current_call
from ..sequence import Item
from ..views import ImageView, pixels_to_image
from .base import Adapter, captured, feature_kwargs, set_instance_attr
from .llava import LlavaImageFeatures
from .qwen_vl import checkpoint_chat_template
from .registry import register_adapter


def tile_unit(tile: int, tiles: int) -> int:
    """The unit number of an image's ``tile``-th tile (processor order) when it has ``tiles``: the thumbnail (last
    tile) is unit 0, grid tile j is unit j + 1; a lone tile is unit 0."""
    return (tile + 1) % tiles


def shuffle_groups(pixel_shuffle: Any, side: int, ratio: float) -> torch.Tensor:
    """(T, g) long: the patch numbers (row-major over the ``side`` x ``side`` grid, CLS excluded) that
    ``pixel_shuffle`` concatenates into each of its T output tokens, g = (1 / ratio) ** 2 per token, in channel
    order; read off the model's own ``pixel_shuffle`` applied to the patch numbers."""
    numbers = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
    shuffled = pixel_shuffle(numbers, scale_factor=ratio)
    return shuffled.reshape(-1, shuffled.shape[-1]).round().long()


class InternVLTower:
    """The InternViT tower seen by vlmzip: run it, take the projector's input features, pixel-shuffle them, and
    capture the feature layer's signals with hooks."""

    def __init__(self, inner: nn.Module, config: Any) -> None:
        self.inner = inner
        self.tower = inner.vision_tower
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(
                f"vision_feature_layer={layer!r} concatenates several layers; vlmzip needs a single feature layer "
                "(an int, e.g. -1 as in InternVL3)"
            )
        layers = self.tower.encoder.layer
        self.feature_layer = layer
        self.hidden_index = layer % (len(layers) + 1)  # hidden_states = embeddings + every layer
        if not -len(layers) - 1 <= layer <= len(layers) or self.hidden_index == 0:
            raise ValueError(
                f"vision_feature_layer={layer} does not select one of the tower's {len(layers)} transformer layers"
            )
        self.attn = layers[self.hidden_index - 1].attention
        vcfg = config.vision_config
        size, patch = _pair(vcfg.image_size), _pair(vcfg.patch_size)
        if size[0] != size[1] or patch[0] != patch[1]:
            raise ValueError(f"vlmzip lays out square InternVL tiles; got image_size {size}, patch_size {patch}")
        self.side = size[0] // patch[0]
        ratio = float(config.downsample_ratio)
        group = round(1 / ratio) if ratio > 0 else 0
        if group < 1 or abs(group * ratio - 1) > 1e-9 or self.side % group:
            raise ValueError(
                f"downsample_ratio={ratio} does not merge whole blocks of the {self.side} x {self.side} patch grid; "
                "vlmzip needs 1 / downsample_ratio to be an integer dividing it (InternVL: 0.5)"
            )
        self.ratio = ratio
        self.grid = self.side // group
        self.groups = shuffle_groups(inner.pixel_shuffle, self.side, ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Shuffled tokens per tile (InternVL3: 16 x 16 = 256)."""
        return self.grid * self.grid

    def layout(self) -> TokenLayout:
        """One tile's layout: the shuffled grid, no prefix (the CLS token is never sent)."""
        return TokenLayout(num_prefix=0, grid=(self.grid, self.grid), send_prefix=True)

    def shuffle(self, features: torch.Tensor) -> torch.Tensor:
        """(B, side * side, C) patch features -> (B, T, g * C) shuffled tokens, as HF's ``get_image_features``."""
        batch = features.shape[0]
        grid = features.reshape(batch, self.side, self.side, -1)
        shuffled = self.inner.pixel_shuffle(grid, scale_factor=self.ratio)
        return shuffled.reshape(batch, -1, shuffled.shape[-1])

    def run(self, pixel_values: torch.Tensor, needs: frozenset[str], **kwargs: Any) -> tuple[Any, VisionTokens]:
        """Run the tower on (B, 3, H, W) tiles: (its output, the tiles' shuffled tokens (B, T, g * C) with the
        signals ``needs`` asks for, each per shuffled token)."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "return_dict")}
        with captured({"q": self.attn.q_norm, "k": self.attn.k_norm}, active=bool(needs)) as store:
            pixels = pixel_values.to(self.inner.dtype)
            if self.feature_layer == -1:
                out = self.tower(pixel_values=pixels, return_dict=True, **kwargs)
                features = out.last_hidden_state
            else:
                out = self.tower(pixel_values=pixels, return_dict=True, output_hidden_states=self.feature_layer,
                                 **kwargs)
                features = out.hidden_states[self.feature_layer]
        tokens = VisionTokens(hidden=self.shuffle(features[:, 1:]), layout=self.layout(),
                              seeds=signals.content_seeds(pixel_values))
        if needs:
            self.add_signals(tokens, store["q"], store["k"], needs)
        return out, tokens

    def add_signals(self, tokens: VisionTokens, q: torch.Tensor, k: torch.Tensor, needs: frozenset[str]) -> None:
        """Set ``tokens``' signals from the feature layer's (B, 1 + N, H * Dh) queries and keys: per shuffled token,
        the CLS attention its patches receive (summed) and their head-mean keys (averaged)."""
        heads = self.attn.num_heads
        groups = self.groups.to(q.device)
        if needs & {"cls_attention", "received_attention"}:
            cls = signals.query_row_attention(q, k, heads, float(self.attn.scale), row=0)[:, 1:]  # (B, N)
            dominance = cls[:, groups].sum(dim=-1)  # (B, T)
            tokens.cls_attention = dominance
            tokens.received_attention = dominance
        if "keys" in needs:
            keys = signals.head_mean_keys(k, heads)[:, 1:]  # (B, N, Dh)
            tokens.keys = keys[:, groups].mean(dim=2)  # (B, T, Dh)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def check_strategy(strategy: str) -> None:
    """A clear error for a ``vision_feature_select_strategy`` vlmzip cannot lay out."""
    if strategy == "full":
        raise ValueError(
            "vision_feature_select_strategy='full' keeps InternViT's CLS token, which does not fit the pixel-shuffle "
            "grid (side x side patches + 1); vlmzip needs 'default' (InternVL's own setting)"
        )
    if strategy != "default":
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}; expected 'default'")


def tile_grid(tiles: torch.Tensor, thumbnail: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the grid ``tiles`` (n, 3, H, W, raster order) were cut from: the arrangement whose
    mosaic, shrunk to one tile, is closest to ``thumbnail`` (3, H, W), the whole image resized to one tile (the
    processor does not pass the grid on). Ties go to the squarest grid."""
    count, _, height, width = tiles.shape
    best: tuple[float, int, int, int] | None = None
    for rows in range(1, count + 1):
        if count % rows:
            continue
        cols = count // rows
        mosaic = tiles.float().view(rows, cols, 3, height, width).permute(2, 0, 3, 1, 4)
        mosaic = mosaic.reshape(1, 3, rows * height, cols * width)
        shrunk = nn.functional.interpolate(mosaic, size=(height, width), mode="area")[0]
        error = float((shrunk - thumbnail.float()).square().mean())
        key = (error, abs(rows - cols), rows, cols)
        if best is None or key[:3] < best[:3]:
            best = key
    assert best is not None
    return best[2], best[3]


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without a video processor (transformers' needs torchvision).

    Same tiling, the same placeholder expansion (``<IMG_CONTEXT>`` -> ``<img>`` + image_seq_length x tiles
    ``<IMG_CONTEXT>`` + ``</img>``) and the same outputs (input_ids, attention_mask, pixel_values); used when
    ``AutoProcessor`` cannot build the full processor on a machine without torchvision.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
        """InternVL's processing of ``images`` and ``text``; ``videos`` is a clear error."""
        if videos is not None:
            raise ValueError("this InternVL processor was built without video support (transformers' video "
                             "processor needs torchvision); install torchvision to process videos")
        return super().__call__(images=images, text=text, **kwargs)


def load_processor(folder: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)`` where transformers can build InternVL's processor (its video
    processor needs torchvision); otherwise the same processor without video support, built from the saved image
    processor, tokenizer, ``image_seq_length`` and the checkpoint's own chat template."""
    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as err:
        reason = err
    template = checkpoint_chat_template(folder)
    if template is None:
        raise ValueError(
            f"cannot build the processor of {folder} ({type(reason).__name__}: {reason}), and the checkpoint has no "
            "chat template of its own for the image-only processor vlmzip builds instead; install torchvision so "
            "transformers can build InternVL's processor, or add the model's chat template to the folder"
        )
    saved, _ = ProcessorMixin.get_processor_dict(str(folder))
    return ImageOnlyInternVLProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                      tokenizer=AutoTokenizer.from_pretrained(folder),
                                      image_seq_length=int(saved.get("image_seq_length", 256)), chat_template=template)


class InternVLAdapter(Adapter):
    """vlmzip's view of one ``InternVLForConditionalGeneration`` instance."""

    family = "internvl"
    model_classes = (InternVLForConditionalGeneration,)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        check_strategy(self.config.vision_feature_select_strategy)
        self.tower = InternVLTower(self.inner, self.config)
        self.per_tile = self.tower.tokens_per_tile

    # -- the images of a call ----------------------------------------------------------------------

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Each image's single run of placeholders, read from ``input_ids`` (tiles = run / tokens per tile);
        the runs must account for every tile of ``pixel_values``."""
        ids = call.get("input_ids")
        if ids is None:
            raise ValueError("InternVL images are laid out from the prompt: pass input_ids with pixel_values")
        out = []
        for b, row in enumerate(ids.cpu()):
            for _, length in sequence.image_runs(row, self.image_token_id):
                if length % self.per_tile:
                    raise ValueError(
                        f"row {b} has a run of {length} image placeholders, not a whole number of tiles of "
                        f"{self.per_tile} tokens; build the prompt with this model's processor "
                        f"(image_seq_length={self.per_tile})"
                    )
                out.append(Item(self.image_token_id, (length,)))
        pixels = call.get("pixel_values")
        tiles = sum(item.vanilla // self.per_tile for item in out)
        if pixels is not None and tiles != int(pixels.shape[0]):
            raise ValueError(
                f"the prompt's image placeholders make {tiles} tiles of {self.per_tile} tokens, but pixel_values "
                f"holds {int(pixels.shape[0])} tiles; build the prompt and the pixels with this model's processor "
                "from the same images"
            )
        return out

    def tiles(self, item: Item) -> int:
        """Tiles of an image (its thumbnail included)."""
        return item.vanilla // self.per_tile

    def shares(self, item: Item, keep: int, number: int, method: str) -> list[int]:
        """Each unit's share of image ``number``'s ``keep`` tokens, in unit order (clear error when it cannot
        be split)."""
        tiles = self.tiles(item)
        if not tiles <= keep <= item.vanilla:
            raise ValueError(
                f"{method}: a budget of {keep} visual tokens for image {number} of this batch (vanilla count "
                f"{item.vanilla}: {tiles} tiles of {self.per_tile} tokens) cannot be split over its tiles; it needs "
                f"between {tiles} and {item.vanilla} tokens (use ratio=1.0 to keep every token)"
            )
        return split_evenly(keep, tiles)

    def split(self, item: Item, keep: int, number: int, method: str) -> tuple[int, ...]:
        """One run per image: all ``keep`` tokens in it, after checking they split over its tiles."""
        self.shares(item, keep, number, method)
        return (keep,)

    def unit_layout(self) -> TokenLayout:
        """One tile: the shuffled grid (InternVL3: 16 x 16), no prefix."""
        return self.tower.layout()

    # -- the model's parts ---------------------------------------------------------------------------

    def vision_module(self) -> nn.Module:
        """The InternViT tower (``model.model.vision_tower``)."""
        return self.tower.tower

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        return [set_instance_attr(self.inner, "get_image_features", InternVLImageFeatures(self, state))]

    def load_processor(self, folder: Any) -> Any:
        """The checkpoint's InternVL processor (image-only where torchvision is missing, see ``load_processor``)."""
        return load_processor(folder)

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """The first image's tiles as the tower sees them, in unit order: the thumbnail (the whole image), then the
        grid tiles in raster order (their grid read off the thumbnail); one picture for a one-tile image."""
        item = self.items(inputs)[0]
        tiles = self.tiles(item)
        pixels = inputs["pixel_values"][:tiles]
        layouts = [self.unit_layout()] * tiles
        side = pixels.shape[-1]
        if tiles == 1:
            picture = pixels_to_image(pixels[0], image_processor)
            caption = (f"The image as the model sees it (one {side} x {side} px tile): all {item.vanilla} visual "
                       "tokens")
            return ImageView(inputs, item.vanilla, [picture], layouts, caption=caption)
        rows, cols = tile_grid(pixels[:-1], pixels[-1])
        order = [tiles - 1, *range(tiles - 1)]  # unit order: the thumbnail, then the grid tiles
        pictures = [pixels_to_image(pixels[j], image_processor) for j in order]
        caption = (f"As the model sees it: the thumbnail (the whole image) and {rows} x {cols} tiles of {side} px; "
                   f"the vanilla model sends {item.vanilla} visual tokens for them ({self.per_tile} per tile)")
        return ImageView(inputs, item.vanilla, pictures, layouts, grid=(rows, cols), caption=caption)


class InternVLImageFeatures(LlavaImageFeatures):
    """``get_image_features`` of a compressed InternVL: pooler_output holds every image's sent tokens, in order
    (see the module docstring for its shape). The feature layer / strategy check is LLaVA's."""

    def images(self, count: int, num_patches: Any) -> list[Item]:
        """The images of these ``count`` tiles: from ``num_patches`` (tiles per image, as the image processor
        reports them) when given, else from the call in flight (its prompt's runs)."""
        adapter = self.adapter
        if num_patches is not None:
            tiles = num_patches.tolist() if isinstance(num_patches, torch.Tensor) else list(num_patches)
            items = [Item(adapter.image_token_id, (int(n) * adapter.per_tile,)) for n in tiles]
        else:
            call = current_call(self.state)
            if call is not None and call.items is not None:
                items = call.items
            elif self.state.pre is None:  # nothing to compress: every tile is sent as it is
                items = [Item(adapter.image_token_id, (adapter.per_tile,))] * count
            else:
                raise ValueError(
                    "outside a model call, a compressed InternVL cannot tell which tiles belong to which image: pass "
                    "num_patches=[tiles per image] (the image processor's num_patches) to get_image_features"
                )
        if sum(adapter.tiles(item) for item in items) != count:
            raise ValueError(
                f"the images hold {sum(adapter.tiles(item) for item in items)} tiles but pixel_values has {count}; "
                "pass the processor's pixel_values for the same images"
            )
        return items

    def __call__(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        num_patches: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        self.check(vision_feature_layer, vision_feature_select_strategy)
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected (tiles, 3, H, W)")
        adapter, state = self.adapter, self.state
        items = self.images(int(pixel_values.shape[0]), num_patches)
        keeps = [state.pre_keep(item.vanilla, i) for i, item in enumerate(items)]
        shares = [None if keep >= item.vanilla else adapter.shares(item, keep, i, state.name)
                  for i, (item, keep) in enumerate(zip(items, keeps, strict=True))]
        needs = state.needs() if any(s is not None for s in shares) else frozenset()
        out, tokens = adapter.tower.run(pixel_values, needs, **feature_kwargs(kwargs))
        projector = adapter.inner.multi_modal_projector
        projected = state.pre is not None and state.pre.spec.stage == "projector"
        if projected:
            tokens.hidden = projector(tokens.hidden)
        if all(s is None for s in shares):  # every image whole: HF's own (tiles, T, D) features
            features = tokens.hidden if projected else projector(tokens.hidden)
            return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=features)
        keeps_per_tile: list[int | None] = []
        units: list[tuple[int, int]] = []
        for i, (item, share) in enumerate(zip(items, shares, strict=True)):
            tiles = adapter.tiles(item)
            for j in range(tiles):
                unit = tile_unit(j, tiles)
                keeps_per_tile.append(None if share is None else share[unit])
                units.append((i, unit))
        chosen = state.select_rows(tokens, keeps_per_tile, units)
        sent = {id(c[0]): c[0].features if projected else projector(c[0].features) for c in chosen if c is not None}
        whole = [row for row, c in enumerate(chosen) if c is None]
        full: dict[int, torch.Tensor] = {}
        if whole:
            hidden = tokens.hidden[whole]
            full = dict(zip(whole, hidden if projected else projector(hidden), strict=True))
        parts = [full[row] if c is None else sent[id(c[0])][c[1]] for row, c in enumerate(chosen)]
        features = torch.cat(parts, dim=0).unsqueeze(1)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=features)


register_adapter(InternVLAdapter)
