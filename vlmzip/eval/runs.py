"""What an evaluation runs: its configuration (``EvalConfig``) and its columns (``Run``: a method at a budget).

Vanilla (the unmodified model) is the first column of every evaluation, the reference of every method and
budget. ``plan_runs`` validates every method and budget against the loaded model before any work, and
``budgets`` resolves the budgets of a configuration without writing them back into it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..api import PAPER_BUDGETS, paper_budget, plan
from ..compose import fixed_budget, is_composition, last_stage
from ..compose import parse as parse_composition
from ..knobs import split_knobs
from ..methods import get_method

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


def check_config(cfg: EvalConfig) -> None:
    """Refuse settings no evaluation can run with, before anything is loaded."""
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.turn2_from_scratch and not cfg.multi_turn:
        raise ValueError("--turn2-from-scratch is a --multi-turn option; add --multi-turn")


def budgets(model: nn.Module, tokens: list[int] | None) -> list[int]:
    """The budgets to sweep: ``tokens`` as given, or by default the papers' 192/128/64 of 576 scaled to the
    model (``paper_budget``). A new list: the configuration they come from is left as it is."""
    if tokens is None:
        return [paper_budget(model, t) for t in PAPER_BUDGETS]
    return list(tokens)


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


def plan_runs(model: nn.Module, methods: list[str], tokens: list[int]) -> list[Run]:
    """Vanilla first, then every method at every budget; validates all of them before any work.

    A method that takes a budget is swept over ``tokens`` (a composition: its last stage, unless that
    fixed its own with ``@N``); one without is run once with defaults. Each run carries the visual tokens
    the LLM receives, ends with and averages over its layers, so budgets compare fairly.
    """
    vanilla_tokens = plan(model, VANILLA).tokens
    runs = [Run(VANILLA, VANILLA, {}, vanilla_tokens, budget=vanilla_tokens, sent_tokens=vanilla_tokens)]
    for entry in methods:
        name, extra = split_knobs(entry)  # "cluster_saliency[variant=2]": knobs of every run of this entry
        if name == VANILLA:
            if extra:
                raise ValueError(f"{entry!r}: vanilla takes no knobs")
            continue
        runs.extend(_entry_runs(model, entry, name, extra, tokens))
    return runs


def _entry_runs(model: nn.Module, entry: str, name: str, extra: dict[str, Any], tokens: list[int]) -> list[Run]:
    """The runs of one ``--methods`` entry (``name`` with the knobs ``extra`` given in brackets)."""
    spec = get_method(last_stage(name))
    swept = spec.takes_budget and not fixed_budget(name) and not {"tokens", "ratio"} & set(extra)
    sweep = [{"tokens": t} for t in tokens] if swept else [{}]
    reach = _sent_before_last(model, name)
    runs = []
    for budget in sweep:
        if reach is not None and budget.get("tokens", 0) > reach:
            warnings.warn(f"{entry}: skipping budget {budget['tokens']}, more than the {reach} visual tokens "
                          "its earlier stage sends", stacklevel=3)
            continue
        knobs = {**extra, **budget}
        planned = plan(model, name, **knobs)
        key = f"{entry}@{budget['tokens']}" if budget else entry
        avg = planned.layer_avg_tokens if has_llm_stage(name) else None
        nominal = knobs.get("tokens", planned.final_tokens)
        final, sent = planned.final_tokens, planned.tokens
        if final is None and "tokens" in knobs and not has_llm_stage(name):
            final = sent = knobs["tokens"]  # images with their own counts: each still sends exactly its budget
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
