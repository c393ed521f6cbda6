"""SparseVLM (Zhang et al., 2024, arXiv 2410.04417) and SparseVLM+ ("version 2.0"), faithful to the released code
(Gumpest/SparseVLMs: ``modelling_sparse_llama.py``, ``score.py``, ``utils.py``).

- **Raters**, once per prefill, from the LLM's input embeddings: V = the visual embeddings, T = the text
  after the image; ``m = softmax_over_T(V T^T).mean(over V)``; raters = text tokens with ``m > mean(m)``.
- **Pruning** after decoder layers 2, 6 and 15 (``layers``): the layer runs in full; from its attention
  probabilities (rows = raters, mean over heads, then over raters) each image keeps its top
  ``min(keep_l, v - 1)`` visual tokens, ``keep_l`` from the authors' schedule for the nominal budget.
- **Recycling** (1.0): of the deleted tokens, the top 30 % + 1 by rater score are clustered into
  ``n // 10 + 1`` tokens (k-NN density-peak clustering, :func:`cluster_and_merge`), inserted right after
  the kept visual tokens; the next step ranks them with the rest.
- **Positions** (1.0): renumbered contiguously after each step (decode continues the count).
- **2.0**: other schedules, no recycling, original positions, attention divided by the RoPE weight of
  all-ones q/k ("gravity"), and only the top half of heads by rater-to-visual attention averaged.

vlmzip's additions (the released code handles batch 1 and one image): batches with padding, several images
per prompt (each keeps its own top-N; raters are the text after the row's last image), decode with the
KV cache, M-RoPE LLMs (Qwen2-VL keeps its positions: 1-D renumbering is not defined for M-RoPE), other
visual counts (schedules scaled by ``vanilla / 576``) and LLMs too shallow for layer 15 (layers scaled by
``depth / 32``, said in ``vlmzip.plan``'s notes; every LLM of 17 layers or more prunes after 2, 6 and 15).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..budgets import Budget
from .base import Knob, LLMSelection, LLMStep, LLMTokens, MethodSpec, register, true_positions
from .fastv import top_per_image

REFERENCE_TOKENS = 576  # LLaVA-1.5's visual tokens per image, which the schedules are written for
REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's decoder layers, which the pruning layers are written for
LAYERS = (2, 6, 15)
SCHEDULES: dict[str, dict[int, tuple[int, int, int]]] = {
    "1.0": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
RECYCLE_SHARE = 0.3
RECYCLE_MODES = ("mean", "sum", "none")


# -- pure functions ------------------------------------------------------------------------------------


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters: (V, D) visual and (T, D) text embeddings -> (T,) bool.

    ``m = softmax over T of V T^T``, averaged over the visual tokens; raters are the text tokens whose
    ``m`` is above the mean of ``m``.
    """
    relation = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)
    return relation > relation.mean()


def cluster_and_merge(x: torch.Tensor, clusters: int, reduce: str = "mean") -> torch.Tensor:
    """Density-peak clustering of (N, C) tokens into ``clusters`` merged tokens (clusters, C), as released.

    Distances are Euclidean / sqrt(C); density = exp(-mean squared distance to the ``clusters`` nearest
    tokens, itself included); each token's parent distance is to its nearest denser token (the largest
    distance for the densest); centres = top ``clusters`` of density x distance, in that order; every token
    joins its nearest centre (a centre joins itself); a cluster is the mean (``reduce="sum"``: the sum, as
    the paper writes it) of its members. Ties in density are broken by a fixed tiny offset (the released
    code adds uniform noise below 1e-6 from the global RNG; here it comes from a seeded generator).
    """
    n, c = x.shape
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must be in 1..{n}, got {clusters}")
    xf = x.float()
    dist = torch.cdist(xf.unsqueeze(0), xf.unsqueeze(0)).squeeze(0) / math.sqrt(c)
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    noise = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 1e-6
    density = density + noise.to(density.device)
    denser = density.unsqueeze(0) > density.unsqueeze(1)  # [i, j]: token j is denser than token i
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (parent * density).topk(clusters).indices
    assign = dist[centres].argmin(dim=0)  # (N,) nearest centre
    assign[centres] = torch.arange(clusters, device=x.device)
    merged = torch.zeros(clusters, c, dtype=torch.float32, device=x.device).index_add_(0, assign, xf)
    if reduce == "mean":
        sizes = torch.zeros(clusters, device=x.device).index_add_(0, assign, torch.ones(n, device=x.device))
        merged = merged / (sizes + 1e-6).unsqueeze(-1)
    return merged.to(x.dtype)


