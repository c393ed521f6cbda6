"""SmolVLM / Idefics3 (tiny random weights, saved and reloaded, both model classes): tiles and the global image as
several placeholder runs per image, every method exact at keep-all and batched like single runs, budgets per
image split over its runs, generate and its cache, later turns, the tower's signals, viz / run / eval, errors,
and SmolVLM-Instruct's real shapes."""

from __future__ import annotations

import copy
import importlib
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from transformers import AutoModelForImageTextToText

import vlmzip
from vlmzip import signals
from vlmzip.adapters import adapter_for
from vlmzip.adapters.idefics3 import (
    Idefics3Adapter,
    load_processor,
    masked_received_attention,
    row_images,
    tile_grid,
)
from vlmzip.budgets import split_evenly
from vlmzip.builders import get_arch
from vlmzip.builders.idefics3 import Idefics3Spec, build_idefics3
from vlmzip.cli import main
from vlmzip.sequence import Item, image_runs
from vlmzip.viz import unit_selections, view_of

# 63 px tiles / patch 7 -> 9 x 9 patches, pixel shuffle 3 -> 9 tokens per tile (SmolVLM-Instruct: 27 x 27 -> 81);
# images resized to a 126 px longest edge -> up to 2 x 2 tiles + the global image. 5 decoder layers for SparseVLM.
SPEC = Idefics3Spec(text_layers=5)
RUN = 9
# (width, height): 2 x 2 tiles (5 runs), 1 x 2 (3 runs), 2 x 1 (3 runs): three different tile grids.
SIZES = [(130, 120), (120, 50), (50, 120)]
GRIDS = [(2, 2), (1, 2), (2, 1)]
QUESTIONS = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]
NEW = 3
TOKENS = 8  # per image: at least one per run (5 for a 2 x 2 image), at most the smallest image's 27


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def family_dir(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    # SmolVLM-Instruct's tokenizer writes the tile tags as text; SmolVLM2's has them as special tokens
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_idefics3(out, replace(SPEC, model_class=request.param, special_tags=request.param == "smolvlm"))
    return request.param, out


def load(family_dir, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(family_dir[1], **kwargs).eval()


@pytest.fixture()
def model(family_dir):
    return load(family_dir)


@pytest.fixture(scope="module")
def processor(family_dir):
    return load_processor(family_dir[1])


def prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode(processor, images, texts, **kwargs):
    """The processor's batch; images nested per prompt (SmolVLM's processor takes a flat list as one prompt's)."""
    return processor(images=[[image] for image in images], text=texts, return_tensors="pt", padding=True, **kwargs)


@pytest.fixture(scope="module")
def batch(processor):
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    texts = [prompt(processor, q) for q in QUESTIONS]
    return encode(processor, images, texts), images, texts


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)


def budget(spec) -> dict:
    return {"tokens": TOKENS} if spec.takes_budget else {}


def expected_runs(grid: tuple[int, int], keep: int) -> list[int]:
    """Each run's share of an image's budget: even over the units, global image first, returned in run order."""
    shares = split_evenly(keep, grid[0] * grid[1] + 1)
    return shares[1:] + shares[:1]


class LMIds:
    """Records the ids the LLM embeds (the shrunk prompt) on every call of the embedding table."""

    def __init__(self, model) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls.append(args[0].detach().cpu())


METHODS = sorted(vlmzip.methods.registered())


def test_checkpoint_loads_like_a_real_one(family_dir, processor, batch):
    name, _ = family_dir
    inputs, _, _ = batch
    model = load(family_dir)
    assert type(model).__name__ == {"idefics3": "Idefics3ForConditionalGeneration",
                                    "smolvlm": "SmolVLMForConditionalGeneration"}[name]
    # SmolVLM's own processor where transformers can build it (num2words, torchvision), else the image-only one
    assert type(processor).__name__ in {"idefics3": {"Idefics3Processor"},
                                        "smolvlm": {"SmolVLMProcessor", "ImageOnlySmolVLMProcessor"}}[name]
    assert isinstance(adapter_for(model), Idefics3Adapter)
    assert inputs["pixel_values"].shape[:2] == (3, 5), "up to 2 x 2 tiles + the global image, padded per row"
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"


def test_items_are_the_processors_tiles_and_global_images(model, processor, batch):
    inputs, images, _ = batch
    adapter = adapter_for(model)
    items = adapter.items(dict(inputs))
    layout = processor.image_processor(images=[[i] for i in images], return_row_col_info=True)
    grids = [(r[0], c[0]) for r, c in zip(layout["rows"], layout["cols"], strict=True)]
    assert grids == GRIDS
    assert [item.segments for item in items] == [(RUN,) * (r * c + 1) for r, c in grids]
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert [item.vanilla for item in items] == placeholders
    assert adapter.static_tokens_per_image() is None
    assert (adapter.unit_layout().num_prefix, adapter.unit_layout().grid) == (0, (3, 3))
    # an image no larger than a tile: the global image alone, one run
    single = encode(processor, images[:1], [prompt(processor, "what ?")], do_image_splitting=False)
    assert [item.segments for item in adapter.items(dict(single))] == [(RUN,)]


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_reproduces_vanilla_logits(model, batch, method):
    inputs, _, _ = batch
    before = logits(model, inputs)
    knobs = {"ratio": 1.0} if vlmzip.methods.get_method(method).takes_budget else {}
    with vlmzip.compressed(model, method, **knobs):
        torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_batched_equals_single_runs(model, processor, batch, method):
    """A left-padded batch of three tile grids generates (KV cache) what each image does alone, at batch 3 and 1."""
    inputs, images, texts = batch
    vlmzip.compress(model, method, **budget(vlmzip.methods.get_method(method)))
    batched = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(batched.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    new = batched.sequences[:, inputs["input_ids"].shape[1] :]
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        single_inputs = encode(processor, [image], [text])
        single = greedy(model, single_inputs, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1] :], new[i])
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": TOKENS}), ("divprune", {"ratio": 0.4}),
                                               ("pool", {"tokens": 11})])
