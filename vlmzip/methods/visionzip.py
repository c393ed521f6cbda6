"""VisionZip (Yang et al., 2024, arXiv 2412.04467, and its supplement): dominant tokens + contextual tokens.

Faithful to the authors' released behaviour (dvlab-research/VisionZip):

- dominant tokens: for a CLS encoder, the CLS token plus the (dominant - 1) patches the CLS query
  attends to most (attention summed over heads); for an encoder without CLS, the ``dominant`` tokens
  that receive the most attention (mean over heads and queries). Kept in positional order.
- contextual tokens: the R remaining tokens, in positional order, are split into C targets at a uniform
  stride (``step = max(1, R // C)``) and the rest; every other token joins the target whose
  L2-normalised key is most similar; a contextual token is its target plus the mean of its members.
- output order: dominant tokens, then contextual tokens.

Multi-crop models (LLaVA-NeXT) call it once per crop with that crop's share of the image's budget, as the
authors' released code does; encoders without CLS (SigLIP, Qwen's ViT) rank by received attention.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budgets import CONTEXTUAL_FRACTION, Budget, positive_int
from .base import Knob, MethodSpec, Selection, VisionTokens, gather_tokens, register, true_positions


def select_dominant(
    cls_attention: torch.Tensor | None,
    received_attention: torch.Tensor | None,
    dominant: int,
    has_cls: bool,
) -> torch.Tensor:
    """Indices of the dominant tokens, sorted in positional order.

    With CLS: ``cls_attention`` (B, T), CLS at index 0; returns CLS + top (dominant - 1) patches.
    Without: ``received_attention`` (B, T); returns the top ``dominant`` tokens.
    Returns (B, dominant) long.
    """
    if has_cls:
        if cls_attention is None:
            raise ValueError("VisionZip on a CLS encoder needs the CLS attention row")
        patch_scores = cls_attention[:, 1:]
        top = patch_scores.topk(dominant - 1, dim=1).indices + 1
        cls = torch.zeros(top.shape[0], 1, dtype=top.dtype, device=top.device)
        idx = torch.cat([cls, top], dim=1)
    else:
        if received_attention is None:
            raise ValueError("VisionZip on an encoder without CLS needs the received attention")
        idx = received_attention.topk(dominant, dim=1).indices
    return idx.sort(dim=1).values


def remaining_indices(dominant_idx: torch.Tensor, total: int) -> torch.Tensor:
    """(B, T - K) indices of the tokens not in ``dominant_idx`` (B, K), in positional order."""
    batch = dominant_idx.shape[0]
    rest = torch.ones(batch, total, dtype=torch.int8, device=dominant_idx.device)
    rest.scatter_(1, dominant_idx, 0)
    return true_positions(rest, total - dominant_idx.shape[1])


def uniform_targets(num_remaining: int, contextual: int, device: torch.device | None = None) -> torch.Tensor:
    """(C,) positions of the contextual targets among R remaining tokens: 0, step, 2*step, ... first C."""
    step = max(1, num_remaining // contextual)
    return torch.arange(0, num_remaining, step, device=device)[:contextual]


def merge_contextual(
    hidden: torch.Tensor, keys: torch.Tensor, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge R remaining tokens into C contextual tokens.

    ``hidden`` (B, R, D) and ``keys`` (B, R, Dh) are the remaining tokens in positional order.
    Returns ``(tokens (B, C, D), targets (C,), assign (B, R), weights (B, C, R))`` where ``targets`` are
    positions among the R tokens, ``assign[b, r]`` is the contextual slot (0..C-1) token r went to, and
    ``weights`` how each contextual token mixes the R tokens (1 on its target, 1 / members on each member).
    """
    batch, num_remaining, _ = hidden.shape
    targets = uniform_targets(num_remaining, contextual, hidden.device)
    is_member = torch.ones(num_remaining, dtype=torch.int8, device=hidden.device)
    is_member[targets] = 0
    members = true_positions(is_member, num_remaining - contextual)

    k = keys.float()
    k = k / k.norm(dim=-1, keepdim=True)
    similarity = k[:, members] @ k[:, targets].transpose(1, 2)  # (B, M, C)
    member_slot = similarity.argmax(dim=2)  # (B, M)

    one_hot = torch.zeros(batch, members.numel(), contextual, dtype=torch.float32, device=hidden.device)
    one_hot.scatter_(2, member_slot.unsqueeze(-1), 1.0)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (B, C, 1)
    member_mean = one_hot.transpose(1, 2) @ hidden[:, members].float() / counts
    tokens = (hidden[:, targets].float() + member_mean).to(hidden.dtype)

    assign = torch.empty(batch, num_remaining, dtype=torch.long, device=hidden.device)
    assign[:, targets] = torch.arange(contextual, device=hidden.device)
    assign[:, members] = member_slot
    weights = torch.zeros(batch, contextual, num_remaining, dtype=torch.float32, device=hidden.device)
    weights[:, :, members] = (one_hot / counts.transpose(1, 2)).transpose(1, 2)
    weights[:, torch.arange(contextual, device=hidden.device), targets] = 1.0
    return tokens, targets, assign, weights


def visionzip(tokens: VisionTokens, keep: int, contextual_share: float = CONTEXTUAL_FRACTION) -> Selection:
    """VisionZip on a batch of units, ``keep`` tokens each: (B, T, D) hidden -> (B, keep, D) selection.

    ``keep`` splits into ``contextual = round(keep * contextual_share)`` contextual tokens and the rest
    dominant (64 -> 54 + 10 at the paper's share; at least one dominant token).
    """
    contextual = round(keep * contextual_share)
    dominant = max(1, keep - contextual)
    return visionzip_select(tokens, dominant, keep - dominant)


