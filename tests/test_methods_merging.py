"""The merging / pooling / diversity methods: hypothesis invariants, hand-checked cases, end to end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vlmzip
import vlmzip.methods
from vlmzip.methods.base import TokenLayout, VisionTokens, get_method
from vlmzip.methods.cluster import cluster_aggregate
from vlmzip.methods.divprune import divprune
from vlmzip.methods.kmeans import kmeans, nearest_in_groups
from vlmzip.methods.pool import output_grid, pool
from vlmzip.methods.tome import tome

NEW = 3


def units(batch, grid, dim, prefix, send, seed, duplicates=False):
    gen = torch.Generator().manual_seed(seed)
    total = grid[0] * grid[1] + prefix
    hidden = torch.randn(batch, total, dim, generator=gen)
    keys = torch.randn(batch, total, 5, generator=gen)
    if duplicates:  # only three distinct tokens per unit
        hidden = hidden[:, torch.arange(total) % 3]
        keys = keys[:, torch.arange(total) % 3]
    layout = TokenLayout(num_prefix=prefix, grid=grid, send_prefix=send)
    seeds = torch.arange(batch, dtype=torch.int64) * 7919 + seed
    return VisionTokens(hidden=hidden, layout=layout, keys=keys, seeds=seeds)


PRE_LLM = sorted(name for name, spec in vlmzip.methods.registered().items()
                 if spec.stage != "llm" and spec.takes_budget)


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(PRE_LLM), grid=st.tuples(st.integers(2, 6), st.integers(2, 6)),
       prefix=st.integers(0, 1), send=st.booleans(), seed=st.integers(0, 99), data=st.data())
def test_a_selection_applies_its_merging_to_other_features_of_the_same_tokens(name, grid, prefix, send, seed, data):
    """``Selection.apply`` mixes any per-token features as the method mixed the tokens: applied to the tokens
    themselves it gives the method's own outputs (so e.g. Qwen3-VL's DeepStack features follow the selection)."""
    tokens = units(2, grid, 6, prefix, send, seed)
    gen = torch.Generator().manual_seed(seed)
    signal = torch.rand(2, tokens.hidden.shape[1], generator=gen)
    tokens.cls_attention, tokens.received_attention = (signal, None) if prefix else (None, signal)
    keep = data.draw(st.integers(1, tokens.layout.vanilla))
    sel = run(name, tokens, keep)
    torch.testing.assert_close(sel.apply(tokens.hidden), sel.features, atol=1e-5, rtol=1e-5)
    other = torch.randn(2, tokens.hidden.shape[1], 3, generator=gen)
    assert sel.apply(other).shape == (2, keep, 3)


def run(name, tokens, keep, **knobs):
    spec = get_method(name)
    return spec.fn(tokens, keep, **spec.resolve(dict(knobs)))


def check_selection(sel, tokens, keep):
    batch, total, dim = tokens.hidden.shape
    assert sel.features.shape == (batch, keep, dim)
    assert torch.isfinite(sel.features).all()
    assert sel.indices.shape == (batch, keep)
    candidates = set(tokens.vanilla_indices().tolist())
    for row in sel.indices:
        assert len(set(row.tolist())) == keep, "indices unique"
        assert set(row.tolist()) <= candidates, "indices among the tokens the vanilla model sends"
    if sel.merged_from is not None:
        assert sel.merged_from.shape == (batch, total)
        assert int(sel.merged_from.min()) >= -1 and int(sel.merged_from.max()) < keep
        for b in range(batch):
            slots = sel.merged_from[b]
            for k, index in enumerate(sel.indices[b].tolist()):
                assert slots[index] == k, "an output's representative maps to that output"
            assert set(slots[slots >= 0].tolist()) <= set(range(keep))
            outside = [i for i in range(total) if i not in candidates]
            assert (slots[outside] == -1).all(), "tokens the vanilla model does not send map nowhere"


@st.composite
def cases(draw):
    grid = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    prefix = draw(st.integers(0, 1))
    send = draw(st.booleans()) if prefix else False
    vanilla = grid[0] * grid[1] + (prefix if send else 0)
    keep = draw(st.integers(1, vanilla))
    return grid, prefix, send, keep, draw(st.integers(1, 3)), draw(st.booleans()), draw(st.integers(0, 99))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_pool_invariants(case):
    grid, prefix, send, keep, batch, dup, seed = case
    tokens = units(batch, grid, 4, prefix, send, seed, duplicates=dup)
    sel = run("pool", tokens, keep)
    check_selection(sel, tokens, keep)
    assert sel.merged_from is not None


def test_pool_constant_grid_is_that_constant():
    tokens = units(2, (5, 7), 3, 1, False, 0)
    tokens.hidden[:, 1:] = torch.tensor([1.5, -2.0, 3.0])
    for keep in (1, 4, 6, 7, 13, 35):
        sel = pool(tokens, keep)
        torch.testing.assert_close(sel.features, torch.tensor([1.5, -2.0, 3.0]).expand(2, keep, 3))


def test_pool_4x4_to_4_is_the_2x2_block_means():
    hidden = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    tokens = VisionTokens(hidden=hidden, layout=TokenLayout(num_prefix=0, grid=(4, 4), send_prefix=False))
    sel = pool(tokens, 4)
    assert sel.features.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert sel.merged_from[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_pool_grid_choice():
    assert output_grid((24, 24), 64) == (8, 8)
    assert output_grid((24, 24), 144) == (12, 12)
    assert output_grid((4, 8), 8) == (2, 4)
    h, w = output_grid((8, 8), 7)  # prime: pooled to a cover, extras dropped
    assert h * w >= 7 and abs(h - w) <= 1


def test_pool_sends_cls_first_when_the_model_does():
    tokens = units(1, (4, 4), 3, 1, True, 0)
    sel = pool(tokens, 5)
    assert sel.indices[0, 0] == 0
    torch.testing.assert_close(sel.features[:, 0], tokens.hidden[:, 0])


@settings(max_examples=60, deadline=None)
@given(cases())
def test_divprune_invariants(case):
    grid, prefix, send, keep, batch, dup, seed = case
    tokens = units(batch, grid, 4, prefix, send, seed, duplicates=dup)
    check_selection(run("divprune", tokens, keep), tokens, keep)


def test_divprune_picks_distinct_tokens_before_duplicates():
    base = torch.eye(4)  # four mutually orthogonal directions, each repeated
    hidden = base[torch.tensor([0, 0, 1, 0, 2, 2, 1, 3, 3])].unsqueeze(0).repeat(2, 1, 1)
    hidden[1] = hidden[1].flip(0)
    tokens = VisionTokens(hidden=hidden, layout=TokenLayout(num_prefix=0, grid=(3, 3), send_prefix=False))
    sel = divprune(tokens, 4)
    for b in range(2):
        assert sorted(hidden[b, sel.indices[b]].argmax(dim=1).tolist()) == [0, 1, 2, 3]
    assert (sel.indices[:, 1:] > sel.indices[:, :-1]).all(), "positional order"


def test_divprune_first_pick_is_the_most_isolated_token():
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.9, 0.1]]])
    tokens = VisionTokens(hidden=hidden, layout=TokenLayout(num_prefix=0, grid=(2, 2), send_prefix=False))
    assert divprune(tokens, 1).indices.tolist() == [[2]]


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(0, 4), st.booleans())
def test_tome_invariants(case, r, with_keys):
    grid, prefix, send, keep, batch, dup, seed = case
    tokens = units(batch, grid, 4, prefix, send, seed, duplicates=dup)
    if not with_keys:
        tokens.keys = None
    sel = run("tome", tokens, keep, r=r)
    check_selection(sel, tokens, keep)
    for b in range(batch):  # every output is the mean of the vanilla tokens merged into it (sizes weight)
        for k in range(keep):
            members = (sel.merged_from[b] == k).nonzero().flatten()
            torch.testing.assert_close(sel.features[b, k], tokens.hidden[b, members].mean(0), atol=1e-5, rtol=1e-5)
        means = [float((sel.merged_from[b] == k).nonzero().float().mean()) for k in range(keep)]
        assert means == sorted(means), "in order of the members' mean raster position"
    if prefix and send and keep >= 2:
        assert (sel.indices[:, 0] == 0).all() and (sel.merged_from[:, 0] == 0).all(), "CLS protected"
        assert ((sel.merged_from[:, 1:] == 0).sum(1) == 0).all()


def test_tome_merges_exact_duplicates_first():
    tokens = units(3, (4, 4), 6, 0, False, 1)
    tokens.keys[:, 9] = tokens.keys[:, 4] * 3.0  # same direction: cosine similarity 1 (A slot 4, B slot 9)
    sel = tome(tokens, 15)
    assert (sel.merged_from[:, 4] == sel.merged_from[:, 9]).all()
    assert ((sel.merged_from == sel.merged_from[:, 4:5]).sum(1) == 2).all(), "that pair and nothing else"
    torch.testing.assert_close(sel.features[0, int(sel.merged_from[0, 9])], tokens.hidden[0, [4, 9]].mean(0))
    assert sel.indices[0].tolist() == [0, 1, 2, 3, 5, 6, 4, 7, 8, 10, 11, 12, 13, 14, 15], (
        "ordered by the members' mean raster position (4 and 9: 6.5), sent at the member nearest their mean cell")


def test_tome_sizes_weight_later_merges():
    hidden = torch.tensor([[[0.0], [0.0], [3.0]]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.01]]])
    tokens = VisionTokens(hidden=hidden, keys=keys,
                          layout=TokenLayout(num_prefix=0, grid=(1, 3), send_prefix=False))
    sel = tome(tokens, 1)
    torch.testing.assert_close(sel.features, torch.tensor([[[1.0]]]))  # (0 + 0 + 3) / 3, not (0 + 3) / 2


def blobs(batch, per, centres, dim, seed, spread=0.05):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(batch, centres, dim, generator=gen) * 10
    truth = torch.randperm(per * centres, generator=gen) % centres
    x = means[:, truth] + spread * torch.randn(batch, per * centres, dim, generator=gen)
    return x, truth


def same_partition(labels, truth):
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(truth.tolist())) == len(set(labels.tolist()))


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_well_separated_clusters(seed):
    x, truth = blobs(3, 9, 5, 4, seed)
    labels, centres = kmeans(x, 5, torch.tensor([11, 12, 13]) + seed, seed=seed)
    for b in range(3):
        assert same_partition(labels[b], truth)
        for c in range(5):
            torch.testing.assert_close(centres[b, c], x[b, labels[b] == c].mean(0))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 4), st.data())
def test_kmeans_never_empty_never_nan(batch, num, distinct, data):
    k = data.draw(st.integers(1, num))
    gen = torch.Generator().manual_seed(num * 10 + distinct)
    x = torch.randn(batch, distinct, 3, generator=gen)[:, torch.arange(num) % distinct]  # duplicates
    seeds = torch.arange(batch)
    labels, centres = kmeans(x, k, seeds, seed=data.draw(st.integers(0, 5)), iters=data.draw(st.integers(0, 5)))
    assert torch.isfinite(centres).all()
    for b in range(batch):
        assert sorted(set(labels[b].tolist())) == list(range(k)), "every cluster has a member"


def test_kmeans_is_deterministic_per_unit_whatever_the_batch():
    x, _ = blobs(4, 6, 4, 3, 0, spread=2.0)
    seeds = torch.tensor([5, 6, 7, 8])
    labels, centres = kmeans(x, 4, seeds, seed=3)
    again, _ = kmeans(x.flip(0), 4, seeds.flip(0), seed=3)
    assert torch.equal(labels, again.flip(0))
    single, _ = kmeans(x[2:3], 4, seeds[2:3], seed=3)
    assert torch.equal(single[0], labels[2])


def test_kmeans_rejects_impossible_k():
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans(torch.zeros(1, 3, 2), 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 5), st.data())
def test_nearest_in_groups_is_each_groups_argmin(batch, num, k, data):
    """Without ties: each group's member of smallest distance; an empty group only gives an index in range."""
    dist = torch.tensor(data.draw(st.lists(st.floats(0, 10), min_size=batch * num, max_size=batch * num))).view(
        batch, num)
    labels = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=batch * num,
                                             max_size=batch * num))).view(batch, num)
    got = nearest_in_groups(dist, labels, k, rtol=0.0)
    assert got.shape == (batch, k) and bool(((got >= 0) & (got < num)).all())
    for b in range(batch):
        for g in range(k):
            members = (labels[b] == g).nonzero().flatten()
            if members.numel():
                best = dist[b, members].min()
                assert int(got[b, g]) == int(members[dist[b, members] == best][0])  # the first of the nearest


