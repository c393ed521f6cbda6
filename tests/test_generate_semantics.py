"""generate() keeps its meaning on a compressed model; copies, pickles and batch-invariant random draws."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import load

import vlmzip


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", [("visionzip", {"tokens": 16}), ("fastv", {"layer": 1, "tokens": 16})])
def test_max_and_min_length_count_from_the_callers_prompt(model, batch_inputs, method):
    inputs, _, _ = batch_inputs
    prompt = inputs["input_ids"].shape[1]
    vanilla = model.generate(**inputs, max_length=prompt + 4, min_length=prompt + 4, do_sample=False)
    with vlmzip.compressed(model, method[0], **method[1]):
        squeezed = model.generate(**inputs, max_length=prompt + 4, min_length=prompt + 4, do_sample=False)
    assert vanilla.shape == squeezed.shape == (3, prompt + 4)
    assert torch.equal(squeezed[:, :prompt], inputs["input_ids"])


def test_default_max_length_counts_from_the_callers_prompt(model, batch_inputs):
    inputs, _, _ = batch_inputs
    prompt = inputs["input_ids"].shape[1]
    model.generation_config.max_length = prompt + 3
    model.generation_config.min_length = prompt + 3
    with vlmzip.compressed(model, "random", tokens=8):
        out = model.generate(**inputs, do_sample=False)
    assert out.shape == (3, prompt + 3)


def test_beams_and_return_sequences_start_with_their_own_prompt(model, batch_inputs):
    inputs, _, _ = batch_inputs
    prompt = inputs["input_ids"].shape[1]
    with vlmzip.compressed(model, "visionzip", tokens=16):
        beams = model.generate(**inputs, num_beams=3, num_return_sequences=2, max_new_tokens=3, do_sample=False)
        sampled = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=3, top_k=5)
    for out in (beams, sampled):
        assert out.shape[0] == 6
        assert torch.equal(out[:, :prompt], inputs["input_ids"].repeat_interleave(2, dim=0))


IN_LLM = [("fastv", {"layer": 2, "tokens": 20}), ("sparsevlm", {"tokens": 20}), ("saliency", {"tokens": 20})]


@pytest.mark.parametrize("method", IN_LLM, ids=[m for m, _ in IN_LLM])
def test_in_llm_methods_prune_the_rows_generate_expands(six_layer_dir, batch_inputs, method):
    """Beams, num_return_sequences and sampling repeat each caller row: every copy is pruned as its row is
    (one-best sampling returns each row's greedy answer; a one-step beam search its greedy first token)."""
    inputs, _, _ = batch_inputs
    model = load(six_layer_dir)
    name, knobs = method
    prompt = inputs["input_ids"].shape[1]
    with vlmzip.compressed(model, name, **knobs):
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=2)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
        step = model.generate(**inputs, max_new_tokens=1, num_beams=2, do_sample=False)
    assert torch.equal(sampled, greedy.repeat_interleave(2, dim=0))
    assert beams.shape[0] == 6 and torch.equal(beams[:, :prompt], inputs["input_ids"].repeat_interleave(2, dim=0))
    assert torch.equal(step, greedy[:, : prompt + 1])


def test_beam_search_on_compressed_equals_beam_search_on_the_shrunk_prompt(model, batch_inputs):
    """Beams run on the compressed prompt: the continuation matches greedy's first token at beam width 1."""
    inputs, _, _ = batch_inputs
    with vlmzip.compressed(model, "visionzip", tokens=16):
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        one_beam = model.generate(**inputs, max_new_tokens=4, num_beams=1, do_sample=False)
    assert torch.equal(greedy, one_beam)


@pytest.mark.parametrize("method", [("visionzip", {"tokens": 16}), ("fastv", {"layer": 1, "tokens": 16})])
def test_deepcopy_of_a_compressed_model_is_compressed_and_independent(model, batch_inputs, method):
    inputs, _, _ = batch_inputs
    vanilla = logits(model, inputs)
    vlmzip.compress(model, method[0], **method[1])
    squeezed = logits(model, inputs)
    twin = copy.deepcopy(model)
    assert vlmzip.is_compressed(twin) and vlmzip.state_of(twin) is not vlmzip.state_of(model)
    assert torch.equal(logits(twin, inputs), squeezed)
    vlmzip.decompress(twin)
    assert torch.equal(logits(twin, inputs), vanilla)
    assert torch.equal(logits(model, inputs), squeezed), "the original is still compressed"
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    twin_again = copy.deepcopy(twin)
    assert torch.equal(logits(twin_again, inputs), vanilla), "the copy has its own weights"


