"""Average pooling (a merging baseline): 2-D average pooling of each unit's patch grid.

- Output grid: ``h' x w' == keep`` with the aspect closest to the unit's grid (``h' <= H``, ``w' <= W``)
  when one exists within a factor 2 of that aspect (or no further off than the cover below); otherwise
  (a prime ``keep``, say) the smallest grid ``>= keep`` near the aspect is pooled and the extra cells are
  dropped at a uniform stride in raster order (``sampling.stride_indices``).
- Bins are ``adaptive_avg_pool2d``'s: rows ``floor(i H / h')`` to ``ceil((i + 1) H / h')`` (they overlap
  when ``H`` is not a multiple of ``h'``); a cell's representative index is its bin's centre patch.
- CLS: dropped, unless the vanilla model sends it; then it is sent first as it is and the patches are
  pooled to ``keep - 1`` (to ``keep`` when ``keep == 1``, CLS dropped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import MethodSpec, Selection, VisionTokens, register
from .sampling import stride_indices


def output_grid(grid: tuple[int, int], keep: int) -> tuple[int, int]:
    """(h', w') with h' <= H, w' <= W, h' * w' >= keep: exactly ``keep`` if a factorisation with an aspect
    within a factor 2 of the grid's exists (the closest one), else the smallest cover near the aspect."""
    height, width = grid
    aspect = math.log(height / width)

    def off(hw: tuple[int, int]) -> float:
        return abs(math.log(hw[0] / hw[1]) - aspect)

    h = min(height, max(1, round(math.sqrt(keep * height / width))))
    w = min(width, math.ceil(keep / h))
    if h * w < keep:
        h = min(height, math.ceil(keep / w))
    exact = [(e, keep // e) for e in range(1, height + 1) if keep % e == 0 and keep // e <= width]
    exact = [hw for hw in exact if off(hw) <= max(math.log(2), off((h, w)))]
    return min(exact, key=off) if exact else (h, w)


def bin_bounds(size: int, bins: int) -> tuple[list[int], list[int]]:
    """adaptive_avg_pool's bins along one axis: (starts, ends), end exclusive."""
    return [i * size // bins for i in range(bins)], [-(-(i + 1) * size // bins) for i in range(bins)]


def pool(tokens: VisionTokens, keep: int) -> Selection:
    """Average-pool each unit's patch grid to ``keep`` tokens (CLS first if sent): (B, T, D) -> (B, keep, D)."""
    hidden, layout = tokens.hidden, tokens.layout
    batch, total, dim = hidden.shape
    device = hidden.device
    with_cls = layout.send_prefix and layout.num_prefix > 0 and keep >= 2
    cls_count = layout.num_prefix if with_cls else 0
    patches_keep = keep - cls_count
    (height, width), pre = layout.grid, layout.num_prefix
    h, w = output_grid(layout.grid, patches_keep)

    grid = hidden[:, pre:].float().reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, (h, w)).flatten(2).transpose(1, 2)  # (B, h*w, D)
    cells = stride_indices(h * w, patches_keep).to(device)  # which pooled cells are sent

    (rs, re), (cs, ce) = bin_bounds(height, h), bin_bounds(width, w)
    centre = torch.tensor([pre + ((rs[i] + re[i] - 1) // 2) * width + (cs[j] + ce[j] - 1) // 2
                           for i in range(h) for j in range(w)], device=device)
    slot_of_cell = torch.full((h * w,), -1, dtype=torch.long, device=device)
    slot_of_cell[cells] = torch.arange(patches_keep, device=device) + cls_count
    rows = torch.arange(height, device=device) * h // height
    cols = torch.arange(width, device=device) * w // width
    patch_slot = slot_of_cell[(rows[:, None] * w + cols[None, :]).flatten()]  # (H*W,)
    merged_from = torch.full((total,), -1, dtype=torch.long, device=device)
    merged_from[pre:] = patch_slot
    merged_from[centre[cells]] = slot_of_cell[cells]  # bins overlap: a sent centre maps to its own cell
    indices = centre[cells]
    features = pooled[:, cells]
    weights = torch.zeros(keep, total, device=device)
    for slot, cell in enumerate(cells.tolist()):  # each sent cell: the mean of its (possibly overlapping) bin
        i, j = divmod(cell, w)
        window = torch.zeros(height, width, device=device)
        window[rs[i] : re[i], cs[j] : ce[j]] = 1.0 / ((re[i] - rs[i]) * (ce[j] - cs[j]))
        weights[cls_count + slot, pre:] = window.flatten()
    if with_cls:
        merged_from[:pre] = torch.arange(pre, device=device)
        indices = torch.cat([torch.arange(pre, device=device), indices])
        features = torch.cat([hidden[:, :pre].float(), features], dim=1)
        weights[:pre, :pre] = torch.eye(pre, device=device)
    return Selection(features=features.to(hidden.dtype), indices=indices.expand(batch, -1),
                     merged_from=merged_from.expand(batch, -1), weights=weights.expand(batch, -1, -1))


SPEC = register(
    MethodSpec(
        name="pool",
        description="Average pooling: 2-D average pooling of each image's (crop's) patch grid to N tokens.",
        knobs=(),
        fn=pool,
        resolve=lambda knobs: {},
    )
)