def test_nearest_in_groups_breaks_rounding_ties_by_position():
    """The two members of a two-member cluster are equally far from its mean: whichever rounding makes one a hair
    nearer, the first in position order represents it (the same on every runtime)."""
    labels = torch.tensor([[0, 1, 1, 0, 1]])
    for nudge in (1e-7, -1e-7, 0.0):
        dist = torch.tensor([[4.0, 0.5 + nudge, 0.5, 3.0, 2.0]])
        assert nearest_in_groups(dist, labels, 2, rtol=1e-5).tolist() == [[3, 1]]
    assert nearest_in_groups(torch.tensor([[4.0, 0.6, 0.5, 3.0, 2.0]]), labels, 2, rtol=1e-5).tolist() == [[3, 2]]
    assert nearest_in_groups(torch.tensor([[4.0, 0.5 + 1e-7, 0.5, 3.0, 2.0]]), labels, 2).tolist() == [[3, 2]]


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from(["random", "position"]))
def test_cluster_aggregate_invariants(case, order):
    grid, prefix, send, keep, batch, dup, seed = case
    tokens = units(batch, grid, 4, prefix, send, seed, duplicates=dup)
    sel = run("cluster_aggregate", tokens, keep, order=order, seed=seed)
    check_selection(sel, tokens, keep)
    for b in range(batch):  # every output is the mean of its cluster, and every cluster has a member
        for k in range(keep):
            members = (sel.merged_from[b] == k).nonzero().flatten()
            assert members.numel() >= 1
            torch.testing.assert_close(sel.features[b, k], tokens.hidden[b, members].mean(0), atol=1e-5, rtol=1e-5)


