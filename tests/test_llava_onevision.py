"""LLaVA-OneVision (tiny random weights, saved and reloaded): the processor's counts, exact keep-all for every
method, every method under generate and batching, budgets per image, VisionZip's layout and signals, multi-image
rows, videos (every method, per frame and across frames, batches with images), later turns, bad inputs, the 7B shapes
and the command line."""

from __future__ import annotations

import copy
import json
import pickle
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import video_cases
from conftest import random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.image_utils import SizeDict
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.adapters.llava_next import unpadded_grid
from vlmzip.adapters.llava_onevision import (
    LlavaOnevisionAdapter,
    OnevisionPilVideoProcessor,
    PilOnevisionProcessor,
    load_processor,
)
from vlmzip.budgets import split_evenly
from vlmzip.builders import get_arch
from vlmzip.builders.llava_onevision import LlavaOnevisionSpec, build_llava_onevision
from vlmzip.cli import main
from vlmzip.lab.scenes import write_split
from vlmzip.methods import get_method, registered
from vlmzip.methods.visionzip import visionzip
from vlmzip.viz import method_panel, view_of

# 98 px crops / patch 14 -> 7 x 7 = 49 SigLIP patches per crop (odd, like the released 27 x 27); crop grids 1x1,
# 1x2, 2x1, 2x2, 1x3, 3x1; anyres_max_2 pools a high-resolution grid of more than ~2 crops' patches. Five decoder
# layers: SparseVLM's scaled pruning layers fit.
SPEC = LlavaOnevisionSpec()
PER_CROP = 49
# (width, height): 2 x 2 crops, pooled (5 crops, 148 tokens); 1 x 3, pooled (4, 139); 1 x 2, not pooled (3, 154).
SIZES = [(130, 120), (200, 60), (150, 80)]
CROPS = [5, 4, 3]
QUESTIONS = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]
NEW = 4
METHODS = registered()


def knobs_of(method: str, **budget) -> dict:
    """``budget`` for a method that takes one (vanilla takes none)."""
    return budget if get_method(method).takes_budget else {}


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llava-onevision")
    build_llava_onevision(out, SPEC)
    return out


def load(ov_dir: Path, **kwargs) -> LlavaOnevisionForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(ov_dir, **kwargs).eval()


@pytest.fixture()
def model(ov_dir):
    return load(ov_dir)


@pytest.fixture(scope="module")
def processor(ov_dir):
    return load_processor(ov_dir)


def prompt(processor, question: str, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def batch(processor):
    """Three single images of different sizes (crop counts, pooled or not, placeholder counts), left padded."""
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    texts = [prompt(processor, q) for q in QUESTIONS]
    return processor(images=images, text=texts, return_tensors="pt", padding=True), images, texts


def placeholders(inputs, config) -> list[int]:
    return (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def placeholder_ids(model) -> list[int]:
    return [model.config.image_token_id, model.config.video_token_id]


def greedy(model, inputs, **kwargs):
    """Greedy generation that never emits a placeholder token (a random model may; the sequence would then hold an
    image placeholder the images do not account for)."""
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, suppress_tokens=placeholder_ids(model),
                          **kwargs)


def next_token(model, logits: torch.Tensor) -> torch.Tensor:
    """(B, V) last-position logits -> (B, 1) greedy token, placeholders suppressed as in :func:`greedy`."""
    logits = logits.clone()
    logits[:, placeholder_ids(model)] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def image_features(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                   batch_num_images=inputs.get("batch_num_images")).pooler_output)


class LLMImageTokens:
    """A pre-hook on the inner model: the image placeholders each row of every call sends to the LLM."""

    def __init__(self, model) -> None:
        self.image_token_id = model.config.image_token_id
        self.calls: list[list[int]] = []
        self.handle = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None:
            self.calls.append((ids == self.image_token_id).sum(dim=1).tolist())


# -- the checkpoint and its counts ---------------------------------------------------------------------------


