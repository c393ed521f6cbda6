"""vLLM's CLIP / SigLIP towers seen by the plugin: run one, with the signals a method needs captured by a hook.

vLLM's towers return the feature layer's hidden states (they are built only up to that layer) and no attention.
VisionZip and the saliency-based methods need that layer's attention rows, so a forward hook on the layer's fused
``qkv_proj`` takes its q and k (vLLM keeps its own attention kernel; nothing is switched to eager attention) and
``vlmzip.signals`` rebuilds only the rows the method needs, exactly as vlmzip's transformers adapters do.

Under tensor parallelism a tower's heads are split evenly over the ranks: each rank computes the signals of its own
heads and :func:`over_all_heads` combines them across the ranks (every signal is a sum or a mean over heads), so every
rank selects the same tokens as a single process would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import signals
from ..methods import TokenLayout, VisionTokens


def over_all_heads(x: torch.Tensor, tp_size: int, mean: bool) -> torch.Tensor:
    """A signal over this rank's heads -> over all heads: their sum across the ``tp_size`` tensor-parallel ranks
    (divided by ``tp_size`` for a mean over heads: every rank holds as many heads). Every rank of the group must call
    it, in the same order."""
    if tp_size == 1:
        return x
    from vllm.distributed import tensor_model_parallel_all_reduce

    total = tensor_model_parallel_all_reduce(x.contiguous())
    return total / tp_size if mean else total


class _QKV:
    """Forward hook storing a ``QKVParallelLinear``'s output (its first element: the fused q | k | v)."""

    def __init__(self, store: dict[str, torch.Tensor]) -> None:
        self.store = store

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.store["qkv"] = output[0] if isinstance(output, tuple) else output


class Tower:
    """One vLLM vision tower (``CLIPVisionModel`` or ``SiglipVisionModel``) and its last built layer's attention."""

    def __init__(self, tower: nn.Module, layout: TokenLayout) -> None:
        body = getattr(tower, "vision_model", tower)
        self.tower, self.layout = tower, layout
        self.attn = body.encoder.layers[-1].self_attn  # vLLM builds the tower up to the feature layer only
        self.qkv = getattr(self.attn, "qkv_proj", None)
        self.tp_size = int(getattr(self.attn, "tp_size", 1))
        self.num_heads = int(getattr(self.attn, "num_heads_per_partition", self.attn.num_heads))  # this rank's heads
        self.head_dim = int(self.attn.head_dim)
        self.scale = float(self.attn.scale)

    def check(self, needs: frozenset[str], method: str) -> None:
        """A clear start-up error where the signals ``needs`` cannot be captured on this tower."""
        if not needs:
            return
        if self.qkv is None:
            raise ValueError(f"vlmzip in vLLM: {method} needs the vision tower's attention, but this tower's layer "
                             f"({type(self.attn).__name__}) has no fused qkv_proj to capture q and k from")

    def run(self, pixel_values: torch.Tensor, needs: frozenset[str], **kwargs: Any) -> VisionTokens:
        """(B, 3, H, W) pixels -> every token of the feature layer (prefix first) and the signals in ``needs``."""
        store: dict[str, torch.Tensor] = {}
        handle = self.qkv.register_forward_hook(_QKV(store)) if needs else None
        try:
            hidden = self.tower(pixel_values, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        tokens = VisionTokens(hidden=hidden, layout=self.layout, seeds=signals.content_seeds(pixel_values))
        if needs:
            width, heads, tp = self.num_heads * self.head_dim, self.num_heads, self.tp_size
            qkv = store["qkv"].reshape(hidden.shape[0], hidden.shape[1], -1)  # this rank's q | k | v
            q, k = qkv[..., :width], qkv[..., width : 2 * width]
            if "keys" in needs:  # mean over heads
                tokens.keys = over_all_heads(signals.head_mean_keys(k, heads), tp, mean=True)
            if "cls_attention" in needs and self.layout.num_prefix == 1:  # sum over heads
                row = signals.query_row_attention(q, k, heads, self.scale, row=0)
                tokens.cls_attention = over_all_heads(row, tp, mean=False)
            if "received_attention" in needs and self.layout.num_prefix == 0:  # mean over heads
                received = signals.received_attention(q, k, heads, self.scale)
                tokens.received_attention = over_all_heads(received, tp, mean=True)
        return tokens