def recycled_count(deleted: int) -> tuple[int, int]:
    """Of ``deleted`` tokens: how many are recycled (top 30 % + 1) and into how many clusters (n // 10 + 1)."""
    if deleted <= 0:
        return 0, 0
    recycled = int(deleted * RECYCLE_SHARE) + 1
    return recycled, recycled // 10 + 1


def scale_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """``layers`` (written for a 32-layer LLM) scaled by ``depth / 32`` (rounded half up), kept strictly
    increasing."""
    out, prev = [], -1
    for layer in layers:
        prev = max(math.floor(layer * depth / REFERENCE_DEPTH + 0.5), prev + 1)
        out.append(prev)
    return tuple(out)


def fits(layers: tuple[int, ...], depth: int) -> bool:
    """Whether an LLM of ``depth`` decoder layers can prune after each of ``layers`` (a layer must follow the
    last pruning layer, and another after it: the last must be <= depth - 2)."""
    return layers[-1] <= depth - 2


def pruning_layers(layers: tuple[int, ...] | None, depth: int) -> tuple[int, ...]:
    """The user's ``layers`` as given; by default the authors' (2, 6, 15) whatever the depth (their released code
    uses them for 7B and 13B alike), scaled by ``depth / 32`` only for an LLM too shallow to have them."""
    if layers is None:
        layers = LAYERS if fits(LAYERS, depth) else scale_layers(LAYERS, depth)
    if not fits(layers, depth):
        raise ValueError(
            f"sparsevlm prunes after decoder layers {layers}, but this LLM has {depth} layers (the last pruning "
            f"layer must be <= {depth - 2}); pass layers=(...) with fewer or lower layers"
        )
    return layers


def layers_note(layers: tuple[int, ...] | None, depth: int) -> str:
    """What ``vlmzip.plan`` says when the default layers had to be scaled (empty otherwise)."""
    if layers is not None or fits(LAYERS, depth):
        return ""
    return (f"sparsevlm: this LLM has {depth} decoder layers, too few for the authors' pruning layers {LAYERS}; "
            f"pruning after layers {pruning_layers(None, depth)} instead (scaled by {depth}/{REFERENCE_DEPTH})")


def schedule(budget: Budget, vanilla: int, version: str) -> tuple[int, ...] | None:
    """The tokens an image of ``vanilla`` tokens keeps at each pruning layer; None = keep everything.

    The authors' schedules are written for 576 tokens and the nominal budgets 192 / 128 / 96 / 64. A budget
    that is one of those at this model's scale (``round(b * vanilla / 576)`` tokens, e.g. 28 of the lab
    model's 256 for 64) uses that schedule; any other budget interpolates linearly between the two
    neighbouring schedules (or scales the nearest one proportionally outside 64..192). Every schedule entry
    is then scaled by ``vanilla / 576`` and rounded (at least 1).
    """
    target = budget.keep(vanilla)
    if target >= vanilla:
        return None
    table = SCHEDULES[version]
    scale = vanilla / REFERENCE_TOKENS
    rows = sorted(table)
    chosen: tuple[float, ...] | None = None
    for nominal in rows:
        if max(1, round(nominal * scale)) == target:
            chosen = table[nominal]
            break
    if chosen is None:
        b = target / scale
        if b <= rows[0] or b >= rows[-1]:
            edge = rows[0] if b <= rows[0] else rows[-1]
            chosen = tuple(v * b / edge for v in table[edge])
        else:
            hi = next(r for r in rows if r > b)
            lo = rows[rows.index(hi) - 1]
            t = (b - lo) / (hi - lo)
            chosen = tuple(a + t * (c - a) for a, c in zip(table[lo], table[hi], strict=True))
    return tuple(max(1, round(v * scale)) for v in chosen)


# -- the step -----------------------------------------------------------------------------------------