def visionzip_select(tokens: VisionTokens, dominant: int, contextual: int) -> Selection:
    """VisionZip with an explicit split: (B, T, D) hidden -> (B, dominant + contextual, D) selection."""
    hidden = tokens.hidden
    batch, total, _ = hidden.shape
    has_cls = tokens.layout.num_prefix == 1
    dom_idx = select_dominant(tokens.cls_attention, tokens.received_attention, dominant, has_cls)
    dom_tokens = gather_tokens(hidden, dom_idx)

    merged_from = torch.full((batch, total), -1, dtype=torch.long, device=hidden.device)
    merged_from.scatter_(1, dom_idx, torch.arange(dominant, device=hidden.device).expand(batch, dominant))
    if contextual == 0:
        return Selection(features=dom_tokens, indices=dom_idx, merged_from=merged_from, dominant=dominant)

    if tokens.keys is None:
        raise ValueError("VisionZip's contextual tokens need the layer's keys")
    rest_idx = remaining_indices(dom_idx, total)
    rest_hidden = gather_tokens(hidden, rest_idx)
    rest_keys = gather_tokens(tokens.keys, rest_idx)
    ctx_tokens, targets, assign, mix = merge_contextual(rest_hidden, rest_keys, contextual)
    merged_from.scatter_(1, rest_idx, assign + dominant)

    features = torch.cat([dom_tokens, ctx_tokens], dim=1)
    indices = torch.cat([dom_idx, rest_idx[:, targets]], dim=1)
    weights = torch.zeros(batch, dominant + contextual, total, dtype=torch.float32, device=hidden.device)
    weights.scatter_(2, dom_idx.unsqueeze(-1), 1.0)
    weights[:, dominant:].scatter_(2, rest_idx.unsqueeze(1).expand(-1, contextual, -1), mix)
    return Selection(features=features, indices=indices, merged_from=merged_from, dominant=dominant, weights=weights)


def crop_layout(crops: list[tuple[torch.Tensor, torch.Tensor, int]], grid: tuple[int, int], prefix: int,
                side: int) -> torch.Tensor:
    """One multi-crop image's tokens in the released VisionZip order (LLaVA-NeXT): the base crop as emitted; the
    high-resolution crops' dominant patches in raster order over the whole high-resolution grid; each of those
    crops' prefix (CLS) tokens; then all their contextual tokens.

    ``crops``: per crop, base first, (features (K_c, D) as sent, indices (K_c,) into the crop's tokens, dominant
    count); ``grid``: (rows, cols) of high-resolution crops; ``prefix``: prefix tokens per crop; ``side``: patches
    per crop side. Returns (sum K_c, D). One sort does the middle part without a host sync: a dominant patch's key
    is its raster position in the whole grid, a prefix token's key comes after every patch, in crop order.
    """
    cols = grid[1]
    grid_total = grid[0] * side * cols * side
    dominant_parts, keys, contextual = [], [], []
    for crop, (features, indices, dominant) in enumerate(crops[1:]):
        idx = indices[:dominant]
        patch = (idx - prefix).clamp(min=0)
        y, x = patch.div(side, rounding_mode="floor"), patch % side
        row, col = divmod(crop, cols)
        raster = (row * side + y) * (cols * side) + col * side + x
        keys.append(torch.where(idx < prefix, grid_total + crop * max(prefix, 1) + idx, raster))
        dominant_parts.append(features[:dominant])
        contextual.append(features[dominant:])
    order = torch.cat(keys).argsort(stable=True)
    return torch.cat([crops[0][0], torch.cat(dominant_parts)[order], *contextual], dim=0)


def resolve(knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate VisionZip's own knobs: ``dominant`` and ``contextual`` fix the budget and its split.

    Without them (a ``tokens`` / ``ratio`` budget) the split is the paper's share, 10 of 64 contextual.
    """
    dominant, contextual = knobs.get("dominant"), knobs.get("contextual")
    if dominant is None and contextual is None:
        return {"contextual_share": CONTEXTUAL_FRACTION}
    if dominant is None:
        raise ValueError("VisionZip: pass dominant=D together with contextual=C (e.g. 54 and 10), or tokens=N")
    dominant = positive_int("dominant", dominant)
    contextual = positive_int("contextual", 0 if contextual is None else contextual, allow_zero=True)
    return {"contextual_share": contextual / (dominant + contextual), "dominant": dominant, "contextual": contextual}


def fixed_budget(resolved: dict[str, Any]) -> Budget | None:
    """dominant + contextual per image, when the user gave them."""
    if "dominant" in resolved:
        return Budget(tokens=resolved.pop("dominant") + resolved.pop("contextual"), label="dominant + contextual")
    return None


SPEC = register(
    MethodSpec(
        name="visionzip",
        description="VisionZip: CLS-attended dominant tokens + key-similarity merged contextual tokens.",
        knobs=(
            Knob("dominant", int, None, "dominant tokens per image, CLS included (with contextual: the budget)"),
            Knob("contextual", int, None, "contextual (merged) tokens per image"),
        ),
        fn=visionzip,
        resolve=resolve,
        budget=fixed_budget,
        needs=frozenset({"keys", "cls_attention", "received_attention"}),
    )
)
