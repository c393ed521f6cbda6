"""Adapter for ``transformers.Gemma3ForConditionalGeneration`` (Gemma 3, images).

Model quirks this file owns:
- Tower and projector: a SigLIP tower without CLS token (Gemma-3: 896 px / patch 14 = 64 x 64 patches); its
  ``last_hidden_state`` (after the post-layernorm) goes to ``Gemma3MultiModalProjector``, which average-pools
  k x k patch groups (k = 64 / 16 = 4) to ``mm_tokens_per_image`` tokens (256: a 16 x 16 grid), RMS-normalises
  them (``mm_soft_emb_norm``) and projects them to the LLM width. The LLM sees the pooled tokens.
- What is compressed: the pooled tokens of each picture the tower encodes (a unit of layout
  ``TokenLayout(0, (16, 16), send_prefix=True)``). "vision"-stage methods get the pooled tower features (the
  average pool's output, tower width, before the norm and projection), as VisionZip merges tower features
  before LLaVA's projector; what they send then goes through the norm and projection, which act token by
  token, so keep-all is exact. "projector"-stage methods get the projected tokens (LLM width).
- Signals (no CLS token; VisionZip arXiv 2412.04467 scores by received attention then): ``received_attention``
  of a pooled token = the attention its k x k patches receive in the tower's last layer (each patch's: mean
  over heads and over all queries), summed over the group; ``keys`` = that layer's ``k_proj`` output, mean over
  heads, mean over the group. Both are rebuilt from q / k captured with hooks, queries in chunks (the full
  16 x 4096 x 4096 attention of one picture would take 1 GB).
- Pan-and-scan: with ``do_pan_and_scan=True`` the processor adds crops of a wide or tall image and writes it as
  ``Here is the original image <run> and here are some crops to help you see better <run> <run> ...``: 1 + n
  runs of 256 placeholders, each between ``<start_of_image>`` and ``<end_of_image>``, text between runs, and
  one ``pixel_values`` row per run (the whole image, then its crops). The image processor counts the crops
  (``num_crops``), but ``Gemma3Processor`` drops that from its output (``unused_input_names``) and the model
  treats every run as an image of its own, so ``items`` reads the grouping from the prompt: a run continues the
  previous run's image when the ids between them are exactly what the processor writes there (after an
  image's first run, the crops' lead-in; after a crop, the separator between crops), tokenized by the processor
  saved with the model (``model.name_or_path``, loaded once). Without it, a row holding several runs is a clear
  error. Without pan-and-scan every image is one run of 256.
- Budget: per image, summed over its runs (``tokens=N``; ``ratio=r`` of its own count), split evenly over its
  runs (remainder to the first runs, VisionZip's multi-crop setting), each run compressed on its own (runs with
  the same share in one batched method call) and sent into its own placeholder run, in the method's order.
- Bidirectional attention: the model lets the tokens of each contiguous run of ``token_type_ids == 1`` attend to
  each other (global layers; sliding layers within the window). runtime.py shrinks ``token_type_ids`` with
  ``input_ids``, so the kept tokens of a run still form one block.
- ``pooler_output``: ``Gemma3Model`` takes one tensor (it calls ``.to`` and counts ``shape[0] * shape[1]``), so
  the sent tokens are concatenated in placeholder order and shaped (N / g, g, D), g the gcd of the runs' kept
  counts: generate's expansion for beams splits that first dimension by each row's placeholder count, which
  is a multiple of g, so each row's tokens stay together.
- Positions: 1-D, contiguous over the shrunk sequence (what the released VisionZip code does); the decoder's
  sliding-window layers apply their window to the shrunk sequence.
- In-LLM methods: the LLM's global and sliding layers each get their own mask and RoPE in a pruned segment; a
  sliding layer's window counts the kept sequence's slots, as its cache does (``vlmzip.llm_hooks``). The kept
  tokens of an image run still attend to each other both ways (the model's global mask, gathered).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import Gemma3ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import signals
from ..budgets import split_evenly
from ..methods.base import TokenLayout, VisionTokens
from ..runtime import current_call
from ..sequence import Item, image_runs
from ..views import ImageView, pixels_to_image
from .base import Adapter, captured, feature_kwargs, set_instance_attr
from .registry import register_adapter

# Query rows per chunk when rebuilding the received attention of one picture (memory: heads x chunk x patches).
QUERY_CHUNK = 512

# Per checkpoint folder: the ids the processor writes between the runs of one image (see ``crop_connectors``).
_CONNECTORS: dict[str, tuple[tuple[int, ...], tuple[int, ...]] | None] = {}


def chunked_received_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """(B, T, H * Dh) queries and keys -> (B, T) attention each token receives, mean over heads and queries: what
    ``signals.received_attention`` computes (float32), built ``QUERY_CHUNK`` query rows of one unit at a time."""
    qh, kh = signals.split_heads(q, num_heads), signals.split_heads(k, num_heads)  # (B, H, T, Dh)
    batch, heads, tokens, _ = qh.shape
    total = torch.zeros(batch, tokens, dtype=torch.float32, device=q.device)
    for b in range(batch):
        for start in range(0, tokens, QUERY_CHUNK):
            probs = torch.softmax((qh[b, :, start : start + QUERY_CHUNK] @ kh[b].transpose(-1, -2)) * scale, dim=-1)
            total[b] += probs.sum(dim=(0, 1))
    return total / (heads * tokens)


def crop_connectors(processor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lead-in, separator): the ids ``processor`` writes between an image's first run and its first crop, and
    between two crops, each from ``<end_of_image>`` to ``<start_of_image>`` included, read off the processor's own
    text for an image with two crops (so they follow the processor's wording and the tokenizer's pieces)."""
    tokenizer = processor.tokenizer
    text = processor.replace_image_token({"num_crops": [2]}, 0)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    runs = image_runs(ids, tokenizer.image_token_id)
    if len(runs) != 3:
        raise ValueError(f"{type(processor).__name__} wrote {len(runs)} image runs for an image with 2 crops, not 3")
    (a, n), (b, m), (c, _) = runs
    return tuple(ids[a + n : b].tolist()), tuple(ids[b + m : c].tolist())


