"""Time to first token (vision tower + compression + LLM prefill + one decode step), vanilla vs compressed.

Vanilla and compressed runs are interleaved on the same model object, so drift on a shared machine
hits both alike; the ratio of medians is the number to report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    vanilla: list[float] = []
    squeezed: list[float] = []
    for i in range(repeats + 1):
        t_vanilla = time_to_first_token(model, inputs)
        with compressed(model, method, **knobs):
            t_compressed = time_to_first_token(model, inputs)
        if i:  # the first round is the warm-up
            vanilla.append(t_vanilla)
            squeezed.append(t_compressed)
    return TTFTComparison(vanilla_s=vanilla, compressed_s=squeezed)
