"""Text-agnostic sampling baselines (Token Sequence Compression, seed 002): random and spatial.

Both choose among the tokens the vanilla model sends (patches; plus CLS where the model sends it)
and keep the chosen ones in positional order.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Knob, MethodSpec, Selection, TokenLayout, VisionTokens, check_budget, positive_int, register


def gather_tokens(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D) gathered at (B, K) indices -> (B, K, D)."""
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def random_indices(candidates: torch.Tensor, batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """(B, tokens) indices drawn without replacement from ``candidates`` (N,), sorted per row."""
    scores = torch.rand(batch, candidates.numel(), generator=generator)
    pick = scores.topk(tokens, dim=1).indices.sort(dim=1).values
    if candidates.device.type == "cuda":  # an async copy: no host sync in the middle of a forward
        pick = pick.pin_memory().to(candidates.device, non_blocking=True)
    return candidates[pick]


def random_sample(tokens: VisionTokens, tokens_per_image: int, seed: int) -> Selection:
    """Keep ``tokens_per_image`` vanilla tokens chosen uniformly at random (seeded per call)."""
    generator = torch.Generator().manual_seed(seed)
    idx = random_indices(tokens.vanilla_indices(), tokens.hidden.shape[0], tokens_per_image, generator)
    return Selection(features=gather_tokens(tokens.hidden, idx), indices=idx)


def stride_indices(num: int, tokens: int) -> torch.Tensor:
    """(tokens,) evenly spaced, unique positions in [0, num), first and last included when tokens > 1."""
    if tokens == 1:
        return torch.tensor([num // 2])
    return torch.floor(torch.linspace(0, num - 1, tokens, dtype=torch.float64) + 0.5).long()


def spatial_sample(tokens: VisionTokens, tokens_per_image: int) -> Selection:
    """Keep ``tokens_per_image`` vanilla tokens at a uniform stride over the sequence (raster order)."""
    candidates = tokens.vanilla_indices()
    idx = candidates[stride_indices(candidates.numel(), tokens_per_image).to(candidates.device)]
    idx = idx.expand(tokens.hidden.shape[0], -1)
    return Selection(features=gather_tokens(tokens.hidden, idx), indices=idx)


def _resolve_tokens(knobs: dict[str, Any], layout: TokenLayout) -> int:
    if knobs.get("tokens") is None:
        raise ValueError("this method needs a budget: pass tokens=N (visual tokens per image)")
    budget = positive_int("tokens", knobs["tokens"])
    check_budget("tokens", budget, layout.vanilla, "visual tokens")
    return budget


def resolve_random(knobs: dict[str, Any], layout: TokenLayout) -> dict[str, Any]:
    """Validate ``tokens`` and ``seed``."""
    seed = knobs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return {"tokens_per_image": _resolve_tokens(knobs, layout), "seed": seed}


def resolve_spatial(knobs: dict[str, Any], layout: TokenLayout) -> dict[str, Any]:
    """Validate ``tokens``."""
    return {"tokens_per_image": _resolve_tokens(knobs, layout)}


RANDOM = register(
    MethodSpec(
        name="random",
        description="Random sampling: keep N visual tokens drawn uniformly (seeded), positional order.",
        knobs=(
            Knob("tokens", int, None, "visual tokens kept per image"),
            Knob("seed", int, 0, "random seed (re-applied at every forward, so runs repeat)"),
        ),
        fn=random_sample,
        resolve=resolve_random,
        budget=lambda k, layout: k["tokens_per_image"],
    )
)

SPATIAL = register(
    MethodSpec(
        name="spatial",
        description="Spatial sampling: keep N visual tokens at a uniform stride in raster order.",
        knobs=(Knob("tokens", int, None, "visual tokens kept per image"),),
        fn=spatial_sample,
        resolve=resolve_spatial,
        budget=lambda k, layout: k["tokens_per_image"],
    )
)
