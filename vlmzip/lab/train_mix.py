"""Mixture augmentation of the lab training: image runs shortened in every way the methods shorten them.

From ``drop_from`` on (``TrainConfig.mix``), an image that the token-count augmentation shortens reaches
the LM as ``k`` tokens built by one component, drawn at random per image (``train_data.mix_plan``):

- ``random``: a random subset of the patches (random sampling, FastV-like drops);
- ``strided``: a uniform-stride subset in raster order, random offset (spatial sampling);
- ``salient``: the ``k`` patches the CLS token attends to most (VisionZip's dominant tokens, saliency);
- ``neighbours``: every patch joins the nearest of ``k`` seed patches on the grid; each token is the mean of
  its group (pooling, neighbourhood merging);
- ``similar``: every patch joins the most cosine-similar of ``k`` seed patches; means (ToMe, k-means,
  Cluster & Aggregate);
- ``salient_similar``: the most salient patches plus a few similarity-merged means of the rest, in that
  order (VisionZip's dominant + contextual tokens);
- ``diverse``: the ``k`` most mutually distant patches by greedy max-min cosine distance of the projected
  features, positional order (DivPrune: mostly object and text patches, which no random subset gives);
- ``kmeans``: k-means++ clusters of the projected features, one mean per cluster (Cluster & Aggregate,
  the cluster-saliency variants' aggregated tokens).

Independently, the CLS token may take the first slot (VisionZip keeps it), merged tokens come in mean-position
or random order (Cluster & Aggregate's order), and merging happens before or after the projector. So no
single method's pattern is favoured. Everything here is a pure tensor function of one image: the *slots*
of its ``1 + n`` tokens (CLS first, then the patches row-major): ``slots[t] = j`` sends token ``t`` into
LM token ``j`` (0 <= j < k), -1 drops it; LM token ``j`` is the mean of the tokens with slot ``j``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

MIX_MODES = ("random", "strided", "salient", "neighbours", "similar", "salient_similar", "diverse", "kmeans")
IGNORE_INDEX = -100  # train_data.IGNORE_INDEX (train_data imports this module, not the reverse)


@dataclass(frozen=True)
class MixPlan:
    """How one train image is shortened: ``mode`` (``"full"`` or one of ``MIX_MODES``), ``tokens`` it sends
    to the LM, CLS as the first of them, merged tokens in random order, merge after the projector, seed."""

    mode: str
    tokens: int
    cls: bool = False
    shuffle: bool = False
    after_projector: bool = False
    seed: int = 0


def draw_plan(rng: random.Random, n_patches: int, min_keep: float) -> MixPlan:
    """A random ``MixPlan`` for an image of ``n_patches`` that is shortened (kept share min_keep + (1 -
    min_keep) * u^2, u uniform in [0, 1): short runs more often): the component, and the CLS / order /
    projector coin flips, from ``rng``."""
    mode = MIX_MODES[int(rng.random() * len(MIX_MODES))]
    u = rng.random()
    share = min_keep + (1 - min_keep) * u * u  # more short runs: the budgets that trouble the LM most
    tokens = max(2, min(n_patches - 1, round(share * n_patches)))
    cls = rng.random() < 0.5
    shuffle = rng.random() < 0.5
    after = rng.random() < 0.5
    return MixPlan(mode, tokens, cls, shuffle, after, int(rng.random() * 2**31))


def _positional(chosen: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) slots sending the patches ``chosen`` (any order) to slots 0.. in positional order, rest -1."""
    slots = torch.full((n,), -1, dtype=torch.long)
    slots[chosen.sort().values] = torch.arange(chosen.numel())
    return slots


def random_slots(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) slots of a random subset of ``k`` of ``n`` patches, positional order."""
    return _positional(torch.randperm(n, generator=gen)[:k], n)


def strided_slots(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) slots of ``k`` patches at a uniform stride ``n / k`` in raster order, from a random offset."""
    offset = float(torch.rand((), generator=gen)) * (n / k)
    chosen = (offset + torch.arange(k, dtype=torch.float64) * (n / k)).floor().long().clamp(max=n - 1)
    return _positional(chosen, n)


