"""SparseVLM 1.0 / 2.0 against an eager, layer-by-layer reference written here from the released code
(Gumpest/SparseVLMs, modelling_sparse_llama.py / score.py / utils.py); schedules, cache, batches."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import TEST_CFG, load
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import eager_layer, rotate_half

import vlmzip
from vlmzip.budgets import Budget
from vlmzip.builders.llava import build_llava
from vlmzip.methods.sparsevlm import cluster_and_merge, recycled_count, scale_layers, schedule

NEW = 4
TOKENS = 21  # 192 of 576 at the test model's 64 patches: the authors' 192 schedule, scaled by 64 / 576


@pytest.fixture(scope="module")
def deep_dir(six_layer_dir):
    """The test LLaVA with 6 decoder layers: SparseVLM's layers 2 / 6 / 15 of 32 scale to 0 / 1 / 3."""
    return six_layer_dir


def reference_cluster_and_merge(x: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """utils.cluster_and_merge as released, (B, N, C) -> (B, cluster_num, C); its tie-breaking noise drawn
    from a generator seeded 0 instead of the global RNG."""
    b, n, c = x.shape
    dist_matrix = torch.cdist(x, x) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(b, n, generator=torch.Generator().manual_seed(0)) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    centre_dist = dist_matrix[torch.arange(b)[:, None], index_down]
    idx_cluster = centre_dist.argmin(dim=1)
    idx_cluster[torch.arange(b)[:, None].expand(b, cluster_num).reshape(-1), index_down.reshape(-1)] = (
        torch.arange(cluster_num)[None, :].expand(b, cluster_num).reshape(-1)
    )
    idx = idx_cluster + torch.arange(b)[:, None] * cluster_num
    all_weight = torch.zeros(b * cluster_num, 1).index_add_(0, idx.reshape(-1), torch.ones(b * n, 1)) + 1e-6
    norm_weight = torch.ones(b, n, 1) / all_weight[idx]
    merged = torch.zeros(b * cluster_num, c).index_add_(0, idx.reshape(-1), (x * norm_weight).reshape(b * n, c))
    return merged.reshape(b, cluster_num, c)


def sparsevlm_reference(model, inputs, layers, plan, version="1.0", fixed=None):
    """The released SparseVLM on one unpadded prompt with one image, eager and explicit.

    Returns (logits, per step: (kept visual indices, recycled indices, visual count after)). With ``fixed``
    (a previous call's steps) those selections are replayed instead of ranking again (the KV-cache variant
    selects once per prefill).
    """
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    features = torch.cat(list(inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    image = ids[0] == model.config.image_token_id
    embeds = embeds.masked_scatter(image[None, :, None], features)
    lm = inner.language_model
    v_start = int(image.nonzero()[0])
    v_num = int(image.sum())
    text_start = v_start + v_num
    hidden = embeds
    # text raters, from the LLM input embeddings (score.py / modelling_sparse_llama.py)
    m_v_t = (hidden[:, v_start:text_start] @ hidden[:, text_start:].transpose(1, 2)).softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())[1]
    positions = torch.arange(ids.shape[1])[None]
    steps = []
    for index, layer in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(hidden, positions)
        length = hidden.shape[1]
        allowed = torch.ones(length, length).tril().bool()[None]
        out, probs = eager_layer(layer, hidden, cos, sin, allowed)
        if index in layers:
            j = layers.index(index)
            attn = probs
            if version == "2.0":  # attention gravity: divide by the RoPE weight of all-ones q / k
                ones = torch.ones(1, attn.shape[1], length, cos.shape[-1])
                q_rot = ones * cos[:, None] + rotate_half(ones) * sin[:, None]
                attn = attn / (q_rot @ q_rot.transpose(2, 3) / math.sqrt(cos.shape[-1]))
            rows = t_token_idx + text_start
            if version == "2.0":  # priority heads: the top half by summed rater-to-visual attention
                per_head = attn[0][:, rows, v_start:text_start].sum((1, 2))
                attn = attn[:, per_head.topk(attn.shape[1] // 2)[1]]
            relation = attn.mean(1)[:, rows, v_start : v_start + v_num].mean(1)[0]  # (v_num,)
            keep_n = min(plan[j], v_num - 1)
            top = relation.topk(keep_n).indices.sort().values if fixed is None else fixed[j][0]
            dropped = torch.ones(v_num, dtype=torch.bool)
            dropped[top] = False
            visual = out[:, v_start : v_start + v_num]
            kept_hidden = visual[:, top]
            recycled = None
            merged = visual[:, :0]
            if version == "1.0":
                deleted = dropped.nonzero().flatten()
                m = int(deleted.numel() * 0.3) + 1
                recycled = deleted[relation[deleted].topk(m)[1]] if fixed is None else fixed[j][1]
                merged = reference_cluster_and_merge(visual[:, recycled], int(m / 10) + 1)
            hidden = torch.cat([out[:, :v_start], kept_hidden, merged, out[:, text_start:]], dim=1)
            if version == "1.0":
                positions = positions[:, : hidden.shape[1]]
            else:
                positions = torch.cat([positions[:, :v_start], positions[:, v_start + top],
                                       positions[:, text_start:]], dim=1)
            v_num = keep_n + merged.shape[1]
            text_start = v_start + v_num
            steps.append((top, recycled, v_num))
        else:
            hidden = out
    return model.lm_head(lm.norm(hidden)), steps


@pytest.mark.parametrize(("version", "plan"), [("1.0", (33, 22, 12)), ("2.0", (33, 22, 13))])
def test_sparsevlm_matches_the_eager_reference(deep_dir, processor, batch_inputs, version, plan):
    _, images, texts = batch_inputs
    model = load(deep_dir)
    single = processor(images=[images[2]], text=[texts[2]], return_tensors="pt")
    layers = scale_layers((2, 6, 15), 6)
    assert layers == (0, 1, 3)
    assert schedule(Budget(tokens=TOKENS), 64, version) == plan
    with torch.no_grad():
        expected, steps = sparsevlm_reference(model, single, list(layers), plan, version)
        with vlmzip.compressed(model, "sparsevlm", tokens=TOKENS, version=version):
            got = model(**single).logits
            greedy = model.generate(**single, max_new_tokens=NEW, do_sample=False)
            planned = vlmzip.plan(model, "sparsevlm", tokens=TOKENS, version=version)
    # per-step visual counts: the schedule, plus (1.0) the recycled clusters
    counts = [v for _, _, v in steps]
    if version == "1.0":
        assert counts == [33 + 2, 22 + 1, 12 + 1]  # 31 deleted -> 10 recycled -> 2 clusters; 13 -> 4 -> 1; ...
    else:
        assert counts == list(plan)
    assert planned.final_tokens == counts[-1]
    assert planned.layer_avg_tokens == pytest.approx((64 * 1 + counts[0] + counts[1] * 2 + counts[2] * 2) / 6)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    ids = single["input_ids"]  # greedy decoding from the reference with the prefill's selection held fixed
    with torch.no_grad():
        for _ in range(NEW):
            step, _ = sparsevlm_reference(model, {**single, "input_ids": ids}, list(layers), plan, version, steps)
            ids = torch.cat([ids, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, ids)


def test_sparsevlm_cache_and_layer_lengths_follow_the_schedule(deep_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    model = load(deep_dir)
    with vlmzip.compressed(model, "sparsevlm", tokens=TOKENS):
        lengths = layer_lengths(model, inputs)
    full = inputs["input_ids"].shape[1]
    assert lengths == [full, full - 64 + 35, full - 64 + 23, full - 64 + 23, full - 64 + 13, full - 64 + 13]


def layer_lengths(model, inputs) -> list[int]:
    """The sequence length each decoder layer receives in one forward."""
    lengths: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: lengths.append(k["hidden_states"].shape[1]
                                                                             if not a else a[0].shape[1]),
                                             with_kwargs=True) for layer in model.model.language_model.layers]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return lengths


def test_an_llm_deep_enough_prunes_after_the_authors_layers_2_6_15(tmp_path, batch_inputs):
    """The released code prunes after layers 2, 6 and 15 whatever the depth: an 18-layer LLaVA does too."""
    inputs, _, _ = batch_inputs
    build_llava(tmp_path, replace(TEST_CFG, text_layers=18))
    model = load(tmp_path)
    planned = vlmzip.plan(model, "sparsevlm", tokens=TOKENS)
    assert [step.layer for step in vlmzip.api.llm_steps(list(planned.stages), 18)] == [3, 7, 16]
    assert planned.notes == ()
    with vlmzip.compressed(model, "sparsevlm", tokens=TOKENS):
        lengths = layer_lengths(model, inputs)
    full = inputs["input_ids"].shape[1]
    after = [full - 64 + n for n in (35, 23, 13)]  # the 192 schedule scaled to 64 patches, recycled tokens included
    assert lengths == [full] * 3 + [after[0]] * 4 + [after[1]] * 9 + [after[2]] * 2


def test_a_shallow_llm_runs_the_scaled_layers_and_says_so(deep_dir):
    planned = vlmzip.plan(load(deep_dir), "sparsevlm", tokens=TOKENS)
    assert [step.layer for step in vlmzip.api.llm_steps(list(planned.stages), 6)] == [1, 2, 4]
    assert len(planned.notes) == 1 and "pruning after layers (0, 1, 3)" in planned.notes[0]
    assert "(2, 6, 15)" in planned.notes[0] and "6 decoder layers" in planned.notes[0]
    assert vlmzip.plan(load(deep_dir), "sparsevlm", tokens=TOKENS, layers=(0, 1, 3)).notes == ()


def test_sparsevlm_keep_all_reproduces_vanilla(deep_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    model = load(deep_dir)
    with torch.no_grad():
        before = model(**inputs).logits
        with vlmzip.compressed(model, "sparsevlm", ratio=1.0):
            during = model(**inputs).logits
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)


def batch_equals_singles(model, processor, images, texts, **knobs):
    """Greedy generate on a left-padded batch equals each prompt alone (tokens and every step's logits)."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    batched = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        single_inputs = processor(images=[image], text=[text], return_tensors="pt")
        single = model.generate(**single_inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1]:],
                           batched.sequences[i, inputs["input_ids"].shape[1]:])
        for step in range(NEW):
            torch.testing.assert_close(single.logits[step][0], batched.logits[step][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("knobs", [{}, {"version": "2.0"}, {"keep_positions": True}, {"recycle": "sum"}])
def test_sparsevlm_batch_equals_single_runs(deep_dir, processor, batch_inputs, knobs):
    _, images, texts = batch_inputs
    model = load(deep_dir)
    with vlmzip.compressed(model, "sparsevlm", tokens=TOKENS, **knobs):
        batch_equals_singles(model, processor, images, texts)


def test_sparsevlm_rows_with_two_images_keep_per_image(deep_dir, processor, batch_inputs):
    _, images, _ = batch_inputs
    two = "USER: <image>\n<image>\nsame shape ? ASSISTANT:"
    one = "USER: <image>\nhow many ? ASSISTANT:"
    inputs = processor(images=[images[0], images[1], images[2]], text=[two, one], return_tensors="pt", padding=True)
    model = load(deep_dir)
    vlmzip.compress(model, "sparsevlm", tokens=TOKENS)
    batched = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    for row, (text, imgs) in enumerate([(two, images[:2]), (one, images[2:])]):
        single_inputs = processor(images=imgs, text=[text], return_tensors="pt")
        single = model.generate(**single_inputs, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(single[0, single_inputs["input_ids"].shape[1]:], batched[row, inputs["input_ids"].shape[1]:])


def test_visionzip_then_sparsevlm_compose(deep_dir, batch_inputs):
    """Seed 000 Table 5: VisionZip to 128 (here 14 of 64), then SparseVLM's 64 schedule (here 7 / 3 / 2)."""
    inputs, _, _ = batch_inputs
    model = load(deep_dir)
    stages = [("visionzip", {"tokens": 14}), ("sparsevlm", {"tokens": 7})]
    planned = vlmzip.plan(model, stages)
    # 14 -> keep 7, recycle int(7 * .3) + 1 = 3 into 1 -> 8 -> keep 3 + 1 -> 4 -> keep 2 + 1 -> 3
    assert (planned.tokens, planned.final_tokens) == (14, 3)
    with vlmzip.compressed(model, stages):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    full = inputs["input_ids"].shape[1] - 64 + 14 + 1
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [full, full - 6, full - 10, full - 10,
                                                                     full - 11, full - 11]


def test_second_turn_continues_the_renumbered_cache(deep_dir, processor, batch_inputs):
    """A later text-only turn on the pruned cache equals the reference run on the whole conversation with
    turn 1's selection held fixed (positions keep counting from the renumbered prompt)."""
    _, images, texts = batch_inputs
    model = load(deep_dir)
    first = processor(images=[images[1]], text=[texts[1]], return_tensors="pt")
    plan = (33, 22, 12)
    with torch.no_grad():
        _, steps = sparsevlm_reference(model, first, [0, 1, 3], plan)
        vlmzip.compress(model, "sparsevlm", tokens=TOKENS)
        turn1 = model.generate(**first, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        follow = processor.tokenizer(" USER: and now ? ASSISTANT:", return_tensors="pt", add_special_tokens=False)
        ids = torch.cat([turn1.sequences, follow["input_ids"]], dim=1)
        tail = ids.shape[1] - turn1.cache.get_seq_length()
        turn2 = model(input_ids=ids[:, -tail:], past_key_values=turn1.cache).logits
        expected, _ = sparsevlm_reference(model, {**first, "input_ids": ids}, [0, 1, 3], plan, fixed=steps)
    torch.testing.assert_close(turn2, expected[:, -tail:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_sparsevlm_on_qwen_vl_keeps_mrope_positions(tmp_path, version):
    from conftest import random_image
    from transformers import AutoModelForImageTextToText

    from vlmzip.adapters.qwen_vl import load_processor
    from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl

    build_qwen_vl(tmp_path, QwenVLSpec(text_layers=5), version=version)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor = load_processor(tmp_path)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
             "text": q}]}], add_generation_prompt=True) for q in ("what is it ?", "is there a red circle left of it ?")]
    images = [random_image(0, (130, 120)), random_image(1, (96, 144))]
    inputs = processor(images=images[:1], text=texts[:1], return_tensors="pt")
    with pytest.raises(ValueError, match="keep_positions=True"):
        with vlmzip.compressed(model, "sparsevlm", ratio=0.25, keep_positions=False):
            model(**inputs)
    for knobs in ({"ratio": 0.25}, {"ratio": 0.25, "version": "2.0"}):
        with vlmzip.compressed(model, "sparsevlm", **knobs):
            batch_equals_singles(model, processor, images, texts)


def test_sparsevlm_on_llava_next(tmp_path):
    from conftest import chat_prompt, random_image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from vlmzip.builders.llava_next import LlavaNextSpec, build_llava_next

    build_llava_next(tmp_path, LlavaNextSpec(image_size=84, patch_size=14, vision_layers=2, text_layers=5))
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    images = [random_image(0, (130, 120)), random_image(1, (200, 60))]
    texts = [chat_prompt(processor, q) for q in ("what color is the shape ?", "how many ?")]
    with vlmzip.compressed(model, "sparsevlm", ratio=0.2):
        batch_equals_singles(model, processor, images, texts)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"tokens": 65}, "larger than the 64"),
        ({"tokens": 0}, ">= 1"),
        ({"version": "3.0"}, "version must be one of"),
        ({"recycle": "max"}, "recycle must be one of"),
        ({"layers": (2, 1, 3)}, "3 increasing"),
        ({"layers": (0, 1, 5)}, "the last pruning layer must be <= 4"),
    ],
)
def test_bad_sparsevlm_knobs_get_clear_errors(deep_dir, batch_inputs, knobs, match):
    inputs, _, _ = batch_inputs
    model = load(deep_dir)
    with pytest.raises(ValueError, match=match):
        vlmzip.compress(model, "sparsevlm", **knobs)
        model(**inputs)
    vlmzip.decompress(model) if vlmzip.is_compressed(model) else None


def test_schedules_are_the_authors_at_their_budgets():
    assert schedule(Budget(tokens=64), 576, "1.0") == (66, 30, 17)
    assert schedule(Budget(tokens=128), 576, "2.0") == (238, 108, 60)
    assert schedule(Budget(tokens=28), 256, "1.0") == (29, 13, 8)  # the lab model's 64-equivalent
    assert schedule(Budget(tokens=160), 576, "1.0") == (302, 155, 73)  # halfway between 128 and 192
    assert schedule(Budget(ratio=1.0), 576, "1.0") is None
    assert recycled_count(510) == (154, 16) and recycled_count(0) == (0, 0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 40), seed=st.integers(0, 1000))
def test_cluster_and_merge_is_the_released_algorithm(n, k, seed):
    k = min(k, n)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    got = cluster_and_merge(x, k)
    assert got.shape == (k, 8) and torch.isfinite(got).all()
    torch.testing.assert_close(got, reference_cluster_and_merge(x[None], k)[0], atol=1e-5, rtol=1e-5)
    sums = cluster_and_merge(x, k, "sum")
    assert torch.allclose(sums.sum(0), x.sum(0), atol=1e-4)  # every token lands in exactly one cluster
