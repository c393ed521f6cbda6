"""InternVL (tiny random weights, saved and reloaded): tiles and their counts, every method exact at keep-all,
batching, generate and its cache, per-image budgets over tiles, VisionZip's signals against an eager reference,
videos, the command line, errors, and the InternVL3-8B shapes."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from transformers import AutoModelForImageTextToText, InternVLForConditionalGeneration

import vlmzip
import vlmzip.methods
from vlmzip.adapters import adapter_for
from vlmzip.adapters.internvl import (
    ImageOnlyInternVLProcessor,
    InternVLAdapter,
    load_processor,
    tile_grid,
    tile_unit,
)
from vlmzip.budgets import split_evenly
from vlmzip.builders import get_arch
from vlmzip.builders.internvl import InternVLSpec, build_internvl
from vlmzip.cli import main
from vlmzip.lab.scenes import write_split
from vlmzip.views import pixels_to_image
from vlmzip.viz import method_panel, view_of

# 64 px tiles / patch 8 -> 8 x 8 patches + CLS; pixel shuffle 0.5 -> 4 x 4 = 16 tokens per tile; up to 4 tiles.
SPEC = InternVLSpec(image_size=64, patch_size=8, vision_layers=2, text_layers=5, max_patches=4)
PER_TILE = 16
# (width, height): one tile; 2 x 1 tiles + thumbnail; 2 x 2 tiles + thumbnail: 16, 48 and 80 placeholders.
SIZES = [(60, 60), (130, 60), (150, 140)]
TILES = [1, 3, 5]
QUESTIONS = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]
NEW = 3
METHODS = sorted(name for name, spec in vlmzip.methods.registered().items() if name != "vanilla")
PRE_LLM = [m for m in METHODS if vlmzip.methods.get_method(m).stage != "llm"]
IN_LLM = [m for m in METHODS if vlmzip.methods.get_method(m).stage == "llm"]


@pytest.fixture(scope="module")
def iv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-internvl")
    build_internvl(out, SPEC)
    return out


@pytest.fixture(scope="module")
def loaded(iv_dir: Path) -> InternVLForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(iv_dir).eval()


@pytest.fixture()
def model(loaded):
    """The module's model, decompressed again after each test."""
    yield loaded
    if vlmzip.is_compressed(loaded):
        vlmzip.decompress(loaded)


@pytest.fixture(scope="module")
def processor(iv_dir: Path):
    return load_processor(iv_dir)


def prompt(processor, question: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def batch(processor):
    """Three images with 1, 3 and 5 tiles and questions of different lengths, left padded."""
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    texts = [prompt(processor, q) for q in QUESTIONS]
    return processor(images=images, text=texts, return_tensors="pt", padding=True), images, texts


def single(processor, i: int):
    return processor(images=[random_image(i, SIZES[i])], text=[prompt(processor, QUESTIONS[i])], return_tensors="pt")


def placeholders(inputs, model) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kwargs):
    """Greedy generation of exactly NEW tokens (a random model may otherwise stop at EOS in one run only)."""
    return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)


def budget(method: str) -> dict:
    """A budget every image of the batch can split over its tiles (5 tiles <= 10 <= 16 tokens)."""
    return {"tokens": 10}


class LLMIds:
    """A pre-hook on the inner model recording the (shrunk) input_ids the LLM side receives."""

    def __init__(self, model) -> None:
        self.ids: list[torch.Tensor] = []
        self.handle = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        if kwargs.get("input_ids") is not None:
            self.ids.append(kwargs["input_ids"])


# -- the checkpoint, its tiles and their counts -------------------------------------------------------------