def test_cluster_aggregate_orders():
    x, truth = blobs(2, 4, 4, 3, 1)
    order = torch.argsort(truth, stable=True)  # the clusters are contiguous runs of 4 in raster order
    tokens = VisionTokens(hidden=x[:, order], layout=TokenLayout(num_prefix=0, grid=(4, 4), send_prefix=False),
                          seeds=torch.tensor([1, 2]))
    by_position = cluster_aggregate(tokens, 4, order="position")
    assert by_position.merged_from.tolist() == [[0] * 4 + [1] * 4 + [2] * 4 + [3] * 4] * 2
    shuffled = cluster_aggregate(tokens, 4, order="random")
    assert any(not torch.equal(cluster_aggregate(tokens, 4, seed=s).merged_from, by_position.merged_from)
               for s in range(3)), "random order is not the positional one"
    for b in range(2):  # the same clusters, permuted
        assert sorted(shuffled.features[b].tolist()) == sorted(by_position.features[b].tolist())
    again = cluster_aggregate(tokens, 4, order="random", seed=0)
    assert torch.equal(again.features, shuffled.features), "seeded"


@pytest.mark.parametrize(("name", "knobs", "message"), [
    ("cluster_aggregate", {"order": "foo"}, "order must be one of"),
    ("cluster_aggregate", {"iters": -1}, "iters must be"),
    ("cluster_aggregate", {"tol": "x"}, "tol must be"),
    ("cluster_aggregate", {"seed": 1.5}, "seed must be"),
    ("tome", {"r": -2}, "r must be"),
    ("pool", {"size": 2}, "has no knob 'size'"),
])
def test_impossible_knobs_are_clear_errors(model, name, knobs, message):
    with pytest.raises(ValueError, match=message):
        vlmzip.compress(model, name, tokens=16, **knobs)
    assert not vlmzip.is_compressed(model)