class SiglipTower:
    """Gemma 3's SigLIP tower seen by vlmzip: run it and rebuild its last layer's signals per pooled token."""

    def __init__(self, tower: nn.Module, side: int) -> None:
        self.tower = tower
        self.attn = tower.encoder.layers[-1].self_attn
        self.num_heads = int(self.attn.num_heads)
        self.patches = int(tower.config.image_size // tower.config.patch_size)  # per side
        self.side = side  # pooled tokens per side
        self.kernel = self.patches // side

    def pool_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, ...) per patch (P = patches^2, row-major) -> (B, side^2, ...) summed over each k x k group."""
        b, s, k = x.shape[0], self.side, self.kernel
        grouped = x.reshape(b, s, k, s, k, *x.shape[2:])
        return grouped.sum(dim=(2, 4)).reshape(b, s * s, *x.shape[2:])

    def run(self, pixel_values: torch.Tensor, needs: frozenset[str],
            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run the tower on (U, 3, H, W) pixels: (its last_hidden_state (U, P, C), received attention per pooled
        token (U, side^2), keys per pooled token (U, side^2, Dh)); the signals None unless ``needs`` them."""
        with captured({"q": self.attn.q_proj, "k": self.attn.k_proj}, active=bool(needs)) as store:
            out = self.tower(pixel_values=pixel_values.to(self.tower.dtype), return_dict=True, **kwargs)
        received = keys = None
        if "received_attention" in needs:
            scale = float(getattr(self.attn, "scale", (store["q"].shape[-1] // self.num_heads) ** -0.5))
            received = self.pool_sum(chunked_received_attention(store["q"], store["k"], self.num_heads, scale))
        if "keys" in needs:
            keys = self.pool_sum(signals.head_mean_keys(store["k"], self.num_heads)) / self.kernel**2
        return out.last_hidden_state, received, keys


class Gemma3Adapter(Adapter):
    """vlmzip's view of one ``Gemma3ForConditionalGeneration`` instance."""

    family = "gemma3"
    model_classes = (Gemma3ForConditionalGeneration,)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.per_run = int(self.config.mm_tokens_per_image)
        side = math.isqrt(self.per_run)
        self.projector = self.inner.multi_modal_projector
        self.tower = SiglipTower(self.inner.vision_tower, side)
        self.layout = TokenLayout(num_prefix=0, grid=(side, side), send_prefix=True)
        self.boi, self.eoi = int(self.config.boi_token_id), int(self.config.eoi_token_id)
        self.source = str(getattr(model, "name_or_path", "") or "")

    # -- the images of a call ------------------------------------------------------------------------

    def connectors(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The processor's lead-in and separator ids between the runs of one image (``crop_connectors``), from
        the processor saved with this model; None when there is none to load."""
        if self.source not in _CONNECTORS:
            try:
                _CONNECTORS[self.source] = crop_connectors(self.load_processor(self.source)) if self.source else None
            except (OSError, ImportError, ValueError, TypeError, KeyError, AttributeError):
                _CONNECTORS[self.source] = None
        return _CONNECTORS[self.source]

    def row_images(self, row: torch.Tensor, b: int) -> list[int]:
        """Runs per image of one row of ids (host, 1-D), in order (see the module docstring)."""
        runs = image_runs(row, self.image_token_id)
        for _, length in runs:
            if length != self.per_run:
                raise ValueError(
                    f"row {b} has a run of {length} image placeholders; Gemma 3 writes {self.per_run} per image and "
                    "per pan-and-scan crop: build the prompt with this model's processor"
                )
        if len(runs) <= 1:
            return [1] * len(runs)
        connectors = self.connectors()
        if connectors is None:
            raise ValueError(
                f"row {b} holds {len(runs)} runs of image placeholders; telling pan-and-scan crops of one image from "
                "separate images needs the text this model's processor writes between them, and no processor could "
                f"be loaded from the model's folder (name_or_path={self.source!r}): load the model with "
                "from_pretrained from a folder that holds its processor"
            )
        lead_in, separator = connectors
        images = [1]
        for (start, length), (next_start, _) in zip(runs, runs[1:], strict=False):
            gap = tuple(row[start + length : next_start].tolist())
            if gap == (lead_in if images[-1] == 1 else separator):
                images[-1] += 1
            else:
                images.append(1)
        return images

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Each image of the call: one run of ``mm_tokens_per_image`` placeholders, plus one per pan-and-scan crop,
        grouped as the processor wrote them (rows in order, images left to right)."""
        ids = call.get("input_ids")
        pixel_values = call.get("pixel_values")
        if ids is None:
            raise ValueError("Gemma 3 images need the processor's input_ids alongside pixel_values")
        host = ids.cpu()
        runs = [n for b in range(host.shape[0]) for n in self.row_images(host[b], b)]
        if pixel_values is not None and sum(runs) != pixel_values.shape[0]:
            raise ValueError(
                f"the prompt holds {sum(runs)} runs of image placeholders (one per image and per pan-and-scan crop) "
                f"but pixel_values holds {pixel_values.shape[0]} pictures; build the prompt with this model's "
                "processor from the same images"
            )
        return [Item(self.image_token_id, (self.per_run,) * n) for n in runs]

    def split(self, item: Item, keep: int, number: int, method: str) -> tuple[int, ...]:
        """An image's ``keep`` tokens split evenly over its runs (the whole image, then its crops), the remainder to
        the first runs; a clear error when every run cannot keep at least one token."""
        runs = len(item.segments)
        if keep < runs:
            raise ValueError(
                f"{method}: a budget of {keep} visual tokens for image {number} of this batch (vanilla count "
                f"{item.vanilla}: the image and {runs - 1} pan-and-scan crop(s), {self.per_run} tokens each) cannot "
                f"be split over its {runs} runs; it needs at least {runs} tokens (or ratio=r for a share of each "
                "image's tokens)"
            )
        return tuple(split_evenly(keep, runs))

    def unit_layout(self) -> TokenLayout:
        return self.layout

    # -- the model's parts -----------------------------------------------------------------------------

    def vision_module(self) -> nn.Module:
        return self.tower.tower

    # -- compression -----------------------------------------------------------------------------------

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        return [set_instance_attr(self.inner, "get_image_features", Gemma3ImageFeatures(self, state))]

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(U, P, C) tower output -> (U, side^2, C) pooled features: the projector's own average pool."""
        units, _, width = hidden.shape
        p = self.tower.patches
        grid = hidden.transpose(1, 2).reshape(units, width, p, p).contiguous()
        return self.projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def project(self, pooled: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(..., C) pooled features -> (..., D_lm): the projector's norm and projection, in ``like``'s dtype."""
        normed = self.projector.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(like)

    def encode(self, state: Any, pixel_values: torch.Tensor, needs: frozenset[str],
               kwargs: dict[str, Any]) -> tuple[VisionTokens, torch.Tensor, bool]:
        """Run tower and pooling on (U, 3, H, W) pixels for ``state``'s method: (the units' tokens, the tower's
        last_hidden_state, whether the tokens are already projected: "projector"-stage methods select after it)."""
        hidden, received, keys = self.tower.run(pixel_values, needs, **feature_kwargs(kwargs))
        pooled = self.pool(hidden)
        projected = state.pre is not None and state.pre.spec.stage == "projector"
        tokens = VisionTokens(hidden=self.project(pooled, hidden) if projected else pooled, layout=self.layout,
                              keys=keys, received_attention=received, seeds=signals.content_seeds(pixel_values))
        return tokens, hidden, projected

    # -- loading and describing --------------------------------------------------------------------------

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """The first image as the tower sees it: the whole image squeezed to the tower's square, then its
        pan-and-scan crops (if any) in the processor's order, drawn in one row."""
        item = self.items(inputs)[0]
        runs = len(item.segments)
        pictures = [pixels_to_image(inputs["pixel_values"][u], image_processor) for u in range(runs)]
        if runs == 1:
            caption = f"The image as the model sees it: all {item.vanilla} visual tokens ({self.per_run} pooled)"
            return ImageView(inputs, item.vanilla, pictures, [self.layout], caption=caption)
        caption = (f"As the model sees it: the whole image and its {runs - 1} pan-and-scan crops (in the processor's "
                   f"order), {self.per_run} pooled tokens each: {item.vanilla} visual tokens")
        return ImageView(inputs, item.vanilla, pictures, [self.layout] * runs, grid=(1, runs - 1), caption=caption)


class Gemma3ImageFeatures:
    """``get_image_features`` of a compressed Gemma 3: ``pooler_output`` holds every run's sent tokens in
    placeholder order, shaped (N / g, g, D_lm) (see the module docstring)."""

    def __init__(self, adapter: Gemma3Adapter, state: Any) -> None:
        self.adapter, self.state = adapter, state

    def unit_keeps(self, units: int) -> tuple[list[tuple[int, int]], list[int | None]]:
        """For each of ``units`` pictures: its (image, run) and the tokens it keeps (None: its image keeps all).
        The images come from the call in flight; outside one (a direct call), each picture is an image."""
        state = self.state
        call = current_call(state)
        items = call.items if call is not None and call.items is not None else None
        if items is None or sum(len(item.segments) for item in items) != units:
            items = [Item(self.adapter.image_token_id, (self.adapter.per_run,))] * units
        names, keeps = [], []
        for i, item in enumerate(items):
            kept = state.item_keep(item, i)
            compressed = kept != item.segments
            for j, k in enumerate(kept):
                names.append((i, j))
                keeps.append(k if compressed else None)
        return names, keeps

    def __call__(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        adapter, state = self.adapter, self.state
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; Gemma 3 expects (pictures, 3, H, W)")
        names, keeps = self.unit_keeps(pixel_values.shape[0])
        needs = state.needs() if any(k is not None for k in keeps) else frozenset()
        tokens, hidden, projected = adapter.encode(state, pixel_values, needs, kwargs)
        chosen = state.select_rows(tokens, keeps, names)
        sent: dict[int, torch.Tensor] = {}
        for c in chosen:
            if c is not None and id(c[0]) not in sent:
                sent[id(c[0])] = c[0].features if projected else adapter.project(c[0].features, hidden)
        vanilla = None
        if any(k is None for k in keeps):
            vanilla = tokens.hidden if projected else adapter.project(tokens.hidden, hidden)
        parts = [vanilla[u] if c is None else sent[id(c[0])][c[1]] for u, c in enumerate(chosen)]
        features = torch.cat(parts, dim=0)
        group = math.gcd(*(int(p.shape[0]) for p in parts))
        return BaseModelOutputWithPooling(last_hidden_state=hidden,
                                          pooler_output=features.view(-1, group, features.shape[-1]))


register_adapter(Gemma3Adapter)
