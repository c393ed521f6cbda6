"""Adapter for ``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5 layout).

Model quirks this file owns:
- The projector is fed ``vision_tower(...).hidden_states[vision_feature_layer]`` (LLaVA-1.5: -2, the
  output of the 23rd of 24 CLIP layers); with ``vision_feature_select_strategy == "default"`` the CLS
  token is dropped, with ``"full"`` it is sent.
- The processor expands ``<image>`` into one placeholder per sent token, the same count for every image;
  the LLM embeds the placeholders and ``masked_scatter``s the projected image features into them, so the
  placeholder count must equal the feature count.
- Route: an instance-level ``get_image_features`` on ``model.model`` returns K projected tokens per
  image; runtime.py shrinks the placeholder runs from N to K before the model sees them.
- Positions: 1-D, contiguous over the shrunk sequence (what the released VisionZip code does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import signals
from ..methods.base import TokenLayout, VisionTokens
from .base import Adapter, set_instance_attr

SUPPORTED_VISION = ("CLIPVisionModel", "SiglipVisionModel")


class ClipLikeTower:
    """A CLIP / SigLIP tower seen by vlmzip: run it and capture one layer's signals with hooks."""

    def __init__(self, tower: nn.Module, feature_layer: int, num_heads: int) -> None:
        if type(tower).__name__ not in SUPPORTED_VISION:
            raise ValueError(f"vlmzip supports LLaVA vision towers {SUPPORTED_VISION}, got {type(tower).__name__}")
        if not isinstance(feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={feature_layer!r} concatenates several layers; vlmzip needs a single "
                "feature layer (an int, e.g. -2 as in LLaVA-1.5)"
            )
        self.tower = tower
        body = getattr(tower, "vision_model", tower)  # transformers < 5 nests the body one level deeper
        layers = body.encoder.layers
        self.hidden_index = feature_layer % (len(layers) + 1)  # hidden_states = embeddings + every layer
        if self.hidden_index == 0:
            raise ValueError("vision_feature_layer selects the patch embeddings; vlmzip needs a transformer layer")
        self.attn = layers[self.hidden_index - 1].self_attn
        self.num_heads = num_heads
        self.has_cls = hasattr(body.embeddings, "class_embedding")

    def tokens(self, pixel_values: torch.Tensor, layout: TokenLayout, needs: frozenset[str],
               **kwargs: Any) -> VisionTokens:
        """Run the tower on (B, 3, H, W) pixels; capture q/k of the feature layer only when needed."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        if needs:
            for name in ("q_proj", "k_proj"):
                handles.append(getattr(self.attn, name).register_forward_hook(_Store(captured, name)))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "return_dict")}
        try:
            out = self.tower(pixel_values.to(self.tower.dtype), output_hidden_states=True, return_dict=True, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        tokens = VisionTokens(hidden=out.hidden_states[self.hidden_index], layout=layout,
                              seeds=signals.content_seeds(pixel_values))
        if needs:
            q, k = captured["q_proj"], captured["k_proj"]
            scale = float(getattr(self.attn, "scale", (q.shape[-1] // self.num_heads) ** -0.5))
            if "keys" in needs:
                tokens.keys = signals.head_mean_keys(k, self.num_heads)
            if "cls_attention" in needs and layout.num_prefix == 1:
                tokens.cls_attention = signals.query_row_attention(q, k, self.num_heads, scale, row=0)
            if "received_attention" in needs and layout.num_prefix == 0:
                tokens.received_attention = signals.received_attention(q, k, self.num_heads, scale)
        return tokens


class _Store:
    """A forward hook that stores the module's output under ``name``."""

    def __init__(self, store: dict[str, torch.Tensor], name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.store[self.name] = output


def check_strategy(strategy: str, has_cls: bool) -> None:
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
    if strategy == "default" and not has_cls:
        raise ValueError("vision_feature_select_strategy='default' drops a CLS token this encoder does not have")


class LlavaAdapter(Adapter):
    """vlmzip's view of one ``LlavaForConditionalGeneration`` instance."""

    family = "llava"
    model_classes = (LlavaForConditionalGeneration,)

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__(model)
        self.inner = model.model
        config = model.config
        vcfg = config.vision_config
        self.tower = ClipLikeTower(self.inner.vision_tower, config.vision_feature_layer, vcfg.num_attention_heads)
        side = vcfg.image_size // vcfg.patch_size
        strategy = config.vision_feature_select_strategy
        check_strategy(strategy, self.tower.has_cls)
        self.layout = TokenLayout(num_prefix=int(self.tower.has_cls), grid=(side, side), send_prefix=strategy == "full")
        self.image_token_id = int(config.image_token_id)
        pad = getattr(config.text_config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    def image_counts(self, call: dict[str, Any]) -> list[int]:
        """Every image gets the same count: the layout's vanilla tokens."""
        return [self.layout.vanilla] * int(call["pixel_values"].shape[0])

    def static_tokens_per_image(self) -> int:
        return self.layout.vanilla

    def unit_layout(self) -> TokenLayout:
        return self.layout

    def sequence_modules(self) -> list[nn.Module]:
        """Outer model (takes labels) and the inner LlavaModel (may be called directly)."""
        return [self.model, self.inner]

    def language_model(self) -> nn.Module:
        return self.inner.language_model

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        return [set_instance_attr(self.inner, "get_image_features", LlavaImageFeatures(self, state))]


class LlavaImageFeatures:
    """``get_image_features`` of a compressed LLaVA: pooler_output is a list of (K, D_lm) tensors."""

    def __init__(self, adapter: LlavaAdapter, state: Any) -> None:
        self.adapter, self.state = adapter, state
        config = adapter.model.config
        self.configured = (config.vision_feature_layer, config.vision_feature_select_strategy)

    def __call__(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: Any = None,
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
        if image_sizes is not None:
            raise ValueError("image_sizes (variable-resolution LLaVA) is not supported by the LLaVA adapter")
        adapter, state = self.adapter, self.state
        needs = state.pre.spec.needs if state.pre is not None else frozenset()
        kwargs.pop("return_dict", None)
        tokens = adapter.tower.tokens(pixel_values, adapter.layout, needs, **kwargs)
        keep = state.pre_keep(adapter.layout.vanilla)
        projector = adapter.inner.multi_modal_projector
        if state.pre is not None and state.pre.spec.stage == "projector":
            tokens.hidden = projector(tokens.hidden)
            projected = state.select(tokens, keep).features
        else:
            projected = projector(state.select(tokens, keep).features)
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=list(projected))
