"""The mixture augmentation of the lab training (vlmzip.lab.train_mix): each component does what it says,
merged tokens are means of their groups, and a mixed batch trains (the continuation phase's path)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TINY_TRAIN as TINY
from transformers import LlavaForConditionalGeneration

from vlmzip.builders.llava import build_llava
from vlmzip.lab import train_mix as M
from vlmzip.lab.train import _read_log, start_run, train, update
from vlmzip.lab.train_config import lab_words, model_config
from vlmzip.lab.train_data import _tokenizer, make_batch
from vlmzip.lab.train_losses import distill_loss, eager_attention, full_rows, loss_terms, losses

GRID, N = 16, 256


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chosen(slots: torch.Tensor) -> torch.Tensor:
    return (slots >= 0).nonzero().squeeze(1)


def assert_selection_in_positional_order(slots: torch.Tensor, k: int) -> None:
    idx = chosen(slots)
    assert idx.numel() == k and torch.equal(slots[idx], torch.arange(k))


def test_random_subset_keeps_k_patches_in_positional_order_and_varies_with_the_seed() -> None:
    a, b = M.random_slots(N, 28, gen(1)), M.random_slots(N, 28, gen(2))
    assert_selection_in_positional_order(a, 28)
    assert not torch.equal(chosen(a), chosen(b))
    assert torch.equal(a, M.random_slots(N, 28, gen(1)))


@pytest.mark.parametrize("k", [28, 57, 85, 255])
def test_strided_subset_has_a_uniform_stride(k: int) -> None:
    slots = M.strided_slots(N, k, gen(k))
    assert_selection_in_positional_order(slots, k)
    gaps = chosen(slots).diff()
    assert gaps.min() >= int(N / k) and gaps.max() <= int(N / k) + 1


def test_salient_subset_keeps_the_most_salient_patches() -> None:
    saliency = torch.rand(N, generator=gen(3))
    slots = M.salient_slots(saliency, 40)
    assert_selection_in_positional_order(slots, 40)
    assert set(chosen(slots).tolist()) == set(saliency.topk(40).indices.tolist())


def nearest_seed_property(slots: torch.Tensor, distance: torch.Tensor, k: int, seeds: torch.Tensor) -> None:
    """Every patch sits in the slot of a seed at least distance from it; every slot has one seed."""
    assert sorted(slots[seeds].tolist()) == list(range(k)) and (slots >= 0).all()
    seed_of_slot = torch.empty(k, dtype=torch.long)
    seed_of_slot[slots[seeds]] = torch.arange(k)
    own = distance[torch.arange(N), seed_of_slot[slots]]
    assert torch.allclose(own, distance.min(1).values)


def test_neighbour_groups_join_the_nearest_seed_on_the_grid() -> None:
    k = 20
    slots = M.neighbour_slots(GRID, k, False, gen(4))
    seeds = torch.randperm(N, generator=gen(4))[:k]  # the same draw as inside
    yx = torch.stack(torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij"), -1).reshape(N, 2).float()
    nearest_seed_property(slots, torch.cdist(yx, yx[seeds]), k, seeds)
    # ordered by mean position
    pos = torch.zeros(k).index_add_(0, slots, torch.arange(N).float()) / torch.bincount(slots, minlength=k)
    assert (pos.diff() > 0).all()


def test_similar_groups_join_the_most_similar_seed_and_shuffle_reorders_them() -> None:
    k = 12
    features = torch.randn(N, 8, generator=gen(5))
    slots = M.similar_slots(features, k, False, gen(6))
    seeds = torch.randperm(N, generator=gen(6))[:k]
    unit = torch.nn.functional.normalize(features, dim=-1)
    nearest_seed_property(slots, -(unit @ unit[seeds].T), k, seeds)
    shuffled = M.similar_slots(features, k, True, gen(6))
    # the same groups, other numbering
    pairs = set(zip(slots.tolist(), shuffled.tolist(), strict=True))
    assert len(pairs) == k and not torch.equal(slots, shuffled)


def test_well_separated_features_merge_by_cluster() -> None:
    centres = torch.eye(4) * 10
    features = centres[torch.arange(N) % 4] + 0.01 * torch.randn(N, 4, generator=gen(7))
    seeds_draw = gen(8)
    slots = M.similar_slots(features, 4, False, seeds_draw)
    seeds = torch.randperm(N, generator=gen(8))[:4]
    if len({int(s) % 4 for s in seeds}) == 4:  # one seed per cluster: the groups are the clusters
        for c in range(4):
            assert len(set(slots[torch.arange(N) % 4 == c].tolist())) == 1


def test_salient_plus_merged_keeps_the_salient_first_and_merges_all_the_rest() -> None:
    saliency = torch.rand(N, generator=gen(9))
    features = torch.randn(N, 8, generator=gen(10))
    k = 28
    slots = M.salient_similar_slots(saliency, features, k, False, gen(11))
    assert (slots >= 0).all() and set(slots.tolist()) == set(range(k))  # nothing dropped, k tokens
    singles = torch.bincount(slots, minlength=k) == 1
    dominant = int(singles.int().cumprod(0).sum())  # the leading run of one-patch slots
    c = k - dominant
    assert 1 <= c <= round(0.3 * k) + 1
    top = saliency.topk(dominant).indices
    assert set((slots < dominant).nonzero().squeeze(1).tolist()) == set(top.tolist())


def test_diverse_subset_is_divprunes_selection_in_positional_order() -> None:
    from vlmzip.methods.divprune import cosine_distance, max_min_diverse

    projected = torch.randn(N, 16, generator=gen(15))
    slots = M.diverse_slots(projected, 28)
    assert_selection_in_positional_order(slots, 28)
    expected = max_min_diverse(cosine_distance(projected.unsqueeze(0)), 28)[0]
    assert set(chosen(slots).tolist()) == set(expected.tolist())


def test_kmeans_groups_recover_well_separated_clusters_whatever_the_order() -> None:
    centres = torch.eye(6) * 10
    projected = centres[torch.arange(N) % 6] + 0.01 * torch.randn(N, 6, generator=gen(16))
    for shuffle in (False, True):
        slots = M.kmeans_slots(projected, 6, shuffle, gen(17))
        assert (slots >= 0).all() and set(slots.tolist()) == set(range(6))
        for c in range(6):  # each true cluster is exactly one slot
            assert len(set(slots[torch.arange(N) % 6 == c].tolist())) == 1


@pytest.mark.parametrize("mode", M.MIX_MODES)
@pytest.mark.parametrize("cls", [False, True])
def test_plan_slots_give_exactly_the_planned_tokens_with_cls_first_when_planned(mode: str, cls: bool) -> None:
    plan = M.MixPlan(mode, 28, cls=cls, shuffle=True, seed=12)
    slots = M.plan_slots(plan, torch.rand(N, generator=gen(13)), torch.randn(N, 8, generator=gen(14)), GRID)
    assert slots.shape == (N + 1,) and set(slots[slots >= 0].tolist()) == set(range(28))
    assert int(slots[0]) == (0 if cls else -1)
    assert (slots[1:] != 0).all() if cls else True


def test_full_plan_is_every_patch_in_order_and_an_unknown_mode_is_refused() -> None:
    slots = M.plan_slots(M.MixPlan("full", N), torch.rand(N), torch.randn(N, 4), GRID)
    assert torch.equal(slots, torch.cat([torch.tensor([-1]), torch.arange(N)]))
    with pytest.raises(ValueError, match="unknown mix mode"):
        M.plan_slots(M.MixPlan("pool", 10), torch.rand(N), torch.randn(N, 4), GRID)


def test_merged_tokens_are_the_means_of_their_groups_and_dropped_tokens_vanish() -> None:
    tokens = torch.randn(7, 3, requires_grad=True)
    slots = torch.tensor([-1, 1, 0, 1, -1, 2, 1])
    out = M.merge_slots(tokens, slots, 3)
    expected = torch.stack([tokens[2], tokens[[1, 3, 6]].mean(0), tokens[5]])
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert tokens.grad is not None and (tokens.grad[[0, 4]] == 0).all() and (tokens.grad[[1, 2]] != 0).all()


def test_targets_of_a_group_are_kept_only_when_its_patches_agree() -> None:
    # CLS + 5 patches: slot 0 = CLS, slot 1 = patches 0 and 1 (same targets), slot 2 = patches 2, 3 (differ)
    slots = torch.tensor([0, 1, 1, 2, 2, -1])
    patch_targets = torch.tensor([[5, 6], [5, 6], [5, 7], [5, 6], [9, -100]])
    out = M.slot_targets(slots, patch_targets, 3)
    assert out.tolist() == [[-100, -100], [5, 6], [5, -100]]
    named = torch.tensor([[True, False, False, False, False], [False, False, False, False, True]])
    assert M.slot_named(slots, named, 3).tolist() == [[False, True, False], [False, False, False]]


def test_draw_plan_covers_every_component_and_its_budgets() -> None:
    import random

    rng = random.Random(0)
    plans = [M.draw_plan(rng, N, 0.1) for _ in range(600)]
    assert {p.mode for p in plans} == set(M.MIX_MODES)
    assert {p.cls for p in plans} == {False, True} and {p.shuffle for p in plans} == {False, True}
    tokens = [p.tokens for p in plans]
    assert min(tokens) >= 2 and max(tokens) <= N - 1 and min(tokens) < 30


def test_mixed_batches_start_at_drop_from_and_carry_their_planned_token_counts() -> None:
    cfg = replace(TINY, mix=True, drop_prob=1.0, drop_from=0.5, steps=4, batch_size=4)
    assert make_batch(cfg, 1).mix is None  # before drop_from: the plain path
    batch = make_batch(cfg, 2)
    assert batch.mix is not None and len(batch.mix) == 4 and all(p.mode != "full" for p in batch.mix)
    image_id = _tokenizer(lab_words()).convert_tokens_to_ids("<image>")
    assert (batch.input_ids == image_id).sum(1).tolist() == [p.tokens for p in batch.mix]
    assert make_batch(cfg, 2).mix == batch.mix  # deterministic
    assert make_batch(replace(cfg, mix=False), 2).mix is None


def test_a_mixed_batch_trains_and_all_full_plans_equal_the_stock_forward() -> None:
    cfg = replace(TINY, mix=True, drop_prob=1.0, batch_size=4)
    model, processor = build_llava(None, model_config(cfg))
    batch = make_batch(cfg, 3)
    restore = eager_attention(model)
    answer, aux, attn = losses(model, processor, batch, torch.device("cpu"), attn_layer=0)
    restore()
    assert all(torch.isfinite(x) and x > 0 for x in (answer, aux, attn))
    answer.backward()
    assert model.model.vision_tower.get_input_embeddings().weight.grad.abs().sum() > 0

    plain = make_batch(replace(cfg, mix=False, drop_prob=0.0), 3)
    full = replace(plain, mix=[M.MixPlan("full", plain.keep.shape[1])] * 4)
    with torch.no_grad():
        a, x, _ = losses(model, processor, full, torch.device("cpu"))
        b, y, _ = losses(model, processor, plain, torch.device("cpu"))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(x, y, atol=1e-5)


def test_init_from_starts_from_a_saved_model_and_refuses_a_wrong_one(tmp_path) -> None:
    first = train(tmp_path / "a", replace(TINY, steps=2), resume=False)
    cfg = replace(TINY, steps=1, init_from=str(first), lr=1e-12, min_lr=1e-12, warmup_steps=0)
    run = start_run(tmp_path / "b", cfg, resume=False)
    saved = LlavaForConditionalGeneration.from_pretrained(first).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in run.model.state_dict().items())
    with pytest.raises(ValueError, match="does not fit|do not fit"):
        start_run(tmp_path / "c", replace(cfg, text_hidden=64), resume=False)
    with pytest.raises(ValueError, match="no config.json"):
        start_run(tmp_path / "d", replace(cfg, init_from=str(tmp_path)), resume=False)


def test_a_branch_from_the_base_runs_checkpoint_equals_the_whole_run_with_its_late_recipe(tmp_path) -> None:
    late = replace(TINY, steps=4, mix=True, drop_prob=1.0, drop_from=0.5)  # augmentation from update 2
    whole = train(tmp_path / "whole", late, resume=False)
    base = replace(late, mix=False, drop_prob=0.0)
    train(tmp_path / "base", base, resume=False, stop_after=2)
    branch = train(tmp_path / "branch", replace(late, branch_from=str(tmp_path / "base")), resume=False)
    a = LlavaForConditionalGeneration.from_pretrained(whole).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(branch).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [[r["loss"] for r in _read_log(tmp_path / d / "log.jsonl", 4)] for d in ("whole", "branch")]
    assert logged[0] == logged[1] and len(logged[0]) == 4  # the base's rows carried over, then the branch's


def test_a_branch_is_refused_past_the_augmentation_or_with_other_early_fields(tmp_path) -> None:
    late = replace(TINY, steps=4, mix=True, drop_prob=1.0, drop_from=0.5)
    train(tmp_path / "base", replace(late, mix=False, drop_prob=0.0), resume=False, stop_after=3)
    with pytest.raises(ValueError, match="past update 2.*--stop-after 2"):
        start_run(tmp_path / "b", replace(late, branch_from=str(tmp_path / "base")), resume=False)
    with pytest.raises(ValueError, match="lr: 0.003 there vs 0.001 here"):
        start_run(tmp_path / "c", replace(late, drop_from=1.0, lr=1e-3, branch_from=str(tmp_path / "base")),
                    resume=False)
    with pytest.raises(ValueError, match="no checkpoint there"):
        start_run(tmp_path / "d", replace(late, branch_from=str(tmp_path / "nothing")), resume=False)


def test_distillation_anchor_is_zero_against_itself_and_pulls_full_rows_back_to_the_teacher(tmp_path) -> None:
    first = train(tmp_path / "a", replace(TINY, steps=2), resume=False)
    cfg = replace(TINY, init_from=str(first), mix=True, drop_prob=0.5, batch_size=4, distill=1.0)
    run = start_run(tmp_path / "b", cfg, resume=False)
    assert run.teacher is not None and not any(p.requires_grad for p in run.teacher.parameters())
    batch = next(b for b in (make_batch(cfg, s) for s in range(20)) if 0 < int(full_rows(b).sum()) < 4)
    cpu = torch.device("cpu")
    # the student starts as the teacher: no pull on its full rows (eager vs sdpa attention: float noise only)
    *_, same = loss_terms(run.model, run.processor, batch, cpu, attn_layer=0, teacher=run.teacher)
    assert 0 <= same.item() < 1e-5
    with torch.no_grad():  # move the student away: the anchor is positive and its gradient points back
        for p in run.model.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    *_, moved = loss_terms(run.model, run.processor, batch, cpu, attn_layer=0, teacher=run.teacher)
    assert moved > 1e-3
    moved.backward()
    assert run.model.lm_head.weight.grad.abs().sum() > 0
    none = replace(batch, mix=[M.MixPlan("random", 3)] * 4)  # no full row: nothing to anchor
    assert full_rows(none).sum() == 0
    assert float(distill_loss(torch.zeros(4, batch.input_ids.shape[1], 1), run.teacher, run.processor, none,
                                cpu)) == 0.0
    stats = update(run, batch)
    assert "distill_loss" in stats and stats["distill_loss"] >= 0
    with pytest.raises(ValueError, match="needs .*--init-from"):
        replace(TINY, distill=1.0)
    with pytest.raises(ValueError, match="distill=-1"):
        replace(TINY, init_from=str(first), distill=-1.0)


def test_freeze_vision_trains_the_projector_and_the_lm_but_not_the_tower(tmp_path) -> None:
    cfg = replace(TINY, mix=True, drop_prob=1.0, batch_size=2, freeze_vision=True)
    run = start_run(tmp_path / "a", cfg, resume=False)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    update(run, make_batch(cfg, 0))
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith("model.vision_tower.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert any(k.startswith("model.language_model.") for k in changed)
    tower = {id(p) for p in run.model.model.vision_tower.parameters()}
    assert not any(id(p) in tower for group in run.optimizer.param_groups for p in group["params"])