def step_counts(n: int, vanilla: int, step: LLMStep) -> tuple[int, int]:
    """(kept, after) for an image reaching pruning step ``step.knobs['index']`` with ``n`` visual tokens."""
    assert step.budget is not None
    plan = schedule(step.budget, vanilla, step.knobs["version"])
    if plan is None or n == 0:
        return n, n
    kept = min(plan[step.knobs["index"]], n - 1)
    clusters = recycled_count(n - kept)[1] if step.knobs["recycle"] != "none" else 0
    return kept, kept + clusters


def raters_of(tokens: LLMTokens) -> torch.Tensor:
    """(B, L0) bool raters over this call's input columns, computed once per prefill (kept in ``scratch``)."""
    if "raters" in tokens.scratch:
        return tokens.scratch["raters"]
    assert tokens.inputs_embeds is not None and tokens.inputs_visual is not None and tokens.inputs_real is not None
    embeds, visual, real = tokens.inputs_embeds, tokens.inputs_visual, tokens.inputs_real
    raters = torch.zeros_like(visual)
    for b in range(embeds.shape[0]):
        where = visual[b].nonzero().flatten()
        if where.numel() == 0:
            continue
        after = torch.arange(visual.shape[1], device=visual.device) > where[-1]
        text = (after & real[b] & ~visual[b]).nonzero().flatten()
        if text.numel() == 0:
            continue
        raters[b, text] = select_raters(embeds[b, where], embeds[b, text])
    tokens.scratch["raters"] = raters
    return raters


