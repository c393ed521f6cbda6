"""Cluster & Aggregate (Token Sequence Compression, arXiv 2504.17892, section 3.2), and Cluster & Saliency (3.1).

After the vision encoder and the projector, the visual tokens the vanilla model sends are clustered by
k-means++ on their projected embeddings with k = the budget (``kmeans.py``); each cluster becomes one
token, the mean of its members' embeddings; the cluster tokens are concatenated in a random order (the
paper's choice: a seeded permutation from ``hashed_scores``, so an image gets the same order whatever its
batch position) or, with ``order="position"``, by the mean raster position of their members (the paper's
alternative). An output's index (for position ids and visualisations) is its member nearest the mean.

Cluster & Saliency (``cluster_saliency``) clusters the same way and keeps the most salient tokens of each
cluster; see :func:`cluster_saliency` for its three variants, fitted to an exact budget.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budgets import positive_int
from .base import Knob, MethodSpec, Selection, VisionTokens, gather_tokens, mean_weights, register
from .kmeans import cluster_means, kmeans, nearest_in_groups, squared_distances
from .sampling import hashed_scores
from .tome import central_members

ORDERS = ("random", "position")


def nearest_members(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, k) position of each cluster's member nearest its centre (first in position order on ties, rounding-level
    differences counting as ties)."""
    dist = squared_distances(x, centres).gather(2, labels.unsqueeze(-1)).squeeze(-1)  # (B, N)
    return nearest_in_groups(dist, labels, centres.shape[1], rtol=1e-5)


def cluster_aggregate(
    tokens: VisionTokens, keep: int, order: str = "random", seed: int = 0, iters: int = 20, tol: float = 1e-4
) -> Selection:
    """One mean token per k-means++ cluster, k = ``keep``: (B, T, D) projected tokens -> (B, keep, D)."""
    hidden = tokens.hidden
    batch, total, _ = hidden.shape
    device = hidden.device
    candidates = tokens.vanilla_indices()
    x = hidden[:, candidates]
    seeds = tokens.seeds if tokens.seeds is not None else torch.zeros(batch, dtype=torch.int64)
    seeds = seeds.to(device)
    labels, centres = kmeans(x, keep, seeds, seed, iters, tol)
    rep = nearest_members(x, labels, centres)  # (B, keep) positions among the candidates

    if order == "random":  # draws after the k the seeding used
        sequence = hashed_scores(seeds, seed, 2 * keep)[:, keep:].argsort(dim=1, stable=True)
    else:
        positions = torch.arange(candidates.numel(), device=device, dtype=torch.float32)
        mean_position = cluster_means(positions.expand(batch, -1).unsqueeze(-1), labels, keep).squeeze(-1)
        sequence = mean_position.argsort(dim=1, stable=True)  # (B, keep): the cluster sent at each slot
    slot_of_cluster = torch.empty_like(sequence)
    slot_of_cluster.scatter_(1, sequence, torch.arange(keep, device=device).expand(batch, -1))

    features = centres.gather(1, sequence.unsqueeze(-1).expand(-1, -1, centres.shape[-1])).to(hidden.dtype)
    indices = candidates[rep.gather(1, sequence)]
    merged_from = torch.full((batch, total), -1, dtype=torch.long, device=device)
    merged_from[:, candidates] = slot_of_cluster.gather(1, labels)
    return Selection(features=features, indices=indices, merged_from=merged_from,
                     weights=mean_weights(merged_from, keep))