def test_checkpoint_loads_like_a_real_one(loaded, processor, batch):
    inputs, _, _ = batch
    assert type(loaded) is InternVLForConditionalGeneration
    assert type(processor).__name__ in ("InternVLProcessor", "ImageOnlyInternVLProcessor")
    assert json.loads((Path(loaded.name_or_path) / "processor_config.json").read_text())["processor_class"] == \
        "InternVLProcessor"
    assert inputs["pixel_values"].shape == (sum(TILES), 3, 64, 64)
    assert isinstance(adapter_for(loaded), InternVLAdapter)
    assert processor.image_seq_length == PER_TILE == loaded.config.image_seq_length


def test_counts_are_the_processors(model, processor, batch):
    """One run per image (<img> + its tiles' tokens + </img>), counted as the processor counts them."""
    inputs, images, _ = batch
    adapter = adapter_for(model)
    counts = [item.vanilla for item in adapter.items(dict(inputs))]
    expected = [PER_TILE * processor.image_processor.get_number_of_image_patches(im.height, im.width, {})
                for im in images]
    multimodal = processor._get_num_multimodal_tokens(image_sizes=[(im.height, im.width) for im in images])
    assert counts == expected == placeholders(inputs, model) == [PER_TILE * n for n in TILES]
    assert [n - 2 for n in multimodal.num_image_tokens] == counts  # the processor adds <img> and </img>
    assert all(len(item.segments) == 1 for item in adapter.items(dict(inputs)))
    layout = adapter.unit_layout()
    assert (layout.num_prefix, layout.grid, layout.vanilla) == (0, (4, 4), PER_TILE)
    assert adapter.static_tokens_per_image() is None


def test_pixel_shuffle_groups_are_the_2x2_blocks_it_concatenates(model, batch):
    inputs, _, _ = batch
    tower = adapter_for(model).tower
    expected = [[(2 * y) * 8 + 2 * x, (2 * y) * 8 + 2 * x + 1, (2 * y + 1) * 8 + 2 * x, (2 * y + 1) * 8 + 2 * x + 1]
                for y in range(4) for x in range(4)]
    assert tower.groups.tolist() == expected
    with torch.no_grad():
        _, tokens = tower.run(inputs["pixel_values"][:2], frozenset())
        patches = model.model.vision_tower(inputs["pixel_values"][:2]).last_hidden_state[:, 1:]
    width = patches.shape[-1]
    for t, group in enumerate(expected):  # each shuffled token is its 4 patches' features side by side
        torch.testing.assert_close(tokens.hidden[:, t].view(2, 4, width), patches[:, group], atol=0, rtol=0)
    assert [tile_unit(j, 5) for j in range(5)] == [1, 2, 3, 4, 0] and tile_unit(0, 1) == 0


# -- exactness, batching, generate ----------------------------------------------------------------------------


def test_keep_all_reproduces_vanilla_logits_for_every_method(model, batch):
    inputs, _, _ = batch
    before = logits(model, inputs)
    for method in METHODS:
        with vlmzip.compressed(model, method, ratio=1.0):
            assert torch.equal(logits(model, inputs), before), method


def test_every_method_batch_of_different_sizes_equals_single_runs(model, processor, batch):
    inputs, _, _ = batch
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    singles = [single(processor, i) for i in range(3)]
    for method in METHODS:
        with vlmzip.compressed(model, method, **budget(method)):
            batched = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
            new = batched.sequences[:, inputs["input_ids"].shape[1]:]
            for i, alone_inputs in enumerate(singles):
                alone = greedy(model, alone_inputs, return_dict_in_generate=True, output_logits=True)
                assert torch.equal(alone.sequences[0, alone_inputs["input_ids"].shape[1]:], new[i]), method
                for step in range(NEW):
                    torch.testing.assert_close(alone.logits[step][0], batched.logits[step][i], atol=1e-4, rtol=1e-4,
                                               msg=f"{method}, row {i}, step {step}")


