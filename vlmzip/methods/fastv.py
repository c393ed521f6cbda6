"""FastV (Chen et al., 2024, arXiv 2403.06764; the in-LLM baseline of VisionZip and SparseVLM), faithful to the
released code (pkunlp-icler/FastV, ``modeling_llama.py``, the KV-cache variant):

- before decoder layer K (paper: K = 2) the image tokens are ranked by the attention they receive from
  the last prompt token in layer K-1 (softmax probabilities, averaged over heads);
- the top ones stay for layers >= K, with their original position ids (gaps remain); the others are
  dropped from the hidden states and from those layers' KV cache;
- the selection is made once per prefill; decode attends to the kept set.
The paper's budget is R = 50 % dropped (``ratio=0.5``, the default here); ``tokens=N`` keeps N per image.
With several images in a row each keeps its own top N (the released code handles one image).
"""

from __future__ import annotations

from typing import Any

import torch

from ..budgets import Budget
from .base import Knob, LLMTokens, MethodSpec, register, to_device


def rank_within_groups(scores: torch.Tensor, groups: torch.Tensor, group: int) -> torch.Tensor:
    """(B, L) rank (0 = highest score) of each position among the positions of ``groups == group``.

    Positions outside the group get ranks after all group members. No host sync.
    """
    masked = scores.float().masked_fill(groups != group, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def top_per_image(scores: torch.Tensor, tokens: LLMTokens) -> torch.Tensor:
    """(B, L) bool keep mask: every non-visual token, plus the top ``keep[b][i]`` visual tokens of each image."""
    keep = ~tokens.visual
    images = max((len(row) for row in tokens.keep), default=0)
    for i in range(images):
        counts = to_device([row[i] if i < len(row) else 0 for row in tokens.keep], scores.device)
        ranks = rank_within_groups(scores, tokens.image, i)
        keep = keep | ((tokens.image == i) & (ranks < counts.unsqueeze(1)))
    return keep


def fastv(tokens: LLMTokens) -> torch.Tensor:
    """FastV's selection: rank visual tokens by the last token's head-mean attention in the previous layer.

    Returns (B, L) bool, True for every token that stays (text always stays).
    """
    scores = tokens.last_query_attention()  # (B, L)
    return top_per_image(scores, tokens)


def resolve(knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``layer`` (K >= 1: the scores come from layer K-1)."""
    layer = knobs.get("layer", 2)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(
            f"fastv: layer must be a decoder layer index >= 1 (the scores come from the layer before), got {layer!r}"
        )
    return {"layer": layer}


SPEC = register(
    MethodSpec(
        name="fastv",
        description="FastV: inside the LLM, before layer K keep the image tokens the last token attends to most "
        "in layer K-1 (default K=2, ratio 0.5).",
        knobs=(Knob("layer", int, 2, "K: image tokens are pruned for decoder layers >= K (0-based)"),),
        fn=fastv,
        stage="llm",
        resolve=resolve,
        default_budget=Budget(ratio=0.5),
    )
)