@pytest.mark.parametrize("method", [("visionzip", {"tokens": 16}), ("fastv", {"layer": 1, "tokens": 16})])
def test_pickled_compressed_model_round_trips(model, batch_inputs, method):
    """Pickled before its first image forward: transformers' own output-capturing hooks, installed by that
    forward, make even an uncompressed LLaVA unpicklable afterwards."""
    inputs, _, _ = batch_inputs
    vlmzip.compress(model, method[0], **method[1])
    restored = pickle.loads(pickle.dumps(model))
    assert vlmzip.is_compressed(restored)
    assert torch.equal(logits(restored, inputs), logits(model, inputs))
    out = restored.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    vlmzip.decompress(restored)
    assert "forward" not in vars(restored) and "generate" not in vars(restored)


def test_random_picks_the_same_tokens_for_an_image_wherever_it_sits(model, processor, batch_inputs):
    _, images, texts = batch_inputs
    vlmzip.compress(model, "random", tokens=10, seed=3)

    def picks(order: list[int]) -> dict[int, list[int]]:
        batch = processor(images=[images[i] for i in order], text=[texts[i] for i in order], return_tensors="pt",
                          padding=True)
        with vlmzip.recorded(model) as selections, torch.no_grad():
            model(**batch)
        return {i: selections[0].indices[row].tolist() for row, i in enumerate(order)}

    alone, forward, backward = picks([0]), picks([0, 1, 2]), picks([2, 1, 0])
    assert alone[0] == forward[0] == backward[0]
    assert forward[1] == backward[1] and forward[2] == backward[2]
    assert forward[0] != forward[1], "different images get different draws"


def test_recording_keeps_nothing_alive_outside_its_block(model, batch_inputs):
    inputs, _, _ = batch_inputs
    vlmzip.compress(model, "visionzip", tokens=16)
    with vlmzip.recorded(model) as selections, torch.no_grad():
        model(**inputs)
    assert len(selections) == 1 and selections[0].features.device.type == "cpu"
    assert vlmzip.state_of(model).recording is None
    with torch.no_grad():
        model(**inputs)
    assert len(selections) == 1


def test_caller_features_cannot_bypass_compression(model, batch_inputs):
    inputs, _, _ = batch_inputs
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    vlmzip.compress(model, "visionzip", tokens=16)
    call = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="pass pixel_values, not mm_encoder_outputs"):
        model(**call, mm_encoder_outputs={"image": features})


def test_in_llm_methods_refuse_labels(model, batch_inputs):
    inputs, _, _ = batch_inputs
    vlmzip.compress(model, "fastv", layer=1)
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])


def test_image_feature_override_passes_extra_kwargs_to_the_tower(model, batch_inputs):
    inputs, _, _ = batch_inputs
    vlmzip.compress(model, "visionzip", tokens=16)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], output_attentions=True)
    assert out.last_hidden_state.shape[0] == 3


def test_padding_side_comes_from_the_caller(model, processor, batch_inputs):
    _, images, texts = batch_inputs
    two = "USER: <image>\n<image>\nsame ? ASSISTANT:"
    rows = [(two, images[:2]), (texts[2], images[2:3])]
    right = processor(images=images[:3], text=[two, texts[2]], return_tensors="pt", padding=True,
                      padding_side="right")
    vlmzip.compress(model, "random", tokens=4, padding_side="right")
    assert vlmzip.state_of(model).padding_side == "right"
    with torch.no_grad():
        out = model(**right).logits
        for row, (text, imgs) in enumerate(rows):
            single = model(**processor(images=imgs, text=[text], return_tensors="pt")).logits[0]
            torch.testing.assert_close(out[row, : single.shape[0]], single, atol=1e-4, rtol=1e-4)
    lengths = [right["input_ids"].shape[1] - 60 * len(imgs) for _, imgs in rows]  # padding columns stay
    assert out.shape[1] == max(lengths) and min(lengths) < max(lengths), "rows shrank by different amounts"
    vlmzip.decompress(model)
    with pytest.raises(ValueError, match="padding_side must be"):
        vlmzip.compress(model, "random", tokens=4, padding_side="middle")


def test_mixed_images_per_row_shrink_rows_by_different_amounts(model, processor, batch_inputs):
    _, images, texts = batch_inputs
    two = "USER: <image>\n<image>\nsame shape ? ASSISTANT:"
    inputs = processor(images=images[:3], text=[two, texts[2]], return_tensors="pt", padding=True)
    vlmzip.compress(model, "visionzip", tokens=16)
    batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for row, (text, imgs) in enumerate([(two, images[:2]), (texts[2], images[2:3])]):
        single_inputs = processor(images=imgs, text=[text], return_tensors="pt")
        single = model.generate(**single_inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(single[0, single_inputs["input_ids"].shape[1]:], batched[row, inputs["input_ids"].shape[1]:])