def test_checkpoint_loads_like_a_real_one(ov_dir, processor, batch):
    inputs, _, _ = batch
    model = load(ov_dir)
    assert type(model) is LlavaOnevisionForConditionalGeneration
    assert isinstance(adapter_for(model), LlavaOnevisionAdapter)
    # AutoProcessor builds LLaVA-OneVision's own processor where torchvision works; here the image-only one
    assert isinstance(processor, LlavaOnevisionProcessor)
    assert json.loads((ov_dir / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
    assert (processor.num_image_tokens, processor.vision_aspect_ratio) == (PER_CROP, "anyres_max_2")
    assert inputs["pixel_values"].shape[:2] == (3, max(CROPS)), "up to 5 crops, padded per image"
    assert inputs["batch_num_images"].tolist() == [1, 1, 1]
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"


def test_counts_are_the_processors_and_hf_packs_them(model, batch):
    inputs, _, _ = batch
    adapter = adapter_for(model)
    counts = [item.vanilla for item in adapter.items(dict(inputs))]
    assert counts == placeholders(inputs, model.config) == [148, 139, 154]
    assert [f.shape[0] for f in image_features(model, inputs)] == counts  # HF's own packing, uncompressed
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    assert [adapter.num_crops(s) for s in sizes] == CROPS
    pooled = [adapter.packed_grid(s) != unpadded_grid(s, adapter.crop_grid(s), adapter.side) for s in sizes]
    assert pooled == [True, True, False]
    assert adapter.static_tokens_per_image() is None
    layout = adapter.unit_layout()
    assert (layout.num_prefix, layout.grid, layout.vanilla) == (0, (7, 7), PER_CROP)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(20, 500), height=st.integers(20, 500), share=st.floats(0.0, 1.0),
       method=st.sampled_from(["visionzip", "random", "pool"]))
def test_every_image_size_is_counted_and_sends_its_budget(model, processor, width, height, share, method):
    image = random_image(width * 1000 + height, (width, height))
    inputs = processor(images=[image], text=[prompt(processor, "what ?")], return_tensors="pt")
    adapter = adapter_for(model)
    (count,) = placeholders(inputs, model.config)
    assert [item.vanilla for item in adapter.items(dict(inputs))] == [count]
    assert [f.shape[0] for f in image_features(model, inputs)] == [count]
    crops = adapter.num_crops(inputs["image_sizes"][0])
    tokens = crops + round(share * (min(count - 1, crops * PER_CROP) - crops))
    with vlmzip.compressed(model, method, tokens=tokens):
        assert [f.shape[0] for f in image_features(model, inputs)] == [tokens]
        out = logits(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] - count + tokens


# -- every method -------------------------------------------------------------------------------------------


def test_keep_all_reproduces_vanilla_logits_for_every_method(model, batch, mixed):
    inputs, _, _ = batch
    for call in (inputs, mixed[0]):  # single images (pooled or not) and a multi-image row: HF's own packing
        vanilla = image_features(model, call)
        with vlmzip.compressed(model, "visionzip", ratio=1.0):
            same = image_features(model, call)
        assert all(torch.equal(a, b) for a, b in zip(same, vanilla, strict=True))
    before = logits(model, inputs)
    for method in METHODS:
        with vlmzip.compressed(model, method, **knobs_of(method, ratio=1.0)):
            torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0, msg=method)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_batch_of_different_sizes_equals_single_runs(model, processor, batch, method):
    inputs, images, texts = batch
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    vlmzip.compress(model, method, **knobs_of(method, tokens=24))
    batched = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
    new_batched = batched.sequences[:, inputs["input_ids"].shape[1]:]
    assert new_batched.shape == (3, NEW)
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        single_inputs = processor(images=[image], text=[text], return_tensors="pt")
        single = greedy(model, single_inputs, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1]:], new_batched[i]), method
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


PRE_LLM = [m for m in METHODS if get_method(m).stage != "llm"]
IN_LLM = [m for m in METHODS if get_method(m).stage == "llm"]


@pytest.mark.parametrize("method", PRE_LLM)
def test_pre_llm_cached_generate_equals_recomputation(model, batch, method):
    """A pre-LLM selection does not depend on the text: generate's tokens are the argmax of a forward over the
    whole sequence so far, recomputed without a cache, at every step."""
    inputs, _, _ = batch
    vlmzip.compress(model, method, **knobs_of(method, tokens=24))
    cached = greedy(model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(cached[:, :prompt_len], inputs["input_ids"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                        image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"], use_cache=False)
            token = next_token(model, out.logits[:, -1])
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_generate_prunes_once_and_decodes_from_the_cache(model, batch, method):
    """An in-LLM method selects with the prompt's text once (a recomputation would re-select with every new
    token). Methods that prune from layer 1 on: generate equals one compressed prefill, then decode steps on its
    cache, token by token. Methods that prune before layer 0 (a cache only generate may continue): generate in one
    go equals one token, then the rest continued on that cache."""
    inputs, _, _ = batch
    vlmzip.compress(model, method, tokens=24)
    out = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(out.logits[0], model(**inputs).logits[:, -1], atol=1e-5, rtol=1e-5)
    full = inputs["input_ids"].shape[1] + NEW - 1
    assert out.cache.layers[-1].keys.shape[-2] < full, "the last layer's cache holds only the kept tokens"
    if min(step.layer for step in vlmzip.api.state_of(model).steps) == 0:
        first = model.generate(**inputs, max_new_tokens=1, do_sample=False, suppress_tokens=placeholder_ids(model),
                               return_dict_in_generate=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, -1:])], dim=1)
        rest = model.generate(input_ids=first.sequences, attention_mask=mask, cache=first.cache,
                              max_new_tokens=NEW - 1, do_sample=False, suppress_tokens=placeholder_ids(model))
        assert torch.equal(rest, out.sequences)
        return
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        step = model(**inputs, use_cache=True)
        cache = step.cache
        for _ in range(NEW):
            token = next_token(model, step.logits[:, -1])
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
    assert torch.equal(out.sequences, ids)