END_TO_END = ["pool", "divprune", "tome", "cluster_aggregate", "cluster_saliency"]


@pytest.mark.parametrize("name", END_TO_END)
def test_compresses_the_tiny_llava_and_generates(model, batch_inputs, name):
    inputs, _, _ = batch_inputs
    vlmzip.compress(model, name, tokens=16)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - (64 - 16)
    assert torch.isfinite(logits).all()
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + NEW)
    vlmzip.decompress(model)


def test_viz_draws_the_merging_methods(llava_dir, tmp_path, capsys):
    from vlmzip.cli import main

    out = tmp_path / "viz.png"
    assert main(["viz", "--model", str(llava_dir), "--out", str(out), "--methods",
                 "pool,tome,divprune,cluster_aggregate,cluster_saliency", "--tokens", "8"]) == 0
    assert out.exists()


def test_viz_legend_marks_merged_outputs():
    from vlmzip.viz import kept_outputs, legend_keys

    tokens = units(1, (4, 4), 3, 1, False, 0)
    pooled, picked = pool(tokens, 4), divprune(tokens, 4)
    assert kept_outputs(pooled) == 0 and "merged" in legend_keys(pooled, tokens.layout)
    assert kept_outputs(picked) is None and legend_keys(picked, tokens.layout) == {"kept", "dropped"}


