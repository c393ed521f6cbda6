"""ToMe (Bolya et al., ICLR 2023, arXiv 2210.09461; the merging baseline of VisionZip and SparseVLM): bipartite
soft matching, applied once to the vision tower's output tokens, round after round until ``keep`` tokens remain.

One round, as ``bipartite_soft_matching`` + ``merge_wavg`` in facebookresearch/ToMe ``merge.py``:

- split the current tokens alternately into A (even positions) and B (odd positions);
- cosine similarity of their keys (the feature layer's keys, head mean; the features when an adapter
  gives no keys); each A token's best B match;
- the ``r`` A tokens with the most similar matches are merged into their B match: size-weighted averages
  of features and keys, sizes added; the others stay.
- A CLS token the model sends is protected (never merged away), as ToMe's ``class_token``.

An output's index (for position ids and visualisations) is the member nearest its group's mean grid cell.

Differences from ``merge.py``, for a one-shot use before the LLM: ``r`` per round defaults to as many as
a round allows (``min(tokens - keep, A's size)``), so the rounds are few; after each round the tokens
are put back in order of their members' mean raster position, so the next split alternates over
neighbours and the LLM receives them in (mean) raster order.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budgets import positive_int
from .base import Knob, MethodSpec, Selection, VisionTokens, mean_weights, register
from .kmeans import cluster_means, nearest_in_groups


def match_round(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, r: int, protect: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bipartite-matching round on (B, t, D) tokens, (B, t, Dm) metric, (B, t) sizes, (B, t) mean positions.

    Returns the ``t - r`` tokens left (in order of their members' mean raster position): features, metric,
    sizes, mean positions, and (B, t) the new slot of each old slot.
    """
    batch, t, _ = x.shape
    device = x.device
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    a_pos = torch.arange(0, t, 2, device=device)
    b_pos = torch.arange(1, t, 2, device=device)
    scores = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)  # (B, tA, tB)
    if protect:
        scores[:, 0] = float("-inf")  # the CLS token (slot 0, always in A) is never merged away
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    src = order[:, :r]  # (B, r) positions in A that merge
    dst = node_idx.gather(1, src)  # (B, r) positions in B they merge into

    # Each old slot's target old slot: merged A tokens point at their B match, everything else at itself.
    target = torch.arange(t, device=device).repeat(batch, 1)
    target.scatter_(1, a_pos[src], b_pos[dst])
    gone = torch.zeros(batch, t, dtype=torch.bool, device=device)
    gone.scatter_(1, a_pos[src], True)

    weights = size.float()
    sums = torch.zeros(batch, t, x.shape[-1], dtype=torch.float32, device=device)
    sums.scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x.float() * weights.unsqueeze(-1))
    msums = torch.zeros(batch, t, m.shape[-1], dtype=torch.float32, device=device)
    msums.scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, m.shape[-1]),
                       metric.float() * weights.unsqueeze(-1))
    new_size = torch.zeros(batch, t, dtype=torch.float32, device=device).scatter_add_(1, target, weights)
    new_pos = torch.zeros(batch, t, dtype=torch.float32, device=device).scatter_add_(1, target, pos * weights)

    # Survivors, in order of their members' mean raster position; a departed slot sorts last.
    key = (new_pos / new_size.clamp(min=1)).masked_fill(gone, float("inf"))
    keep_slots = key.argsort(dim=1, stable=True)[:, : t - r]  # (B, t - r) old slots that survive
    new_slot_of_survivor = torch.empty_like(target)
    new_slot_of_survivor.scatter_(1, keep_slots, torch.arange(t - r, device=device).expand(batch, -1))
    new_slot = new_slot_of_survivor.gather(1, target)

    sizes = new_size.gather(1, keep_slots)
    index = keep_slots.unsqueeze(-1)
    x_out = (sums.gather(1, index.expand(-1, -1, x.shape[-1])) / sizes.unsqueeze(-1)).to(x.dtype)
    m_out = (msums.gather(1, index.expand(-1, -1, m.shape[-1])) / sizes.unsqueeze(-1)).to(metric.dtype)
    return x_out, m_out, sizes, (new_pos.gather(1, keep_slots) / sizes), new_slot


def tome(tokens: VisionTokens, keep: int, r: int = 0) -> Selection:
    """Merge each unit's vanilla tokens by bipartite soft matching down to ``keep``: (B, T, D) -> (B, keep, D).

    ``r``: tokens merged per round (0 = as many as a round allows).
    """
    hidden = tokens.hidden
    batch, total, _ = hidden.shape
    device = hidden.device
    candidates = tokens.vanilla_indices()
    x = hidden[:, candidates]
    metric = (tokens.keys if tokens.keys is not None else hidden)[:, candidates]
    size = torch.ones(batch, candidates.numel(), device=device)
    pos = candidates.float().expand(batch, -1)
    slot = torch.arange(candidates.numel(), device=device).repeat(batch, 1)  # each candidate's current slot
    protect = tokens.layout.send_prefix and tokens.layout.num_prefix > 0 and keep >= 2
    while x.shape[1] > keep:
        t = x.shape[1]
        allowed = (t - int(protect)) // 2 if protect else t // 2
        step = min(t - keep, allowed, r if r > 0 else allowed)
        x, metric, size, pos, new_slot = match_round(x, metric, size, pos, step, protect)
        slot = new_slot.gather(1, slot)
    merged_from = torch.full((batch, total), -1, dtype=torch.long, device=device)
    merged_from[:, candidates] = slot
    return Selection(features=x, indices=candidates[central_members(tokens, slot, keep)], merged_from=merged_from,
                     weights=mean_weights(merged_from, keep))


def central_members(tokens: VisionTokens, slot: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep) position among the candidates of each group's member nearest the group's mean grid cell.

    ``slot`` (B, N): each candidate's output slot. A prefix (CLS) token sits at cell (-1, -1).
    """
    candidates = tokens.vanilla_indices()
    patch = (candidates - tokens.layout.num_prefix).float()
    width = tokens.layout.grid[1]
    cells = torch.stack([torch.div(patch, width, rounding_mode="floor"), patch.remainder(width)], dim=-1)
    cells = torch.where((patch < 0).unsqueeze(-1), torch.full_like(cells, -1.0), cells)
    cells = cells.expand(slot.shape[0], -1, -1)
    centres = cluster_means(cells, slot, keep)  # (B, keep, 2)
    dist = (cells - centres.gather(1, slot.unsqueeze(-1).expand(-1, -1, 2))).pow(2).sum(-1)
    return nearest_in_groups(dist, slot, keep)


def resolve(knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``r`` (tokens merged per round; 0 = as many as a round allows)."""
    return {"r": positive_int("r", knobs.get("r", 0), allow_zero=True)}


SPEC = register(
    MethodSpec(
        name="tome",
        description="ToMe: bipartite soft matching on the tower's keys, size-weighted merges, rounds until N "
        "tokens remain (positional order).",
        knobs=(Knob("r", int, 0, "tokens merged per round (0 = as many as a round allows, fewest rounds)"),),
        fn=tome,
        resolve=resolve,
        needs=frozenset({"keys"}),
    )
)