# -- budgets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "knobs", "kept"), [
    ("visionzip", {"tokens": 30}, lambda n: 30),
    ("random", {"tokens": 17}, lambda n: 17),
    ("divprune", {"ratio": 0.3}, lambda n: round(0.3 * n)),
    ("tome", {"ratio": 0.5}, lambda n: round(0.5 * n)),
])
def test_budget_per_image_holds_in_a_batch(model, batch, method, knobs, kept):
    inputs, _, _ = batch
    counts = placeholders(inputs, model.config)
    expected = [kept(n) for n in counts]
    vlmzip.compress(model, method, **knobs)
    seen = LLMImageTokens(model)
    with vlmzip.recorded(model) as selections:
        greedy(model, inputs)
    seen.handle.remove()
    assert seen.calls[0] == expected, "the LLM's prefill holds each image's budget of placeholders"
    assert all(row == [0, 0, 0] for row in seen.calls[1:]), "decode steps carry no image"
    # each image's budget is split evenly over its crops (base + high-resolution), remainder first
    shares: dict[tuple[int, int], int] = {}
    for selection in selections:
        for unit in selection.units:
            shares[unit] = selection.features.shape[1]
    for image, (crops, keep) in enumerate(zip(CROPS, expected, strict=True)):
        assert [shares[(image, j)] for j in range(crops)] == split_evenly(keep, crops)


def test_an_image_sent_whole_next_to_compressed_ones(model, batch):
    # tokens equal to the smallest image's count: that image is sent as HF packs it, the others compressed
    inputs, _, _ = batch
    counts = placeholders(inputs, model.config)
    smallest = counts.index(min(counts))
    vanilla = image_features(model, inputs)
    with vlmzip.compressed(model, "visionzip", tokens=counts[smallest]):
        mixed = image_features(model, inputs)
    assert [f.shape[0] for f in mixed] == [counts[smallest]] * 3
    torch.testing.assert_close(mixed[smallest], vanilla[smallest], atol=1e-6, rtol=0)


def test_no_newline_tokens_once_an_image_is_compressed(model, batch):
    inputs, _, _ = batch
    newline = model.model.image_newline
    vanilla = image_features(model, inputs)
    assert all(bool((f == newline).all(dim=1).any()) for f in vanilla), "HF sends newline tokens"
    with vlmzip.compressed(model, "random", tokens=30):
        compressed = image_features(model, inputs)
    assert not any(bool((f == newline).all(dim=1).any()) for f in compressed)


# -- VisionZip on SigLIP ------------------------------------------------------------------------------------


def released_layout(model, pixel_values, image_size, keeps):
    """VisionZip on anyres as the authors' LLaVA-NeXT ``llava_arch.py`` lays it out (no CLS on SigLIP), from the
    pure method per crop: the base crop as emitted; the other crops' dominant patches scattered into the whole
    high-resolution grid and read back in raster order; then every crop's contextual tokens."""
    adapter = adapter_for(model)
    projector = model.model.multi_modal_projector
    side = adapter.side
    rows, cols = adapter.crop_grid(image_size)
    crops = []
    for crop, keep in enumerate(keeps):
        tokens = adapter.tower.run(pixel_values[crop : crop + 1], adapter.layout,
                                   frozenset({"keys", "received_attention"}))
        sel = visionzip(tokens, keep)
        crops.append((projector(sel.features[0]), sel.indices[0], sel.dominant))
    width = model.config.text_config.hidden_size
    grid = torch.zeros(rows * side, cols * side, width)
    mask = torch.zeros(rows * side, cols * side, dtype=torch.bool)
    contextual = []
    for crop, (features, indices, dominant) in enumerate(crops[1:]):
        r, c = divmod(crop, cols)
        for feature, index in zip(features[:dominant], indices[:dominant].tolist(), strict=True):
            y, x = divmod(index, side)
            grid[r * side + y, c * side + x] = feature
            mask[r * side + y, c * side + x] = True
        contextual.append(features[dominant:])
    return torch.cat([crops[0][0], grid[mask], *contextual])