def rater_scores(tokens: LLMTokens, version: str) -> torch.Tensor:
    """(B, L) each slot's attention from the raters in the previous layer: mean over heads (2.0: gravity-
    corrected, priority heads only), then over raters."""
    cols = tokens.cols
    assert cols is not None
    raters = raters_of(tokens).gather(1, cols.clamp(min=0)) & (cols >= 0) & ~tokens.visual
    counts = raters.sum(dim=1)
    if int(counts.max()) == 0:  # no text after the image: the last token rates alone
        raters[:, -1] = True
        counts = raters.sum(dim=1)
    rows = true_positions(raters, int(counts.max()))  # (B, R)
    weight = raters.gather(1, rows).float()  # 0 for padding rows of short rows
    attn = tokens.attention(rows)  # (B, H, R, L)
    if version == "2.0":
        assert tokens.rope_ones is not None
        attn = (attn / tokens.rope_ones(rows).unsqueeze(1)).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        to_visual = (attn * weight[:, None, :, None] * tokens.visual[:, None, None, :]).sum(dim=(2, 3))  # (B, H)
        top = to_visual.topk(max(1, attn.shape[1] // 2), dim=1).indices
        attn = attn.gather(1, top[:, :, None, None].expand(-1, -1, *attn.shape[2:]))
    per_rater = attn.mean(dim=1)  # (B, R, L)
    return (per_rater * weight.unsqueeze(-1)).sum(dim=1) / counts.clamp(min=1).unsqueeze(-1)


def sparsevlm(tokens: LLMTokens, index: int, version: str, recycle: str) -> LLMSelection:
    """One SparseVLM pruning step: keep each image's top ``keep`` visual tokens by rater attention and
    (1.0) recycle the best deleted ones into a few merged tokens.

    ``tokens.hidden`` (B, L, D) is the pruning layer's output. Returns the (B, L) keep mask and the
    recycled tokens (B, M, D) with their images (B, M) (-1 = unused).
    """
    scores = rater_scores(tokens, version)
    keep = top_per_image(scores, tokens)
    if recycle == "none":
        return LLMSelection(keep=keep)
    extras: list[list[tuple[int, torch.Tensor]]] = []
    for b, row in enumerate(tokens.keep):
        found = []
        for i, _ in enumerate(row):
            deleted = ((tokens.image[b] == i) & ~keep[b]).nonzero().flatten()
            m, clusters = recycled_count(deleted.numel())
            if clusters == 0:
                continue
            best = deleted[scores[b, deleted].topk(m).indices]
            found.append((i, cluster_and_merge(tokens.hidden[b, best], clusters, recycle)))
        extras.append(found)
    width = max((sum(t.shape[0] for _, t in row) for row in extras), default=0)
    if width == 0:
        return LLMSelection(keep=keep)
    batch, _, dim = tokens.hidden.shape
    extra = tokens.hidden.new_zeros(batch, width, dim)
    extra_image = torch.full((batch, width), -1, dtype=torch.long, device=keep.device)
    for b, row in enumerate(extras):
        at = 0
        for i, merged in row:
            extra[b, at : at + merged.shape[0]] = merged
            extra_image[b, at : at + merged.shape[0]] = i
            at += merged.shape[0]
    return LLMSelection(keep=keep, extra=extra, extra_image=extra_image)


# -- registration -------------------------------------------------------------------------------------


def resolve(knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``version``, ``layers``, ``recycle`` and ``keep_positions``."""
    version = str(knobs.get("version", "1.0"))
    if version not in SCHEDULES:
        raise ValueError(f"sparsevlm version must be one of {sorted(SCHEDULES)}, got {version!r}")
    layers = knobs.get("layers")
    if layers is None:
        return {"version": version, "layers": None, **_rest(knobs, version)}
    if isinstance(layers, str):
        layers = tuple(int(x) for x in layers.replace(",", " ").split())
    layers = tuple(layers)
    if len(layers) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers) or list(
        layers
    ) != sorted(set(layers)):
        raise ValueError(f"layers must be 3 increasing decoder layer indices >= 0 (default {LAYERS}), got {layers!r}")
    return {"version": version, "layers": layers, **_rest(knobs, version)}


def _rest(knobs: dict[str, Any], version: str) -> dict[str, Any]:
    recycle = knobs.get("recycle", "mean" if version == "1.0" else "none")
    if recycle not in RECYCLE_MODES:
        raise ValueError(f"recycle must be one of {RECYCLE_MODES}, got {recycle!r}")
    keep_positions = knobs.get("keep_positions")
    if keep_positions is not None and not isinstance(keep_positions, bool):
        raise ValueError(f"keep_positions must be True or False, got {keep_positions!r}")
    return {"recycle": recycle, "keep_positions": keep_positions}


def steps(resolved: dict[str, Any], budget: Budget | None, num_layers: int) -> list[LLMStep]:
    """Three steps, after each (scaled) pruning layer; positions per ``keep_positions`` / the version."""
    keep_positions = resolved["keep_positions"]
    if keep_positions is None:  # the released behaviour: 1.0 renumbers (where the LLM has 1-D RoPE), 2.0 keeps
        positions = "auto" if resolved["version"] == "1.0" else "keep"
    else:
        positions = "keep" if keep_positions else "renumber"
    knobs = {"version": resolved["version"], "recycle": resolved["recycle"]}
    note = layers_note(resolved["layers"], num_layers)
    return [
        LLMStep(layer=layer + 1, fn=sparsevlm, knobs={"index": j, **knobs}, budget=budget, counts=step_counts,
                positions=positions, group="sparsevlm", needs=frozenset({"inputs_embeds"}), note=note)
        for j, layer in enumerate(pruning_layers(resolved["layers"], num_layers))
    ]


SPEC = register(
    MethodSpec(
        name="sparsevlm",
        description="SparseVLM: inside the LLM, after layers 2/6/15 keep the image tokens the question's rater "
        "tokens attend to (authors' schedule for the budget), recycling the rest into a few merged tokens.",
        knobs=(
            Knob("version", str, "1.0", '"1.0" (the paper) or "2.0" (SparseVLM+: no recycling, kept positions, '
                 "gravity-corrected priority heads)"),
            Knob("layers", tuple, None, "decoder layers after which tokens are pruned (default: the authors' 2, 6, "
                 "15; scaled by depth / 32 on an LLM of fewer than 17 layers)"),
            Knob("recycle", str, None, 'deleted tokens recycled as cluster "mean" (1.0 default), "sum" (as the '
                 'paper writes it) or "none" (2.0 default)'),
            Knob("keep_positions", bool, None, "keep original positions (default: 1.0 renumbers on 1-D RoPE LLMs, "
                 "2.0 keeps)"),
        ),
        fn=sparsevlm,
        stage="llm",
        resolve=resolve,
        default_budget=Budget(tokens=None, ratio=64 / REFERENCE_TOKENS),
        steps=steps,
        needs=frozenset({"inputs_embeds"}),
    )
)
