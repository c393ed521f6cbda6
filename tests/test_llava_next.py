"""LLaVA-NeXT (anyres): per-image counts, exact keep-all, VisionZip's released layout, generate, batching."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from conftest import chat_prompt, random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextForConditionalGeneration

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.adapters.llava_next import LlavaNextAdapter, split_evenly
from vlmzip.builders import get_arch
from vlmzip.builders.llava_next import LlavaNextSpec, build_llava_next
from vlmzip.methods import base as method_base
from vlmzip.methods import get_method
from vlmzip.methods.visionzip import visionzip

# 84 px crops / patch 14 -> 6 x 6 patches + CLS per crop; pinpoints 1x2, 2x1, 2x2, 3x1, 1x3 crops.
NEXT_CFG = LlavaNextSpec(image_size=84, patch_size=14, vision_layers=2, text_layers=3)
PER_CROP = 36
# (width, height): 2x2 crops (5 with the base), 1x3 (4), 3x1 (4): three different placeholder counts.
SIZES = [(130, 120), (200, 60), (60, 190)]
NEW = 5


@pytest.fixture(scope="session")
def next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llava-next")
    build_llava_next(out, NEXT_CFG)
    return out


@pytest.fixture()
def next_model(next_dir: Path) -> LlavaNextForConditionalGeneration:
    return LlavaNextForConditionalGeneration.from_pretrained(next_dir).eval()


@pytest.fixture(scope="session")
def next_processor(next_dir: Path):
    return AutoProcessor.from_pretrained(next_dir)


@pytest.fixture(scope="session")
def next_batch(next_processor):
    """Three images of different sizes (different crop and placeholder counts), left padded."""
    questions = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    texts = [chat_prompt(next_processor, q) for q in questions]
    return next_processor(images=images, text=texts, return_tensors="pt", padding=True), images, texts


def placeholders(inputs, model) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)


def test_checkpoint_loads_like_a_real_one(next_dir, next_processor, next_batch):
    inputs, _, _ = next_batch
    model = AutoModelForImageTextToText.from_pretrained(next_dir)
    assert type(model) is LlavaNextForConditionalGeneration
    assert type(next_processor).__name__ == "LlavaNextProcessor"
    assert inputs["pixel_values"].shape[:2] == (3, 5), "up to 5 crops, padded per image"
    assert isinstance(adapter_for(model), LlavaNextAdapter)


def test_counts_equal_the_processors_placeholders(next_model, next_batch):
    inputs, _, _ = next_batch
    adapter = adapter_for(next_model)
    counts = [item.vanilla for item in adapter.items(dict(inputs))]
    assert counts == placeholders(inputs, next_model)
    assert len(set(counts)) == 3
    assert adapter.static_tokens_per_image() is None
    layout = adapter.unit_layout()
    assert (layout.num_prefix, layout.grid, layout.vanilla) == (1, (6, 6), PER_CROP)


@pytest.mark.parametrize("method", ["visionzip", "random", "spatial"])
def test_keep_all_reproduces_vanilla_logits(next_model, next_batch, method):
    inputs, _, _ = next_batch
    before = logits(next_model, inputs)
    with vlmzip.compressed(next_model, method, ratio=1.0):
        during = logits(next_model, inputs)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=0)


def test_decompress_restores_exactly(next_model, next_batch):
    inputs, _, _ = next_batch
    before = logits(next_model, inputs)
    vlmzip.compress(next_model, "visionzip", tokens=40)
    shrunk = logits(next_model, inputs).shape[1]
    assert shrunk == inputs["input_ids"].shape[1] - min(placeholders(inputs, next_model)) + 40
    vlmzip.decompress(next_model)
    assert torch.equal(before, logits(next_model, inputs))
    for name in ("forward", "generate", "_vlmzip"):
        assert name not in vars(next_model)
    assert "get_image_features" not in vars(next_model.model)
    assert "forward" not in vars(next_model.model)


def released_layout(model, pixel_values, image_size, keeps):
    """VisionZip on LLaVA-NeXT as the authors' ``llava_arch.py`` lays it out, from the pure method per crop.

    Each crop: VisionZip with its share; project. Base crop as emitted; the other crops' dominant patches
    scattered into the whole high-resolution grid and read back in raster order (a mask over the grid,
    as ``restore_image_features_sorted`` does); then each crop's CLS; then every crop's contextual tokens.
    """
    adapter = adapter_for(model)
    projector = model.model.multi_modal_projector
    side = adapter.side
    rows, cols = adapter.crop_grid(image_size)
    crops = []
    for crop, keep in enumerate(keeps):
        tokens = adapter.tower.run(pixel_values[crop : crop + 1], adapter.layout,
                                      frozenset({"keys", "cls_attention"}))
        sel = visionzip(tokens, keep)
        crops.append((projector(sel.features[0]), sel.indices[0], sel.dominant))
    width = projector(torch.zeros(1, model.config.vision_config.hidden_size)).shape[-1]
    grid = torch.zeros(rows * side, cols * side, width)
    mask = torch.zeros(rows * side, cols * side, dtype=torch.bool)
    cls_tokens, contextual = [], []
    for crop, (features, indices, dominant) in enumerate(crops[1:]):
        r, c = divmod(crop, cols)
        assert int(indices[0]) == 0, "the CLS token leads the dominant tokens"
        cls_tokens.append(features[0])
        for feature, index in zip(features[1:dominant], indices[1:dominant].tolist(), strict=True):
            y, x = divmod(index - 1, side)
            grid[r * side + y, c * side + x] = feature
            mask[r * side + y, c * side + x] = True
        contextual.append(features[dominant:])
    return torch.cat([crops[0][0], grid[mask], torch.stack(cls_tokens), *contextual])


@pytest.mark.parametrize("tokens", [40, 37, 5 * PER_CROP])
def test_visionzip_follows_the_released_layout(next_model, next_processor, tokens):
    image = random_image(7, SIZES[0])
    inputs = next_processor(images=[image], text=[chat_prompt(next_processor, "what ?")], return_tensors="pt")
    pixel_values = inputs["pixel_values"][0]
    keeps = split_evenly(tokens, 5)
    with torch.no_grad():
        expected = released_layout(next_model, pixel_values, inputs["image_sizes"][0], keeps)
        with vlmzip.compressed(next_model, "visionzip", tokens=tokens):
            got = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert len(got) == 1 and got[0].shape[0] == tokens
    if tokens == 5 * PER_CROP:  # every crop keeps all its patches: the method is not run, crops are concatenated
        return
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def test_split_gives_the_remainder_to_the_first_crops():
    assert split_evenly(160, 5) == [32] * 5
    assert split_evenly(162, 5) == [33, 33, 32, 32, 32]


def test_papers_split_on_five_crops(next_model, next_processor):
    # 160 = 5 x (27 + 5), as the VisionZip paper runs LLaVA-NeXT: CLS + 26 patches + 5 contextual per crop,
    # the five crops in one batched call
    image = random_image(3, SIZES[0])
    inputs = next_processor(images=[image], text=[chat_prompt(next_processor, "what ?")], return_tensors="pt")
    with vlmzip.compressed(next_model, "visionzip", tokens=160), vlmzip.recorded(next_model) as selections, \
            torch.no_grad():
        out = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert out[0].shape[0] == 160
    assert [(tuple(s.features.shape[:2]), s.dominant) for s in selections] == [((5, 32), 27)]


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 40}), ("random", {"tokens": 30})])
def test_cached_generate_equals_uncached_recomputation(next_model, next_batch, method, knobs):
    inputs, _, _ = next_batch
    vlmzip.compress(next_model, method, **knobs)
    cached = greedy(next_model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(cached[:, :prompt_len], inputs["input_ids"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(NEW):
            out = next_model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                             image_sizes=inputs["image_sizes"], use_cache=False)
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 40}), ("random", {"ratio": 0.25})])
def test_batch_of_different_sizes_equals_single_runs(next_model, next_processor, next_batch, method, knobs):
    inputs, images, texts = next_batch
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    vlmzip.compress(next_model, method, **knobs)
    batched = greedy(next_model, inputs, return_dict_in_generate=True, output_logits=True)
    new_batched = batched.sequences[:, inputs["input_ids"].shape[1] :]
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        single_inputs = next_processor(images=[image], text=[text], return_tensors="pt")
        single = greedy(next_model, single_inputs, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1] :], new_batched[i])
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "knobs", "kept"),
    [("random", {"tokens": 30}, [30, 30, 30]), ("spatial", {"tokens": 17}, [17, 17, 17]),
     ("random", {"ratio": 0.5}, None)],
)
def test_pre_llm_methods_send_the_budget(next_model, next_batch, method, knobs, kept):
    inputs, _, _ = next_batch
    counts = placeholders(inputs, next_model)
    kept = kept or [round(0.5 * n) for n in counts]
    with vlmzip.compressed(next_model, method, **knobs), torch.no_grad():
        features = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        out = next_model(**inputs)
    assert [f.shape[0] for f in features] == kept
    removed = [n - k for n, k in zip(counts, kept, strict=True)]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - min(removed)


def test_fastv_prunes_inside_the_llm(next_model, next_processor, next_batch):
    _, images, texts = next_batch
    inputs = next_processor(images=[images[1]], text=[texts[1]], return_tensors="pt")
    count = placeholders(inputs, next_model)[0]
    vlmzip.compress(next_model, "fastv", tokens=20, layer=2)
    out = greedy(next_model, inputs, return_dict_in_generate=True, output_logits=True)
    full = inputs["input_ids"].shape[1] + NEW - 1
    # layers 0-1 see every token (newline tokens included); layer 2 on keep 20 of the image's tokens
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [full, full, full - count + 20]
    with torch.no_grad():
        first = next_model(**inputs).logits[:, -1]
    torch.testing.assert_close(out.logits[0], first, atol=1e-5, rtol=1e-5)


def test_budget_too_large_names_the_images_vanilla_count(next_model, next_batch):
    inputs, _, _ = next_batch
    counts = placeholders(inputs, next_model)
    with vlmzip.compressed(next_model, "visionzip", tokens=max(counts)), pytest.raises(
        ValueError, match=rf"larger than the {min(counts)} visual tokens image \d of this batch has"
    ):
        logits(next_model, inputs)


@pytest.mark.parametrize("tokens", [3, 5 * PER_CROP + 1])
def test_budget_that_cannot_be_split_over_the_crops_is_a_clear_error(next_model, next_processor, tokens):
    image = random_image(0, SIZES[0])  # 5 crops of 36 patches; its vanilla count adds newline tokens
    inputs = next_processor(images=[image], text=[chat_prompt(next_processor, "what ?")], return_tensors="pt")
    count = placeholders(inputs, next_model)[0]
    assert count > 5 * PER_CROP + 1
    with vlmzip.compressed(next_model, "random", tokens=tokens), pytest.raises(
        ValueError, match=rf"vanilla count {count}.*between 5 and 180 tokens.*ratio=1.0"
    ):
        logits(next_model, inputs)


def test_deepcopy_and_pickle_keep_the_compression(next_model, next_batch):
    inputs, _, _ = next_batch
    vlmzip.compress(next_model, "visionzip", tokens=40)
    # before any forward: transformers' own lazily installed output-capturing hook is a closure
    twins = (copy.deepcopy(next_model), pickle.loads(pickle.dumps(next_model)))
    expected = logits(next_model, inputs)
    for twin in twins:
        assert vlmzip.is_compressed(twin)
        torch.testing.assert_close(logits(twin, inputs), expected, atol=0, rtol=0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(20, 400), height=st.integers(20, 400), share=st.floats(0.0, 1.0),
       method=st.sampled_from(["visionzip", "random", "spatial"]))
def test_every_image_size_sends_its_budget(next_model, next_processor, width, height, share, method):
    image = random_image(width * 1000 + height, (width, height))
    inputs = next_processor(images=[image], text=[chat_prompt(next_processor, "what ?")], return_tensors="pt")
    adapter = adapter_for(next_model)
    count = placeholders(inputs, next_model)[0]
    assert [item.vanilla for item in adapter.items(dict(inputs))] == [count]
    crops = adapter.num_crops(inputs["image_sizes"][0])
    tokens = crops + round(share * (min(count - 1, crops * PER_CROP) - crops))
    with vlmzip.compressed(next_model, method, tokens=tokens), torch.no_grad():
        features = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        out = next_model(**inputs)
    assert [f.shape[0] for f in features] == [tokens]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - count + tokens


def test_real_architecture_shapes():
    cfg = get_arch("llava-next-7b").spec
    assert (cfg.image_size, cfg.patch_size, cfg.vision_hidden, cfg.vision_layers) == (336, 14, 1024, 24)
    assert (cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.text_intermediate) == (4096, 32, 32, 11008)
    assert cfg.pinpoints() == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_keep_all_image_next_to_a_compressed_one(next_model, next_processor, next_batch):
    # tokens equal to one image's vanilla count: that image is sent as HF packs it, the other compressed
    _, images, texts = next_batch
    inputs = next_processor(images=[images[1], images[0]], text=texts[:2], return_tensors="pt", padding=True)
    counts = placeholders(inputs, next_model)
    with torch.no_grad():
        vanilla = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        with vlmzip.compressed(next_model, "visionzip", tokens=counts[0]):
            mixed = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert [f.shape[0] for f in mixed] == [counts[0], counts[0]] and counts[1] > counts[0]
    torch.testing.assert_close(mixed[0], vanilla[0], atol=1e-5, rtol=0)


def test_extra_kwargs_reach_the_vision_tower(next_model, next_batch):
    inputs, _, _ = next_batch
    seen = []
    handle = next_model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("interpolate_pos_encoding")), with_kwargs=True
    )
    try:
        with vlmzip.compressed(next_model, "random", tokens=30), torch.no_grad():
            next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                interpolate_pos_encoding=True)
    finally:
        handle.remove()
    assert seen == [True]


def test_projector_stage_methods_select_projected_tokens(next_model, next_batch, monkeypatch):
    # a projector-stage method sees the projected tokens (LLM width); spatial's choice is the same either
    # way, and the projector acts per token, so both stages send the same tokens
    inputs, _, _ = next_batch
    projected = dataclasses.replace(get_method("spatial"), name="spatial-projected", stage="projector")
    monkeypatch.setitem(method_base._REGISTRY, projected.name, projected)
    outputs = {}
    for name in ("spatial", "spatial-projected"):
        with vlmzip.compressed(next_model, name, tokens=30), vlmzip.recorded(next_model) as seen, torch.no_grad():
            outputs[name] = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        widths = {s.features.shape[-1] for s in seen}
        assert widths == ({next_model.config.text_config.hidden_size} if name == "spatial-projected"
                          else {next_model.config.vision_config.hidden_size})
    for a, b in zip(outputs["spatial"].pooler_output, outputs["spatial-projected"].pooler_output, strict=True):
        assert a.shape == b.shape == (30, next_model.config.text_config.hidden_size)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eval_on_images_with_their_own_counts(tmp_path, capsys, next_dir):
    """vlmzip eval on a model whose images each have their own visual-token count: vanilla is 'per image', a
    token budget is every image's count, a ratio goes to its own group; the table and plot are written."""
    from vlmzip.cli import main
    from vlmzip.lab.scenes import write_split

    write_split("val", tmp_path / "data", n_images=2)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(next_dir), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--methods", "vanilla,visionzip,fastv[layer=1],random[ratio=0.25]", "--tokens", "12", "--limit", "4",
                 "--max-new-tokens", "2", "--batch-size", "4"]) == 0
    table = (out / "table.md").read_text()
    assert "| vanilla | per image |" in table and "**Retain 12 tokens**" in table and "| visionzip | 12 |" in table
    assert "**Other budgets**" in table and "| random[ratio=0.25] | ratio 0.25 |" in table
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
