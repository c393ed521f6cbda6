"""What an evaluation runs: its configuration (``EvalConfig``) and its columns (``Run``: a method at a budget).

Vanilla (the unmodified model) is the first column of every evaluation, the reference of every method and
budget. ``plan_runs`` validates every method and budget against the loaded model before any work, and
``budgets`` resolves the budgets of a configuration without writing them back into it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..api import PAPER_BUDGETS, paper_budget, plan
from ..compose import fixed_budget, is_composition, last_stage
from ..compose import parse as parse_composition
from ..io import takes_videos
from ..knobs import split_knobs
from ..methods import get_method
from ..video import frame_knobs

VANILLA = "vanilla"


@dataclass
class EvalConfig:
    """Everything that defines an evaluation (what ``vlmzip eval`` takes)."""

    data: str
    out: str
    model: str | None = None
    methods: list[str] = field(default_factory=lambda: [VANILLA, "visionzip"])
    tokens: list[int] | None = None  # None: the papers' 192/128/64 of 576, scaled to the model (paper_budget)
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 8
    match: str = "exact"
    device: str = "cpu"
    dtype: str = "float32"
    multi_turn: bool = False  # two-turn conversations on one KV cache (vlmzip.eval.multiturn)
    turn2_from_scratch: bool = False  # multi-turn control: turn 2 recomputed from its full prompt and the image
    frames: int | None = None  # frames sampled per video (None: the dataset's default, vlmzip.eval.data)
    tokens_per_frame: list[int] | None = None  # per-frame budgets of videos, swept beside ``tokens``


def check_config(cfg: EvalConfig) -> None:
    """Refuse settings no evaluation can run with, before anything is loaded."""
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.turn2_from_scratch and not cfg.multi_turn:
        raise ValueError("--turn2-from-scratch is a --multi-turn option; add --multi-turn")
    if cfg.frames is not None and (isinstance(cfg.frames, bool) or not isinstance(cfg.frames, int) or cfg.frames < 1):
        raise ValueError(f"--frames must be a whole number >= 1, got {cfg.frames!r}")
    for value in cfg.tokens_per_frame or []:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--tokens-per-frame values must be whole numbers >= 1, got {value!r}")


def budgets(model: nn.Module, tokens: list[int] | None, tokens_per_frame: list[int] | None = None,
            videos: bool = False) -> tuple[list[int], list[int]]:
    """The budgets to sweep, (``tokens``, ``tokens_per_frame``): as given, or by default the papers' 192/128/64 of
    576 scaled to the model (``paper_budget``): as ``tokens`` per image, or for a dataset of ``videos`` as tokens
    per frame (each frame budgeted as an image). New lists: the configuration is left as it is."""
    if tokens is None and tokens_per_frame is None:
        papers = [paper_budget(model, t) for t in PAPER_BUDGETS]
        return ([], papers) if videos else (papers, [])
    return list(tokens or []), list(tokens_per_frame or [])


@dataclass
class Run:
    """One column of results: a method (or a composition such as ``visionzip@128+fastv``) at one budget.

    ``budget`` is the nominal budget (the ``tokens`` the run was given; None for a method without one),
    ``sent_tokens`` what the LLM receives per image, ``tokens`` what it ends with, ``layer_avg_tokens`` the
    mean over its decoder layers (for in-LLM stages the three differ; ``vlmzip.plan`` computes them). On a model
    whose images each have their own count, the counts the budget does not fix are None.
    """

    key: str
    method: str
    knobs: dict[str, Any]
    tokens: int | None  # visual tokens per image the LLM ends with (None: each image its own, LLaVA-NeXT, Qwen-VL)
    layer_avg_tokens: float | None = None  # in-LLM methods: visual tokens per image averaged over decoder layers
    budget: int | None = None
    sent_tokens: int | None = None
    notes: list[str] = field(default_factory=list)  # what vlmzip.plan says about the method on this model


def has_llm_stage(method: str) -> bool:
    """True for a method, or a composition, with a stage inside the LLM (tokens change across its layers)."""
    names = [name for name, _ in parse_composition(method)] if is_composition(method) else [method]
    return any(get_method(name).stage == "llm" for name in names)


def plan_runs(model: nn.Module, methods: list[str], tokens: list[int], tokens_per_frame: Sequence[int] = (),
              video_frames: int | None = None) -> list[Run]:
    """Vanilla first, then every method at every budget; validates all of them before any work.

    A method that takes a budget is swept over ``tokens`` and then ``tokens_per_frame`` (a composition: its last
    stage, unless that fixed its own with ``@N``); one without is run once with defaults. Each run carries the
    visual tokens the LLM receives, ends with and averages over its layers, so budgets compare fairly.

    ``video_frames``: every question is about a video of that many frames. On a model that takes videos as
    images (``vlmzip.io.takes_videos`` False), each run is then planned with its per-frame knobs
    (``vlmzip.video.frame_knobs``) and its counts are per video (the frames' counts summed); the run keeps the
    knobs as given (a video's ``tokens``, ``tokens_per_frame``), which the evaluation turns into per-frame knobs.
    """
    per_frame = video_frames if video_frames is not None and not takes_videos(model) else None
    scale = per_frame or 1
    vanilla_tokens = plan(model, VANILLA).tokens
    if vanilla_tokens is not None:
        vanilla_tokens *= scale
    runs = [Run(VANILLA, VANILLA, {}, vanilla_tokens, budget=vanilla_tokens, sent_tokens=vanilla_tokens)]
    for entry in methods:
        name, extra = split_knobs(entry)  # "cluster_saliency[variant=2]": knobs of every run of this entry
        if name == VANILLA:
            if extra:
                raise ValueError(f"{entry!r}: vanilla takes no knobs")
            continue
        runs.extend(_entry_runs(model, entry, name, extra, tokens, tokens_per_frame, per_frame))
    return runs


def _entry_runs(model: nn.Module, entry: str, name: str, extra: dict[str, Any], tokens: list[int],
                tokens_per_frame: Sequence[int] = (), per_frame: int | None = None) -> list[Run]:
    """The runs of one ``--methods`` entry (``name`` with the knobs ``extra`` given in brackets); ``per_frame``:
    the frames of the videos asked about, when they reach the model as images."""
    spec = get_method(last_stage(name))
    swept = spec.takes_budget and not fixed_budget(name) and not {"tokens", "ratio", "tokens_per_frame"} & set(extra)
    sweep = [{"tokens": t} for t in tokens] + [{"tokens_per_frame": t} for t in tokens_per_frame]
    sweep = sweep if swept else [{}]
    reach = _sent_before_last(model, name)
    scale = per_frame or 1
    runs = []
    for budget in sweep:
        knobs = {**extra, **budget}
        planned_knobs = frame_knobs(knobs, per_frame) if per_frame else knobs
        if "tokens_per_frame" in planned_knobs:  # an image is one frame
            planned_knobs = frame_knobs(planned_knobs, 1)
        if reach is not None and planned_knobs.get("tokens", 0) > reach:
            spelled = budget.get("tokens", budget.get("tokens_per_frame"))
            warnings.warn(f"{entry}: skipping budget {spelled}, more than the {reach} visual tokens "
                          "its earlier stage sends", stacklevel=3)
            continue
        planned = plan(model, name, **planned_knobs)
        if "tokens_per_frame" in budget:
            key = f"{entry}@{budget['tokens_per_frame']}pf"
        else:
            key = f"{entry}@{budget['tokens']}" if budget else entry
        avg = planned.layer_avg_tokens if has_llm_stage(name) else None
        final, sent = planned.final_tokens, planned.tokens
        if final is None and "tokens" in planned_knobs and not has_llm_stage(name):
            final = sent = planned_knobs["tokens"]  # images with their own counts: each still sends exactly its budget
        final, sent = (None if n is None else n * scale for n in (final, sent))
        avg = None if avg is None else avg * scale
        nominal = knobs.get("tokens", final)
        runs.append(Run(key, name, knobs, final, avg, nominal, sent, list(planned.notes)))
    return runs


def _sent_before_last(model: nn.Module, method: str) -> int | None:
    """For a composition whose last stage takes the run's budget: the visual tokens its earlier stages
    leave per image (budgets above it are skipped); None otherwise."""
    if not is_composition(method) or fixed_budget(method):
        return None
    earlier = method.rsplit("+", 1)[0]
    return plan(model, earlier).final_tokens if "+" in method else None


def merge_runs(previous: list[Run], current: list[Run]) -> list[Run]:
    """Vanilla first, then the earlier columns in their order, then the new ones."""
    now = {run.key: run for run in current}
    merged = {current[0].key: current[0]}  # vanilla
    for run in [*previous, *current[1:]]:
        merged.setdefault(run.key, now.get(run.key, run))
    return list(merged.values())