def test_cached_generate_equals_uncached_recomputation(model, batch, method, knobs):
    inputs, _, _ = batch
    vlmzip.compress(model, method, **knobs)
    cached = greedy(model, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                        pixel_attention_mask=inputs["pixel_attention_mask"], use_cache=False)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize(("method", "knobs", "keep"), [
    ("visionzip", {"tokens": TOKENS}, lambda n: TOKENS),
    ("random", {"tokens": 13}, lambda n: 13),
    ("tome", {"ratio": 0.3}, lambda n: round(0.3 * n)),
])
def test_each_run_keeps_its_share_and_the_text_between_runs_stays(model, batch, method, knobs, keep):
    inputs, _, _ = batch
    seen = LMIds(model)
    with vlmzip.compressed(model, method, **knobs), torch.no_grad():
        model(**inputs)
    (shrunk,) = seen.calls
    image_id = model.config.image_token_id
    mask = inputs["attention_mask"].bool()
    for b, grid in enumerate(GRIDS):
        vanilla = grid[0] * grid[1] * RUN + RUN
        runs = [length for _, length in image_runs(shrunk[b], image_id)]
        assert runs == expected_runs(grid, keep(vanilla)), f"row {b}: each tile's and the global image's share"
        original = inputs["input_ids"][b][mask[b]]
        text = original[original != image_id]
        kept = shrunk[b][shrunk[b] != image_id]
        assert torch.equal(kept[-text.numel() :], text), "every text token kept (tile tags, <global-img>, question)"
        assert (kept[: -text.numel()] == adapter_for(model).pad_token_id).all(), "only padding before it"
    seen.handle.remove()


@pytest.mark.parametrize("method", ["divprune", "random"])  # a projector-stage and a vision-stage method
def test_each_run_receives_its_own_units_tokens(model, batch, method):
    """Image 0 (2 x 2 tiles) sends, run by run, tiles 1..4 then the global image (unit 0), each its own unit's
    selection; images 1 and 2 keep all 27 of their tokens and send the model's own features."""
    inputs, _, _ = batch
    with torch.no_grad():
        vanilla = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
        with vlmzip.compressed(model, method, tokens=27), vlmzip.recorded(model) as selections:
            out = model(**inputs)
    features = out.image_outputs.pooler_output
    assert [f.shape[0] for f in features] == [27, 27, 27]
    units = unit_selections(selections, image=0)
    assert sorted(units) == [0, 1, 2, 3, 4] and not unit_selections(selections, image=1)
    project = (lambda x: x) if method == "divprune" else model.model.connector.modality_projection
    with torch.no_grad():
        expected = torch.cat([project(units[u][0].features[units[u][1]]) for u in (1, 2, 3, 4, 0)])
    assert [units[u][0].features.shape[1] for u in (1, 2, 3, 4, 0)] == expected_runs((2, 2), 27)
    torch.testing.assert_close(features[0], expected, atol=1e-5, rtol=1e-5)
    for row in (1, 2):
        assert torch.equal(features[row], vanilla[row])


