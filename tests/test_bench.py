"""The shared interleaved timing loop (vlmzip.bench.interleaved) and the prefill benchmark built on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from conftest import random_image

import vlmzip
from vlmzip.bench import bench_prefill, compare_ttft, interleaved
from vlmzip.io import batch_inputs


def test_interleaved_alternates_sides_and_drops_the_warm_up_round() -> None:
    calls: list[str] = []
    state = {"side": "vanilla", "round": 0}

    @contextlib.contextmanager
    def compress() -> Iterator[None]:
        calls.append("enter")
        state["side"] = "compressed"
        yield
        state["side"] = "vanilla"
        state["round"] += 1

    def measure(name: str) -> float:
        calls.append(f"{state['side']}:{name}")
        return 10.0 * state["round"] + (1.0 if name == "b" else 0.0) + (0.5 if state["side"] == "compressed" else 0.0)

    vanilla, squeezed = interleaved({"a": lambda: measure("a"), "b": lambda: measure("b")}, compress, repeats=2)
    round_ = ["vanilla:a", "vanilla:b", "enter", "compressed:a", "compressed:b"]
    assert calls == round_ * 3  # the warm-up round, then 2 timed rounds; a fresh context each round
    assert vanilla == {"a": [10.0, 20.0], "b": [11.0, 21.0]}
    assert squeezed == {"a": [10.5, 20.5], "b": [11.5, 21.5]}
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved({"a": lambda: 0.0}, contextlib.nullcontext, repeats=0)


def test_bench_prefill_and_compare_ttft_time_both_sides(model, processor) -> None:
    image = random_image(3)

    def make_inputs(batch_size: int) -> dict:
        return batch_inputs(processor, [image] * batch_size, ["what color ?"] * batch_size, model)

    (row,) = bench_prefill(model, make_inputs, [("visionzip", {"tokens": 16})], [2], repeats=1)
    assert (row.method, row.tokens, row.batch_size) == ("visionzip", 16, 2)
    assert row.forward_ratio > 0 and row.ttft_ratio > 0 and row.ideal > 1
    assert row.vanilla_forward_ms > 0 and row.method_forward_ms > 0
    timing = compare_ttft(model, make_inputs(1), "visionzip", {"tokens": 16}, repeats=2)
    assert len(timing.vanilla_s) == len(timing.compressed_s) == 2 and timing.speedup > 0
    assert not vlmzip.is_compressed(model)  # every round's context was left
