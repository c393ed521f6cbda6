"""saliency (seed 002, Algorithm 1) and the LLM-side Cluster & Saliency against references written here
from layer 0's weights: the score, exactness against dropping tokens before the LLM, cache, batch, counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import chat_prompt, random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlmzip
from vlmzip.budgets import Budget
from vlmzip.methods import saliency as saliency_module
from vlmzip.methods.base import LLMTokens
from vlmzip.methods.cluster import saliency_clusters
from vlmzip.methods.kmeans import cluster_means
from vlmzip.methods.saliency import cluster_counts, cluster_saliency_llm, text_rows, text_saliency

NEW = 4
VISUAL = 64  # the test LLaVA: 8 x 8 patches per image


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def input_embeds(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L, D) LLM input embeddings of one unpadded prompt and its (L,) image-token mask."""
    ids = inputs["input_ids"]
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    features = torch.cat(list(inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    image = ids == model.config.image_token_id
    return embeds.masked_scatter(image.unsqueeze(-1), features), image[0]


def reference_score(model, embeds: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 by hand from layer 0: (L,) score of every token (0 at text), one unpadded prompt."""
    lm = model.model.language_model
    layer = lm.layers[0]
    attn = layer.self_attn
    length = embeds.shape[1]
    x = layer.input_layernorm(embeds)
    q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(embeds, torch.arange(length).unsqueeze(0))
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    text = torch.arange(length) > image.nonzero().max()  # the tokens after the image
    visual = image.nonzero().squeeze(1)
    scores = (q[0][:, text] @ k[0][:, visual].transpose(-1, -2)) * attn.head_dim**-0.5  # (H, T, V)
    per_visual = scores.softmax(dim=1).amax(dim=0).mean(dim=0)  # softmax over text, max over heads, mean
    return torch.zeros(length).index_put((visual,), per_visual)


def reference_logits(model, embeds: torch.Tensor, kept: torch.Tensor, extra: list[torch.Tensor] = (),
                     after: int = -1) -> torch.Tensor:
    """The LLM on the prompt with only the ``kept`` positions (and the ``extra`` embeddings inserted right
    after position ``after``), positions renumbered 0, 1, ...: what dropping placeholders before the LLM gives."""
    kept = kept.sort().values
    seq = embeds[:, kept]
    if len(extra):
        at = int((kept <= after).sum())
        seq = torch.cat([seq[:, :at], torch.stack(list(extra)).unsqueeze(0), seq[:, at:]], dim=1)
    out = model.model.language_model(inputs_embeds=seq)
    return model.lm_head(out.last_hidden_state)


def single(processor, index: int = 0, question: str = "what color is the shape ?"):
    return processor(images=[random_image(index)], text=[chat_prompt(processor, question)], return_tensors="pt")


class Spy:
    """Records the scores ``top_per_image`` receives inside the saliency step."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.original = saliency_module.top_per_image

    def __call__(self, scores, tokens):
        self.scores.append(scores.detach().clone())
        return self.original(scores, tokens)


def test_score_equals_the_hand_reference_from_layer_0(model, processor, monkeypatch):
    inputs = single(processor)
    spy = Spy()
    monkeypatch.setattr(saliency_module, "top_per_image", spy)
    with torch.no_grad():
        embeds, image = input_embeds(model, inputs)
        expected = reference_score(model, embeds, image)
        with vlmzip.compressed(model, "saliency", tokens=16):
            model(**inputs)
    assert len(spy.scores) == 1
    torch.testing.assert_close(spy.scores[0][0], expected, atol=1e-6, rtol=1e-5)
    assert expected[image].min() > 0


@pytest.mark.parametrize("keep", [1, 16, 40])
def test_saliency_equals_dropping_the_same_tokens_before_the_llm(model, processor, keep):
    inputs = single(processor, 1, "is there a red circle left of the square ?")
    with torch.no_grad():
        embeds, image = input_embeds(model, inputs)
        score = reference_score(model, embeds, image)
        top = score.topk(keep).indices
        kept = torch.cat([(~image).nonzero().squeeze(1), top])
        expected = reference_logits(model, embeds, kept)
        with vlmzip.compressed(model, "saliency", tokens=keep):
            got = model(**inputs).logits
            greedy = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    assert got.shape == expected.shape == (1, inputs["input_ids"].shape[1] - (VISUAL - keep), got.shape[-1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # cached generate == recomputing from scratch with the prefill's selection held fixed
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(NEW):
            embeds, _ = input_embeds(model, {**inputs, "input_ids": ids})
            step = reference_logits(model, embeds, torch.cat([kept, torch.arange(embeds.shape[1])[image.numel():]]))
            ids = torch.cat([ids, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, ids)


def test_variant_3_equals_kept_tokens_plus_cluster_means_before_the_llm(model, processor):
    inputs = single(processor, 2)
    keep, k = 16, 4
    with torch.no_grad():
        embeds, image = input_embeds(model, inputs)
        score = reference_score(model, embeds, image)
        visual = image.nonzero().squeeze(1)
        x, sal = embeds[:, visual], score[visual].unsqueeze(0)
        picked, labels, clusters = saliency_clusters(x, sal, keep, 3, k, torch.zeros(1, dtype=torch.int64))
        assert clusters == 4 and int(picked.sum()) == keep - clusters
        rest = torch.where(picked, clusters, labels)
        means = cluster_means(x, rest, clusters + 1)[0, :clusters]
        mean_pos = cluster_means(torch.arange(VISUAL).float().view(1, -1, 1), rest, clusters + 1)[0, :clusters, 0]
        extra = [means[c] for c in mean_pos.argsort(stable=True)]
        kept = torch.cat([(~image).nonzero().squeeze(1), visual[picked[0]]])
        expected = reference_logits(model, embeds, kept, extra, after=int(visual.max()))
        with vlmzip.compressed(model, "cluster_saliency_llm", tokens=keep, variant=3, k=k):
            got = model(**inputs).logits
    assert got.shape == expected.shape == (1, inputs["input_ids"].shape[1] - (VISUAL - keep), got.shape[-1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["saliency", "cluster_saliency_llm"])
def test_keep_all_reproduces_vanilla(model, batch_inputs, method):
    inputs, _, _ = batch_inputs
    with torch.no_grad():
        before = model(**inputs).logits
        with vlmzip.compressed(model, method, ratio=1.0):
            during = model(**inputs).logits
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "knobs"), [("saliency", {}), ("cluster_saliency_llm", {"variant": 1}),
                                               ("cluster_saliency_llm", {"variant": 2}),
                                               ("cluster_saliency_llm", {"variant": 3, "k": 5})])
def test_batch_equals_single_runs(model, processor, batch_inputs, method, knobs):
    inputs, images, texts = batch_inputs
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    vlmzip.compress(model, method, tokens=20, **knobs)
    batched = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        one = processor(images=[image], text=[text], return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
        start, batch_start = one["input_ids"].shape[1], inputs["input_ids"].shape[1]
        assert torch.equal(alone.sequences[0, start:], batched.sequences[i, batch_start:])
        for step in range(NEW):
            torch.testing.assert_close(alone.logits[step][0], batched.logits[step][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "knobs"), [("saliency", {}), ("cluster_saliency_llm", {"variant": 3, "k": 3})])
def test_every_image_keeps_its_budget(model, processor, method, knobs):
    images = [random_image(i) for i in range(3)]
    two = "USER: <image>\n<image>\nsame shape ? ASSISTANT:"
    one = "USER: <image>\nhow many ? ASSISTANT:"
    inputs = processor(images=images, text=[two, one], return_tensors="pt", padding=True)
    vlmzip.compress(model, method, tokens=12, **knobs)
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    full = inputs["input_ids"].shape[1] + 1
    # row 0 drops 2 x (64 - 12) slots, row 1 (left padded to row 0's length) 64 - 12: the longer row sets the width
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [full - (VISUAL - 12)] * 2
    for row, (text, imgs) in enumerate([(two, images[:2]), (one, images[2:])]):
        alone = processor(images=imgs, text=[text], return_tensors="pt")
        seq = model.generate(**alone, max_new_tokens=2, do_sample=False)
        assert torch.equal(seq[0, alone["input_ids"].shape[1]:], out.sequences[row, inputs["input_ids"].shape[1]:])


@pytest.mark.parametrize(
    ("method", "knobs", "match"),
    [
        ("saliency", {"tokens": 65}, "tokens=65 is larger than the 64"),
        ("saliency", {"layer": 2}, "no knob 'layer'"),
        ("cluster_saliency_llm", {"tokens": 8, "variant": 4}, "variant must be 1"),
        ("cluster_saliency_llm", {"tokens": 8, "k": 0}, "k must be >= 1"),
        ("cluster_saliency_llm", {}, "needs a budget"),
    ],
)
def test_bad_knobs_get_clear_errors(model, method, knobs, match):
    with pytest.raises(ValueError, match=match):
        vlmzip.compress(model, method, **knobs)
    assert not vlmzip.is_compressed(model)


def test_a_prompt_ending_with_its_image_is_refused(model, processor):
    inputs = processor(images=[random_image(0)], text=["USER: what is it ? <image>"], return_tensors="pt")
    with vlmzip.compressed(model, "saliency", tokens=8), pytest.raises(ValueError, match="question after the image"):
        model(**inputs)


# -- the pure functions, on synthetic LLMTokens ---------------------------------------------------------------


def synthetic(logits: torch.Tensor, visual: torch.Tensor, image: torch.Tensor, keep, real=None, hidden=None):
    """LLMTokens whose ``logits(rows)`` gathers rows of a fixed (B, H, L, L) score table."""

    def rows_logits(rows: torch.Tensor) -> torch.Tensor:
        return logits.gather(2, rows[:, None, :, None].expand(-1, logits.shape[1], -1, logits.shape[-1]))

    batch, length = visual.shape
    hidden = hidden if hidden is not None else torch.zeros(batch, length, 4)
    return LLMTokens(hidden=hidden, visual=visual, image=image, keep=keep, attention=None, layer=0,
                     logits=rows_logits, real=real if real is not None else torch.ones_like(visual))


@st.composite
def layouts(draw):
    """One row: [pad][text][image 0][text][image 1]...[text after], random logits, a keep per image."""
    pad, head, tail = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(2, 9), min_size=1, max_size=3))
    parts_visual, parts_image = [False] * (pad + head), [-1] * (pad + head)
    for i, n in enumerate(sizes):
        parts_visual += [True] * n + [False]
        parts_image += [i] * n + [-1]
    parts_visual += [False] * tail
    parts_image += [-1] * tail
    length = len(parts_visual)
    heads = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    logits = torch.randn(1, heads, length, length, generator=torch.Generator().manual_seed(seed))
    keep = [[draw(st.integers(1, n)) for n in sizes]]
    real = torch.tensor([[i >= pad for i in range(length)]])
    return logits, torch.tensor([parts_visual]), torch.tensor([parts_image]), keep, real, sizes, tail


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts())
def test_text_saliency_invariants(layout):
    logits, visual, image, keep, real, sizes, tail = layout
    tokens = synthetic(logits, visual, image, keep, real)
    rows, valid = text_rows(tokens)
    tail += 1  # the separator after the last image, then the tail
    assert int(valid.sum()) == tail  # only the tokens after the last image rate
    score = text_saliency(tokens)
    assert bool((score[~visual] == 0).all()) and bool((score[visual] > 0).all())
    heads = logits.shape[1]
    assert bool((score[visual] <= min(1.0, heads / tail) + 1e-6).all())  # a mean over text of max-over-heads softmax
    # the softmax runs over the text rows: a constant added to one key column (per head) changes nothing
    shift = torch.randn(1, heads, 1, logits.shape[-1], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(text_saliency(synthetic(logits + shift, visual, image, keep, real)), score)
    keepmask = saliency_module.saliency(tokens)
    for i in range(len(sizes)):
        assert int((keepmask & (image == i)).sum()) == keep[0][i]
    assert bool(keepmask[~visual].all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), variant=st.sampled_from([1, 2, 3]), k=st.integers(1, 5), share=st.floats(0.1, 1.0))
def test_cluster_saliency_llm_keeps_and_adds_its_plan(layout, variant, k, share):
    logits, visual, image, _, real, sizes, _ = layout
    budget = Budget(ratio=share)
    step = type("Step", (), {"knobs": {"budget": budget, "variant": variant, "k": k}})()
    plans = [cluster_counts(n, n, step) for n in sizes]
    assert all(after == budget.keep(n) for (_, after), n in zip(plans, sizes, strict=True))
    hidden = torch.randn(1, visual.shape[1], 4, generator=torch.Generator().manual_seed(len(sizes)))
    tokens = synthetic(logits, visual, image, [[kept for kept, _ in plans]], real, hidden)
    out = cluster_saliency_llm(tokens, budget, variant=variant, k=k)
    for i, (kept, after) in enumerate(plans):
        assert int((out.keep & (image == i)).sum()) == kept
        added = 0 if out.extra_image is None else int((out.extra_image == i).sum())
        assert kept + added == after
    assert bool(out.keep[~visual].all())


# -- the other families ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl

    out = tmp_path_factory.mktemp("tiny-qwen2-sal")
    build_qwen_vl(out, QwenVLSpec(), version="2")
    return out


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory) -> Path:
    from vlmzip.builders.llava_next import LlavaNextSpec, build_llava_next

    out = tmp_path_factory.mktemp("tiny-next-sal")
    build_llava_next(out, LlavaNextSpec(image_size=84, patch_size=14, vision_layers=2, text_layers=3))
    return out


def family_batch(folder: Path, qwen: bool):
    if qwen:
        from vlmzip.adapters.qwen_vl import load_processor

        processor = load_processor(folder)
    else:
        processor = AutoProcessor.from_pretrained(folder)
    images = [random_image(i, size) for i, size in enumerate([(130, 120), (200, 60)])]
    texts = []
    for q in ["what color is the shape ?", "how many ?"]:
        content = [{"type": "image"}, {"type": "text", "text": q}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    return processor, images, texts


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-next"])
def test_other_families_smoke(family, request):
    folder = request.getfixturevalue("qwen_dir" if family == "qwen2-vl" else "next_dir")
    processor, images, texts = family_batch(folder, family == "qwen2-vl")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        vanilla = model(**inputs).logits
        with vlmzip.compressed(model, "saliency", ratio=1.0):
            torch.testing.assert_close(model(**inputs).logits, vanilla, atol=1e-5, rtol=1e-5)
    for method, knobs in [("saliency", {}), ("cluster_saliency_llm", {"variant": 3, "k": 2})]:
        vlmzip.compress(model, method, ratio=0.25, **knobs)
        batched = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for i, (image, text) in enumerate(zip(images, texts, strict=True)):
            one = processor(images=[image], text=[text], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=3, do_sample=False)
            assert torch.equal(alone[0, one["input_ids"].shape[1]:], batched[i, inputs["input_ids"].shape[1]:])
        vlmzip.decompress(model)


def test_a_second_turn_continues_the_layer_0_pruned_cache(model, processor):
    """After generate, turn 2 on the cache equals the LLM run on the whole conversation with turn 1's image
    tokens dropped before it (positions renumbered), i.e. saliency stays a pre-LLM shrink across turns."""
    inputs = single(processor, 1, "is there a red circle left of the square ?")
    keep = 8
    with torch.no_grad():
        embeds, image = input_embeds(model, inputs)
        top = reference_score(model, embeds, image).topk(keep).indices
        vlmzip.compress(model, "saliency", tokens=keep)
        turn1 = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        follow = processor.tokenizer(" USER: and the shape ? ASSISTANT:", add_special_tokens=False,
                                     return_tensors="pt")["input_ids"]
        ids = torch.cat([turn1.sequences, follow], dim=1)
        turn2 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=turn1.cache,
                               max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
        vlmzip.decompress(model)
        full, _ = input_embeds(model, {**inputs, "input_ids": ids})
        kept = torch.cat([(~image).nonzero().squeeze(1), top, torch.arange(image.numel(), ids.shape[1])])
        expected = reference_logits(model, full, kept)
    assert torch.equal(turn2.sequences[:, : ids.shape[1]], ids)
    torch.testing.assert_close(turn2.logits[0], expected[:, -1], atol=1e-4, rtol=1e-4)


def test_a_second_turn_on_a_forward_pruned_layer_0_cache_is_refused(model, processor):
    inputs = single(processor)
    vlmzip.compress(model, "saliency", tokens=8)
    with torch.no_grad():
        turn1 = model(**inputs, use_cache=True)
    ids = torch.cat([inputs["input_ids"], torch.tensor([[5, 6, 7]])], dim=1)
    with pytest.raises(ValueError, match="pruned before decoder layer 0"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=turn1.past_key_values,
                       max_new_tokens=1)
    with pytest.raises(ValueError, match="pruned before decoder layer 0"), torch.no_grad():
        model(input_ids=ids[:, -3:], cache=turn1.past_key_values)


def test_viz_panel_says_where_saliency_prunes(model, processor):
    from PIL import Image

    from vlmzip.viz import method_panel, view_of

    view = view_of(model, processor, Image.new("RGB", (112, 112), (120, 80, 40)))
    caption, _, keys = method_panel(model, view, "saliency", {"tokens": 8})
    assert caption == "Saliency, 8 of 64 visual tokens from LLM layer 0 on" and keys == set()
