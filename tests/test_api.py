"""compress / decompress / compressed: exactness, instance isolation, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import load
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

import vlmzip


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_noop_method_reproduces_vanilla_logits_exactly(model, batch_inputs):
    inputs, _, _ = batch_inputs
    before = logits(model, inputs)
    with vlmzip.compressed(model, "vanilla"):
        during = logits(model, inputs)
    assert torch.equal(before, during)


def test_decompress_restores_exactly(model, batch_inputs):
    inputs, _, _ = batch_inputs
    before = logits(model, inputs)
    vlmzip.compress(model, "visionzip", tokens=16)
    squeezed = logits(model, inputs)
    assert squeezed.shape[1] == inputs["input_ids"].shape[1] - (64 - 16)
    vlmzip.decompress(model)
    assert not vlmzip.is_compressed(model)
    assert torch.equal(before, logits(model, inputs))
    for name in ("forward", "generate", "_vlmzip"):
        assert name not in vars(model)
    assert "get_image_features" not in vars(model.model)
    assert "forward" not in vars(model.model)


def test_compression_is_instance_only(llava_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    a, b = load(llava_dir), load(llava_dir)
    before = logits(b, inputs)
    class_forward = LlavaForConditionalGeneration.forward
    vlmzip.compress(a, "visionzip", dominant=10, contextual=4)
    assert LlavaForConditionalGeneration.forward is class_forward
    assert torch.equal(before, logits(b, inputs))
    assert b.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3
    assert logits(a, inputs).shape[1] == inputs["input_ids"].shape[1] - 50


def test_context_manager_restores_on_error(model, batch_inputs):
    inputs, _, _ = batch_inputs
    before = logits(model, inputs)
    with pytest.raises(RuntimeError, match="boom"), vlmzip.compressed(model, "random", tokens=8):
        raise RuntimeError("boom")
    assert not vlmzip.is_compressed(model)
    assert torch.equal(before, logits(model, inputs))


def test_vision_tower_keeps_sdpa(model, batch_inputs):
    inputs, _, _ = batch_inputs
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    with vlmzip.compressed(model, "visionzip", tokens=16):
        logits(model, inputs)
        assert model.model.vision_tower.config._attn_implementation == "sdpa"


def test_list_methods_describes_knobs():
    methods = {m["name"]: m for m in vlmzip.list_methods()}
    assert {"vanilla", "visionzip", "random", "spatial"} <= set(methods)
    knobs = {k["name"] for k in methods["visionzip"]["knobs"]}
    assert knobs == {"tokens", "ratio", "tokens_per_frame", "scope", "dominant", "contextual"}
    assert {k["name"] for k in methods["fastv"]["knobs"]} == {"tokens", "ratio", "layer"}  # in-LLM: no video knobs
    assert all(m["description"] for m in methods.values())


@pytest.mark.parametrize(
    ("method", "knobs", "match"),
    [
        ("visionzip", {"dominant": 60, "contextual": 10}, r"larger than the 64 .* <= 64"),
        ("visionzip", {"tokens": 65}, r"larger than the 64"),
        ("visionzip", {"tokens": 0}, r"tokens must be >= 1"),
        ("visionzip", {"tokens": -3}, r"tokens must be >= 1"),
        ("visionzip", {"dominant": 0, "contextual": 4}, r"dominant must be >= 1"),
        ("visionzip", {"dominant": 8, "contextual": -1}, r"contextual must be >= 0"),
        ("visionzip", {}, r"needs a budget"),
        ("visionzip", {"tokens": 64, "dominant": 54}, r"not both"),
        ("visionzip", {"tokens": 2.5}, r"must be an integer"),
        ("visionzip", {"budget": 64}, r"no knob 'budget'.*dominant, ratio, scope, tokens, tokens_per_frame"),
        ("random", {"tokens": 100}, r"larger than the 64"),
        ("random", {}, r"needs a budget"),
        ("nosuch", {}, r"unknown method 'nosuch'.*visionzip"),
    ],
)
def test_bad_knobs_get_clear_errors(model, method, knobs, match):
    with pytest.raises(ValueError, match=match):
        vlmzip.compress(model, method, **knobs)
    assert not vlmzip.is_compressed(model)


def test_already_compressed_is_an_error(model):
    vlmzip.compress(model, "visionzip", tokens=16)
    with pytest.raises(ValueError, match=r"already compressed with 'visionzip'.*decompress"):
        vlmzip.compress(model, "random", tokens=8)
    vlmzip.decompress(model)
    with pytest.raises(ValueError, match="not compressed"):
        vlmzip.decompress(model)


def test_unsupported_model_lists_supported_classes():
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    with pytest.raises(ValueError, match=r"does not support CLIPVisionModel.*LlavaForConditionalGeneration"):
        vlmzip.compress(tower, "visionzip", tokens=4)


def test_multi_layer_features_are_rejected(llava_dir):
    model = load(llava_dir)
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="single feature layer"):
        vlmzip.compress(model, "visionzip", tokens=16)


def test_prompt_without_matching_placeholders_is_an_error(model, batch_inputs):
    inputs, _, _ = batch_inputs
    broken = dict(inputs)
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    ids[0, first] = 5  # one placeholder short: the run no longer matches an image
    broken["input_ids"] = ids
    expected = r"run of 63 image placeholders that does not match the images. token counts \(64, 64, 64\)"
    with vlmzip.compressed(model, "visionzip", tokens=16), pytest.raises(ValueError, match=expected):
        model(**broken)


def test_labels_are_shrunk_with_the_sequence(model, batch_inputs):
    inputs, _, _ = batch_inputs
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with vlmzip.compressed(model, "visionzip", tokens=16):
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == labels.shape[1] - 48


def test_inner_llava_model_is_compressed_too(model, batch_inputs):
    inputs, _, _ = batch_inputs
    with vlmzip.compressed(model, "visionzip", tokens=16), torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        outer = model(**inputs, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[1] == inputs["input_ids"].shape[1] - 48
    torch.testing.assert_close(hidden, outer)


def test_paper_budget_keeps_the_same_share_of_the_patches(model):
    # 64 patches here: 576 * k patches would give back k times the papers' budgets
    assert [vlmzip.paper_budget(model, t) for t in vlmzip.PAPER_BUDGETS] == [21, 14, 7]
    assert vlmzip.paper_budget(model, 576) == 64 and vlmzip.paper_budget(model, 1) == 1
    with pytest.raises(ValueError, match="must be >= 1"):
        vlmzip.paper_budget(model, 0)


@pytest.mark.parametrize("method", ["visionzip", "random", "spatial", "fastv"])
def test_ratio_one_keeps_every_token_and_reproduces_vanilla(model, batch_inputs, method):
    inputs, _, _ = batch_inputs
    before = logits(model, inputs)
    knobs = {"ratio": 1.0, **({"layer": 1} if method == "fastv" else {})}
    with vlmzip.compressed(model, method, **knobs):
        assert vlmzip.plan(model, method, **knobs).final_tokens == 64
        during = logits(model, inputs)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("ratio", "kept"), [(0.5, 32), (0.25, 16), (0.01, 1)])
def test_ratio_keeps_that_share_of_each_image(model, batch_inputs, ratio, kept):
    inputs, _, _ = batch_inputs
    assert vlmzip.plan(model, "visionzip", ratio=ratio).tokens == kept
    with vlmzip.compressed(model, "visionzip", ratio=ratio):
        assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - (64 - kept)


@pytest.mark.parametrize(("knobs", "match"), [
    ({"ratio": 0}, r"ratio must be a number in \(0, 1\]"),
    ({"ratio": 1.5}, r"ratio must be a number in \(0, 1\]"),
    ({"ratio": 0.5, "tokens": 8}, "not both"),
])
def test_bad_ratios_get_clear_errors(model, knobs, match):
    with pytest.raises(ValueError, match=match):
        vlmzip.compress(model, "random", **knobs)
