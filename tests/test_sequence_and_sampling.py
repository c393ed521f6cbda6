"""Invariants of placeholder-run shrinking and of the sampling baselines (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmzip.methods.base import TokenLayout, VisionTokens
from vlmzip.methods.sampling import random_sample, spatial_sample
from vlmzip.sequence import keep_mask, shrink

IMG = 9


@st.composite
def batches(draw):
    """Rows of text tokens with 0-2 images of N placeholders each, left padded to a common length."""
    per_image = draw(st.integers(1, 12))
    kept = draw(st.integers(1, per_image))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        row = []
        for _ in range(draw(st.integers(0, 2))):
            row += draw(st.lists(st.integers(10, 20), min_size=1, max_size=4)) + [IMG] * per_image
        row += draw(st.lists(st.integers(10, 20), min_size=1, max_size=4))
        rows.append(row)
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, per_image, kept


@settings(max_examples=80, deadline=None)
@given(batches())
def test_shrink_keeps_text_and_k_placeholders_per_image(batch):
    ids, mask, per_image, kept = batch
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = shrink(ids, keep_mask(ids, IMG, per_image, kept), attention_mask=mask, labels=ids.clone(),
                 position_ids=positions)
    for b in range(ids.shape[0]):
        before = ids[b][mask[b] == 1]
        after = out.input_ids[b][out.attention_mask[b] == 1]
        assert before[before != IMG].tolist() == after[after != IMG].tolist(), "text tokens kept, in order"
        n_images = int((before == IMG).sum()) // per_image
        assert int((after == IMG).sum()) == n_images * kept
        assert out.attention_mask[b, -1] == 1, "still left padded"
        valid = out.position_ids[b][out.attention_mask[b] == 1]
        assert valid.tolist() == list(range(valid.numel())), "positions contiguous from 0"
        assert torch.equal(out.labels[b][out.attention_mask[b] == 1], after)


def test_runs_that_do_not_match_an_image_are_rejected():
    ids = torch.tensor([[5, IMG, IMG, IMG, 6]])
    with pytest.raises(ValueError, match="run of 3 image placeholders, not a multiple of the 4"):
        keep_mask(ids, IMG, per_image=4, kept_per_image=2)


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