@pytest.mark.parametrize(("size", "tokens"), [((130, 120), 40), ((200, 60), 37)])
def test_visionzip_follows_the_released_layout(model, processor, size, tokens):
    image = random_image(7, size)
    inputs = processor(images=[image], text=[prompt(processor, "what ?")], return_tensors="pt")
    crops = adapter_for(model).num_crops(inputs["image_sizes"][0])
    with torch.no_grad():
        expected = released_layout(model, inputs["pixel_values"][0], inputs["image_sizes"][0],
                                   split_evenly(tokens, crops))
        with vlmzip.compressed(model, "visionzip", tokens=tokens):
            (got,) = image_features(model, inputs)
    assert got.shape[0] == tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_visionzip_ranks_by_the_attention_each_patch_receives(ov_dir, batch, monkeypatch):
    """SigLIP has no CLS: the dominance handed to VisionZip is the feature layer's attention probabilities each
    patch receives, averaged over heads and queries, per crop (checked against an eager run's probabilities)."""
    inputs, _, _ = batch
    model = load(ov_dir, attn_implementation="eager")
    attn = model.model.vision_tower.encoder.layers[-1].self_attn  # vision_feature_layer -1
    probs: list[torch.Tensor] = []
    attn.register_forward_hook(lambda module, args, out: probs.append(out[1]))
    vlmzip.compress(model, "visionzip", tokens=30)
    state = vlmzip.api.state_of(model)
    handed: list = []
    select = state.select
    monkeypatch.setattr(state, "select",
                        lambda tokens, keep, units=None: handed.append((tokens, units)) or select(tokens, keep, units))
    with torch.no_grad():
        model(**inputs)
    (weights,) = probs  # (all crops, H, 49, 49)
    assert weights.shape == (sum(CROPS), SPEC.vision_heads, PER_CROP, PER_CROP)
    received = weights.float().mean(dim=(1, 2))
    starts = [sum(CROPS[:i]) for i in range(len(CROPS))]
    checked = 0
    for tokens, units in handed:
        rows = torch.tensor([starts[image] + crop for image, crop in units])
        torch.testing.assert_close(tokens.received_attention, received[rows], atol=1e-6, rtol=1e-5)
        assert tokens.cls_attention is None and tokens.layout.num_prefix == 0
        checked += len(units)
    assert checked == sum(CROPS)


# -- multi-image rows, videos, later turns ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(processor):
    """Row 0: two images (each one padded crop + a newline token); row 1: one image (cut into crops)."""
    images = [[random_image(10, (90, 60)), random_image(11, (60, 120))], [random_image(12, SIZES[0])]]
    texts = [prompt(processor, "what is left ?", images=2), prompt(processor, "how many ?")]
    return processor(images=images, text=texts, return_tensors="pt", padding=True), images, texts


