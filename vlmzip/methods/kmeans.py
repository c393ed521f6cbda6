"""Batched k-means++ (Arthur & Vassilvitskii, 2007) in torch, for the clustering methods of Token
Sequence Compression (arXiv 2504.17892).

- Seeding: k-means++ (first centre uniform, each next one drawn with probability proportional to the
  squared distance to the nearest chosen centre; uniform among the unchosen points when every distance
  is zero, i.e. fewer distinct points than k). The uniform draws are ``hashed_scores`` of the units'
  content seeds and ``seed``: the same unit gives the same clustering on any device, batch position or
  batch size, with no generator state.
- Lloyd iterations on squared Euclidean distance, at most ``iters``, stopping once no centre moves by
  more than ``tol`` (squared distance, all units; one host sync per iteration).
- Empty clusters: after every assignment, each empty cluster takes the point farthest from its centre
  among the points whose cluster can spare one (has two or more members), so every cluster always has a
  member: means never divide by zero, and with duplicated tokens (k larger than the distinct points)
  still k non-empty clusters come back.
"""

from __future__ import annotations

import torch

from .sampling import hashed_scores


def uniforms(seeds: torch.Tensor, seed: int, num: int) -> torch.Tensor:
    """(B,) unit seeds -> (B, num) float64 uniforms in [0, 1), from ``hashed_scores``."""
    bits = hashed_scores(seeds, seed, num) >> 11 & ((1 << 53) - 1)
    return bits.double() / float(1 << 53)


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, K, D) -> (B, N, K) squared Euclidean distances (float32, >= 0)."""
    x, centres = x.float(), centres.float()
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ centres.transpose(1, 2) + (centres * centres).sum(-1).unsqueeze(1)
    return d.clamp(min=0)


def kmeans_pp_init(x: torch.Tensor, k: int, seeds: torch.Tensor, seed: int) -> torch.Tensor:
    """k-means++ seeding: (B, N, D) -> (B, k) indices of distinct points chosen as the initial centres."""
    batch, num, _ = x.shape
    device = x.device
    rows = torch.arange(batch, device=device)
    u = uniforms(seeds.to(device), seed, k)
    first = (u[:, 0] * num).long().clamp(max=num - 1)
    chosen = torch.zeros(batch, num, dtype=torch.bool, device=device)
    chosen[rows, first] = True
    picks = [first]
    nearest = squared_distances(x, x[rows, first].unsqueeze(1)).squeeze(-1).double()  # (B, N)
    for j in range(1, k):
        weights = nearest.masked_fill(chosen, 0.0)
        total = weights.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, weights, (~chosen).double())  # all duplicates: uniform over the rest
        cdf = weights.cumsum(dim=1)
        target = u[:, j : j + 1] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=num - 1)
        # rounding at the top end can land on a zero-weight point: fall back to the heaviest unchosen one
        pick = torch.where(weights[rows, pick] > 0, pick, weights.argmax(dim=1))
        chosen[rows, pick] = True
        picks.append(pick)
        nearest = torch.minimum(nearest, squared_distances(x, x[rows, pick].unsqueeze(1)).squeeze(-1).double())
    return torch.stack(picks, dim=1)


def fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster a point: (B, N) labels, (B, N) distance of each point to its centre -> labels.

    The j-th empty cluster (in cluster order) takes the j-th point, farthest first, among the points that
    are not the last member of their cluster. No host sync.
    """
    batch, num = labels.shape
    device = labels.device
    counts = torch.zeros(batch, k, dtype=torch.long, device=device).scatter_add_(1, labels, torch.ones_like(labels))
    empty = counts == 0
    # points grouped by cluster, farthest first within a cluster
    by_dist = dist.argsort(dim=1, descending=True, stable=True)
    perm = by_dist.gather(1, labels.gather(1, by_dist).argsort(dim=1, stable=True))
    sorted_labels = labels.gather(1, perm)
    starts = counts.cumsum(1) - counts
    rank = torch.arange(num, device=device) - starts.gather(1, sorted_labels)
    spare = rank < counts.gather(1, sorted_labels) - 1  # never the last (nearest) member
    # spare points, farthest first overall
    spare_dist = torch.where(spare, dist.gather(1, perm), torch.full_like(dist, -1.0))
    donors = perm.gather(1, spare_dist.argsort(dim=1, descending=True, stable=True))  # (B, N)
    empty_rank = (empty.long().cumsum(1) - 1).clamp(min=0)  # (B, k)
    donor = donors.gather(1, empty_rank)  # (B, k): the point each empty cluster takes
    clusters = torch.arange(k, device=device).expand(batch, -1)
    claimed = torch.full((batch, num + 1), -1, dtype=torch.long, device=device)  # column num: a sink
    claimed.scatter_(1, torch.where(empty, donor, num), torch.where(empty, clusters, -1))
    new = torch.where(claimed[:, :num] >= 0, claimed[:, :num], labels)
    return new


def cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, D) points, (B, N) labels of non-empty clusters -> (B, k, D) float32 means."""
    one_hot = torch.zeros(*labels.shape, k, dtype=torch.float32, device=x.device)
    one_hot.scatter_(2, labels.unsqueeze(-1), 1.0)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    return one_hot.transpose(1, 2) @ x.float() / counts


def nearest_in_groups(dist: torch.Tensor, labels: torch.Tensor, k: int, rtol: float = 0.0) -> torch.Tensor:
    """(B, N) distances, (B, N) labels of k groups -> (B, k) position of each group's nearest member (meaningless
    for an empty group). No host sync.

    Ties go to the first member in position order; with ``rtol`` > 0 a tie is any distance within ``rtol`` times the
    row's largest distance of its group's nearest. Distances computed from features need it: the two members of a
    two-member cluster are exactly as far from their mean, and rounding alone (a different matmul order, another
    runtime's tower) must not decide which one represents it."""
    batch, num = dist.shape
    nearest = dist.new_full((batch, k), float("inf")).scatter_reduce(1, labels, dist, "amin")
    slack = rtol * dist.abs().amax(dim=1, keepdim=True)
    near = dist <= nearest.gather(1, labels) + slack
    position = torch.arange(num, device=dist.device).expand(batch, -1)
    first = torch.full((batch, k), num, dtype=torch.long, device=dist.device)
    first.scatter_reduce_(1, labels, torch.where(near, position, num), "amin")
    return first.clamp(max=num - 1)  # empty groups: junk


def assign(x: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Nearest-centre labels with every cluster non-empty: (B, N, D), (B, k, D) -> (B, N) long."""
    d = squared_distances(x, centres)
    dist, labels = d.min(dim=2)
    return fill_empty(labels, dist, k)


def kmeans(
    x: torch.Tensor, k: int, seeds: torch.Tensor | None = None, seed: int = 0, iters: int = 20, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ then Lloyd on (B, N, D) points, 1 <= k <= N.

    Returns ``(labels (B, N) long, centres (B, k, D) float32)``: every cluster has at least one member and
    the centres are their members' means.
    """
    batch, num, _ = x.shape
    if not 1 <= k <= num:
        raise ValueError(f"k-means needs 1 <= k <= {num} points, got k={k}")
    if seeds is None:
        seeds = torch.zeros(batch, dtype=torch.int64, device=x.device)
    rows = torch.arange(batch, device=x.device).unsqueeze(1)
    centres = x[rows, kmeans_pp_init(x, k, seeds, seed)].float()
    labels = assign(x, centres, k)
    for _ in range(iters):
        updated = cluster_means(x, labels, k)
        shift = float((updated - centres).pow(2).sum(-1).max())
        centres = updated
        labels = assign(x, centres, k)
        if shift <= tol:
            break
    return labels, cluster_means(x, labels, k)
