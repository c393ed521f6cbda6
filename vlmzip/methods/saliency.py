"""Text-guided saliency (Token Sequence Compression, arXiv 2504.17892, Algorithm 1) and the LLM-side Cluster &
Saliency.

``saliency`` scores each visual token with the FIRST decoder layer of the LLM, before it runs: the keys of
the visual tokens against the queries of the text tokens (both after that layer's input norm, q/k
projections and RoPE; GQA keys shared by their query heads), scaled by the layer's own 1/sqrt(Dh) as its
attention is (the paper writes "k_vi . Q_text" and does not say; we score with the attention logits the
layer computes). Per head, softmax over the text dimension; max over heads; mean over the text tokens.
The top N visual tokens of each image stay; the rest are dropped before layer 0, which is the same as
dropping them before the LLM: positions are renumbered contiguously on 1-D RoPE LLMs (LLaVA, LLaVA-NeXT)
and Qwen2-VL's M-RoPE positions are kept (``positions="auto"``).

Choices where the paper is silent:

- "The text tokens" are the real (non-padding) non-visual tokens after the row's last visual token: the
  question and the chat template's tail (LLaVA-1.5's "ASSISTANT:"). The system prompt before the image
  cannot see the image (causal attention) and is not a rater.
- Several images in a prompt: every image is scored by the same text and keeps its own top N.

``cluster_saliency_llm`` is Cluster & Saliency (Token Sequence Compression, section 3.1, Table 1) on this score:
k-means++ on the visual embeddings entering the LLM, then variant 1 (static: quotas by cluster size), 2 (dynamic: size x
softmax(mean cluster saliency)) or 3 (coarse aggregation: ``N - c`` picked tokens plus one mean token per
cluster, ``c = max(1, min(k, N // 2))``); quotas are fitted so that every image ends with exactly N
tokens, as the pre-LLM ``cluster_saliency`` does. Variant 3's mean tokens are inserted after the image's
kept tokens, in the order of their members' mean position (their position: the next ones after the kept
tokens when renumbered). k-means draws use seed ``seed`` only (no per-image content seed exists inside the
LLM), so an image's clustering does not depend on its batch position.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budgets import Budget
from .base import LLMSelection, LLMStep, LLMTokens, MethodSpec, register
from .cluster import CLUSTER_SALIENCY_KNOBS, cluster_count, resolve_saliency, saliency_clusters
from .fastv import top_per_image
from .kmeans import cluster_means


def text_rows(tokens: LLMTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """The text tokens that rate the visual ones: ((B, R) slot of each, (B, R) bool valid).

    Real non-visual slots after the row's last visual slot; rows padded with the last slot (not valid).
    """
    visual = tokens.visual
    batch, length = visual.shape
    slot = torch.arange(length, device=visual.device).expand(batch, -1)
    last_visual = torch.where(visual, slot, -1).amax(dim=1, keepdim=True)
    real = tokens.real if tokens.real is not None else torch.ones_like(visual)
    text = real & ~visual & (slot > last_visual)
    counts = text.sum(dim=1)
    has_image = visual.any(dim=1)
    if bool((has_image & (counts == 0)).any()):
        raise ValueError("saliency scores the image tokens with the text after them; a prompt ends with its image: "
                         "put the question after the image")
    width = max(1, int(counts.max()))
    order = torch.where(text, slot, length).sort(dim=1).values[:, :width]
    valid = order < length
    return order.clamp(max=length - 1), valid


def text_saliency(tokens: LLMTokens) -> torch.Tensor:
    """Algorithm 1's score of every slot: (B, L) float32 (0 at non-visual slots).

    ``tokens.logits(rows)`` (B, H, R, L) -> softmax over the R text rows -> max over H -> mean over R.
    """
    if tokens.logits is None:
        raise ValueError("saliency needs the scoring layer's logits (LLMTokens.logits)")
    rows, valid = text_rows(tokens)
    logits = tokens.logits(rows).float()  # (B, H, R, L), masked = -inf
    logits = logits.masked_fill(~valid[:, None, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=2).nan_to_num(0.0)  # over the text dimension
    best = probs.amax(dim=1)  # (B, R, L): max over heads
    score = (best * valid.unsqueeze(-1)).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    return score.masked_fill(~tokens.visual, 0.0)


def saliency(tokens: LLMTokens) -> torch.Tensor:
    """Basic Saliency: (B, L) bool keep mask, the top ``keep[b][i]`` visual tokens of each image by
    :func:`text_saliency` (text always stays)."""
    return top_per_image(text_saliency(tokens), tokens)


def image_slots(tokens: LLMTokens) -> dict[int, list[tuple[int, int, torch.Tensor]]]:
    """Each image's visual slots, grouped by token count: {n: [(row, image, (n,) slots), ...]}."""
    groups: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    image = tokens.image.cpu()
    for b, row in enumerate(tokens.keep):
        for i in range(len(row)):
            slots = (image[b] == i).nonzero().squeeze(1).to(tokens.image.device)
            groups.setdefault(slots.numel(), []).append((b, i, slots))
    return groups


