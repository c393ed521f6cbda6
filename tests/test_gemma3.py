"""Gemma 3 (tiny random weights, saved and reloaded): pan-and-scan runs, exact keep-all, every pre-LLM method in
generate at every batch size, per-image budgets over crops, batching, caches, bidirectional image blocks, signals,
pictures, the command line, errors, and the 12B speed model's shapes."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from transformers import AutoModelForImageTextToText, Gemma3ForConditionalGeneration, Gemma3Processor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.adapters.gemma3 import Gemma3Adapter
from vlmzip.budgets import split_evenly
from vlmzip.builders import get_arch
from vlmzip.builders.gemma3 import Gemma3Spec, build_gemma3
from vlmzip.cli import main
from vlmzip.io import batch_inputs
from vlmzip.lab.scenes import write_split
from vlmzip.methods import registered
from vlmzip.sequence import image_runs
from vlmzip.viz import method_panel, plain_picture

SPEC = Gemma3Spec()  # 96 px / patch 4 = 24 x 24 patches, pooled 4 x 4 to 6 x 6 = 36 tokens per picture
PER_RUN = 36
PRE_LLM = sorted(name for name, spec in registered().items() if spec.stage != "llm" and name != "vanilla")
NEW = 4
# (width, height): 800 x 300 -> the image + 3 crops (4 runs), 130 x 120 -> no crops (1 run), 300 x 600 -> 2 crops
SIZES = [(800, 300), (130, 120), (300, 600)]
RUNS = [4, 1, 3]
QUESTIONS = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gemma3")
    build_gemma3(out, SPEC)
    return out


def load(path: Path, **kwargs) -> Gemma3ForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()


@pytest.fixture()
def model(gemma_dir):
    return load(gemma_dir)


@pytest.fixture(scope="module")
def processor(gemma_dir):
    return adapter_for(load(gemma_dir)).load_processor(gemma_dir)


def prompt(processor, question: str, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(processor, images, questions, crops: bool = True):
    """Processor outputs for one image per prompt, left padded, with pan-and-scan crops when ``crops``."""
    return processor(images=[[image] for image in images], text=[prompt(processor, q) for q in questions],
                     return_tensors="pt", padding=True, do_pan_and_scan=crops)


@pytest.fixture(scope="module")
def batch(processor):
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    return encode(processor, images, QUESTIONS), images


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)


class LLMInputs:
    """A pre-hook on ``model.model``: the (shrunk) ids, token types and masks the LLM side receives, per call."""

    def __init__(self, model) -> None:
        self.calls: list[dict] = []
        self.image_token = model.config.image_token_id
        self.handles = [model.model.register_forward_pre_hook(self.inner, with_kwargs=True),
                        model.model.language_model.register_forward_pre_hook(self.lm, with_kwargs=True)]

    def inner(self, module, args, kwargs) -> None:
        self.calls.append({k: kwargs.get(k) for k in ("input_ids", "token_type_ids", "attention_mask")})

    def lm(self, module, args, kwargs) -> None:
        self.calls[-1]["masks"] = kwargs.get("attention_mask")

    def runs(self, call: int = 0) -> list[list[int]]:
        """Placeholders of each run, per row, in the ids of call ``call``."""
        ids = self.calls[call]["input_ids"].cpu()
        return [[n for _, n in image_runs(row, self.image_token)] for row in ids]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def expected_runs(keeps: list[int], runs: list[int]) -> list[list[int]]:
    return [split_evenly(k, r) for k, r in zip(keeps, runs, strict=True)]


# -- the checkpoint and its images ------------------------------------------------------------------------


def test_checkpoint_loads_like_a_real_one(gemma_dir, processor, batch):
    inputs, images = batch
    model = load(gemma_dir)
    assert type(model) is Gemma3ForConditionalGeneration and isinstance(adapter_for(model), Gemma3Adapter)
    assert type(processor) is Gemma3Processor and type(processor.image_processor) is Gemma3ImageProcessorPil
    assert model.config.text_config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    # one picture per run: the processor's own crop counts (which it drops from its output) give the runs
    crops = processor.image_processor(images, do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
                                      pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    assert [1 + n for n in crops["num_crops"]] == RUNS and "num_crops" not in inputs
    assert inputs["pixel_values"].shape[0] == sum(RUNS)
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    # the image reaches the answer (transformers initialises the projection to zeros; the builder draws it)
    one, other = (encode(processor, [random_image(seed, SIZES[1])], ["how many ?"]) for seed in (1, 9))
    assert (logits(model, one)[0, -1] - logits(model, other)[0, -1]).abs().max() > 1e-3


def test_items_group_each_images_runs_as_the_processor_wrote_them(model, processor, batch):
    inputs, images = batch
    adapter = adapter_for(model)
    assert [item.segments for item in adapter.items(dict(inputs))] == [(PER_RUN,) * n for n in RUNS]
    # several images in one prompt, one with crops next to ones without: runs continue an image only after the
    # processor's own lead-in / separator
    text = prompt(processor, "<start_of_image> and <start_of_image> or <start_of_image> how many ?", images=0)
    both = processor(images=[[images[1], images[0], images[1]]], text=[text], return_tensors="pt",
                     do_pan_and_scan=True)
    assert [len(item.segments) for item in adapter.items(dict(both))] == [1, 4, 1]
    assert adapter.static_tokens_per_image() is None
    layout = adapter.unit_layout()
    assert (layout.num_prefix, layout.grid, layout.vanilla) == (0, (6, 6), PER_RUN)


# -- exactness and every method ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", PRE_LLM)
def test_keep_all_reproduces_vanilla_logits_exactly(model, batch, method):
    inputs, _ = batch
    before = logits(model, inputs)
    with vlmzip.compressed(model, method, ratio=1.0):
        torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)


def test_every_pre_llm_method_generates_at_every_batch_size(model, processor, batch):
    inputs, images = batch
    tokens = 9
    for method in PRE_LLM:
        stage = registered()[method].stage
        width = model.config.text_config.hidden_size if stage == "projector" else SPEC.vision_hidden
        for rows in ([1], [0, 2], [0, 1, 2]):
            sub = encode(processor, [images[i] for i in rows], [QUESTIONS[i] for i in rows])
            seen = LLMInputs(model)
            with vlmzip.compressed(model, method, tokens=tokens), vlmzip.recorded(model) as selections:
                out = greedy(model, sub, return_dict_in_generate=True)
            seen.remove()
            assert seen.runs(0) == [split_evenly(tokens, RUNS[i]) for i in rows], (method, rows)
            assert out.sequences.shape[1] <= sub["input_ids"].shape[1] + NEW
            assert torch.equal(out.sequences[:, : sub["input_ids"].shape[1]], sub["input_ids"])
            assert seen.calls[-1]["input_ids"].shape[1] == 1, "decode steps run on the KV cache"
            assert {s.features.shape[-1] for s in selections} == {width}, method
            assert sorted(u for s in selections for u in s.units) == [
                (i, j) for i, row in enumerate(rows) for j in range(RUNS[row])]


@pytest.mark.parametrize(("method", "knobs"), [("random", {"tokens": 12}), ("visionzip", {"tokens": 13}),
                                                ("spatial", {"ratio": 0.25}), ("tome", {"tokens": 36})])
def test_budget_per_image_holds_over_its_crops(model, batch, method, knobs):
    inputs, _ = batch
    counts = [PER_RUN * n for n in RUNS]
    keeps = [knobs["tokens"]] * 3 if "tokens" in knobs else [round(knobs["ratio"] * n) for n in counts]
    seen = LLMInputs(model)
    with vlmzip.compressed(model, method, **knobs), torch.no_grad():
        out = model(**inputs)
    seen.remove()
    assert seen.runs() == expected_runs(keeps, RUNS)
    removed = [n - k for n, k in zip(counts, keeps, strict=True)]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - min(removed)
    # token types shrink with the ids: 1 exactly at the placeholders the LLM receives
    ids, types = seen.calls[0]["input_ids"], seen.calls[0]["token_type_ids"]
    assert torch.equal(types == 1, ids == model.config.image_token_id)


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 10}), ("random", {"ratio": 0.3})])
def test_padded_batch_with_and_without_crops_equals_single_runs(model, processor, batch, method, knobs):
    inputs, images = batch
    vlmzip.compress(model, method, **knobs)
    batched = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
    new = batched.sequences[:, inputs["input_ids"].shape[1] :]
    for i, image in enumerate(images):
        single_inputs = encode(processor, [image], [QUESTIONS[i]])
        single = greedy(model, single_inputs, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1] :], new[i])
        for step, step_logits in enumerate(single.logits):
            torch.testing.assert_close(step_logits[0], batched.logits[step][i], atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_recomputation(model, batch):
    inputs, _ = batch
    vlmzip.compress(model, "visionzip", tokens=10)
    cached = greedy(model, inputs)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions,
                        pixel_values=inputs["pixel_values"], use_cache=False)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            types = torch.cat([types, torch.zeros_like(token)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    assert torch.equal(cached, ids)


def test_second_turn_continues_the_cache_and_equals_recomputing_it(model, processor, batch):
    _, images = batch
    first = encode(processor, [images[0]], [QUESTIONS[0]])
    vlmzip.compress(model, "visionzip", tokens=10)
    turn1 = greedy(model, first, return_dict_in_generate=True)
    follow = processor.tokenizer("<end_of_turn>\n<start_of_turn>user\nand the shape ?<end_of_turn>\n"
                                 "<start_of_turn>model\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([turn1.sequences, follow], dim=1)
    mask = torch.ones_like(ids)
    cached = turn1.cache.get_seq_length()
    turn2 = greedy(model, {"input_ids": ids, "attention_mask": mask, "cache": turn1.cache})
    assert turn1.cache.get_seq_length() > cached, "the second turn extended the first turn's cache"
    types = (ids == model.config.image_token_id).long()
    fresh = greedy(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                           "pixel_values": first["pixel_values"]})
    assert torch.equal(turn2, fresh)


def test_kept_tokens_of_a_run_still_attend_to_each_other(model, batch):
    inputs, _ = batch
    seen = LLMInputs(model)
    with vlmzip.compressed(model, "random", tokens=10), torch.no_grad():
        model(**inputs)
    seen.remove()
    call = seen.calls[0]
    ids, masks = call["input_ids"], call["masks"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    full = masks["full_attention"]
    assert full.dtype == torch.bool and full.shape[-2:] == (ids.shape[1], ids.shape[1])
    for b, row in enumerate(ids):
        spans = image_runs(row, model.config.image_token_id)
        assert [n for _, n in spans] == split_evenly(10, RUNS[b])
        for k, (start, n) in enumerate(spans):
            block = full[b, 0, start : start + n, start : start + n]
            assert bool(block.all()), "every kept token of a run attends to every other (bidirectional)"
            assert not bool(full[b, 0, start, start + n]), "the token after the run stays in the future"
            if k + 1 < len(spans):
                nxt = spans[k + 1][0]
                assert not bool(full[b, 0, start + n - 1, nxt]), "a run does not see the next run"
                assert bool(full[b, 0, nxt, start]), "a later run sees the earlier one (causal)"


def test_decompress_restores_exactly_and_copies_keep_the_compression(model, batch):
    inputs, _ = batch
    before = logits(model, inputs)
    vlmzip.compress(model, "visionzip", tokens=10)
    twins = (copy.deepcopy(model), pickle.loads(pickle.dumps(model)))
    squeezed = logits(model, inputs)
    assert squeezed.shape[1] < inputs["input_ids"].shape[1]
    for twin in twins:
        torch.testing.assert_close(logits(twin, inputs), squeezed, atol=0, rtol=0)
    vlmzip.decompress(model)
    assert torch.equal(before, logits(model, inputs))
    assert "get_image_features" not in vars(model.model) and "forward" not in vars(model)


def test_beams_on_a_padded_batch_equal_beams_on_each_row(model, processor, batch):
    """generate repeats each row's image tokens for beams, splitting pooler_output by each row's placeholder
    count: the compressed rows' tokens (row totals 7 = 2+2+2+1, 7, 7 = 3+2+2: runs of different counts) stay
    with their row."""
    inputs, images = batch
    kwargs = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    vanilla = model.generate(**inputs, **kwargs)
    with vlmzip.compressed(model, "random", ratio=1.0):
        assert torch.equal(model.generate(**inputs, **kwargs), vanilla)
    vlmzip.compress(model, "random", tokens=7)
    beams = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
    for i, image in enumerate(images):
        single = encode(processor, [image], [QUESTIONS[i]])
        alone = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1] :]
        assert torch.equal(beams[2 * i : 2 * i + 2], alone), i


# -- the signals VisionZip scores with --------------------------------------------------------------------


def test_visionzip_signals_match_an_eager_attention(gemma_dir, batch, monkeypatch):
    inputs, _ = batch
    model = load(gemma_dir, attn_implementation="eager")
    tower = model.model.vision_tower
    keys: list[torch.Tensor] = []
    tower.encoder.layers[-1].self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    with torch.no_grad():
        out = tower(pixel_values=inputs["pixel_values"], output_attentions=True)
    probs = out.attentions[-1].float()  # (U, H, P, P) of the last layer
    received = probs.mean(dim=(1, 2)).view(-1, 6, 4, 6, 4).sum(dim=(2, 4)).reshape(-1, PER_RUN)
    heads = model.config.vision_config.num_attention_heads
    k = keys[0].float().view(*keys[0].shape[:2], heads, -1).mean(dim=2)
    k = k.view(-1, 6, 4, 6, 4, k.shape[-1]).mean(dim=(2, 4)).reshape(-1, PER_RUN, k.shape[-1])
    pooled = model.model.multi_modal_projector.avg_pool(
        out.last_hidden_state.transpose(1, 2).reshape(-1, SPEC.vision_hidden, 24, 24)).flatten(2).transpose(1, 2)
    vlmzip.compress(model, "visionzip", tokens=10)
    state = vlmzip.api.state_of(model)
    handed: list = []
    select = state.select
    monkeypatch.setattr(state, "select", lambda tokens, keep, units=None: handed.append((tokens, units))
                        or select(tokens, keep, units))
    with torch.no_grad():
        model(**inputs)
    order = [sum(RUNS[:i]) + j for tokens, units in handed for i, j in units]
    assert sorted(order) == list(range(sum(RUNS)))
    got = {name: torch.cat([getattr(t, name) for t, _ in handed]) for name in ("received_attention", "keys", "hidden")}
    torch.testing.assert_close(got["received_attention"], received[order], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["keys"], k[order], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["hidden"], pooled[order], atol=1e-6, rtol=1e-5)


# -- pictures and the command line ------------------------------------------------------------------------


def test_view_and_panel_draw_the_image_and_its_crops(model, processor, batch):
    _, images = batch
    adapter = adapter_for(model)
    inputs = encode(processor, [images[0]], ["what is it ?"])
    view = adapter.view(inputs, processor.image_processor)
    assert len(view.pictures) == 4 and view.grid == (1, 3) and view.total == 4 * PER_RUN
    assert all(p.size == (SPEC.image_size, SPEC.image_size) for p in view.pictures)
    whole = np.asarray(images[0].resize((SPEC.image_size,) * 2, Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(np.asarray(view.pictures[0]).astype(int) - whole).max() <= 2, "the whole image as the tower sees it"
    first_crop = np.asarray(images[0].crop((0, 0, 267, 300)).resize((SPEC.image_size,) * 2,
                                                                      Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(np.asarray(view.pictures[1]).astype(int) - first_crop).max() <= 2, "the first crop"
    caption, picture, keys = method_panel(model, view, "random", {"tokens": 8})
    assert caption.startswith("Random, 8 of 144 visual tokens") and keys == {"kept", "dropped"}
    plain = np.asarray(plain_picture(view)).astype(int)
    drawn = np.asarray(picture).astype(int)
    assert drawn.shape == plain.shape and (drawn.sum(-1) < plain.sum(-1) - 100).mean() > 0.3, "dropped ones darkened"
    single = adapter.view(encode(processor, [images[1]], ["what is it ?"]), processor.image_processor)
    assert len(single.pictures) == 1 and single.grid is None and single.total == PER_RUN


def test_viz_and_run_commands(gemma_dir, tmp_path, capsys):
    out = tmp_path / "viz.png"
    assert main(["viz", "--model", str(gemma_dir), "--out", str(out), "--methods", "visionzip,random",
                 "--tokens", "8"]) == 0
    assert Image.open(out).width > 2 * 300
    image = tmp_path / "wide.png"
    random_image(5, (200, 120)).save(image)
    assert main(["run", "--model", str(gemma_dir), "--image", str(image), "--prompt", "what is it ?",
                 "--method", "visionzip", "--tokens", "8", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    assert "36 -> 8" in capsys.readouterr().out


def test_eval_command(gemma_dir, tmp_path):
    data = tmp_path / "val2"
    write_split("val", data, n_images=2)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(gemma_dir), "--data", str(data), "--out", str(out),
                 "--methods", "vanilla,visionzip,fastv[layer=1]", "--tokens", "8", "--limit", "4",
                 "--max-new-tokens", "2", "--batch-size", "2"]) == 0
    for key in ("vanilla", "visionzip@8", "fastv[layer=1]@8"):
        assert len((out / "predictions" / f"{key}.jsonl").read_text().splitlines()) == 4
    assert (out / "table.md").exists()


def test_batches_of_the_command_line_on_gemma3(model, processor):
    image = random_image(0, (130, 120))
    inputs = batch_inputs(processor, [image, image], ["how many ?", "what is it ?"], model)
    assert inputs["pixel_values"].shape[0] == 2


# -- bad input ---------------------------------------------------------------------------------------------


def test_a_budget_that_cannot_cover_every_run_is_a_clear_error(model, batch):
    inputs, _ = batch
    with vlmzip.compressed(model, "random", tokens=3), pytest.raises(
        ValueError, match=r"budget of 3 visual tokens for image 0 .*vanilla count 144.*3 pan-and-scan crop.*at least 4"
    ):
        logits(model, inputs)
    with vlmzip.compressed(model, "random", tokens=PER_RUN + 1), pytest.raises(
        ValueError, match=rf"larger than the {PER_RUN} visual tokens image 1 of this batch has"
    ):
        logits(model, inputs)


def test_prompts_not_built_by_the_processor_are_clear_errors(model, batch):
    inputs, _ = batch
    vlmzip.compress(model, "random", tokens=8)
    fewer = dict(inputs, pixel_values=inputs["pixel_values"][:-1])
    with pytest.raises(ValueError, match=r"8 runs of image placeholders .* pixel_values holds 7 pictures"):
        logits(model, fewer)
    ids = inputs["input_ids"].clone()
    at = int((ids[1] == model.config.image_token_id).nonzero()[0])
    ids[1, at] = model.config.boi_token_id
    with pytest.raises(ValueError, match=r"row 1 has a run of 35 image placeholders; Gemma 3 writes 36"):
        logits(model, dict(inputs, input_ids=ids))
    with pytest.raises(ValueError, match="expects \\(pictures, 3, H, W\\)"):
        model.model.get_image_features(inputs["pixel_values"][None])


def test_crops_without_a_processor_to_read_them_are_a_clear_error(processor, batch):
    inputs, _ = batch
    model, _ = build_gemma3(None, SPEC)  # built in memory: no folder, no processor beside it
    vlmzip.compress(model, "random", tokens=8)
    with pytest.raises(ValueError, match="row 0 holds 4 runs .* no processor could be loaded"):
        logits(model, inputs)
    single = encode(processor, [random_image(0, (130, 120))], ["how many ?"])
    assert logits(model, single).shape[1] == single["input_ids"].shape[1] - PER_RUN + 8


def test_a_pre_llm_method_composes_with_every_in_llm_method():
    """Sliding-window layers take in-LLM methods (tests/test_gemma3_in_llm.py checks them against a reference):
    VisionZip before the LLM, then each in-LLM method on what it sent, generates at batch size 3; the last layer's
    cache holds fewer tokens than VisionZip sent, the sliding layers' caches at most their window."""
    model, processor = build_gemma3(None, replace(SPEC, text_layers=6))  # deep enough for every method's layers
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    inputs = encode(processor, images, QUESTIONS, crops=False)
    prompt_len = inputs["input_ids"].shape[1]
    for method in sorted(n for n, s in registered().items() if s.stage == "llm"):
        with vlmzip.compressed(model, [("visionzip", {"tokens": 16}), (method, {"ratio": 0.5})]):
            out = greedy(model, inputs, return_dict_in_generate=True)
        assert torch.equal(out.sequences[:, :prompt_len], inputs["input_ids"])
        held = [layer.keys.shape[-2] for layer in out.cache.layers]
        sent = prompt_len - (PER_RUN - 16) + NEW - 1  # VisionZip's 16 tokens per image, and the answer
        assert held[-1] < sent, "the last (global) layer holds fewer than the tokens VisionZip sent"
        kinds = model.config.text_config.layer_types
        window = SPEC.sliding_window
        assert all(n <= window - 1 for n, kind in zip(held, kinds, strict=True) if kind != "full_attention")
    assert not vlmzip.is_compressed(model)