def with_saliency(tokens, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    scores = torch.rand(tokens.hidden.shape[:2], generator=gen)
    if tokens.layout.num_prefix:
        tokens.cls_attention = scores
    else:
        tokens.received_attention = scores
    return tokens


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from([1, 2, 3]), st.integers(1, 8))
def test_cluster_saliency_invariants(case, variant, k):
    grid, prefix, send, keep, batch, dup, seed = case
    tokens = with_saliency(units(batch, grid, 4, prefix, send, seed, duplicates=dup), seed)
    sel = run("cluster_saliency", tokens, keep, variant=variant, k=k, seed=seed)
    check_selection(sel, tokens, keep)
    for b in range(batch):
        means = []
        for slot in range(keep):
            members = (sel.merged_from[b] == slot).nonzero().flatten()
            torch.testing.assert_close(sel.features[b, slot], tokens.hidden[b, members].mean(0), atol=1e-5, rtol=1e-5)
            means.append(float(members.float().mean()))
        assert means == sorted(means), "positional order (aggregates at their mean position)"
        if variant != 3:
            assert int((sel.merged_from[b] >= 0).sum()) == keep, "a pure selection"


def test_cluster_saliency_keeps_the_most_salient_of_each_cluster():
    x, truth = blobs(1, 6, 3, 4, 2)
    order = torch.argsort(truth, stable=True)  # clusters: positions 0-5, 6-11, 12-17
    saliency = torch.arange(18.0).flip(0).unsqueeze(0)  # earlier tokens more salient
    tokens = VisionTokens(hidden=x[:, order], layout=TokenLayout(num_prefix=0, grid=(3, 6), send_prefix=False),
                          received_attention=saliency, seeds=torch.tensor([4]))
    static = run("cluster_saliency", tokens, 6, k=3)
    assert static.indices.tolist() == [[0, 1, 6, 7, 12, 13]], "two of each cluster, its most salient"
    plain_top = saliency.topk(6).indices.sort().values
    assert plain_top.tolist() == [[0, 1, 2, 3, 4, 5]], "(saliency alone would take one cluster)"
    coarse = run("cluster_saliency", tokens, 6, k=3, variant=3)
    assert (coarse.merged_from >= 0).all(), "variant 3 loses nothing"
    dynamic = run("cluster_saliency", tokens, 6, k=3, variant=2)
    kept = dynamic.indices[0].tolist()
    assert sum(i < 6 for i in kept) >= sum(i >= 12 for i in kept), "the more salient cluster gets more"


def test_cluster_saliency_knob_errors(model):
    with pytest.raises(ValueError, match="variant must be"):
        vlmzip.compress(model, "cluster_saliency", tokens=16, variant=4)
    with pytest.raises(ValueError, match="k must be"):
        vlmzip.compress(model, "cluster_saliency", tokens=16, k=0)