def cluster_saliency_llm(
    tokens: LLMTokens, budget: Budget, variant: int = 1, k: int = 20, seed: int = 0, iters: int = 20,
    tol: float = 1e-4,
) -> LLMSelection:
    """Cluster & Saliency with the LLM's text saliency: (B, L) tokens -> keep mask (+ variant 3's means).

    Images with the same token count are clustered as one batch. Returns an :class:`LLMSelection`:
    ``keep`` (B, L) bool; for variant 3, ``extra`` (B, M, D) mean tokens and ``extra_image`` (B, M).
    """
    hidden = tokens.hidden
    batch, length, dim = hidden.shape
    device = hidden.device
    score = text_saliency(tokens)
    keep = ~tokens.visual
    extras: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(batch)]  # per row: (image, (c, D))
    for n, members in image_slots(tokens).items():
        slots = torch.stack([s for _, _, s in members])  # (G, n)
        rows = torch.tensor([b for b, _, _ in members], device=device).unsqueeze(1)
        x, sal = hidden[rows, slots], score[rows, slots]
        target = budget.keep(n)
        seeds = torch.zeros(len(members), dtype=torch.int64, device=device)
        picked, labels, clusters = saliency_clusters(x, sal, target, variant, k, seeds, seed, iters, tol)
        for g, (b, i, _) in enumerate(members):
            if int(picked[g].sum()) != tokens.keep[b][i]:
                raise RuntimeError(f"cluster_saliency_llm picked {int(picked[g].sum())} tokens of image {i} of "
                                   f"row {b}; its plan says {tokens.keep[b][i]}")
        keep[rows.expand_as(slots)[picked], slots[picked]] = True
        if variant == 3:
            rest = torch.where(picked, clusters, labels)  # group ``clusters`` collects the picked tokens
            means = cluster_means(x, rest, clusters + 1)[:, :clusters]  # (G, c, D)
            where = torch.arange(n, device=device, dtype=torch.float32).expand(len(members), -1).unsqueeze(-1)
            order = cluster_means(where, rest, clusters + 1)[:, :clusters, 0].argsort(dim=1, stable=True)
            means = means.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))
            for g, (b, i, _) in enumerate(members):
                extras[b].append((i, means[g]))
    if variant != 3:
        return LLMSelection(keep=keep)
    width = max(sum(m.shape[0] for _, m in row) for row in extras)
    extra = torch.zeros(batch, width, dim, dtype=hidden.dtype, device=device)
    extra_image = torch.full((batch, width), -1, dtype=torch.long, device=device)
    for b, row in enumerate(extras):
        at = 0
        for i, means in sorted(row, key=lambda item: item[0]):
            extra[b, at : at + means.shape[0]] = means.to(hidden.dtype)
            extra_image[b, at : at + means.shape[0]] = i
            at += means.shape[0]
    return LLMSelection(keep=keep, extra=extra, extra_image=extra_image)


def cluster_counts(n: int, vanilla: int, step: LLMStep) -> tuple[int, int]:
    """(kept, after) of an image with ``n`` tokens: the budget; variant 3 keeps ``budget - clusters`` and
    adds one mean token per cluster."""
    budget = step.knobs["budget"]
    target = budget.keep(n)
    if step.knobs["variant"] != 3:
        return target, target
    return target - cluster_count(n, target, 3, step.knobs["k"]), target


def resolve(knobs: dict[str, Any]) -> dict[str, Any]:
    """``saliency`` has no knobs beyond the budget."""
    if knobs:
        raise ValueError(f"saliency has no knobs {sorted(knobs)}")
    return {}


def saliency_steps(resolved: dict[str, Any], budget: Budget | None, num_layers: int) -> list[LLMStep]:
    """One step before decoder layer 0, scored by layer 0 itself; positions as if dropped before the LLM."""
    return [LLMStep(layer=0, min_layer=0, positions="auto", fn=saliency, knobs={}, budget=budget, group="saliency")]


def cluster_steps(resolved: dict[str, Any], budget: Budget | None, num_layers: int) -> list[LLMStep]:
    """As :func:`saliency_steps`, with the method's knobs and its (kept, after) counts."""
    assert budget is not None
    knobs = {**resolved, "budget": budget}
    return [LLMStep(layer=0, min_layer=0, positions="auto", fn=cluster_saliency_llm, knobs=knobs, budget=budget,
                    counts=cluster_counts, group="cluster_saliency_llm")]


SALIENCY = register(
    MethodSpec(
        name="saliency",
        description="Basic Saliency (Token Sequence Compression): score visual tokens by the text's layer-0 attention "
        "(softmax over text, max over heads, mean over text); keep the top N before the LLM runs.",
        knobs=(),
        fn=saliency,
        stage="llm",
        resolve=resolve,
        steps=saliency_steps,
    )
)

CLUSTER_SALIENCY_LLM = register(
    MethodSpec(
        name="cluster_saliency_llm",
        description="Cluster & Saliency (Token Sequence Compression) with the text's layer-0 saliency: k-means++ "
        "clusters; each keeps its most salient tokens (variant 1 static, 2 dynamic quotas, 3 plus one mean token per "
        "cluster).",
        knobs=CLUSTER_SALIENCY_KNOBS,
        fn=cluster_saliency_llm,
        stage="llm",
        resolve=resolve_saliency,
        steps=cluster_steps,
    )
)