def test_multi_image_rows(model, processor, mixed):
    inputs, images, texts = mixed
    assert inputs["batch_num_images"].tolist() == [2, 1]
    counts = [item.vanilla for item in adapter_for(model).items(dict(inputs))]
    assert counts == [PER_CROP + 1, PER_CROP + 1, 148]
    assert placeholders(inputs, model.config) == [2 * (PER_CROP + 1), 148]
    assert [f.shape[0] for f in image_features(model, inputs)] == counts
    view = adapter_for(model).view(dict(inputs), processor.image_processor)  # the first image: one padded crop
    assert len(view.pictures) == 1 and view.grid is None and view.total == PER_CROP + 1
    assert view.image.size == (98, 98) and view.caption.startswith("The image as the model sees it (one padded")
    before = logits(model, inputs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    vlmzip.compress(model, "visionzip", tokens=12)
    seen = LLMImageTokens(model)
    batched = greedy(model, inputs)
    seen.handle.remove()
    assert seen.calls[0] == [24, 12]
    new = batched[:, inputs["input_ids"].shape[1]:]
    for i, (row_images, text) in enumerate(zip(images, texts, strict=True)):
        single = processor(images=[row_images], text=[text], return_tensors="pt")
        assert torch.equal(greedy(model, single)[0, single["input_ids"].shape[1]:], new[i])


# -- videos ---------------------------------------------------------------------------------------------------

VIDEO_FRAMES = 4
PER_FRAME = 16  # 7 x 7 patches shrunk to ceil(7 / 2)^2


@pytest.fixture(scope="module")
def videos(processor):
    """Row 0: a video; row 1: an image; row 2: two videos; and each row alone."""
    return video_cases.mixed_batch(processor, VIDEO_FRAMES)


def video_features(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output


def test_video_processor_and_counts(model, processor, videos):
    inputs, singles = videos
    assert isinstance(processor.video_processor, OnevisionPilVideoProcessor) and adapter_for(model).takes_videos
    assert inputs["pixel_values_videos"].shape == (3, VIDEO_FRAMES, 3, 98, 98)
    count = VIDEO_FRAMES * PER_FRAME + 1  # the frames' pooled tokens and one newline
    video_id = model.config.video_token_id
    assert (inputs["input_ids"] == video_id).sum(dim=1).tolist() == [count, 0, 2 * count]
    items = adapter_for(model).items(dict(inputs))
    assert [(i.token_id, i.vanilla, i.frames) for i in items[1:]] == [(video_id, count, VIDEO_FRAMES)] * 3
    reference = LlavaOnevisionImageProcessorPil(size={"height": 98, "width": 98})
    expected = torch.stack([torch.as_tensor(reference.resize(reference.process_image(f, do_convert_rgb=True),
                                                             SizeDict(height=98, width=98), resample=3))
                            for f in video_cases.frames(1, VIDEO_FRAMES)])
    expected = (expected.float() / 255 - torch.tensor(reference.image_mean).view(3, 1, 1)) / torch.tensor(
        reference.image_std).view(3, 1, 1)
    torch.testing.assert_close(inputs["pixel_values_videos"][0], expected)
    assert video_features(model, inputs).shape[:2] == (3, count)
    assert video_cases.greedy(model, inputs).shape[0] == 3  # HF's own counts check passes


def test_videos_keep_all_reproduces_vanilla_logits_for_every_method(model, videos):
    inputs, _ = videos
    vanilla = video_features(model, inputs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        assert torch.equal(video_features(model, inputs), vanilla)
    video_cases.check_keep_all(model, [inputs], sorted(METHODS))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_videos_padded_batch_equals_single_runs(model, videos, method):
    inputs, singles = videos
    video_cases.check_batch_equals_singles(model, inputs, singles, method, tokens=24)


@pytest.mark.parametrize("method", PRE_LLM)
def test_videos_cached_generate_equals_recomputation(model, videos, method):
    video_cases.check_cached_equals_recomputed(model, videos[0], method, tokens=24)


@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_methods_prune_videos(model, videos, method):
    video_cases.check_in_llm_on_videos(model, videos[0], method, tokens=20)


@pytest.mark.parametrize(("method", "knobs", "shares"), [
    ("visionzip", {"tokens": 26}, [7, 7, 6, 6]),
    ("random", {"tokens_per_frame": 5}, [5] * VIDEO_FRAMES),
    ("tome", {"ratio": 0.5}, [8] * VIDEO_FRAMES),  # round(0.5 * 65) = 32 frame tokens (65: the newline included)
])
def test_video_per_frame_budgets_hold_and_the_newline_stays(model, videos, method, knobs, shares):
    inputs, _ = videos
    vlmzip.compress(model, method, **knobs)
    seen = video_cases.LLMPlaceholders(model)
    with vlmzip.recorded(model) as selections:
        video_cases.greedy(model, inputs)
    seen.handle.remove()
    keep = sum(shares) + 1
    assert [videos for _, videos in seen.calls[0]] == [keep, 0, 2 * keep]
    for video in (1, 2, 3):
        assert video_cases.frame_shares(selections, video) == shares
    sent = video_features(model, inputs)
    assert sent.shape[:2] == (3, keep)
    assert torch.equal(sent[:, -1], model.model.image_newline.expand(3, -1))


def test_video_tokens_fewer_than_frames_is_a_clear_error_unless_scope_video(model, videos):
    inputs, singles = videos
    with vlmzip.compressed(model, "visionzip", tokens=3), \
            pytest.raises(ValueError, match="3 tokens cannot be split over the 4 frames of video 0 of this batch"):
        video_cases.greedy(model, singles[2])
    vlmzip.compress(model, "visionzip", tokens=10, scope="video")
    with vlmzip.recorded(model) as selections:
        video_cases.greedy(model, inputs)
    assert {u: s.features.shape[1] for s in selections for u in s.units if u[0] >= 1} == {
        (1, 0): 10, (2, 0): 10, (3, 0): 10}
    assert video_features(model, inputs).shape[:2] == (3, 11)


@pytest.mark.parametrize(("knobs", "per_frame"), [({"tokens_per_frame": 5}, True),
                                                  ({"tokens": 12, "scope": "video"}, False)])
def test_kept_video_tokens_are_the_pooled_tokens_the_vanilla_model_sends(model, videos, knobs, per_frame):
    inputs, _ = videos
    vanilla = video_features(model, inputs)
    with vlmzip.compressed(model, "random", **knobs):
        sent = video_features(model, inputs)
    for v in range(3):
        for k, token in enumerate(sent[v, :-1]):
            pool = vanilla[v, (k // 5) * PER_FRAME : (k // 5 + 1) * PER_FRAME] if per_frame else vanilla[v, :-1]
            assert float((pool - token).abs().max(dim=1).values.min()) < 1e-5, (v, k)


def test_video_signals_are_shrunk_like_the_tokens(model, videos):
    """VisionZip's dominant tokens of a frame: the pooled tokens with the most received attention, the frame's
    received-attention map shrunk by the same bilinear interpolation as its tokens."""
    inputs, _ = videos
    adapter = adapter_for(model)
    with torch.no_grad():
        tokens = adapter.tower.run(inputs["pixel_values_videos"].flatten(0, 1), adapter.layout,
                                   frozenset({"received_attention"}))
    grid = tokens.received_attention.reshape(-1, 1, 7, 7)
    pooled = torch.nn.functional.interpolate(grid, size=[4, 4], mode="bilinear").flatten(1)
    vlmzip.compress(model, "visionzip", tokens_per_frame=7)  # 6 dominant + 1 contextual per frame
    with vlmzip.recorded(model) as selections:
        video_features(model, inputs)
    (selection,) = selections
    assert selection.dominant == 6
    assert torch.equal(selection.indices[:, :6], pooled.topk(6, dim=1).indices.sort(dim=1).values)


FOLLOW_UP = "<|im_end|>\n<|im_start|>user\nand the shape ?<|im_end|>\n<|im_start|>assistant\n"


def second_turn_ids(processor, turn1) -> torch.Tensor:
    follow = processor.tokenizer(FOLLOW_UP, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return torch.cat([turn1.sequences, follow.expand(turn1.sequences.shape[0], -1)], dim=1)


@pytest.mark.parametrize("method", ["visionzip", "divprune"])
def test_second_turn_continues_the_cache_and_equals_recomputing_it(model, processor, batch, method):
    _, images, texts = batch
    first = processor(images=[images[0]], text=[texts[0]], return_tensors="pt")
    vlmzip.compress(model, method, tokens=20)
    turn1 = greedy(model, first, return_dict_in_generate=True)
    ids = second_turn_ids(processor, turn1)
    mask = torch.ones_like(ids)
    cached_len = turn1.cache.get_seq_length()
    turn2 = greedy(model, {"input_ids": ids, "attention_mask": mask}, cache=turn1.cache)
    assert turn1.cache.get_seq_length() > cached_len, "the second turn extended the first turn's cache"
    fresh = greedy(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": first["pixel_values"],
                           "image_sizes": first["image_sizes"], "batch_num_images": first["batch_num_images"]})
    assert torch.equal(turn2, fresh)


def two_turns(model, processor, inputs) -> tuple[torch.Tensor, list[int], list[int]]:
    """Turn 1 generated on ``inputs``, then turn 2 (a follow-up question) on its cache: (turn 2's new tokens,
    each layer's cached length after turn 1, after turn 2)."""
    turn1 = greedy(model, inputs, return_dict_in_generate=True)
    ids = second_turn_ids(processor, turn1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["attention_mask"].shape[1]:])], dim=1)
    before = [layer.keys.shape[2] for layer in turn1.cache.layers]
    turn2 = greedy(model, {"input_ids": ids, "attention_mask": mask}, cache=turn1.cache)
    return turn2[:, ids.shape[1]:], before, [layer.keys.shape[2] for layer in turn1.cache.layers]


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_text_guided_second_turn_keeps_the_first_turns_tokens(model, processor, batch, method):
    """Text-guided in-LLM methods keep question 1's selection for question 2: turn 2 runs on turn 1's pruned
    cache (every layer grows by the new tokens only, the deep ones still hold turn 1's pruned image), and a left
    padded batch of two conversations answers turn 2 as each conversation alone does."""
    _, images, texts = batch
    vlmzip.compress(model, method, tokens=20)
    both = processor(images=images[:2], text=texts[:2], return_tensors="pt", padding=True)
    new, before, after = two_turns(model, processor, both)
    follow = len(processor.tokenizer(FOLLOW_UP, add_special_tokens=False)["input_ids"])
    assert [b - a for a, b in zip(before, after, strict=True)] == [1 + follow + NEW - 1] * len(before)
    assert before[-1] < before[0], "the deep layers hold turn 1's pruned image"
    for i in range(2):
        alone = processor(images=[images[i]], text=[texts[i]], return_tensors="pt")
        assert torch.equal(two_turns(model, processor, alone)[0][0], new[i])


def test_decompress_restores_exactly(model, batch):
    inputs, _, _ = batch
    before = logits(model, inputs)
    vlmzip.compress(model, "visionzip", tokens=30)
    assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - min(placeholders(inputs, model.config)) + 30
    vlmzip.decompress(model)
    assert torch.equal(before, logits(model, inputs))
    for name in ("forward", "generate", "_vlmzip"):
        assert name not in vars(model)
    for name in ("get_image_features", "forward"):
        assert name not in vars(model.model)


def test_deepcopy_and_pickle_keep_the_compression(model, batch):
    inputs, _, _ = batch
    vlmzip.compress(model, "visionzip", tokens=30)
    # before any forward: transformers' own lazily installed output-capturing hook is a closure
    twins = (copy.deepcopy(model), pickle.loads(pickle.dumps(model)))
    expected = logits(model, inputs)
    for twin in twins:
        assert vlmzip.is_compressed(twin)
        assert torch.equal(logits(twin, inputs), expected)


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "tokens", "crops"), [((130, 120), 4, 5), ((196, 98), 148, 3)])
def test_budget_that_cannot_be_split_over_the_crops_is_a_clear_error(model, processor, size, tokens, crops):
    # (196, 98): a 1 x 2 grid without padding or pooling, 154 placeholders of which 7 are newline tokens
    inputs = processor(images=[random_image(0, size)], text=[prompt(processor, "what ?")], return_tensors="pt")
    (count,) = placeholders(inputs, model.config)
    assert tokens < count
    with vlmzip.compressed(model, "random", tokens=tokens), pytest.raises(
        ValueError, match=rf"vanilla count {count}.*between {crops} and {crops * PER_CROP} tokens.*ratio=1.0"
    ):
        logits(model, inputs)


