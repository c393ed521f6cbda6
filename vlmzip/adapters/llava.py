"""Adapter for ``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5 layout).

Model quirks this file owns:
- The projector is fed ``vision_tower(...).hidden_states[vision_feature_layer]`` (LLaVA-1.5: -2, the
  output of the 23rd of 24 CLIP layers); with ``vision_feature_select_strategy == "default"`` the CLS
  token is dropped, with ``"full"`` it is sent.
- The processor expands ``<image>`` into one run of placeholders, one per sent token, the same count for
  every image; the LLM embeds the placeholders and ``masked_scatter``s the projected image features into
  them, so the placeholder count must equal the feature count.
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
from ..sequence import Item
from ..views import ImageView, pixels_to_image
from .base import Adapter, captured, feature_kwargs, set_instance_attr
from .registry import register_adapter

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

    def run(self, pixel_values: torch.Tensor, layout: TokenLayout, needs: frozenset[str],
            **kwargs: Any) -> VisionTokens:
        """Run the tower on (B, 3, H, W) pixels; capture q/k of the feature layer only when needed."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "return_dict")}
        with captured({"q": self.attn.q_proj, "k": self.attn.k_proj}, active=bool(needs)) as store:
            out = self.tower(pixel_values.to(self.tower.dtype), output_hidden_states=True, return_dict=True, **kwargs)
        tokens = VisionTokens(hidden=out.hidden_states[self.hidden_index], layout=layout,
                              seeds=signals.content_seeds(pixel_values))
        if needs:
            q, k = store["q"], store["k"]
            scale = float(getattr(self.attn, "scale", (q.shape[-1] // self.num_heads) ** -0.5))
            if "keys" in needs:
                tokens.keys = signals.head_mean_keys(k, self.num_heads)
            if "cls_attention" in needs and layout.num_prefix == 1:
                tokens.cls_attention = signals.query_row_attention(q, k, self.num_heads, scale, row=0)
            if "received_attention" in needs and layout.num_prefix == 0:
                tokens.received_attention = signals.received_attention(q, k, self.num_heads, scale)
        return tokens


def check_strategy(strategy: str, has_cls: bool) -> None:
    """A clear error for a ``vision_feature_select_strategy`` vlmzip cannot lay out."""
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
    if strategy == "default" and not has_cls:
        raise ValueError("vision_feature_select_strategy='default' drops a CLS token this encoder does not have")


class LlavaAdapter(Adapter):
    """vlmzip's view of one ``LlavaForConditionalGeneration`` instance."""

    family = "llava"
    model_classes = (LlavaForConditionalGeneration,)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vcfg = self.config.vision_config
        self.tower = ClipLikeTower(self.inner.vision_tower, self.config.vision_feature_layer, vcfg.num_attention_heads)
        self.side = vcfg.image_size // vcfg.patch_size
        self.strategy = self.config.vision_feature_select_strategy
        check_strategy(self.strategy, self.tower.has_cls)
        self.layout = TokenLayout(num_prefix=int(self.tower.has_cls), grid=(self.side, self.side),
                                  send_prefix=self.strategy == "full")

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Every image gets the same single run: the layout's vanilla tokens."""
        return [Item(self.image_token_id, (self.layout.vanilla,))] * int(call["pixel_values"].shape[0])

    def static_tokens_per_image(self) -> int:
        return self.layout.vanilla

    def unit_layout(self) -> TokenLayout:
        return self.layout

    def vision_module(self) -> nn.Module:
        return self.tower.tower

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        return [set_instance_attr(self.inner, "get_image_features", LlavaImageFeatures(self, state))]

    def encode(self, state: Any, pixel_values: torch.Tensor, needs: frozenset[str], kwargs: dict[str, Any],
               tower: Any = None, layout: TokenLayout | None = None) -> tuple[VisionTokens, nn.Module, bool]:
        """Run the tower (default: the image tower, with its ``layout``) on (units, 3, H, W) pixels for ``state``'s
        method: (the units' tokens, the projector, whether the tokens are already projected: a "projector"-stage
        method selects after it)."""
        tower, layout = tower or self.tower, layout or self.layout
        tokens = tower.run(pixel_values, layout, needs, **feature_kwargs(kwargs))
        projector = self.inner.multi_modal_projector
        projected = state.pre is not None and state.pre.spec.stage == "projector"
        if projected:
            tokens.hidden = projector(tokens.hidden)
        return tokens, projector, projected

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """The image as the tower sees it (resized, centre-cropped): one unit."""
        picture = pixels_to_image(inputs["pixel_values"][0], image_processor)
        total = self.items(inputs)[0].vanilla
        return ImageView(inputs, total, [picture], [self.layout],
                         caption=f"The image as the model sees it: all {total} visual tokens")


class LlavaImageFeatures:
    """``get_image_features`` of a compressed LLaVA: pooler_output is a list of (K, D_lm) tensors."""

    def __init__(self, adapter: LlavaAdapter, state: Any) -> None:
        self.adapter, self.state = adapter, state
        config = adapter.config
        self.configured = (config.vision_feature_layer, config.vision_feature_select_strategy)

    def check(self, vision_feature_layer: int | None, vision_feature_select_strategy: str | None) -> None:
        """The feature layer and strategy of this call must be the ones the model was compressed for."""
        asked = (
            self.configured[0] if vision_feature_layer is None else vision_feature_layer,
            self.configured[1] if vision_feature_select_strategy is None else vision_feature_select_strategy,
        )
        if asked != self.configured:
            raise ValueError(
                f"this model was compressed for vision_feature_layer/strategy {self.configured}, got {asked}; "
                "decompress, change the config, and compress again"
            )

    def __call__(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        self.check(vision_feature_layer, vision_feature_select_strategy)
        if image_sizes is not None:
            raise ValueError("image_sizes (variable-resolution LLaVA) is not supported by the LLaVA adapter")
        adapter, state = self.adapter, self.state
        tokens, projector, projected = adapter.encode(state, pixel_values, state.needs(), kwargs)
        keep = state.pre_keep(adapter.layout.vanilla)  # every image has the same count, so the same budget
        units = [(i, 0) for i in range(tokens.hidden.shape[0])]
        features = state.select(tokens, keep, units).features
        return BaseModelOutputWithPooling(last_hidden_state=tokens.hidden,
                                          pooler_output=list(features if projected else projector(features)))


register_adapter(LlavaAdapter)
