"""Cluster & Aggregate (Token Sequence Compression, seed 002, section 3.2).

After the vision encoder and the projector, the visual tokens the vanilla model sends are clustered by
k-means++ on their projected embeddings with k = the budget (``kmeans.py``); each cluster becomes one
token, the mean of its members' embeddings; the cluster tokens are concatenated in a random order (the
paper's choice: a seeded permutation from ``hashed_scores``, so an image gets the same order whatever its
batch position) or, with ``order="position"``, by the mean raster position of their members (the paper's
alternative). An output's index (for position ids and visualisations) is its member nearest the mean.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Knob, MethodSpec, Selection, VisionTokens, register
from .kmeans import cluster_means, kmeans, nearest_in_groups, squared_distances
from .sampling import hashed_scores

ORDERS = ("random", "position")


def nearest_members(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, k) position of each cluster's member nearest its centre (first in position order on ties)."""
    dist = squared_distances(x, centres).gather(2, labels.unsqueeze(-1)).squeeze(-1)  # (B, N)
    return nearest_in_groups(dist, labels, centres.shape[1])


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
    return Selection(features=features, indices=indices, merged_from=merged_from)


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