def test_budget_larger_than_an_images_count_names_it(model, batch):
    inputs, _, _ = batch
    smallest = min(placeholders(inputs, model.config))
    vlmzip.compress(model, "visionzip", tokens=smallest + 1)
    with pytest.raises(ValueError, match=rf"larger than the {smallest} visual tokens image \d of this batch has"):
        logits(model, inputs)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("vision_feature_select_strategy", "default", "drops a CLS token this encoder does not have"),
    ("vision_feature_layer", [-2, -1], "concatenates several layers"),
    ("vision_aspect_ratio", "anyres", "'anyres_max_N' only"),
])
def test_configs_vlmzip_cannot_lay_out_are_refused(model, field, value, message):
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=message):
        vlmzip.compress(model, "visionzip", tokens=30)
    assert not vlmzip.is_compressed(model)


def test_images_that_do_not_match_batch_num_images_are_refused(model, batch):
    inputs, _, _ = batch
    vlmzip.compress(model, "visionzip", tokens=30)
    with pytest.raises(ValueError, match=r"batch_num_images \[1, 1\] counts 2 images, but image_sizes has 3"):
        logits(model, {**inputs, "batch_num_images": torch.tensor([1, 1])})


# -- the 7B architecture ------------------------------------------------------------------------------------


def test_real_architecture_on_the_meta_device():
    arch = get_arch("llava-onevision-7b")
    assert arch.family == "llava-onevision"
    model, processor = arch.build(spec=replace(arch.spec, text_layers=2), device="meta")
    config, vision, text = model.config, model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1152, 27, 16)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4304, 384, 14)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (3584, 2, 28)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (4, 18944, 152064)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert config.vision_aspect_ratio == "anyres_max_9" and len(config.image_grid_pinpoints) == 36
    assert config.image_grid_pinpoints[-1] == [2304, 2304]
    assert model.model.multi_modal_projector.linear_1.weight.shape == (3584, 1152)
    assert model.lm_head.weight.shape == (152064, 3584) and model.model.image_newline.shape == (3584,)
    assert model.model.language_model.layers[0].mlp.gate_proj.weight.shape == (18944, 3584)
    adapter = adapter_for(model)
    assert adapter.unit_layout().vanilla == 729 and adapter.max_crops == 9
    for height, width in [(384, 384), (480, 640), (1080, 1920), (2304, 2304), (500, 3000)]:
        expected = processor._get_number_of_features(height, width, 384, 384)
        assert adapter.vanilla_count((height, width)) == expected
    # a 1080p image: 1152 x 1920 px, base + 3 x 5 crops (16 units); its 75 x 135 unpadded patches pooled by
    # sqrt(75 * 135 / (9 * 729)) = 1.24 to 60 x 108, + 60 newline tokens + 729 for the base crop
    assert adapter.num_crops((1080, 1920)) == 16 and adapter.packed_grid((1080, 1920)) == (60, 108)
    assert adapter.vanilla_count((1080, 1920)) == 729 + 60 * 108 + 60