def test_gemma4_is_a_clear_error_naming_the_supported_classes():
    """Gemma 4 does not share Gemma 3's path (another vision encoder, per-layer input embeddings, KV shared across
    layers, audio): compressing one says so by naming what is supported."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    config = Gemma4Config(
        text_config={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 16, "vocab_size": 300,
                     "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 300,
                     "layer_types": ["sliding_attention", "full_attention"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 2, "head_dim": 16})
    model = Gemma4ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="does not support Gemma4ForConditionalGeneration.*Gemma3ForConditional"):
        vlmzip.compress(model, "visionzip", tokens=8)
    assert not vlmzip.is_compressed(model)


# -- the speed model -----------------------------------------------------------------------------------------


def test_arch_has_gemma_3_12b_shapes():
    arch = get_arch("gemma-3-12b")
    assert arch.family == "gemma3"
    model, processor = arch.build(spec=replace(arch.spec, text_layers=6), device="meta")
    config, text, vision = model.config, model.config.text_config, model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (896, 14, 1152, 27)
    assert (vision.num_attention_heads, vision.intermediate_size, vision.vision_use_head) == (16, 4304, False)
    assert config.mm_tokens_per_image == 256 and processor.image_seq_length == 256
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (3840, 16, 8, 256)
    assert (text.intermediate_size, text.vocab_size, text.sliding_window) == (15360, 262208, 1024)
    assert text.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert text.rope_parameters["full_attention"]["factor"] == 8.0
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    lm = model.model.language_model
    assert len(lm.layers) == 6 and lm.embed_tokens.weight.shape == (262208, 3840)
    attn = lm.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16 * 256, 3840) and attn.k_proj.weight.shape == (8 * 256, 3840)
    assert lm.layers[0].mlp.gate_proj.weight.shape == (15360, 3840)
    tower = model.model.vision_tower
    assert len(tower.encoder.layers) == 27 and tower.embeddings.position_embedding.weight.shape == (4096, 1152)
    assert tower.encoder.layers[0].mlp.fc1.weight.shape == (4304, 1152)
    projector = model.model.multi_modal_projector
    assert projector.mm_input_projection_weight.shape == (1152, 3840) and projector.kernel_size == 4
    adapter = adapter_for(model)
    assert adapter.unit_layout().grid == (16, 16) and adapter.tower.kernel == 4
