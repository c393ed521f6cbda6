"""generate() on a compressed model: KV cache exactness, batching with left padding, multi-turn."""

from __future__ import annotations

import pytest
import torch

import vlmzip

NEW = 6


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 16}), ("random", {"tokens": 12})])
def test_cached_generate_equals_uncached_recomputation(model, batch_inputs, method, knobs):
    inputs, _, _ = batch_inputs
    vlmzip.compress(model, method, **knobs)
    cached = greedy(model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(cached[:, :prompt_len], inputs["input_ids"]), "sequences start with the caller's prompt"

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False)
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(cached, ids)


def test_fastv_generate_prunes_once_and_decodes_from_the_cache(model, batch_inputs):
    # generate() encodes the images before its prefill (mm_encoder_outputs, no pixel_values): FastV must
    # still prune there. Reference: one compressed prefill, then a manual decode loop on its cache.
    inputs, _, _ = batch_inputs
    vlmzip.compress(model, "fastv", tokens=12, layer=1)
    out = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        step = model(**inputs, use_cache=True)
        cache = step.cache
        torch.testing.assert_close(out.logits[0], step.logits[:, -1], atol=1e-5, rtol=1e-5)
        for _ in range(NEW):
            next_token = step.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            step = model(input_ids=next_token, attention_mask=mask, cache=cache, use_cache=True)
    assert torch.equal(out.sequences, ids)
    full = inputs["input_ids"].shape[1] + NEW - 1
    # layer 0 holds every token; layer 1 on only the 12 kept of each image's 64 (rows padded to the longest)
    assert out.cache.layers[0].keys.shape[-2] == full
    assert out.cache.layers[1].keys.shape[-2] == full - (64 - 12)


def test_batch_of_three_equals_three_single_runs(model, processor, batch_inputs):
    inputs, images, texts = batch_inputs
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    vlmzip.compress(model, "visionzip", dominant=12, contextual=4)
    batched = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
    new_batched = batched.sequences[:, inputs["input_ids"].shape[1]:]
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        single_inputs = processor(images=[image], text=[text], return_tensors="pt")
        single = greedy(model, single_inputs, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1]:], new_batched[i])
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


def test_compressed_generation_differs_from_vanilla_prefill_length(model, batch_inputs):
    inputs, _, _ = batch_inputs
    with vlmzip.compressed(model, "visionzip", tokens=8):
        out = greedy(model, inputs, return_dict_in_generate=True)
    # the KV cache holds the shrunk prompt: 64 -> 8 visual tokens per image
    assert out.cache.get_seq_length() == inputs["input_ids"].shape[1] - 56 + NEW - 1


def test_multi_turn_continues_the_same_cache(model, processor, batch_inputs):
    _, images, texts = batch_inputs
    first = processor(images=[images[0]], text=[texts[0]], return_tensors="pt")
    vlmzip.compress(model, "visionzip", tokens=16)
    turn1 = greedy(model, first, return_dict_in_generate=True)
    follow = processor.tokenizer(" USER: and the shape ? ASSISTANT:", add_special_tokens=False,
                                 return_tensors="pt")["input_ids"]
    ids = torch.cat([turn1.sequences, follow], dim=1)
    mask = torch.ones_like(ids)
    cached_len = turn1.cache.get_seq_length()
    turn2 = model.generate(input_ids=ids, attention_mask=mask, cache=turn1.cache, max_new_tokens=NEW,
                           do_sample=False)
    assert turn1.cache.get_seq_length() > cached_len, "the second turn extended the first turn's cache"
    fresh = model.generate(input_ids=ids, attention_mask=mask, pixel_values=first["pixel_values"],
                           max_new_tokens=NEW, do_sample=False)
    assert torch.equal(turn2, fresh)
    assert torch.equal(turn2[:, : ids.shape[1]], ids)