# -- the command line ---------------------------------------------------------------------------------------


def test_viz_draws_every_crop_as_the_tower_sees_it(ov_dir, model, processor, tmp_path, capsys):
    assert main(["viz", "--model", str(ov_dir), "--out", str(tmp_path / "viz.png")]) == 0
    assert "visionzip, random, spatial at" in capsys.readouterr().out
    path = tmp_path / "wide.png"
    Image.new("RGB", (200, 60), (30, 140, 200)).save(path)  # the base crop + 1 x 3 crops, pooled
    assert main(["viz", "--model", str(ov_dir), "--image", str(path), "--methods", "visionzip,fastv",
                 "--tokens", "12", "--out", str(tmp_path / "wide-viz.png")]) == 0
    view = view_of(model, processor, Image.open(path))
    assert len(view.pictures) == 4 and view.grid == (1, 3) and len(view.layouts) == 4
    assert view.image.size == (98, 98) and view.total == 139
    assert view.caption.endswith("(the 7 x 21 unpadded high-resolution patches pooled to 5 x 17)")
    caption, drawn, keys = method_panel(model, view, "random", {"tokens": 12})
    assert caption == ("Random, 12 of 139 visual tokens\nleft: the base crop, 3 of its 49 tokens; right: the 1 x 3 "
                       "high-resolution crops, 9 tokens")
    assert keys == {"kept", "dropped"}


