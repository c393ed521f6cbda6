"""Time to first token (vision tower + compression + LLM prefill + one decode step), vanilla vs compressed,
and ``interleaved``: the one timing loop of every vanilla-vs-compressed measurement.

Vanilla and compressed runs are interleaved on the same model object, so drift on a shared machine
hits both alike; the ratio of medians is the number to report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..api import compressed


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the GPU synchronised before and after on a CUDA device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved(
    measures: dict[str, Callable[[], float]],
    compress: Callable[[], AbstractContextManager[Any]],
    repeats: int,
    on_round: Callable[[int], Any] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every measure (a function returning seconds) on the vanilla model and compressed, round by round.

    Each of ``repeats + 1`` rounds calls the measures in order on the vanilla model, then again inside
    ``compress()``, a fresh context per round (e.g. ``partial(vlmzip.compressed, model, method, **knobs)``).
    The first round warms both sides up and is discarded. Returns ``(vanilla, compressed)``: per measure
    name, ``repeats`` seconds each. ``on_round(1)`` is called after each round (a progress bar's update).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    vanilla: dict[str, list[float]] = {name: [] for name in measures}
    squeezed: dict[str, list[float]] = {name: [] for name in measures}
    for i in range(repeats + 1):
        plain = {name: measure() for name, measure in measures.items()}
        with compress():
            small = {name: measure() for name, measure in measures.items()}
        if i:  # the first round is the warm-up
            for name in measures:
                vanilla[name].append(plain[name])
                squeezed[name].append(small[name])
        if on_round is not None:
            on_round(1)
    return vanilla, squeezed


@torch.no_grad()
def time_to_first_token(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Seconds for ``model.generate(**inputs, max_new_tokens=1)`` (greedy), synchronised on GPU."""
    device = next(model.parameters()).device
    return timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), device)


@dataclass
class TTFTComparison:
    """Median time to first token of vanilla and compressed runs, and their ratio."""

    vanilla_s: list[float]
    compressed_s: list[float]

    @property
    def vanilla_median(self) -> float:
        return statistics.median(self.vanilla_s)

    @property
    def compressed_median(self) -> float:
        return statistics.median(self.compressed_s)

    @property
    def speedup(self) -> float:
        """vanilla / compressed (> 1 means the compressed model is faster)."""
        return self.vanilla_median / self.compressed_median


def compare_ttft(
    model: nn.Module, inputs: dict[str, torch.Tensor], method: str, knobs: dict[str, Any], repeats: int = 5
) -> TTFTComparison:
    """Interleave ``repeats`` vanilla and compressed TTFT measurements (after one warm-up of each)."""
    measures = {"ttft": partial(time_to_first_token, model, inputs)}
    vanilla, squeezed = interleaved(measures, partial(compressed, model, method, **knobs), repeats)
    return TTFTComparison(vanilla_s=vanilla["ttft"], compressed_s=squeezed["ttft"])
