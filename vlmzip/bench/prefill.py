"""Prefill benchmark: forward (vision + compression + LLM prefill) and time to first token through
``generate``, vanilla vs each method x budget, interleaved in one run, medians, ratios to vanilla;
plus the ideal speedup from counting the LLM's multiply-adds at the real shapes."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..api import compressed, plan
from .timing import interleaved, timed


def llm_prefill_macs(seq_len: int, text_config: Any) -> float:
    """Multiply-adds of a Llama-style decoder prefill over ``seq_len`` tokens (one sequence).

    Per layer: q/o projections 2*n*d^2, k/v projections 2*n*d*d_kv, scores and weighted sum 2*n^2*d,
    gated MLP 3*n*d*m. (VisionZip's formula T*(4nd^2 + 2n^2d + 2ndm) is the same with d_kv = d and a
    2-matrix MLP.)
    """
    n, d = seq_len, text_config.hidden_size
    heads = text_config.num_attention_heads
    d_kv = d * getattr(text_config, "num_key_value_heads", heads) // heads
    m = text_config.intermediate_size
    per_layer = 2 * n * d * d + 2 * n * d * d_kv + 2 * n * n * d + 3 * n * d * m
    return float(text_config.num_hidden_layers * per_layer)


@dataclass
class BenchRow:
    """Medians for one (method, budget, batch size) against vanilla timed in the same rounds."""

    method: str
    tokens: int
    batch_size: int
    forward_ratio: float  # vanilla / method, model(...) (vision + compression + prefill)
    ttft_ratio: float  # vanilla / method, generate(max_new_tokens=1)
    ideal: float  # LLM prefill MACs vanilla / method
    vanilla_forward_ms: float
    method_forward_ms: float


@torch.no_grad()
def bench_prefill(
    model: nn.Module,
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    runs: list[tuple[str, dict[str, Any]]],
    batch_sizes: list[int],
    repeats: int = 10,
) -> list[BenchRow]:
    """Time every (method, knobs) at every batch size, each round interleaving vanilla and method.

    ``make_inputs(batch_size)`` returns processor outputs on the model's device. One warm-up round
    is discarded.
    """
    device = next(model.parameters()).device
    rows = []
    for batch_size in batch_sizes:
        inputs = make_inputs(batch_size)
        prompt_len = inputs["input_ids"].shape[1]

        def forward(inputs: dict[str, torch.Tensor] = inputs) -> Any:
            return model(**inputs)

        def ttft(inputs: dict[str, torch.Tensor] = inputs) -> Any:
            return model.generate(**inputs, max_new_tokens=1, do_sample=False)

        measures = {"forward": partial(timed, forward, device), "ttft": partial(timed, ttft, device)}
        for method, knobs in runs:
            planned = plan(model, method, **knobs)
            adapter, budget = planned.adapter, planned.tokens
            vanilla, squeezed = interleaved(measures, partial(compressed, model, method, **knobs), repeats)
            v = {name: statistics.median(seconds) for name, seconds in vanilla.items()}
            m = {name: statistics.median(seconds) for name, seconds in squeezed.items()}
            per_image = planned.vanilla_tokens
            n_images = int((inputs["input_ids"][0] == adapter.image_token_id).sum()) // per_image
            kept_len = prompt_len - n_images * (per_image - budget)
            text_cfg = model.config.text_config
            rows.append(
                BenchRow(
                    method=method, tokens=budget, batch_size=batch_size,
                    forward_ratio=v["forward"] / m["forward"], ttft_ratio=v["ttft"] / m["ttft"],
                    ideal=llm_prefill_macs(prompt_len, text_cfg) / llm_prefill_macs(kept_len, text_cfg),
                    vanilla_forward_ms=1e3 * v["forward"], method_forward_ms=1e3 * m["forward"],
                )
            )
    return rows


def format_rows(rows: list[BenchRow], vanilla_tokens: int, repeats: int, device: str) -> str:
    """A markdown table of the rows (ratios are vanilla / method: > 1 is faster)."""
    lines = [
        f"Device: {device}; medians of {repeats} interleaved rounds; ratios = vanilla / method (> 1 is faster).",
        "forward: model(**inputs) = vision tower + compression + LLM prefill; "
        "TTFT: generate(max_new_tokens=1); ideal: LLM prefill multiply-adds vanilla / method.",
        "",
        "| batch | method | visual tokens | forward speedup | TTFT speedup | ideal (LLM MACs) | achieved / ideal "
        "| vanilla forward ms | method forward ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.batch_size} | {r.method} | {vanilla_tokens} -> {r.tokens} | {r.forward_ratio:.2f}x | "
            f"{r.ttft_ratio:.2f}x | {r.ideal:.2f}x | {r.forward_ratio / r.ideal:.2f} | "
            f"{r.vanilla_forward_ms:.1f} | {r.method_forward_ms:.1f} |"
        )
    return "\n".join(lines) + "\n"