def test_cached_generate_equals_recomputation_for_every_method(model, batch):
    """Pre-LLM methods: the cached answer equals greedy decoding that recomputes the whole prompt each step.
    In-LLM methods choose from the prompt's last tokens, so a longer prompt would choose again: their
    recomputation is the pruned prefill once, then each new token through its cache (a forward call each; for a
    cache pruned before layer 0, which only generate may continue, a generate call each)."""
    inputs, _, _ = batch
    prompt_len = inputs["input_ids"].shape[1]
    for method in METHODS:
        with vlmzip.compressed(model, method, **budget(method)), torch.no_grad():
            cached = greedy(model, inputs)
            assert torch.equal(cached[:, :prompt_len], inputs["input_ids"]), method
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            if method in PRE_LLM:
                for _ in range(NEW):
                    out = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                                use_cache=False)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
            elif vlmzip.plan(model, method, **budget(method)).steps[0].layer == 0:
                out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
                for _ in range(NEW - 1):
                    ids = out.sequences
                    mask = torch.cat([mask, torch.ones_like(ids[:, -1:])], dim=1)
                    out = model.generate(input_ids=ids, attention_mask=mask, cache=out.cache, max_new_tokens=1,
                                         do_sample=False, return_dict_in_generate=True)
                ids = out.sequences
            else:
                out = model(**inputs, use_cache=True)
                for _ in range(NEW):
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
                    out = model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
        assert torch.equal(cached, ids), method


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 12}), ("fastv", {"tokens": 12})])
def test_second_turn_continues_the_cache(model, processor, method, knobs):
    first = single(processor, 2)
    vlmzip.compress(model, method, **knobs)
    turn1 = model.generate(**first, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           return_dict_in_generate=True)
    follow = processor.tokenizer("<|im_end|>\n<|im_start|>user\nand the shape ?<|im_end|>\n<|im_start|>assistant\n",
                                 add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([turn1.sequences, follow], dim=1)
    mask = torch.ones_like(ids)
    cached_len = turn1.cache.get_seq_length()
    turn2 = model.generate(input_ids=ids, attention_mask=mask, cache=turn1.cache, max_new_tokens=NEW,
                           min_new_tokens=NEW, do_sample=False)
    assert turn1.cache.get_seq_length() > cached_len, "the second turn extended the first turn's cache"
    fresh = model.generate(input_ids=ids, attention_mask=mask, pixel_values=first["pixel_values"],
                           max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(turn2, fresh)
    assert torch.equal(turn2[:, : ids.shape[1]], ids)


def test_beams_expand_each_rows_images(model, processor, batch):
    """generate encodes the images, then repeats each row's features for its beams before the prefill: kept-whole
    images keep HF's features (vanilla beams), compressed ones are repeated row by row (one token per feature
    row), so a batch's beams equal each prompt's own."""
    inputs, _, _ = batch
    kwargs = dict(max_new_tokens=2, min_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    vanilla = model.generate(**inputs, **kwargs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        same = model.generate(**inputs, **kwargs)
    assert torch.equal(vanilla.sequences, same.sequences)
    with vlmzip.compressed(model, "visionzip", tokens=10):
        beams = model.generate(**inputs, **kwargs).sequences[:, inputs["input_ids"].shape[1]:]
        for i in range(3):
            alone_inputs = single(processor, i)
            alone = model.generate(**alone_inputs, **kwargs).sequences[:, alone_inputs["input_ids"].shape[1]:]
            assert torch.equal(alone, beams[2 * i : 2 * i + 2]), i


# -- budgets over tiles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "knobs", "kept"), [
    ("visionzip", {"tokens": 12}, [12, 12, 12]),
    ("random", {"ratio": 0.25}, [4, 12, 20]),
    ("pool", {"ratio": 0.5}, [8, 24, 40]),
])
def test_each_image_sends_its_budget_split_evenly_over_its_tiles(model, batch, method, knobs, kept):
    inputs, _, _ = batch
    seen = LLMIds(model)
    with vlmzip.compressed(model, method, **knobs), vlmzip.recorded(model) as selections, torch.no_grad():
        out = model(**inputs)
    seen.handle.remove()
    assert placeholders({"input_ids": seen.ids[0]}, model) == kept  # what the LLM receives, image by image
    removed = [n - k for n, k in zip(placeholders(inputs, model), kept, strict=True)]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - min(removed)
    for image, (tiles, keep) in enumerate(zip(TILES, kept, strict=True)):
        shares = {}
        for sel in selections:
            for number, unit in sel.units:
                if number == image:
                    shares[unit] = sel.features.shape[1]
        expected = split_evenly(keep, tiles)  # unit 0 (the thumbnail) gets the remainder first
        assert shares == {u: expected[u] for u in range(tiles) if expected[u] < PER_TILE}


def test_fastv_prunes_each_image_inside_the_llm(model, processor):
    inputs = single(processor, 2)
    count = placeholders(inputs, model)[0]
    vlmzip.compress(model, "fastv", tokens=10, layer=2)
    out = greedy(model, inputs, return_dict_in_generate=True)
    full = inputs["input_ids"].shape[1] + NEW - 1
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [full, full] + [full - count + 10] * 3


def test_direct_get_image_features_takes_num_patches(model, batch):
    inputs, _, _ = batch
    with torch.no_grad():
        vanilla = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        with vlmzip.compressed(model, "fastv", tokens=10):  # no pre-LLM stage: every tile is sent whole
            whole = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        with vlmzip.compressed(model, "random", ratio=1.0):
            assert torch.equal(model.model.get_image_features(inputs["pixel_values"], num_patches=TILES).pooler_output,
                               vanilla)
        with vlmzip.compressed(model, "spatial", tokens=10):
            with pytest.raises(ValueError, match="pass num_patches"):
                model.model.get_image_features(inputs["pixel_values"])
            sent = model.model.get_image_features(inputs["pixel_values"], num_patches=TILES).pooler_output
    assert vanilla.shape == (sum(TILES), PER_TILE, model.config.text_config.hidden_size)
    assert torch.equal(whole, vanilla)
    assert sent.shape == (30, 1, model.config.text_config.hidden_size)


def test_an_image_sent_whole_next_to_a_compressed_one_is_hfs_own(model, batch):
    inputs, _, _ = batch
    with torch.no_grad():
        vanilla = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        with vlmzip.compressed(model, "visionzip", tokens=16):  # image 0 (one tile of 16) whole, the others not
            mixed = model.model.get_image_features(inputs["pixel_values"], num_patches=TILES).pooler_output
    assert mixed.shape[0] == 48
    torch.testing.assert_close(mixed[:PER_TILE, 0], vanilla[0], atol=0, rtol=0)


# -- VisionZip's signals ------------------------------------------------------------------------------------


def test_visionzip_ranks_by_the_cls_attention_of_each_2x2_group(iv_dir, processor, monkeypatch):
    """The dominance handed to VisionZip is the CLS attention (eager probabilities of the feature layer, summed
    over heads) its 2 x 2 patches receive, summed; its keys their head-mean keys, averaged; VisionZip keeps the
    most attended groups and no CLS token."""
    model = AutoModelForImageTextToText.from_pretrained(iv_dir, attn_implementation="eager").eval()
    attn = model.model.vision_tower.encoder.layer[-1].attention
    with torch.no_grad():  # sharpen the random attention so that rankings are far from ties
        attn.q_proj.weight.mul_(40)
    inputs = single(processor, 2)
    pixels = inputs["pixel_values"]
    keys_seen: list[torch.Tensor] = []
    handle = attn.k_proj.register_forward_hook(lambda m, a, out: keys_seen.append(out))
    with torch.no_grad():
        probs = model.model.vision_tower(pixels, output_attentions=True).attentions[-1]  # (5, H, 65, 65)
    handle.remove()
    heads = attn.num_heads
    cls = probs[:, :, 0, 1:].sum(dim=1)  # (tiles, 64)
    keys = keys_seen[0].view(5, 65, heads, -1).mean(dim=2)[:, 1:]  # (tiles, 64, Dh)
    blocks = [[(2 * y + dy) * 8 + 2 * x + dx for dy in (0, 1) for dx in (0, 1)] for y in range(4) for x in range(4)]
    dominance = torch.stack([cls[:, b].sum(dim=1) for b in blocks], dim=1)
    group_keys = torch.stack([keys[:, b].mean(dim=1) for b in blocks], dim=1)

    vlmzip.compress(model, "visionzip", tokens=20)  # 4 per tile: 3 dominant + 1 contextual
    state = vlmzip.api.state_of(model)
    handed = []
    select = state.select
    monkeypatch.setattr(state, "select", lambda tokens, keep, units=None: handed.append(tokens)
                        or select(tokens, keep, units))
    with vlmzip.recorded(model) as selections, torch.no_grad():
        model(**inputs)
    (tokens,) = handed
    assert tokens.layout.num_prefix == 0 and tokens.hidden.shape[:2] == (5, PER_TILE)
    torch.testing.assert_close(tokens.cls_attention, dominance, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens.received_attention, dominance, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens.keys, group_keys, atol=1e-5, rtol=1e-4)
    (sel,) = selections
    assert sel.dominant == 3 and sel.units == ((0, 1), (0, 2), (0, 3), (0, 4), (0, 0))
    top = dominance.topk(3, dim=1).indices.sort(dim=1).values
    assert torch.equal(sel.indices[:, :3], top), "the dominant tokens are the groups the CLS attends to most"


# -- videos ---------------------------------------------------------------------------------------------------


def video_inputs(model, processor):
    """An image prompt with a two-frame video before the question, written as InternVL's processor writes videos
    ("FrameN: <img>" + one tile of placeholders + "</img>"); no video processor here, so random frames."""
    inputs = single(processor, 1)
    tokenizer = processor.tokenizer
    start, end = tokenizer.convert_tokens_to_ids("<img>"), tokenizer.convert_tokens_to_ids("</img>")

    def frame(n: int) -> list[int]:
        label = tokenizer(f"Frame{n}: ", add_special_tokens=False)["input_ids"]
        return [*label, start, *[model.config.image_token_id] * PER_TILE, end]

    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    video = torch.tensor([frame(1) + newline + frame(2)])
    ids = inputs["input_ids"]
    at = int((ids[0] == tokenizer.convert_tokens_to_ids("how")).nonzero()[0])
    frames = torch.randn(2, *inputs["pixel_values"].shape[1:], generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids[:, :at], video, ids[:, at:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.cat([inputs["pixel_values"], frames])}


def test_videos_run_and_each_frame_counts_as_a_one_tile_image(model, processor):
    inputs = video_inputs(model, processor)
    assert [item.vanilla for item in adapter_for(model).items(inputs)] == [48, PER_TILE, PER_TILE]
    before = logits(model, inputs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        assert torch.equal(logits(model, inputs), before)
    vlmzip.compress(model, "visionzip", tokens=6)
    assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - (48 - 6) - 2 * (PER_TILE - 6)
    out = greedy(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW


# -- pictures and the command line ----------------------------------------------------------------------------


def test_view_shows_the_thumbnail_then_every_tile_in_its_grid(loaded, processor, iv_dir, tmp_path):
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (60, 130, 3), dtype=np.uint8))  # 1 x 2 tiles + thumbnail
    view = view_of(loaded, processor, wide)
    pixels = view.inputs["pixel_values"]
    assert view.grid == (1, 2) and len(view.pictures) == len(view.layouts) == 3 and view.total == 48
    image_processor = processor.image_processor
    assert np.array_equal(np.asarray(view.pictures[0]), np.asarray(pixels_to_image(pixels[2], image_processor)))
    assert np.array_equal(np.asarray(view.pictures[1]), np.asarray(pixels_to_image(pixels[0], image_processor)))
    assert view.pictures[1].size == (64, 64) and view.caption.startswith("As the model sees it: the thumbnail")
    assert tile_grid(pixels[:2], pixels[2]) == (1, 2)
    caption, _, keys = method_panel(loaded, view, "random", {"tokens": 9})  # a selection drawn on every tile
    assert caption.endswith("left: the base crop, 3 of its 16 tokens; right: the 1 x 2 high-resolution crops, "
                            "6 tokens") and keys == {"kept", "dropped"}
    tall = Image.fromarray(rng.integers(0, 256, (130, 60, 3), dtype=np.uint8))
    assert view_of(loaded, processor, tall).grid == (2, 1)
    out = tmp_path / "viz.png"
    image = tmp_path / "wide.png"
    wide.save(image)
    assert main(["viz", "--model", str(iv_dir), "--image", str(image), "--methods", "visionzip,random,fastv",
                 "--tokens", "9", "--out", str(out)]) == 0
    assert Image.open(out).width > 3 * 336
    assert main(["viz", "--model", str(iv_dir), "--out", str(tmp_path / "default.png")]) == 0


def test_run_on_the_command_line(iv_dir, tmp_path, capsys):
    image = tmp_path / "wide.png"
    random_image(3, (130, 60)).save(image)
    assert main(["run", "--model", str(iv_dir), "--image", str(image), "--prompt", "what color is the shape ?",
                 "--method", "visionzip", "--tokens", "9", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "InternVLForConditionalGeneration" in text and "48 -> 9" in text


def test_eval_on_the_command_line(iv_dir, tmp_path):
    data = tmp_path / "val2"
    write_split("val", data, n_images=2)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(iv_dir), "--data", str(data), "--out", str(out), "--methods",
                 "vanilla,visionzip", "--tokens", "16", "--limit", "4", "--max-new-tokens", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["vanilla", "visionzip@16"]
    assert all(r["scores"]["n"] == 4 for r in results["runs"])
    assert "| visionzip | 16 |" in (out / "table.md").read_text()


# -- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("knobs", "match"), [
    ({"tokens": 3}, r"image 2 of this batch \(vanilla count 80: 5 tiles of 16 tokens\) cannot be split over its "
                    r"tiles; it needs between 5 and 80 tokens \(use ratio=1.0"),
    ({"ratio": 0.02}, r"image 1 of this batch \(vanilla count 48: 3 tiles"),
    ({"tokens": 17}, r"larger than the 16 visual tokens image 0 of this batch has"),
])
def test_a_budget_that_cannot_be_split_is_a_clear_error(model, batch, knobs, match):
    inputs, _, _ = batch
    with vlmzip.compressed(model, "random", **knobs), pytest.raises(ValueError, match=match):
        logits(model, inputs)


def test_prompts_and_pixels_that_do_not_match_are_clear_errors(model, processor, batch):
    inputs, _, _ = batch
    vlmzip.compress(model, "visionzip", tokens=10)
    ids = inputs["input_ids"]
    broken = ids.clone()
    broken[2, (ids[2] == model.config.image_token_id).nonzero()[0]] = processor.tokenizer.unk_token_id  # a run of 79
    with pytest.raises(ValueError, match="not a whole number of tiles of 16 tokens"):
        model(input_ids=broken, attention_mask=torch.ones_like(broken), pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="make 9 tiles of 16 tokens, but pixel_values holds 8"):
        model(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"][:-1])
    with pytest.raises(ValueError, match="compressed for vision_feature_layer/strategy"):
        model(**inputs, vision_feature_layer=-2)
    if isinstance(processor, ImageOnlyInternVLProcessor):  # the fallback built where torchvision is missing
        with pytest.raises(ValueError, match="without video support"):
            processor(text=["<video>"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])


@pytest.mark.parametrize(("change", "match"), [
    ({"vision_feature_select_strategy": "full"}, "keeps InternViT's CLS token, which does not fit the pixel-shuffle"),
    ({"vision_feature_layer": [-1, -2]}, "concatenates several layers"),
    ({"vision_feature_layer": 7}, "does not select one of the tower's 2 transformer layers"),
    ({"downsample_ratio": 0.3}, "1 / downsample_ratio to be an integer dividing it"),
])
def test_configs_vlmzip_cannot_lay_out_are_refused(iv_dir, change, match):
    model = AutoModelForImageTextToText.from_pretrained(iv_dir)
    for key, value in change.items():
        object.__setattr__(model.config, key, value)
    with pytest.raises(ValueError, match=match):
        vlmzip.compress(model, "visionzip", tokens=10)
    assert not vlmzip.is_compressed(model)


def test_an_earlier_feature_layer_is_followed(iv_dir, batch):
    model = AutoModelForImageTextToText.from_pretrained(iv_dir).eval()
    model.config.vision_feature_layer = -2
    inputs, _, _ = batch
    before = logits(model, inputs)
    assert adapter_for(model).tower.attn is model.model.vision_tower.encoder.layer[0].attention
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        assert torch.equal(logits(model, inputs), before)
    with vlmzip.compressed(model, "visionzip", tokens=10):
        assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - 6


def test_a_checkpoint_without_a_chat_template_is_refused_without_torchvision(tmp_path):
    build_internvl(tmp_path, replace(SPEC, text_layers=1))
    (tmp_path / "chat_template.jinja").unlink()
    try:
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(tmp_path)
    except Exception:  # the image-only fallback is what runs here
        with pytest.raises(ValueError, match="has no chat template of its own"):
            load_processor(tmp_path)
    else:
        pytest.skip("transformers builds InternVL's own processor here (torchvision works): no fallback to check")


# -- instance-level and reversible ----------------------------------------------------------------------------


def test_decompress_restores_exactly(model, batch):
    inputs, _, _ = batch
    before = logits(model, inputs)
    vlmzip.compress(model, "visionzip", tokens=10)
    assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - 6
    vlmzip.decompress(model)
    assert torch.equal(logits(model, inputs), before)
    for name in ("forward", "generate", "_vlmzip"):
        assert name not in vars(model)
    assert "get_image_features" not in vars(model.model) and "forward" not in vars(model.model)


def test_deepcopy_and_pickle_keep_the_compression(iv_dir, batch):
    inputs, _, _ = batch
    model = AutoModelForImageTextToText.from_pretrained(iv_dir).eval()
    vlmzip.compress(model, "visionzip", tokens=10)
    # before any forward: transformers' own lazily installed output-capturing hook is a closure
    twins = (copy.deepcopy(model), pickle.loads(pickle.dumps(model)))
    expected = logits(model, inputs)
    for twin in twins:
        assert vlmzip.is_compressed(twin)
        assert torch.equal(logits(twin, inputs), expected)


# -- the released size ------------------------------------------------------------------------------------------


def test_internvl3_8b_has_the_released_shapes():
    spec = replace(get_arch("internvl3-8b").spec, text_layers=2)  # reduced text depth, the rest as released
    model, processor = build_internvl(spec=spec, device="meta")
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, tuple(vision.patch_size), tuple(vision.image_size)) == (4096, (14, 14),
                                                                                              (448, 448))
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584, 2, 28, 4)
    assert (text.intermediate_size, text.vocab_size, text.max_position_embeddings) == (18944, 151674, 32768)
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (4096, 3584)
    assert model.model.vision_tower.embeddings.position_embeddings.shape == (1, 1025, 1024)
    adapter = adapter_for(model)
    assert adapter.unit_layout().grid == (16, 16) and adapter.per_tile == 256 == processor.image_seq_length
    assert processor.image_processor.max_patches == 12
