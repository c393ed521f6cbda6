"""FastV inside the LLM against an eager, layer-by-layer reference written here; cache, batch, composition."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TEST_CFG, load
from reference import eager_layer

import vlmzip
from vlmzip.builders.llava import build_llava

NEW = 5


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """The test LLaVA with 4 decoder layers, so pruned segments span several layers."""
    out = tmp_path_factory.mktemp("tiny-llava-4")
    build_llava(out, replace(TEST_CFG, text_layers=4))
    return out


def fastv_reference(model, inputs, layer_k: int, keep: int, top: torch.Tensor | None = None):
    """The released FastV algorithm on one unpadded prompt, eager and explicit.

    Returns (logits of the kept sequence, the kept image positions). With ``top`` given, those image
    positions are kept instead of ranking again: the KV-cache variant selects once per prefill, so
    tokens generated later do not change the selection.
    """
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    features = torch.cat(list(inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    image = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image.unsqueeze(-1), features)
    lm = inner.language_model
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    hidden = embeds
    probs = None
    for index, layer in enumerate(lm.layers):
        if index == layer_k:  # rank image tokens by the last token's head-mean attention in layer K-1
            if top is None:
                scores = probs[0, :, -1, :].mean(0)
                image_pos = image[0].nonzero().squeeze(1)
                top = image_pos[scores[image_pos].topk(keep).indices]
            kept = torch.cat([(~image[0]).nonzero().squeeze(1), top]).sort().values
            hidden, positions = hidden[:, kept], positions[:, kept]
        cos, sin = lm.rotary_emb(hidden, positions)
        length = hidden.shape[1]
        allowed = (positions[0].view(1, -1) <= positions[0].view(-1, 1)).unsqueeze(0).expand(1, length, length)
        hidden, probs = eager_layer(layer, hidden, cos, sin, allowed)
    return model.lm_head(lm.norm(hidden)), top


@pytest.mark.parametrize(("layer_k", "keep"), [(2, 16), (1, 40), (3, 5)])
def test_fastv_matches_the_eager_reference(deep_dir, processor, batch_inputs, layer_k, keep):
    _, images, texts = batch_inputs
    model = load(deep_dir)
    single = processor(images=[images[0]], text=[texts[0]], return_tensors="pt")
    with torch.no_grad():
        expected, top = fastv_reference(model, single, layer_k, keep)
        with vlmzip.compressed(model, "fastv", layer=layer_k, tokens=keep):
            got = model(**single).logits
            greedy = model.generate(**single, max_new_tokens=NEW, do_sample=False)
    assert got.shape == expected.shape == (1, single["input_ids"].shape[1] - (64 - keep), got.shape[-1])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    ids = single["input_ids"]  # greedy decoding from the reference, one full recomputation per token
    with torch.no_grad():
        for _ in range(NEW):
            step, _ = fastv_reference(model, {**single, "input_ids": ids}, layer_k, keep, top=top)
            ids = torch.cat([ids, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, ids)


def test_fastv_keep_all_reproduces_vanilla(deep_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    model = load(deep_dir)
    with torch.no_grad():
        before = model(**inputs).logits
        with vlmzip.compressed(model, "fastv", ratio=1.0):
            during = model(**inputs).logits
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)


def test_fastv_batch_equals_single_runs(deep_dir, processor, batch_inputs):
    inputs, images, texts = batch_inputs
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    model = load(deep_dir)
    vlmzip.compress(model, "fastv", tokens=20)
    batched = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        single_inputs = processor(images=[image], text=[text], return_tensors="pt")
        single = model.generate(**single_inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1]:],
                           batched.sequences[i, inputs["input_ids"].shape[1]:])
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


def test_rows_with_different_image_counts_prune_by_different_amounts(model, processor, batch_inputs):
    _, images, _ = batch_inputs
    two = "USER: <image>\n<image>\nsame shape ? ASSISTANT:"
    one = "USER: <image>\nhow many ? ASSISTANT:"
    inputs = processor(images=[images[0], images[1], images[2]], text=[two, one], return_tensors="pt", padding=True)
    vlmzip.compress(model, "fastv", layer=1, tokens=10)
    batched = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    for row, (text, imgs) in enumerate([(two, images[:2]), (one, images[2:])]):
        single_inputs = processor(images=imgs, text=[text], return_tensors="pt")
        single = model.generate(**single_inputs, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(single[0, single_inputs["input_ids"].shape[1]:], batched[row, inputs["input_ids"].shape[1]:])


def test_fastv_cache_holds_only_kept_tokens_after_layer_k(deep_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    model = load(deep_dir)
    with vlmzip.compressed(model, "fastv", layer=2, tokens=8):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    full = inputs["input_ids"].shape[1] + 1
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [full, full, full - 56, full - 56]


def test_visionzip_then_fastv_compose(model, batch_inputs):
    inputs, _, _ = batch_inputs
    planned = vlmzip.plan(model, [("visionzip", {"tokens": 32}), ("fastv", {"tokens": 16, "layer": 1})])
    assert (planned.vanilla_tokens, planned.tokens, planned.final_tokens) == (64, 32, 16)
    assert planned.layer_avg_tokens == pytest.approx((32 * 1 + 16 * 1) / 2)
    with vlmzip.compressed(model, [("visionzip", {"tokens": 32}), ("fastv", {"tokens": 16, "layer": 1})]):
        with torch.no_grad():
            logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - (64 - 16)
    assert out.cache.layers[0].keys.shape[2] == inputs["input_ids"].shape[1] - 32 + 1


@pytest.mark.parametrize(
    ("method", "match"),
    [
        ([("fastv", {"layer": 1}), ("visionzip", {"tokens": 8})], "pre-LLM methods before in-LLM"),
        ([("visionzip", {"tokens": 8}), ("random", {"tokens": 4})], "at most one method"),
        ([("fastv", {"layer": 2})], r"layer=2 is outside this LLM's decoder layers 1..1"),
        ([("fastv", {"tokens": 65, "layer": 1})], "fastv: tokens=65 is larger than the 64"),
    ],
)
def test_bad_compositions_get_clear_errors(model, method, match):
    with pytest.raises(ValueError, match=match):
        vlmzip.compress(model, method)
    assert not vlmzip.is_compressed(model)


def test_in_llm_methods_need_sdpa_or_eager(llava_dir):
    model = load(llava_dir)
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        vlmzip.compress(model, "fastv", layer=1)


def test_fastv_on_eager_attention_equals_sdpa(deep_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    sdpa, eager = load(deep_dir), load(deep_dir, attn_implementation="eager")
    with torch.no_grad():
        with vlmzip.compressed(sdpa, "fastv", layer=1, tokens=12):
            a = sdpa(**inputs).logits
        with vlmzip.compressed(eager, "fastv", layer=1, tokens=12):
            b = eager(**inputs).logits
    pads = (inputs["attention_mask"] == 0).sum(dim=1, keepdim=True)  # left padding, before the image
    real = torch.arange(a.shape[1]).unsqueeze(0) >= pads  # padding rows' logits are undefined in both
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)


def test_second_turn_reuses_the_pruned_cache(deep_dir, processor, batch_inputs):
    """Turn 2 (text only) continues turn 1's cache: its logits equal the eager reference run on the whole
    conversation with turn 1's selection held fixed."""
    _, images, texts = batch_inputs
    model = load(deep_dir)
    first = processor(images=[images[0]], text=[texts[0]], return_tensors="pt")
    with torch.no_grad():
        _, top = fastv_reference(model, first, 2, 12)
    vlmzip.compress(model, "fastv", layer=2, tokens=12)
    turn1 = model.generate(**first, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    follow = processor.tokenizer(" USER: and the shape ? ASSISTANT:", add_special_tokens=False,
                                 return_tensors="pt")["input_ids"]
    ids = torch.cat([turn1.sequences, follow], dim=1)
    turn2 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=turn1.cache, max_new_tokens=1,
                           do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(turn2.sequences[:, : ids.shape[1]], ids)
    assert turn1.cache.layers[2].keys.shape[2] == ids.shape[1] - (64 - 12)
    with torch.no_grad():
        expected, _ = fastv_reference(load(deep_dir), {**first, "input_ids": ids}, 2, 12, top=top)
    torch.testing.assert_close(turn2.logits[0][0], expected[0, -1], atol=1e-4, rtol=1e-4)


def test_two_threads_share_one_compressed_model(deep_dir, processor, batch_inputs):
    """Each forward's in-LLM state is per thread: concurrent calls give the same logits as sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    _, images, texts = batch_inputs
    model = load(deep_dir)
    vlmzip.compress(model, "fastv", layer=2, tokens=10)
    calls = [processor(images=[images[i]], text=[texts[i]], return_tensors="pt") for i in range(3)]
    with torch.no_grad():
        sequential = [model(**c).logits for c in calls]
        with ThreadPoolExecutor(3) as pool:
            parallel = list(pool.map(lambda c: model(**c).logits, calls * 3))
    for i, out in enumerate(parallel):
        torch.testing.assert_close(out, sequential[i % 3], atol=1e-5, rtol=1e-5)


def test_sliding_window_llms_are_refused_for_in_llm_methods(llava_dir):
    model = load(llava_dir)
    model.model.language_model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding-window"):
        vlmzip.compress(model, "fastv", layer=1)
