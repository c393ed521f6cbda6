"""The records that flow between adapters and methods, budgets, and the method registry.

A method is a pure tensor function. Pre-LLM methods (stage ``"vision"`` or ``"projector"``) receive a
:class:`VisionTokens` record - the tokens of a batch of *units* of one shape (a unit is an image, or
one crop of a multi-crop image, or one image of a dynamic-resolution model) with their grid and the
signals the method asked for - and return a :class:`Selection`. In-LLM methods (stage ``"llm"``)
receive an :class:`LLMTokens` record at their decoder layer and return which visual tokens stay.
Methods never see a model class; adapters never contain an algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..budgets import Budget

# Signals an adapter knows how to compute for a pre-LLM method (``MethodSpec.needs``).
SIGNALS = frozenset({"keys", "cls_attention", "received_attention", "inputs_embeds"})
# Where a method acts: on the vision tower's output, on the projector's output, inside the LLM.
STAGES = ("vision", "projector", "llm")


@dataclass(frozen=True)
class TokenLayout:
    """The token layout of one unit (an image, or one crop of an image).

    ``num_prefix`` tokens (the CLS token of CLIP, none for SigLIP or Qwen) come first, then
    ``grid[0] * grid[1]`` patch tokens in row-major order. ``send_prefix`` says whether the vanilla
    model sends the prefix tokens to the LLM (LLaVA's ``vision_feature_select_strategy == "full"``).
    """

    num_prefix: int
    grid: tuple[int, int]
    send_prefix: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def total(self) -> int:
        """All tokens the vision layer produces per unit (prefix + patches)."""
        return self.num_prefix + self.num_patches

    @property
    def vanilla(self) -> int:
        """Tokens the unmodified model sends to the LLM per unit."""
        return self.num_patches + (self.num_prefix if self.send_prefix else 0)


@dataclass
class VisionTokens:
    """What the vision tower produced for a batch of units of one layout, for one method call.

    Shapes: B units, T = layout.total tokens, D hidden size, Dh head dim.

    - ``hidden``: (B, T, D) tokens, prefix first (stage "vision": the feature layer the projector is
      fed; stage "projector": the projected tokens, D = the LLM's width).
    - ``keys``: (B, T, Dh) that layer's ``k_proj`` output averaged over heads, or None.
    - ``cls_attention``: (B, T) attention of the CLS query over all tokens, summed over heads, or None.
    - ``received_attention``: (B, T) attention each token receives, mean over heads and queries, or None.
    - ``seeds``: (B,) int64 hash of each unit's pixels: methods that draw random numbers derive them
      from it, so a unit gets the same draw whatever its batch position or the batch size.
    """

    hidden: torch.Tensor
    layout: TokenLayout
    keys: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    received_attention: torch.Tensor | None = None
    seeds: torch.Tensor | None = None

    def vanilla_indices(self) -> torch.Tensor:
        """(T_v,) indices into ``hidden`` of the tokens the vanilla model sends, in order."""
        start = 0 if self.layout.send_prefix else self.layout.num_prefix
        return torch.arange(start, self.layout.total, device=self.hidden.device)

    def joined(self, frames: int) -> VisionTokens:
        """The units of whole videos from the units of their frames: B = V * F frames (video v's frames at rows
        ``v * F .. v * F + F - 1``) -> V units of ``F * N`` patch tokens (N = the grid's patches; prefix tokens are
        dropped), so a method chooses across a video's frames (``scope=video``). Index ``f * N + i`` of a joined unit
        is patch ``i`` of frame ``f``; the grid stacks the frames' grids in time, (F * rows, cols).

        A frame's CLS attention (each frame's own CLS query over its patches) becomes the joined unit's received
        attention, the score a method without a CLS token ranks by; ``keys`` are joined alike; each video's seed
        combines its frames'. Frames whose prefix the vanilla model sends (``send_prefix``) cannot be joined.
        """
        layout, p = self.layout, self.layout.num_prefix
        if layout.send_prefix and p:
            raise ValueError("scope=video needs frames whose prefix tokens (CLS) are not sent to the LLM; use "
                             "scope=frame on this model")
        batch = self.hidden.shape[0]
        if frames < 1 or batch % frames:
            raise ValueError(f"{batch} frame units cannot be joined into videos of {frames} frames")
        videos = batch // frames

        def join(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, p:].reshape(videos, frames * (t.shape[1] - p), *t.shape[2:])

        score = self.received_attention if self.cls_attention is None or p == 0 else self.cls_attention
        seeds = None if self.seeds is None else self.seeds.view(videos, frames).sum(dim=1)
        return VisionTokens(
            hidden=join(self.hidden), layout=TokenLayout(0, (frames * layout.grid[0], layout.grid[1]), False),
            keys=join(self.keys), received_attention=join(score), seeds=seeds,
        )

    def rows(self, rows: list[int]) -> VisionTokens:
        """The same record for the units ``rows`` only (B' = len(rows)), every signal taken along."""
        index = torch.tensor(rows, device=self.hidden.device)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index.to(t.device)]

        return VisionTokens(hidden=self.hidden[index], layout=self.layout, keys=take(self.keys),
                            cls_attention=take(self.cls_attention), received_attention=take(self.received_attention),
                            seeds=take(self.seeds))


@dataclass
class Selection:
    """The tokens a pre-LLM method sends to the LLM for a batch of units.

    - ``features``: (B, K, D) tokens in the order they are sent.
    - ``indices``: (B, K) index into ``VisionTokens.hidden`` of the token each output came from (for a
      merged token, its target). Unique per row. Adapters use it for positions (Qwen's M-RoPE).
    - ``merged_from``: optional (B, T) long tensor: for each input token, the output slot it was merged
      into, or -1 if it was dropped (kept tokens map to their own slot). Used by visualisations.
    - ``dominant``: optional number of leading outputs that are kept tokens as they are (VisionZip's
      dominant tokens, CLS included), the rest being merged (contextual) tokens; None when the method
      makes no such split. Multi-crop adapters use it to lay out crops as the method's authors do.
    - ``weights``: for a method that merges, (B, K, T) float: output k is ``sum_t weights[b, k, t] * hidden[b,
      t]`` (a merged token's mixture of the input tokens, a kept token's one-hot row); None for a pure
      selection (output k is ``hidden[b, indices[b, k]]``). ``apply`` uses it.
    - ``units``: on a selection recorded by ``vlmzip.recorded``, the (image number in the call, unit number
      within the image) of each row: which crop, tile or frame of which image it is; None otherwise.
    """

    features: torch.Tensor
    indices: torch.Tensor
    merged_from: torch.Tensor | None = None
    dominant: int | None = None
    weights: torch.Tensor | None = None
    units: tuple[tuple[int, int], ...] | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The same selection and merging applied to other per-token features aligned with the input tokens:
        (B, T, D') -> (B, K, D') (e.g. Qwen3-VL's DeepStack features of the same tokens). A kept token takes its
        own row, a merged token the same mixture of rows as its features."""
        if self.weights is None:
            return gather_tokens(x, self.indices.to(x.device))
        return (self.weights.to(x.device) @ x.float()).to(x.dtype)


def mean_weights(merged_from: torch.Tensor, keep: int) -> torch.Tensor:
    """``Selection.weights`` of outputs that are each the plain mean of their members: (B, T) ``merged_from``
    (each input token's output slot, -1 = dropped) -> (B, keep, T), 1 / members on each member."""
    one_hot = (merged_from.unsqueeze(1) == torch.arange(keep, device=merged_from.device).view(1, -1, 1)).float()
    return one_hot / one_hot.sum(dim=-1, keepdim=True).clamp(min=1)


@dataclass
class LLMTokens:
    """What an in-LLM method sees when it acts before decoder layer ``layer`` (one prefill, B rows).

    - ``hidden``: (B, L, D) hidden states entering that layer (L = the current sequence, padded).
    - ``visual``: (B, L) bool, True at the current visual tokens.
    - ``image``: (B, L) long, the image (0, 1, ... within its row) of each visual token, -1 elsewhere.
    - ``keep``: per row, per image, how many of its visual tokens this step keeps (host ints).
    - ``last_query_attention``: () -> (B, L) attention probabilities of each row's last token over the
      sequence in the previous layer, mean over heads (causal and padding masks applied).
    - ``attention(rows)``: (B, R) long positions -> (B, H, R, L) attention probabilities of those query
      rows in the previous layer (after RoPE, GQA expanded, masks applied). Only these rows are built.
    - ``logits(rows)``: (B, R) -> (B, H, R, L) scaled q.k scores of those rows in layer ``layer`` itself,
      from its input norm, q/k projections and RoPE on ``hidden`` (masked entries -inf), before softmax.
    - ``rope_ones(rows)``: (B, R) -> (B, R, L) the previous layer's RoPE applied to all-ones queries and
      keys, dot product scaled by 1/sqrt(Dh) (SparseVLM+'s "attention gravity").
    - ``cols``: (B, L) long, each slot's column in this call's LLM input (-1 = padding slot; an inserted
      token has its anchor's column).
    - ``real``: (B, L) bool, slots holding a real token (not padding of any kind).
    - ``inputs_embeds``: (B, L0, D) the LLM's input embeddings (columns = ``cols``), for methods whose
      ``MethodSpec.needs`` has "inputs_embeds"; ``inputs_visual`` / ``inputs_real``: (B, L0) bool.
    - ``scratch``: a dict shared by the steps of one method within one prefill (e.g. SparseVLM's raters).
    """

    hidden: torch.Tensor
    visual: torch.Tensor
    image: torch.Tensor
    keep: list[list[int]]
    attention: Callable[[torch.Tensor], torch.Tensor]
    layer: int
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    rope_ones: Callable[[torch.Tensor], torch.Tensor] | None = None
    cols: torch.Tensor | None = None
    real: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    inputs_visual: torch.Tensor | None = None
    inputs_real: torch.Tensor | None = None
    scratch: dict[str, Any] = field(default_factory=dict)

    def last_query_attention(self) -> torch.Tensor:
        rows = torch.full((self.hidden.shape[0], 1), self.hidden.shape[1] - 1, device=self.hidden.device)
        return self.attention(rows)[:, :, 0].mean(dim=1)


@dataclass
class LLMSelection:
    """An in-LLM step's answer when it also adds tokens (SparseVLM's recycled clusters).

    - ``keep``: (B, L) bool, True for every token that stays (text always stays).
    - ``extra``: (B, M, D) hidden states to insert, or None; ``extra_image``: (B, M) long, the image each
      extra token belongs to (-1 = an unused padding entry). Each image's extra tokens are inserted, in
      order, right after its last visual token, with the position of that token (or renumbered).
    """

    keep: torch.Tensor
    extra: torch.Tensor | None = None
    extra_image: torch.Tensor | None = None


def keep_counts(n: int, vanilla: int, step: LLMStep) -> tuple[int, int]:
    """The default plan of a step: of ``n`` visual tokens of an image, keep ``budget.keep(n)``, add none.

    (``vanilla``: the image's token count in the unmodified model; methods with schedules scale by it.)
    """
    if step.budget is None:
        return n, n
    kept = step.budget.keep(n)
    return kept, kept


@dataclass
class LLMStep:
    """One pruning point inside the LLM: before decoder layer ``layer``, ``fn(LLMTokens, **knobs)`` runs.

    ``counts(n, vanilla, step) -> (kept, after)``: of ``n`` visual tokens an image has when it reaches this
    step (``vanilla`` in the unmodified model), how many the method keeps and how many it has afterwards
    (kept + inserted). A module-level function,
    so compressed models stay picklable. ``positions``: "keep" (tokens keep their positions, gaps remain),
    "renumber" (positions made contiguous after the step, as SparseVLM 1.0 does; 1-D RoPE LLMs only) or
    "auto" (renumber where the LLM has 1-D positions, keep on multi-axis M-RoPE such as Qwen2-VL). ``group``: steps of
    one method share ``LLMTokens.scratch`` within a prefill.
    """

    layer: int
    fn: Callable[..., Any]
    knobs: dict[str, Any]
    budget: Budget | None = None
    counts: Callable[[int, int, LLMStep], tuple[int, int]] = keep_counts
    positions: str = "keep"
    group: str = ""
    needs: frozenset[str] = field(default_factory=frozenset)
    min_layer: int = 1  # 0 for steps that score with their own layer (LLMTokens.logits), not the previous one
    note: str = ""  # said by ``vlmzip.plan`` (e.g. the method's default layers were scaled to a shallow LLM)

    def plan(self, n: int, vanilla: int, image: str = "an image") -> tuple[int, int]:
        """(kept, after) for an image reaching this step with ``n`` tokens (clear error if impossible)."""
        try:
            return self.counts(n, vanilla, self)
        except ValueError as err:
            raise ValueError(f"{self.group or 'in-LLM step'}: {err} ({image})") from None


@dataclass(frozen=True)
class Knob:
    """One tunable parameter of a method: its name, type, default (None = required or derived) and help."""

    name: str
    type: type
    default: Any
    help: str


BUDGET_KNOBS = (
    Knob("tokens", int, None, "visual tokens per image (or video) sent to the LLM (summed over its crops or frames)"),
    Knob("ratio", float, None, "or: that share of each image's vanilla token count (1.0 keeps all)"),
)
# Pre-LLM methods only: in-LLM methods rank all of a video's tokens together anyway.
VIDEO_KNOBS = (
    Knob("tokens_per_frame", int, None, "or: that many tokens per video frame (an image counts as one frame)"),
    Knob("scope", str, "frame", "a video's budget: 'frame' (even share per frame) or 'video' (across its frames)"),
)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    - ``stage``: "vision" (the vision tower's output), "projector" (the projector's output) or "llm"
      (inside the LLM, before decoder layer ``layer``).
    - ``resolve(knobs) -> dict``: validates the user's knobs (budget knobs already popped into a
      :class:`Budget`) and returns the knob dict ``fn`` is called with (``layer`` for stage "llm");
      raises ``ValueError`` naming the problem and the fix.
    - ``fn``: the pure algorithm. Pre-LLM: ``fn(tokens: VisionTokens, keep: int, **resolved) -> Selection``
      with ``keep`` output tokens per unit. In-LLM: ``fn(tokens: LLMTokens, **resolved) -> (B, L) bool``
      (True = the token stays; text tokens always stay; per row and image exactly ``keep`` visual tokens).
    - ``needs``: the signals (see ``SIGNALS``) the adapter must compute for a pre-LLM ``fn``.
    - ``budget(resolved)``: a budget fixed by the method's own knobs (VisionZip's dominant + contextual),
      an alternative to ``tokens`` / ``ratio``; None when those knobs do not fix one.
    - ``default_budget``: the budget when the user gives none (FastV: the paper's ratio 0.5); None = required.
    - ``steps(resolved, budget, num_layers) -> list[LLMStep]``: for in-LLM methods that act at several
      layers or add tokens (SparseVLM); None = one step before layer ``resolved["layer"]`` keeping the budget.
    """

    name: str
    description: str
    knobs: tuple[Knob, ...]
    fn: Callable[..., Any]
    stage: str = "vision"
    resolve: Callable[[dict[str, Any]], dict[str, Any]] = lambda knobs: knobs
    needs: frozenset[str] = field(default_factory=frozenset)
    budget: Callable[[dict[str, Any]], Budget | None] = lambda resolved: None
    default_budget: Budget | None = None
    takes_budget: bool = True
    steps: Callable[[dict[str, Any], Budget | None, int], list[LLMStep]] | None = None

    def llm_steps(self, resolved: dict[str, Any], budget: Budget | None, num_layers: int) -> list[LLMStep]:
        """The in-LLM steps of this method with these knobs, for an LLM of ``num_layers`` decoder layers."""
        if self.steps is not None:
            return self.steps(resolved, budget, num_layers)
        knobs = {k: v for k, v in resolved.items() if k != "layer"}
        return [LLMStep(layer=resolved["layer"], fn=self.fn, knobs=knobs, budget=budget, group=self.name,
                        needs=self.needs)]

    def all_knobs(self) -> tuple[Knob, ...]:
        """The method's knobs with the shared budget knobs first."""
        if not self.takes_budget:
            return self.knobs
        return BUDGET_KNOBS + (VIDEO_KNOBS if self.stage != "llm" else ()) + self.knobs


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (one call per method file). Names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.stage not in STAGES:
        raise ValueError(f"method {spec.name!r} has unknown stage {spec.stage!r}; stages: {STAGES}")
    unknown = spec.needs - SIGNALS
    if unknown:
        raise ValueError(f"method {spec.name!r} needs unknown signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; a clear error lists the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown method {name!r}; registered methods: {known} (see `vlmzip list`)") from None


def registered() -> dict[str, MethodSpec]:
    """All registered methods by name (a copy)."""
    return dict(_REGISTRY)


def check_knobs(spec: MethodSpec, knobs: dict[str, Any]) -> None:
    """Raise a clear error for a knob the method does not have."""
    names = {k.name for k in spec.all_knobs()}
    for key in knobs:
        if key in {k.name for k in VIDEO_KNOBS} and spec.takes_budget and spec.stage == "llm":
            raise ValueError(
                f"{spec.name} acts inside the LLM, where it already ranks all of a video's tokens together: pass "
                "tokens=N (per video) or ratio=r; tokens_per_frame and scope apply to methods before the LLM"
            )
        if key not in names:
            allowed = ", ".join(sorted(names)) or "none"
            raise ValueError(f"method {spec.name!r} has no knob {key!r}; its knobs are: {allowed}")


def gather_tokens(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D) gathered at (B, K) indices -> (B, K, D)."""
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def true_positions(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` non-zero entries of each row of ``flags`` (..., N), ascending.

    A stable sort instead of boolean indexing: no device-to-host sync, so GPU work stays queued.
    """
    return flags.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :count]


def to_device(t: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    """A small host tensor (or list of ints) on ``device`` without stalling the host on queued GPU work."""
    t = torch.as_tensor(t)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
