"""Video budgets: tokens per video split evenly over frames, tokens_per_frame, scope=video (frames joined into one
unit), and the clear errors around them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vlmzip
from vlmzip.budgets import Budget, parse_budget, parse_scope, split_frames
from vlmzip.methods import get_method, registered
from vlmzip.methods.base import TokenLayout, VisionTokens


def test_tokens_per_frame_budget() -> None:
    budget = parse_budget({"tokens_per_frame": 17})
    assert budget == Budget(per_frame=17, label="tokens_per_frame")
    assert budget.keep(2048, "a video", frames=8) == 136  # Video-LLaVA: 8 x 256 -> 8 x 17
    assert budget.keep(256) == 17  # an image is one frame
    with pytest.raises(ValueError, match="tokens_per_frame=300 is larger than the 256 visual tokens per frame"):
        parse_budget({"tokens_per_frame": 300}).keep(2048, "video 0", frames=8)
    with pytest.raises(ValueError, match="not both"):
        parse_budget({"tokens": 136, "tokens_per_frame": 17})
    with pytest.raises(ValueError, match="tokens_per_frame must be >= 1"):
        parse_budget({"tokens_per_frame": 0})


def test_scope_knob() -> None:
    assert parse_scope({}) == "frame"
    assert parse_scope({"scope": "video"}) == "video"
    with pytest.raises(ValueError, match="scope must be 'frame'"):
        parse_scope({"scope": "clip"})


def test_split_frames() -> None:
    assert split_frames(136, 8) == [17] * 8
    assert split_frames(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="cannot be split over the 8 frames"):
        split_frames(5, 8)


@settings(max_examples=40, deadline=None)
@given(keep=st.integers(1, 4096), frames=st.integers(1, 128))
def test_split_frames_sums_and_is_even(keep: int, frames: int) -> None:
    if keep < frames:
        with pytest.raises(ValueError):
            split_frames(keep, frames)
        return
    parts = split_frames(keep, frames)
    assert sum(parts) == keep and len(parts) == frames and max(parts) - min(parts) <= 1 and min(parts) >= 1


@settings(max_examples=30, deadline=None)
@given(videos=st.integers(1, 3), frames=st.integers(1, 5), rows=st.integers(1, 3), cols=st.integers(1, 3),
       prefix=st.integers(0, 1), seed=st.integers(0, 1000))
def test_joined_frames_layout(videos: int, frames: int, rows: int, cols: int, prefix: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    units = videos * frames
    tokens = VisionTokens(
        hidden=torch.randn(units, prefix + n, 4, generator=g), layout=TokenLayout(prefix, (rows, cols), False),
        keys=torch.randn(units, prefix + n, 2, generator=g),
        cls_attention=torch.rand(units, prefix + n, generator=g) if prefix else None,
        received_attention=None if prefix else torch.rand(units, n, generator=g),
        seeds=torch.arange(units),
    )
    joined = tokens.joined(frames)
    assert joined.hidden.shape == (videos, frames * n, 4)
    assert joined.layout == TokenLayout(0, (frames * rows, cols), False)
    score = tokens.cls_attention if prefix else tokens.received_attention
    for v in range(videos):
        for f in range(frames):
            for i in range(n):
                assert torch.equal(joined.hidden[v, f * n + i], tokens.hidden[v * frames + f, prefix + i])
                assert torch.equal(joined.keys[v, f * n + i], tokens.keys[v * frames + f, prefix + i])
                assert joined.received_attention[v, f * n + i] == score[v * frames + f, prefix + i]


@pytest.mark.parametrize("name", sorted(n for n, s in registered().items() if s.stage != "llm" and s.takes_budget))
def test_every_pre_llm_method_runs_on_joined_frames(name: str) -> None:
    """Every pre-LLM method chooses exactly the budget, unique in-range indices, across a joined video."""
    g = torch.Generator().manual_seed(0)
    frames, n = 4, 16
    tokens = VisionTokens(
        hidden=torch.randn(2 * frames, 1 + n, 8, generator=g), layout=TokenLayout(1, (4, 4), False),
        keys=torch.randn(2 * frames, 1 + n, 4, generator=g), cls_attention=torch.rand(2 * frames, 1 + n, generator=g),
        seeds=torch.arange(2 * frames),
    )
    joined = tokens.joined(frames)
    spec = get_method(name)
    selection = spec.fn(joined, 24, **spec.resolve({}))
    assert selection.features.shape == (2, 24, 8)
    for row in selection.indices:
        assert len(set(row.tolist())) == 24 and 0 <= int(row.min()) and int(row.max()) < frames * n


def test_joined_refuses_sent_prefix() -> None:
    tokens = VisionTokens(hidden=torch.randn(2, 5, 3), layout=TokenLayout(1, (2, 2), True))
    with pytest.raises(ValueError, match="scope=video needs frames whose prefix"):
        tokens.joined(2)


def test_video_knobs_on_models(model) -> None:
    """tokens_per_frame on an image model keeps that many per image; in-LLM methods refuse the video knobs."""
    plan = vlmzip.plan(model, "visionzip", tokens_per_frame=16)
    assert plan.tokens == 16
    assert vlmzip.plan(model, "visionzip", tokens=16, scope="video").tokens == 16
    with pytest.raises(ValueError, match="already ranks all of a video's tokens together"):
        vlmzip.plan(model, "fastv", tokens_per_frame=16)
    with pytest.raises(ValueError, match="already ranks all of a video's tokens together"):
        vlmzip.plan(model, "fastv", tokens=16, scope="video")
    with pytest.raises(ValueError, match="scope must be"):
        vlmzip.plan(model, "random", tokens=16, scope="all")