def resolve(knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``order``, ``seed``, ``iters`` and ``tol``."""
    order = knobs.get("order", "random")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    seed = knobs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    iters = knobs.get("iters", 20)
    if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= 1000:
        raise ValueError(f"iters must be an integer in [0, 1000] (Lloyd iterations after seeding), got {iters!r}")
    tol = knobs.get("tol", 1e-4)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0 (largest squared centre shift that stops), got {tol!r}")
    return {"order": order, "seed": seed, "iters": iters, "tol": float(tol)}


SPEC = register(
    MethodSpec(
        name="cluster_aggregate",
        description="Cluster & Aggregate: after the projector, k-means++ with k = N; one mean token per "
        "cluster, in a seeded random order (or by mean position).",
        knobs=(
            Knob("order", str, "random", "cluster order: 'random' (seeded by seed and the image) or 'position'"),
            Knob("seed", int, 0, "random seed for the k-means++ seeding and the random order"),
            Knob("iters", int, 20, "at most this many Lloyd iterations after the seeding"),
            Knob("tol", float, 1e-4, "stop once no centre moves by more than this (squared distance)"),
        ),
        fn=cluster_aggregate,
        stage="projector",
        resolve=resolve,
    )
)


# -- Cluster & Saliency (Token Sequence Compression, 3.1, Table 1) ----------------------------------------------------


def rank_in_groups(score: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) scores, (B, N) labels -> ((B, N) rank of each point within its group, 0 = highest score;
    (B, k) group sizes). Ties by position. No host sync."""
    by_score = score.argsort(dim=1, descending=True, stable=True)
    perm = by_score.gather(1, labels.gather(1, by_score).argsort(dim=1, stable=True))
    counts = torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    starts = counts.cumsum(1) - counts
    sorted_rank = torch.arange(labels.shape[1], device=labels.device) - starts.gather(1, labels.gather(1, perm))
    return torch.empty_like(labels).scatter_(1, perm, sorted_rank), counts


def quota_select(
    saliency: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, count: int, spare_last: bool
) -> torch.Tensor:
    """(B, N) bool: ``count`` points, the most salient of each group, group i getting a share ~ weights[i].

    The j-th most salient point of group i has key (j + 1/2) / weights[i]; the ``count`` smallest keys are
    picked (a largest-remainder apportionment that never exceeds a group's size). ``spare_last``: a group's
    least salient point is never picked (variant 3 aggregates the rest, which must not be empty).
    """
    k = weights.shape[1]
    rank, counts = rank_in_groups(saliency, labels, k)
    key = (rank.double() + 0.5) / weights.double().gather(1, labels).clamp(min=1e-12)
    if spare_last:
        key = key.masked_fill(rank == counts.gather(1, labels) - 1, float("inf"))
    pick = key.argsort(dim=1, stable=True)[:, :count]
    return torch.zeros_like(labels, dtype=torch.bool).scatter_(1, pick, True)


def cluster_count(num: int, keep: int, variant: int, k: int) -> int:
    """Clusters Cluster & Saliency uses for ``num`` tokens and a budget of ``keep``: ``min(k, num)``;
    variant 3 (one extra mean token per cluster within the budget): ``max(1, min(k, keep // 2))``."""
    return min(k, num) if variant != 3 else max(1, min(k, keep // 2))


def saliency_clusters(
    x: torch.Tensor, saliency: torch.Tensor, keep: int, variant: int, k: int, seeds: torch.Tensor,
    seed: int = 0, iters: int = 20, tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The selection of Cluster & Saliency for units of N tokens: (B, N, D) embeddings, (B, N) saliency.

    k-means++ (``cluster_count`` clusters) on ``x``, then the most salient tokens of each cluster by
    :func:`quota_select`: quotas proportional to cluster sizes (variants 1, 3) or to size x softmax(mean
    cluster saliency) (variant 2). Returns ``(picked (B, N) bool, labels (B, N) long, clusters)``; ``keep``
    tokens are picked (variant 3: ``keep - clusters``, never a cluster's last member, which the caller
    aggregates with the other unpicked ones).
    """
    clusters = cluster_count(x.shape[1], keep, variant, k)
    labels, _ = kmeans(x, clusters, seeds, seed, iters, tol)
    saliency = saliency.float()
    sizes = torch.zeros(x.shape[0], clusters, device=x.device).scatter_add_(1, labels, torch.ones_like(saliency))
    if variant == 2:
        mean_saliency = torch.zeros_like(sizes).scatter_add_(1, labels, saliency) / sizes
        weights = sizes * mean_saliency.softmax(dim=1)
    else:
        weights = sizes
    selected = keep - clusters if variant == 3 else keep
    picked = quota_select(saliency, labels, weights, selected, spare_last=variant == 3)
    return picked, labels, clusters


def cluster_saliency(
    tokens: VisionTokens, keep: int, variant: int = 1, k: int = 20, seed: int = 0, iters: int = 20, tol: float = 1e-4
) -> Selection:
    """Cluster & Saliency, variants 1 (static), 2 (dynamic), 3 (coarse aggregation): (B, T, D) -> (B, keep, D).

    k-means++ on the projected tokens (k clusters, at most the candidates; variant 3: at most ``keep // 2``,
    at least 1); saliency = the tower's CLS attention (received attention without CLS).

    - 1: each cluster keeps its most salient tokens, quotas proportional to the cluster sizes ("top x %
      per cluster", x fixed by the budget).
    - 2: quotas proportional to size * softmax(mean cluster saliency) ("top lambda w_i %", lambda fixed by
      the budget).
    - 3: as 1 for ``keep - k`` tokens, plus one token per cluster: the mean embedding of its other members,
      placed at their mean position (sent at the member nearest their mean grid cell).

    Outputs in positional order (mean position for aggregated tokens).
    """
    hidden = tokens.hidden
    batch, total, _ = hidden.shape
    device = hidden.device
    candidates = tokens.vanilla_indices()
    num = candidates.numel()
    signal = tokens.cls_attention if tokens.cls_attention is not None else tokens.received_attention
    if signal is None:
        raise ValueError("cluster_saliency needs the tower's CLS attention (or received attention without CLS)")
    saliency = signal[:, candidates].float()
    x = hidden[:, candidates]
    seeds = (tokens.seeds if tokens.seeds is not None else torch.zeros(batch, dtype=torch.int64)).to(device)
    picked, labels, clusters = saliency_clusters(x, saliency, keep, variant, k, seeds, seed, iters, tol)
    selected = keep - clusters if variant == 3 else keep

    positions = torch.arange(num, device=device).expand(batch, -1)
    # picked tokens first, in positional order: (B, selected) candidate positions
    out_idx = positions.masked_fill(~picked, num).sort(dim=1, stable=True).values[:, :selected]
    ident = out_idx  # an output's identity: a picked token's candidate position, or num + its cluster
    out_pos = out_idx.float()
    features = gather_tokens(x, out_idx).float()
    owner = torch.where(picked, positions, -1)  # the identity of the output each candidate goes to
    if variant == 3:
        rest = torch.where(picked, clusters, labels)  # group ``clusters`` holds the picked tokens (ignored)
        means = cluster_means(x, rest, clusters + 1)[:, :clusters]
        mean_pos = cluster_means(positions.unsqueeze(-1).float(), rest, clusters + 1)[:, :clusters, 0]
        reps = central_members(tokens, rest, clusters + 1)[:, :clusters]
        features = torch.cat([features, means], dim=1)
        out_pos = torch.cat([out_pos, mean_pos], dim=1)
        out_idx = torch.cat([out_idx, reps], dim=1)
        ident = torch.cat([ident, num + torch.arange(clusters, device=device).expand(batch, -1)], dim=1)
        owner = torch.where(picked, owner, num + labels)
    order = out_pos.argsort(dim=1, stable=True)  # positional order, aggregates at their mean position
    out_idx, ident = out_idx.gather(1, order), ident.gather(1, order)
    features = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1])).to(hidden.dtype)
    slot_of = torch.full((batch, num + clusters), -1, dtype=torch.long, device=device)
    slot_of.scatter_(1, ident, torch.arange(keep, device=device).expand(batch, -1))
    merged_from = torch.full((batch, total), -1, dtype=torch.long, device=device)
    merged_from[:, candidates] = slot_of.gather(1, owner.clamp(min=0)).masked_fill(owner < 0, -1)
    return Selection(features=features, indices=candidates[out_idx], merged_from=merged_from,
                     weights=mean_weights(merged_from, keep))


def resolve_saliency(knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``variant`` and ``k`` (plus the clustering knobs of cluster_aggregate)."""
    variant = knobs.get("variant", 1)
    if variant not in (1, 2, 3) or isinstance(variant, bool):
        raise ValueError(f"variant must be 1 (static), 2 (dynamic) or 3 (coarse aggregation), got {variant!r}")
    k = positive_int("k", knobs.get("k", 20))
    rest = resolve({key: value for key, value in knobs.items() if key in ("seed", "iters", "tol")})
    rest.pop("order")
    return {"variant": variant, "k": k, **rest}


# Cluster & Saliency's knobs, shared by the pre-LLM method here and the LLM-side one (saliency.py).
CLUSTER_SALIENCY_KNOBS = (
    Knob("variant", int, 1, "1 static (quotas by cluster size), 2 dynamic (size x softmax of mean "
         "saliency), 3 coarse aggregation (+ one mean token per cluster)"),
    Knob("k", int, 20, "clusters (at most the tokens; variant 3: at most half the budget)"),
    Knob("seed", int, 0, "random seed for the k-means++ seeding"),
    Knob("iters", int, 20, "at most this many Lloyd iterations after the seeding"),
    Knob("tol", float, 1e-4, "stop once no centre moves by more than this (squared distance)"),
)

SALIENCY = register(
    MethodSpec(
        name="cluster_saliency",
        description="Cluster & Saliency: after the projector, k-means++ clusters; each keeps its most CLS-attended "
        "tokens (variant 1 static, 2 dynamic quotas, 3 plus one mean token per cluster).",
        knobs=CLUSTER_SALIENCY_KNOBS,
        fn=cluster_saliency,
        stage="projector",
        resolve=resolve_saliency,
        needs=frozenset({"cls_attention", "received_attention"}),
    )
)
