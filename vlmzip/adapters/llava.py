"""Adapter for ``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5 layout).

Model quirks this file owns:
- The projector is fed ``vision_tower(...).hidden_states[vision_feature_layer]`` (LLaVA-1.5: -2, the
  output of the 23rd of 24 CLIP layers); with ``vision_feature_select_strategy == "default"`` the CLS
  token is dropped, with ``"full"`` it is sent.
- The processor expands ``<image>`` into one placeholder per sent token; the LLM embeds the
  placeholders and ``masked_scatter``s the projected image features into them, so the placeholder
  count must equal the feature count.
- Route: an instance-level ``get_image_features`` on ``model.model`` returns K projected tokens per
  image; api.py shrinks the placeholder runs from N to K before the model sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import signals
from ..methods.base import TokenLayout, VisionTokens
from .base import SelectFn, set_instance_attr

SUPPORTED_VISION = ("CLIPVisionModel", "SiglipVisionModel")


class LlavaAdapter:
    """vlmzip's view of one ``LlavaForConditionalGeneration`` instance."""

    family = "llava"
    model_classes = (LlavaForConditionalGeneration,)

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        self.model = model
        self.inner = model.model
        config = model.config
        tower = self.inner.vision_tower
        if type(tower).__name__ not in SUPPORTED_VISION:
            raise ValueError(
                f"vlmzip's LLaVA adapter supports vision towers {SUPPORTED_VISION}, got {type(tower).__name__}"
            )
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(
                f"vision_feature_layer={layer!r} concatenates several layers; vlmzip needs a single "
                "feature layer (an int, e.g. -2 as in LLaVA-1.5)"
            )
        vcfg = config.vision_config
        body = getattr(tower, "vision_model", tower)  # transformers < 5 nests the body one level deeper
        self.layers = body.encoder.layers
        num_states = len(self.layers) + 1  # embeddings + every layer
        self.hidden_index = layer % num_states
        if self.hidden_index == 0:
            raise ValueError("vision_feature_layer selects the patch embeddings; vlmzip needs a transformer layer")
        self.attn = self.layers[self.hidden_index - 1].self_attn
        self.num_heads = vcfg.num_attention_heads
        side = vcfg.image_size // vcfg.patch_size
        has_cls = hasattr(body.embeddings, "class_embedding")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
        if strategy == "default" and not has_cls:
            raise ValueError("vision_feature_select_strategy='default' drops a CLS token this encoder does not have")
        self.layout = TokenLayout(num_prefix=int(has_cls), grid=(side, side), send_prefix=strategy == "full")
        self.image_token_id = int(config.image_token_id)
        pad = getattr(config.text_config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    def placeholders_per_image(self) -> int:
        """Placeholders per image written by the processor: the tokens vanilla LLaVA sends."""
        return self.layout.vanilla

    def sequence_modules(self) -> list[nn.Module]:
        """Outer model (takes labels) and the inner LlavaModel (may be called directly)."""
        return [self.model, self.inner]

    def vision_tokens(self, pixel_values: torch.Tensor, needs: frozenset[str]) -> VisionTokens:
        """Run the tower on (B, 3, H, W) pixels; capture q/k of the feature layer only when needed."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        if needs:
            for name in ("q_proj", "k_proj"):
                module = getattr(self.attn, name)
                handles.append(module.register_forward_hook(_capture(captured, name)))
        tower = self.inner.vision_tower
        try:
            out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        finally:
            for handle in handles:
                handle.remove()
        hidden = out.hidden_states[self.hidden_index]
        tokens = VisionTokens(hidden=hidden, layout=self.layout)
        if needs:
            q, k = captured["q_proj"], captured["k_proj"]
            scale = float(getattr(self.attn, "scale", (q.shape[-1] // self.num_heads) ** -0.5))
            if "keys" in needs:
                tokens.keys = signals.head_mean_keys(k, self.num_heads)
            if "cls_attention" in needs and self.layout.num_prefix == 1:
                tokens.cls_attention = signals.query_row_attention(q, k, self.num_heads, scale, row=0)
            if "received_attention" in needs and self.layout.num_prefix == 0:
                tokens.received_attention = signals.received_attention(q, k, self.num_heads, scale)
        return tokens

    def install(self, select: SelectFn, needs: frozenset[str]) -> Callable[[], None]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        adapter = self
        configured = (self.model.config.vision_feature_layer, self.model.config.vision_feature_select_strategy)

        def get_image_features(
            pixel_values: torch.Tensor,
            vision_feature_layer: int | None = None,
            vision_feature_select_strategy: str | None = None,
            image_sizes: Any = None,
            **kwargs: Any,
        ) -> BaseModelOutputWithPooling:
            """Compressed image features: pooler_output is a list of (K, D_lm) tensors, one per image."""
            asked = (
                configured[0] if vision_feature_layer is None else vision_feature_layer,
                configured[1] if vision_feature_select_strategy is None else vision_feature_select_strategy,
            )
            if asked != configured:
                raise ValueError(
                    f"this model was compressed for vision_feature_layer/strategy {configured}, got {asked}; "
                    "decompress, change the config, and compress again"
                )
            if image_sizes is not None:
                raise ValueError("image_sizes (variable-resolution LLaVA) is not supported by the LLaVA adapter")
            tokens = adapter.vision_tokens(pixel_values, needs)
            selection = select(tokens)
            projected = adapter.inner.multi_modal_projector(selection.features)
            return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden, pooler_output=list(projected))

        return set_instance_attr(self.inner, "get_image_features", get_image_features)


def _capture(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        store[name] = output

    return hook
