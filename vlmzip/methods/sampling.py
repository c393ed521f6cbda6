"""Text-agnostic sampling baselines (Token Sequence Compression, arXiv 2504.17892): random and spatial.

Both choose among the tokens the vanilla model sends (patches; plus CLS where the model sends it)
and keep the chosen ones in positional order.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Knob, MethodSpec, Selection, VisionTokens, gather_tokens, register

# 64-bit mixing constants (SplitMix64), as signed int64 so torch's wrapping arithmetic applies.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping): a cheap, well-spread hash, elementwise."""
    x = x * _MIX1
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * _MIX2
    return x ^ ((x >> 29) & ((1 << 35) - 1))


def hashed_scores(seeds: torch.Tensor, seed: int, num: int) -> torch.Tensor:
    """(B,) per-unit content seeds -> (B, num) int64 pseudo-random scores, computed on the seeds' device.

    The same (unit seed, seed, position) always gives the same score: no generator state, no host sync.
    """
    positions = torch.arange(1, num + 1, device=seeds.device, dtype=torch.int64)
    salt = torch.full_like(seeds, seed + 1, dtype=torch.int64) * _GOLDEN  # wraps in int64, as intended
    base = mix64(seeds.to(torch.int64) + salt)
    return mix64(base.unsqueeze(1) + positions * _GOLDEN)


def random_sample(tokens: VisionTokens, keep: int, seed: int) -> Selection:
    """Keep ``keep`` vanilla tokens per unit chosen uniformly at random, in positional order.

    The draw depends only on ``seed`` and the unit's pixels (``tokens.seeds``), so one image gets the same
    tokens whatever its batch position or the batch size. (B, T, D) -> (B, keep, D).
    """
    candidates = tokens.vanilla_indices()
    batch = tokens.hidden.shape[0]
    seeds = tokens.seeds if tokens.seeds is not None else torch.zeros(batch, dtype=torch.int64)
    scores = hashed_scores(seeds.to(candidates.device), seed, candidates.numel())
    pick = scores.argsort(dim=1, descending=True, stable=True)[:, :keep].sort(dim=1).values
    idx = candidates[pick]
    return Selection(features=gather_tokens(tokens.hidden, idx), indices=idx)


def stride_indices(num: int, tokens: int) -> torch.Tensor:
    """(tokens,) evenly spaced, unique positions in [0, num), first and last included when tokens > 1."""
    if tokens == 1:
        return torch.tensor([num // 2])
    return torch.floor(torch.linspace(0, num - 1, tokens, dtype=torch.float64) + 0.5).long()


def spatial_sample(tokens: VisionTokens, keep: int) -> Selection:
    """Keep ``keep`` vanilla tokens per unit at a uniform stride in raster order: (B, T, D) -> (B, keep, D)."""
    candidates = tokens.vanilla_indices()
    idx = candidates[stride_indices(candidates.numel(), keep).to(candidates.device)]
    idx = idx.expand(tokens.hidden.shape[0], -1)
    return Selection(features=gather_tokens(tokens.hidden, idx), indices=idx)


def resolve_random(knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``seed``."""
    seed = knobs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return {"seed": seed}


RANDOM = register(
    MethodSpec(
        name="random",
        description="Random sampling: keep N visual tokens drawn uniformly (seeded by seed and the image), "
        "positional order.",
        knobs=(Knob("seed", int, 0, "random seed; with the image's pixels it fixes the draw"),),
        fn=random_sample,
        resolve=resolve_random,
    )
)

SPATIAL = register(
    MethodSpec(
        name="spatial",
        description="Spatial sampling: keep N visual tokens at a uniform stride in raster order.",
        knobs=(),
        fn=spatial_sample,
        resolve=lambda knobs: {},
    )
)
