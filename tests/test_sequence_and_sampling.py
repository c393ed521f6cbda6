"""Invariants of placeholder-run shrinking and of the sampling baselines (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmzip.methods.base import TokenLayout, VisionTokens
from vlmzip.methods.sampling import random_sample, spatial_sample
from vlmzip.sequence import Item, image_spans, shrink, shrink_positions

IMG, VID, TAG = 9, 8, 21


def single_runs(counts: list[int], kept: list[int]) -> tuple[list[Item], list[tuple[int, ...]]]:
    """Images of one placeholder run each (LLaVA's layout)."""
    return [Item(IMG, (n,)) for n in counts], [(k,) for k in kept]


@st.composite
def batches(draw):
    """Rows of text tokens with 0-2 images each (each image its own placeholder count), left padded."""
    rows, counts = [], []
    for _ in range(draw(st.integers(1, 4))):
        row = []
        for _ in range(draw(st.integers(0, 2))):
            n = draw(st.integers(1, 12))
            counts.append(n)
            row += draw(st.lists(st.integers(10, 20), min_size=1, max_size=4)) + [IMG] * n
        row += draw(st.lists(st.integers(10, 20), min_size=1, max_size=4))
        rows.append(row)
    kept = [draw(st.integers(1, n)) for n in counts]
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, counts, kept


@settings(max_examples=80, deadline=None)
@given(batches())
def test_shrink_keeps_text_and_each_images_kept_count(batch):
    ids, mask, counts, kept = batch
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    spans = image_spans(ids, *single_runs(counts, kept))
    assert [s.vanilla for s in spans] == counts and [s.kept for s in spans] == kept
    out = shrink(ids, spans, "left", attention_mask=mask, labels=ids.clone())
    new_positions = shrink_positions(positions, out.columns)
    image = 0
    for b in range(ids.shape[0]):
        before = ids[b][mask[b] == 1]
        after = out.input_ids[b][out.attention_mask[b] == 1]
        assert before[before != IMG].tolist() == after[after != IMG].tolist(), "text tokens kept, in order"
        row_images = [s for s in spans if s.row == b]
        assert [s.image for s in row_images] == list(range(image, image + len(row_images)))
        image += len(row_images)
        assert int((after == IMG).sum()) == sum(s.kept for s in row_images)
        assert out.attention_mask[b, -1] == 1, "still left padded"
        valid = new_positions[b][out.attention_mask[b] == 1]
        assert valid.tolist() == list(range(valid.numel())), "positions contiguous from 0"
        assert torch.equal(out.labels[b][out.attention_mask[b] == 1], after)
        real = out.columns[b][out.columns[b] >= 0]
        assert (real[1:] > real[:-1]).all(), "columns in order"


def test_shrink_that_adds_padding_without_a_mask_makes_one():
    ids = torch.tensor([[5, IMG, IMG, IMG, 6], [5, 6, 7, 8, 8]])
    out = shrink(ids, image_spans(ids, *single_runs([3], [1])), "left")
    assert out.input_ids.tolist() == [[0, 0, 5, IMG, 6], [5, 6, 7, 8, 8]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_runs_that_do_not_match_the_images_are_rejected():
    ids = torch.tensor([[5, IMG, IMG, IMG, 6]])
    with pytest.raises(ValueError, match="run of 3 image placeholders that does not match the images' token counts"):
        image_spans(ids, *single_runs([4], [2]))
    with pytest.raises(ValueError, match="placeholders for 1 image.* but 2 were passed"):
        image_spans(ids, *single_runs([3, 3], [1, 1]))


@st.composite
def tiled_batches(draw):
    """Rows with 0-2 items each: images made of 1-3 runs (tiles) with a text tag before every run, and videos
    of 1-3 frame runs with their own placeholder token; the kept count of every run drawn below its count."""
    rows, items, kept = [], [], []
    for _ in range(draw(st.integers(1, 3))):
        row = draw(st.lists(st.integers(10, 20), min_size=1, max_size=3))
        for _ in range(draw(st.integers(0, 2))):
            token = draw(st.sampled_from([IMG, VID]))
            runs = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
            items.append(Item(token, tuple(runs), frames=len(runs) if token == VID else 1))
            kept.append(tuple(draw(st.integers(1, n)) for n in runs))
            for n in runs:
                row += [TAG] + [token] * n
            row += draw(st.lists(st.integers(10, 20), min_size=1, max_size=3))
        rows.append(row)
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, items, kept


@settings(max_examples=80, deadline=None)
@given(tiled_batches())
def test_images_of_several_runs_keep_each_runs_count_and_the_text_between(batch):
    ids, mask, items, kept = batch
    spans = image_spans(ids, items, kept)
    assert [(s.image, s.segment) for s in spans] == [(i, j) for i, item in enumerate(items)
                                                      for j in range(len(item.segments))]
    assert [s.vanilla for s in spans] == [n for item in items for n in item.segments]
    assert [s.kept for s in spans] == [k for runs in kept for k in runs]
    out = shrink(ids, spans, "left", attention_mask=mask)
    for b in range(ids.shape[0]):
        before = ids[b][mask[b] == 1]
        after = out.input_ids[b][out.attention_mask[b] == 1]
        is_visual = (before == IMG) | (before == VID)
        assert before[~is_visual].tolist() == after[(after != IMG) & (after != VID)].tolist(), "text and tags kept"
        runs = [s for s in spans if s.row == b]
        for s in runs:  # each run keeps exactly its first `kept` slots, right after the tag before it
            start = int((out.columns[b] == s.start).nonzero())
            assert out.input_ids[b, start - 1] == TAG
            assert out.columns[b, start : start + s.kept].tolist() == list(range(s.start, s.start + s.kept))
        assert int(((after == IMG) | (after == VID)).sum()) == sum(s.kept for s in runs)


def test_an_item_run_cannot_cross_the_text_between_runs():
    ids = torch.tensor([[5, TAG, IMG, IMG, TAG, IMG, 6]])
    assert [s.start for s in image_spans(ids, [Item(IMG, (2, 1))], [(1, 1)])] == [2, 5]
    with pytest.raises(ValueError, match="run of 2 image placeholders that does not match"):
        image_spans(ids, [Item(IMG, (3,))], [(1,)])
    assert Item(VID, (4, 4, 4), frames=3).vanilla == 12


def tokens(batch: int, grid: int, send_prefix: bool) -> VisionTokens:
    layout = TokenLayout(num_prefix=1, grid=(grid, grid), send_prefix=send_prefix)
    return VisionTokens(hidden=torch.randn(batch, layout.total, 4), layout=layout)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), grid=st.integers(1, 6), send_prefix=st.booleans(), data=st.data())
def test_sampling_baselines_return_budget_unique_in_range_indices(batch, grid, send_prefix, data):
    vt = tokens(batch, grid, send_prefix)
    budget = data.draw(st.integers(1, vt.layout.vanilla))
    for sel in (random_sample(vt, budget, seed=data.draw(st.integers(0, 99))), spatial_sample(vt, budget)):
        assert sel.features.shape == (batch, budget, 4)
        for row in sel.indices:
            assert len(set(row.tolist())) == budget
            assert (row[1:] > row[:-1]).all(), "positional order"
            low = 0 if send_prefix else 1
            assert int(row.min()) >= low and int(row.max()) < vt.layout.total
        assert torch.equal(sel.features, vt.hidden.gather(1, sel.indices.unsqueeze(-1).expand(-1, -1, 4)))


def test_random_is_repeatable_per_seed():
    vt = tokens(2, 5, False)
    a, b, c = random_sample(vt, 7, seed=1), random_sample(vt, 7, seed=1), random_sample(vt, 7, seed=2)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