def test_run_answers_with_a_compressed_model(ov_dir, tmp_path, capsys):
    path = tmp_path / "image.png"
    random_image(5, (300, 90)).save(path)
    assert main(["run", "--model", str(ov_dir), "--image", str(path), "--prompt", "what color ?", "--tokens", "20",
                 "--repeats", "1", "--max-new-tokens", "2"]) == 0
    assert "visual tokens per image: 139 -> 20" in capsys.readouterr().out


def test_eval_runs_vanilla_and_visionzip(ov_dir, tmp_path):
    data = tmp_path / "val2"
    write_split("val", data, n_images=2)
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(ov_dir), "--data", str(data), "--methods", "vanilla,visionzip", "--limit", "4",
            "--max-new-tokens", "2", "--out", str(out)]
    table_error = None
    try:
        assert main(argv) == 0
    except TypeError as err:  # the core's table of a model whose images differ in count (see below)
        if "nominal" not in [frame.name for frame in traceback.extract_tb(err.__traceback__)]:
            raise
        table_error = err
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [run["key"] for run in runs] == ["vanilla", "visionzip@16", "visionzip@11", "visionzip@5"]
    for run in runs:
        lines = (out / "predictions" / f"{run['key']}.jsonl").read_text().splitlines()
        assert len(lines) == 4 and all(json.loads(line)["prediction"] is not None for line in lines)
    if table_error is not None:
        pytest.xfail("vlmzip/eval/report.py writes table.md from the vanilla run's 'tokens', which vlmzip.plan leaves "
                     f"None for models whose images differ in token count (LLaVA-NeXT too): {table_error}")
    assert (out / "table.md").exists()


def test_torchvision_free_processor_counts_like_the_real_one(ov_dir, processor, batch):
    inputs, images, texts = batch
    assert isinstance(processor, PilOnevisionProcessor)
    counts = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in SIZES])["num_image_tokens"]
    assert counts == placeholders(inputs, load(ov_dir).config)
