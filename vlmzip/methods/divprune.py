"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): greedy max-min diversity selection.

As the released code (``DivPrune`` in vbdi/divprune) does, on the projected visual tokens:

- distance = 1 - cosine similarity of the token embeddings;
- the first pick is the token whose nearest other token is farthest (the second-smallest entry of its
  distance column, its own zero excluded), not the token farthest from the mean;
- each further pick is the token whose minimum distance to the picked set is largest (already picked
  tokens are masked, so exact duplicates of picked tokens come last);
- the picked tokens are sent in positional order.

Batched over units; the greedy loop runs ``keep`` steps on the device without host syncs.
"""

from __future__ import annotations

import torch

from .base import MethodSpec, Selection, VisionTokens, gather_tokens, register


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) 1 - cosine similarity (zero vectors count as orthogonal to everything)."""
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return 1.0 - x @ x.transpose(1, 2)


def max_min_diverse(distance: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min selection on (B, N, N) distances -> (B, keep) picked positions, in pick order."""
    batch, num, _ = distance.shape
    rows = torch.arange(batch, device=distance.device)
    if num == 1:
        first = torch.zeros(batch, dtype=torch.long, device=distance.device)
    else:  # the token whose nearest neighbour is farthest (its own distance excluded)
        own = torch.eye(num, dtype=torch.bool, device=distance.device)
        first = distance.masked_fill(own, float("inf")).amin(dim=1).argmax(dim=1)
    picks = [first]
    nearest = distance[rows, first]  # (B, N) distance of each token to the picked set
    picked = torch.zeros(batch, num, dtype=torch.bool, device=distance.device)
    picked[rows, first] = True
    for _ in range(keep - 1):
        nxt = nearest.masked_fill(picked, float("-inf")).argmax(dim=1)
        picks.append(nxt)
        picked[rows, nxt] = True
        nearest = torch.minimum(nearest, distance[rows, nxt])
    return torch.stack(picks, dim=1)


def divprune(tokens: VisionTokens, keep: int) -> Selection:
    """Keep the ``keep`` most mutually diverse vanilla tokens per unit: (B, T, D) -> (B, keep, D)."""
    candidates = tokens.vanilla_indices()
    hidden = tokens.hidden
    picks = max_min_diverse(cosine_distance(hidden[:, candidates]), keep).sort(dim=1).values
    idx = candidates[picks]
    merged_from = torch.full(hidden.shape[:2], -1, dtype=torch.long, device=hidden.device)
    merged_from.scatter_(1, idx, torch.arange(keep, device=hidden.device).expand_as(idx))
    return Selection(features=gather_tokens(hidden, idx), indices=idx, merged_from=merged_from)


SPEC = register(
    MethodSpec(
        name="divprune",
        description="DivPrune: after the projector, greedy max-min cosine diversity selection of N visual "
        "tokens, positional order.",
        knobs=(),
        fn=divprune,
        stage="projector",
        resolve=lambda knobs: {},
    )
)