def test_split_is_even_over_units_global_image_first(model):
    adapter = adapter_for(model)
    assert adapter.items({"input_ids": torch.tensor([[0, 1, 2]])}) == []  # a prompt without images
    five = Item(model.config.image_token_id, (RUN,) * 5)
    assert adapter.split(five, 12, 0, "random") == (3, 2, 2, 2, 3)  # global 3, tiles 3, 2, 2, 2
    assert adapter.split(five, 5, 0, "random") == (1,) * 5
    assert adapter.split(Item(model.config.image_token_id, (RUN,)), 4, 0, "random") == (4,)


def test_a_budget_below_the_run_count_is_a_clear_error(model, batch):
    inputs, _, _ = batch
    with vlmzip.compressed(model, "visionzip", tokens=4), pytest.raises(
        ValueError, match=r"visionzip: a budget of 4 visual tokens for image 0 .*vanilla count 45: 4 tiles \+ the "
                          r"global image.*needs at least 5 tokens"
    ):
        logits(model, inputs)


def test_a_budget_above_the_smallest_image_names_its_count(model, batch):
    inputs, _, _ = batch
    with vlmzip.compressed(model, "random", tokens=28), pytest.raises(
        ValueError, match=r"larger than the 27 visual tokens image 1 of this batch has"
    ):
        logits(model, inputs)