def salient_slots(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) slots of the ``k`` patches of highest ``saliency`` (n,), positional order."""
    return _positional(saliency.topk(k).indices, saliency.numel())


def _seeded_groups(distance: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """(n,) group 0..k-1 of every patch: the seed (k,) of least ``distance`` (n, k); a seed is in its own
    group, so no group is empty."""
    groups = distance.argmin(1)
    groups[seeds] = torch.arange(seeds.numel())
    return groups


def _order_groups(groups: torch.Tensor, k: int, shuffle: bool, gen: torch.Generator) -> torch.Tensor:
    """Renumber groups (n,) -> slots: by mean patch position, or in a random order with ``shuffle``."""
    if shuffle:
        rank = torch.randperm(k, generator=gen)
    else:
        where = torch.arange(groups.numel(), dtype=torch.float64)
        pos = torch.zeros(k, dtype=torch.float64).index_add_(0, groups, where)
        mean = pos / torch.bincount(groups, minlength=k).double()
        rank = torch.empty(k, dtype=torch.long)
        rank[mean.argsort()] = torch.arange(k)
    return rank[groups]


def neighbour_slots(grid: int, k: int, shuffle: bool, gen: torch.Generator) -> torch.Tensor:
    """(grid * grid,) slots merging every patch into the nearest (on the grid) of ``k`` random seed patches."""
    n = grid * grid
    seeds = torch.randperm(n, generator=gen)[:k]
    yx = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(n, 2).float()
    groups = _seeded_groups(torch.cdist(yx, yx[seeds]), seeds)
    return _order_groups(groups, k, shuffle, gen)


def similar_slots(features: torch.Tensor, k: int, shuffle: bool, gen: torch.Generator) -> torch.Tensor:
    """(n,) slots merging every patch of ``features`` (n, D) into the most cosine-similar of ``k`` random
    seed patches."""
    n = features.shape[0]
    seeds = torch.randperm(n, generator=gen)[:k]
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    groups = _seeded_groups(-(unit @ unit[seeds].T), seeds)
    return _order_groups(groups, k, shuffle, gen)


def salient_similar_slots(
    saliency: torch.Tensor, features: torch.Tensor, k: int, shuffle: bool, gen: torch.Generator
) -> torch.Tensor:
    """(n,) slots: the ``k - c`` most salient patches (positional order), then ``c`` (10-30 % of ``k``, at
    least 1) similarity-merged means of the rest."""
    n = saliency.numel()
    c = max(1, min(k - 1, round(k * (0.1 + 0.2 * float(torch.rand((), generator=gen))))))
    slots = salient_slots(saliency, k - c)
    rest = (slots < 0).nonzero().squeeze(1)
    merged = similar_slots(features[rest], min(c, rest.numel()), shuffle, gen)
    slots[rest] = merged + (k - c)
    return slots[:n]


def diverse_slots(projected: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) slots of the ``k`` patches picked by greedy max-min cosine distance of ``projected`` (n, D), as
    DivPrune picks them; positional order."""
    from vlmzip.methods.divprune import cosine_distance, max_min_diverse

    return _positional(max_min_diverse(cosine_distance(projected.unsqueeze(0)), k)[0], projected.shape[0])


def kmeans_slots(projected: torch.Tensor, k: int, shuffle: bool, gen: torch.Generator) -> torch.Tensor:
    """(n,) slots merging the patches into ``k`` k-means++ clusters of ``projected`` (n, D) (5 Lloyd
    iterations, seed from ``gen``), as Cluster & Aggregate clusters them."""
    from vlmzip.methods.kmeans import kmeans

    seed = int(torch.randint(0, 2**31, (), generator=gen))
    labels, _ = kmeans(projected.detach().unsqueeze(0), k, seed=seed, iters=5)
    return _order_groups(labels[0], k, shuffle, gen)


def plan_slots(
    plan: MixPlan, saliency: torch.Tensor, features: torch.Tensor, grid: int, projected: torch.Tensor | None = None
) -> torch.Tensor:
    """(1 + n,) slots of an image's CLS + n patches under ``plan``: ``saliency`` (n,) the CLS attention on
    the patches, ``features`` (n, D) what ``similar`` compares, ``projected`` (n, D') what ``diverse`` and
    ``kmeans`` compare (``features`` when None). ``plan.tokens`` slots in all."""
    n = grid * grid
    gen = torch.Generator().manual_seed(plan.seed)
    if plan.mode == "full":
        patches = torch.arange(n)
    else:
        k = plan.tokens - int(plan.cls)
        saliency, features = saliency.detach().float().cpu(), features.detach().float().cpu()
        projected = features if projected is None else projected.detach().float().cpu()
        if plan.mode == "random":
            patches = random_slots(n, k, gen)
        elif plan.mode == "strided":
            patches = strided_slots(n, k, gen)
        elif plan.mode == "salient":
            patches = salient_slots(saliency, k)
        elif plan.mode == "neighbours":
            patches = neighbour_slots(grid, k, plan.shuffle, gen)
        elif plan.mode == "similar":
            patches = similar_slots(features, k, plan.shuffle, gen)
        elif plan.mode == "salient_similar":
            patches = salient_similar_slots(saliency, features, k, plan.shuffle, gen)
        elif plan.mode == "diverse":
            patches = diverse_slots(projected, k)
        elif plan.mode == "kmeans":
            patches = kmeans_slots(projected, k, plan.shuffle, gen)
        else:
            raise ValueError(f"unknown mix mode {plan.mode!r}; use 'full' or one of {MIX_MODES}")
    cls = torch.tensor([0 if plan.cls else -1])
    return torch.cat([cls, torch.where(patches >= 0, patches + int(plan.cls), patches)])


def merge_slots(tokens: torch.Tensor, slots: torch.Tensor, k: int) -> torch.Tensor:
    """(T, D) tokens -> (k, D): LM token ``j`` is the mean of the tokens with ``slots == j`` (every slot
    0..k-1 must have a member); tokens with slot -1 are dropped. Differentiable."""
    kept = slots >= 0
    members = torch.zeros(k, tokens.shape[0], dtype=tokens.dtype, device=tokens.device)
    members[slots[kept].to(tokens.device), kept.nonzero().squeeze(1).to(tokens.device)] = 1.0
    return (members @ tokens) / members.sum(1, keepdim=True)


def slot_targets(slots: torch.Tensor, patch_targets: torch.Tensor, k: int) -> torch.Tensor:
    """(k, 2) dense-loss targets of the LM tokens: a token whose member patches all share their targets
    (``patch_targets`` (n, 2)) gets them, any other (mixed groups, the CLS token) IGNORE_INDEX.
    ``slots`` (1 + n,) as from ``plan_slots``."""
    patch_slots = slots[1:]
    kept = patch_slots >= 0
    index = patch_slots[kept].unsqueeze(1).expand(-1, 2)
    values = patch_targets[kept]
    low = torch.full((k, 2), 2**62, dtype=torch.long).scatter_reduce(0, index, values, "amin")
    high = torch.full((k, 2), -(2**62), dtype=torch.long).scatter_reduce(0, index, values, "amax")
    out = torch.where(low == high, low, torch.full_like(low, IGNORE_INDEX))
    if int(slots[0]) >= 0:
        out[int(slots[0])] = IGNORE_INDEX
    return out


def slot_named(slots: torch.Tensor, named: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, k) bool: LM tokens with at least one member among the named patches ``named`` (Q, n)."""
    patch_slots = slots[1:]
    kept = patch_slots >= 0
    out = torch.zeros(named.shape[0], k, dtype=torch.long)
    out.index_add_(1, patch_slots[kept], named[:, kept].long())
    return out > 0


__all__ = [
    "IGNORE_INDEX", "MIX_MODES", "MixPlan", "diverse_slots", "draw_plan", "kmeans_slots", "merge_slots",
    "neighbour_slots", "plan_slots", "random_slots", "salient_similar_slots", "salient_slots", "similar_slots",
    "slot_named", "slot_targets", "strided_slots",
]  # fmt: skip