def test_multi_turn_continues_the_same_cache(model, processor, batch):
    _, images, texts = batch
    first = encode(processor, images[:1], texts[:1])
    vlmzip.compress(model, "visionzip", tokens=TOKENS)
    turn1 = greedy(model, first, return_dict_in_generate=True)
    follow = processor.tokenizer("<end_of_utterance>\nUser: and the shape ?<end_of_utterance>\nAssistant:",
                                 add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([turn1.sequences, follow], dim=1)
    mask = torch.ones_like(ids)
    cached_len = turn1.cache.get_seq_length()
    turn2 = model.generate(input_ids=ids, attention_mask=mask, cache=turn1.cache, max_new_tokens=NEW, do_sample=False)
    assert turn1.cache.get_seq_length() > cached_len, "the second turn extended the first turn's cache"
    fresh = model.generate(input_ids=ids, attention_mask=mask, pixel_values=first["pixel_values"],
                           pixel_attention_mask=first["pixel_attention_mask"], max_new_tokens=NEW, do_sample=False)
    assert torch.equal(turn2, fresh)


def test_beams_with_keep_all_equal_vanilla_beams(model, batch):
    inputs, _, _ = batch
    kwargs = dict(max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    vanilla = model.generate(**inputs, **kwargs)
    with vlmzip.compressed(model, "random", ratio=1.0):
        same = model.generate(**inputs, **kwargs)
    assert torch.equal(vanilla.sequences, same.sequences)
    with vlmzip.compressed(model, "random", tokens=TOKENS):
        out = model.generate(**inputs, **kwargs)
    assert out.sequences.shape[0] == 6


def test_decompress_restores_exactly_and_copies_keep_the_compression(model, batch):
    inputs, _, _ = batch
    before = logits(model, inputs)
    vlmzip.compress(model, "visionzip", tokens=TOKENS)
    twins = (copy.deepcopy(model), pickle.loads(pickle.dumps(model)))
    squeezed = logits(model, inputs)
    assert squeezed.shape[1] == inputs["input_ids"].shape[1] - 27 + TOKENS  # the shortest rows lose 27 - 8
    for twin in twins:
        torch.testing.assert_close(logits(twin, inputs), squeezed, atol=0, rtol=0)
    vlmzip.decompress(model)
    assert torch.equal(before, logits(model, inputs))
    for name in ("forward", "generate", "_vlmzip"):
        assert name not in vars(model)
    assert "get_image_features" not in vars(model.model) and "forward" not in vars(model.model)


def test_visionzip_signals_match_an_eager_attention(family_dir, batch, monkeypatch):
    """received_attention / keys handed to VisionZip equal those rebuilt from the last tower layer's eager
    attention probabilities and keys, grouped per 3 x 3 block of patches (the pixel shuffle's tokens)."""
    inputs, _, _ = batch
    model = load(family_dir, attn_implementation="eager")
    attn = model.model.vision_model.encoder.layers[-1].self_attn
    module = importlib.import_module(type(attn).__module__)
    eager = module.eager_attention_forward
    probs: list[torch.Tensor] = []

    def recording(mod, *args, **kwargs):
        out, weights = eager(mod, *args, **kwargs)
        if mod is attn:
            probs.append(weights)
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    keys: list[torch.Tensor] = []
    attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    vlmzip.compress(model, "visionzip", tokens=TOKENS)
    state = vlmzip.api.state_of(model)
    handed: list = []
    select = state.select
    monkeypatch.setattr(state, "select",
                        lambda tokens, keep, units=None: handed.append((tokens, units)) or select(tokens, keep, units))
    with torch.no_grad():
        model(**inputs)

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (F, 81, C) per patch -> (F, 9, 9, C): each 3 x 3 block's patches
        f, _, c = x.shape
        return x.view(f, 3, 3, 3, 3, c).permute(0, 1, 3, 2, 4, 5).reshape(f, 9, 9, c)

    received = blocks(probs[0].float().mean(dim=(1, 2)).unsqueeze(-1)).sum(dim=(2, 3))  # (frames, 9)
    heads = attn.num_heads
    k = keys[0].float().view(*keys[0].shape[:2], heads, -1).mean(dim=2)
    grouped = blocks(k).mean(dim=2)
    assert received.shape[0] == 11, "every tile and global image of the batch: 5 + 3 + 3 real frames"
    seen = []
    for tokens, units in handed:
        order = torch.tensor(frame_numbers(units, GRIDS))
        torch.testing.assert_close(tokens.received_attention, received[order], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens.keys, grouped[order], atol=1e-6, rtol=1e-5)
        assert tokens.layout.grid == (3, 3) and tokens.layout.num_prefix == 0
        seen += units
    assert sorted(seen) == [(i, u) for i, (r, c) in enumerate(GRIDS) for u in range(r * c + 1)]


def frame_numbers(units, grids) -> list[int]:
    """The frame (in pixel_values' order of real frames) of each (image, unit): tiles first, the global image last."""
    starts, at = [], 0
    for r, c in grids:
        starts.append(at)
        at += r * c + 1
    out = []
    for image, unit in units:
        tiles = grids[image][0] * grids[image][1]
        out.append(starts[image] + (tiles if unit == 0 else unit - 1))
    return out


def test_tile_grid_is_read_back_from_the_global_image(model, processor):
    for size, grid in zip(SIZES, GRIDS, strict=True):
        inputs = encode(processor, [random_image(5, size)], [prompt(processor, "what ?")])
        frames = inputs["pixel_values"][0][: grid[0] * grid[1] + 1]
        assert tile_grid(frames[:-1], frames[-1]) == grid


def test_view_shows_the_global_image_and_every_tile(model, processor):
    image = random_image(4, SIZES[0])
    view = view_of(model, processor, image)
    assert view.total == 5 * RUN and view.grid == (2, 2) and len(view.pictures) == len(view.layouts) == 5
    inputs = view.inputs
    global_frame = inputs["pixel_values"][0][4]
    # unit 0 is the global image (the last frame the processor writes), units 1.. the tiles in raster order
    assert view.pictures[0].size == (63, 63)
    with vlmzip.compressed(model, "visionzip", tokens=TOKENS), vlmzip.recorded(model) as selections, \
            torch.no_grad():
        model(**inputs)
    units = sorted(u for s in selections for u in s.units)
    assert units == [(0, u) for u in range(5)]
    back = torch.from_numpy(np.asarray(view.pictures[0], dtype=np.float32)).permute(2, 0, 1)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (processor.image_processor.image_mean,
                                                          processor.image_processor.image_std))
    torch.testing.assert_close(back / 255, global_frame * std + mean, atol=1 / 255, rtol=0)


def test_viz_and_run_commands(family_dir, tmp_path, capsys):
    _, folder = family_dir
    out = tmp_path / "viz.png"
    assert main(["viz", "--model", str(folder), "--out", str(out), "--methods", "visionzip,random,fastv"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = tmp_path / "image.png"
    random_image(9, SIZES[1]).save(image)
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what color is the shape ?",
                 "--method", "visionzip", "--tokens", "6", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    assert "visual tokens per image: 27 -> 6" in capsys.readouterr().out


def test_eval_command(family_dir, tmp_path, capsys):
    name, folder = family_dir
    from vlmzip.lab.scenes import write_split

    data = tmp_path / "val2"
    write_split("val", data, n_images=2)
    assert main(["eval", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--methods", "vanilla,visionzip", "--tokens", "9", "--limit", "4", "--max-new-tokens", "2",
                 "--batch-size", "4"]) == 0
    table = capsys.readouterr().out
    assert "| vanilla | per image |" in table and "**Retain 9 tokens**" in table and "| visionzip | 9 |" in table


def test_bad_inputs_are_clear_errors(model, processor, batch):
    inputs, images, texts = batch
    vlmzip.compress(model, "random", tokens=TOKENS)
    with pytest.raises(ValueError, match="not get_image_features alone"), torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
    other = encode(processor, [images[1], images[0], images[2]], texts)  # the same prompts, other images' pixels
    with pytest.raises(ValueError, match=r"row 0 of the prompt has 5 tiles and global images .* holds 3 real frames"):
        logits(model, {**inputs, "pixel_values": other["pixel_values"],
                       "pixel_attention_mask": other["pixel_attention_mask"]})
    cut = {k: v[:, :-20] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match="run of .* image placeholders|ends inside an image"):
        logits(model, cut)


def test_a_config_that_cannot_be_laid_out_is_refused(family_dir):
    model = load(family_dir)
    model.config.scale_factor = 2  # 9 x 9 patches cannot be shuffled into 2 x 2 blocks
    with pytest.raises(ValueError, match="cannot lay out .* multiple of scale_factor 2"):
        vlmzip.compress(model, "visionzip", tokens=TOKENS)
    assert not vlmzip.is_compressed(model)


def test_video_frames_run_as_unsplit_images(family_dir, processor):
    """SmolVLM's video prompts send each frame as an unsplit image (same placeholders, tag and pixel_values):
    keep-all reproduces the vanilla model, and a budget compresses each frame like an image."""
    model = load(family_dir)
    frames = [random_image(20 + i, (80, 60)) for i in range(3)]
    text = "<|im_start|>User: you are provided the following frames ." + "".join(
        f"frame from 00 : 0{i} : <image>" for i in range(3)) + " what happens ?<end_of_utterance>\nAssistant:"
    inputs = processor(images=[frames], text=[text], return_tensors="pt", do_image_splitting=False)
    assert [item.segments for item in adapter_for(model).items(dict(inputs))] == [(RUN,)] * 3
    before = logits(model, inputs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    with vlmzip.compressed(model, "visionzip", tokens=4):
        assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1] - 3 * (RUN - 4)
        out = greedy(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW


def test_row_images_reads_text_and_special_tags():
    fake, image, glob = 1, 9, 2
    tag = [3, 4, 5]  # a tag written as text
    row = torch.tensor([7, fake, *tag, image, image, fake, 3, 4, 6, image, image, fake, glob, image, image, fake, 8,
                        fake, glob, image, image, fake])
    # the global tag is the last run's: the first image has 2 tiles (tags 3 4 5, 3 4 6) then its global image
    assert row_images(torch.tensor([7, fake, 3, 4, 5, image, image, fake, 3, 4, 6, image, image, fake, 3, 4, 0,
                                    image, image, fake]), image, 2) == [3]
    assert row_images(row, image, 2) == [3, 1]
    with pytest.raises(ValueError, match="runs of 3"):
        row_images(row, image, 3)
    with pytest.raises(ValueError, match="ends inside an image"):
        row_images(row[:-1], image, 2)
    with pytest.raises(ValueError, match="not preceded by <fake_token_around_image>"):
        row_images(torch.tensor([7, image, image, fake]), image, 2)


def test_real_architecture_has_smolvlm_instructs_shapes():
    arch = get_arch("smolvlm-2b")
    spec = replace(arch.spec, text_layers=2)
    model, processor = arch.build(spec=spec, device="meta", dtype=torch.bfloat16)
    config = model.config
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and arch.family == "idefics3"
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (384, 14, 1152, 27)
    assert (vision.num_attention_heads, vision.intermediate_size, config.scale_factor) == (16, 4304, 3)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (2048, 2, 32)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (32, 8192, 49155)
    inner = model.model
    assert inner.vision_model.embeddings.position_embedding.weight.shape == (729, 1152)
    assert inner.connector.modality_projection.proj.weight.shape == (2048, 1152 * 9)
    assert inner.text_model.embed_tokens.weight.shape == (49155, 2048)
    assert inner.text_model.layers[0].mlp.gate_proj.weight.shape == (8192, 2048)
    adapter = adapter_for(model)
    assert adapter.image_seq_len == 81 and adapter.unit_layout().grid == (9, 9)
    assert processor.image_seq_len == 81
    assert processor.image_processor.get_number_of_image_patches(1536, 1536) == (17, 4, 4)


def test_received_attention_ignores_padded_patches():
    """A frame with padded patches: its real patches receive what they receive among themselves alone (padded
    keys masked, padded queries not averaged), padded patches nothing."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    got = masked_received_attention(q, k, mask, num_heads=2, scale=0.5)
    full = signals.received_attention(q[:1], k[:1], 2, 0.5)
    alone = signals.received_attention(q[1:, :10], k[1:, :10], 2, 0.5)
    torch.testing.assert_close(got[0], full[0])
    torch.testing.assert_close(got[1, :10], alone[0])
    assert (got[1, 10:] == 0).all()
