"""Video-LLaVA: images and videos through their two towers; per-frame and whole-video budgets; in-LLM methods on
videos; keep-all, batching, generate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from transformers import VideoLlavaForConditionalGeneration
from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.adapters.video_llava import FrameVideoLlavaProcessor, VideoLlavaAdapter, load_processor
from vlmzip.api import image_counts
from vlmzip.builders import get_arch
from vlmzip.builders.video_llava import VideoLlavaSpec, build_video_llava
from vlmzip.methods import get_method, registered
from vlmzip.methods.visionzip import visionzip

# 140 px / patch 14 -> 10 x 10 patches: an image sends 100 tokens, a frame 101 (its CLS too), a 4-frame video 404.
SPEC = VideoLlavaSpec(image_size=140, patch_size=14, frames=4, vision_layers=2, text_layers=4)
PATCHES, FRAME = 100, 101
FRAMES = 4
NEW = 4
BUDGET_METHODS = [name for name in registered() if get_method(name).takes_budget]
PRE_METHODS = [name for name in BUDGET_METHODS if get_method(name).stage != "llm"]


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-video-llava")
    build_video_llava(out, SPEC)
    return out


@pytest.fixture()
def vl_model(vl_dir: Path) -> VideoLlavaForConditionalGeneration:
    return VideoLlavaForConditionalGeneration.from_pretrained(vl_dir).eval()


@pytest.fixture(scope="module")
def vl_processor(vl_dir: Path):
    return load_processor(vl_dir)


def clip(seed: int, frames: int = FRAMES, size: tuple[int, int] = (160, 120)) -> list:
    """A random clip: ``frames`` PIL frames of ``size``."""
    return [random_image(100 * seed + f, size) for f in range(frames)]


def prompt(processor, parts: list[str], question: str = "what is in the image ?") -> str:
    content = [*({"type": kind} for kind in parts), {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# rows of the mixed batch: a video, an image, two videos
ROWS = [(["video"], "what is this ?"), (["image"], "how many ?"), (["video", "video"], "what color is the shape ?")]


def row_media(row: int) -> tuple[list, list]:
    """(images, videos) of row ``row`` of the mixed batch."""
    return {0: ([], [clip(1)]), 1: ([random_image(5)], []), 2: ([], [clip(2), clip(3)])}[row]


@pytest.fixture(scope="module")
def mixed(vl_processor):
    texts = [prompt(vl_processor, parts, q) for parts, q in ROWS]
    images = [im for r in range(3) for im in row_media(r)[0]]
    videos = [v for r in range(3) for v in row_media(r)[1]]
    inputs = vl_processor(text=texts, images=images, videos=videos, return_tensors="pt", padding=True)
    return inputs, texts


def single(processor, row: int):
    images, videos = row_media(row)
    return processor(text=[prompt(processor, *ROWS[row])], images=images or None, videos=videos or None,
                     return_tensors="pt")


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)


def counts(inputs, model) -> tuple[list[int], list[int]]:
    ids = inputs["input_ids"]
    return ((ids == model.config.image_token_id).sum(1).tolist(), (ids == model.config.video_token_id).sum(1).tolist())


# -- the processor and the adapter ---------------------------------------------------------------------------------


def test_processor_matches_what_the_model_expects(vl_dir, vl_model, vl_processor, mixed):
    assert type(vl_processor) is FrameVideoLlavaProcessor or type(vl_processor).__name__ == "VideoLlavaProcessor"
    assert json.loads((vl_dir / "processor_config.json").read_text())["processor_class"] == "VideoLlavaProcessor"
    inputs, _ = mixed
    assert tuple(inputs["pixel_values_videos"].shape) == (3, FRAMES, 3, 140, 140)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 140, 140)
    assert counts(inputs, vl_model) == ([0, PATCHES, 0], [FRAMES * FRAME, 0, 2 * FRAMES * FRAME])
    assert vl_model.config.video_seq_length == FRAMES * FRAME
    # every frame is what Video-LLaVA's image processor makes of it (resize, centre crop, normalise)
    frames = clip(2)
    reference = VideoLlavaImageProcessor(size={"shortest_edge": 140}, crop_size={"height": 140, "width": 140})
    expected = reference(frames, return_tensors="pt", return_legacy_image_output=False)["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values_videos"][1], expected)
    # the vanilla model runs on it (its own check that placeholders and features match)
    assert logits(vl_model, inputs).shape[:2] == inputs["input_ids"].shape


def test_videos_of_different_lengths_are_refused(vl_processor):
    texts = [prompt(vl_processor, ["video"]), prompt(vl_processor, ["video"])]
    with pytest.raises(ValueError, match="same number of frames"):
        vl_processor(text=texts, videos=[clip(1, 4), clip(2, 3)], return_tensors="pt", padding=True)


def test_items_follow_the_prompt_row_by_row(vl_model, vl_processor):
    adapter = adapter_for(vl_model)
    assert isinstance(adapter, VideoLlavaAdapter) and adapter.takes_videos
    texts = [prompt(vl_processor, ["video", "image"]), prompt(vl_processor, ["image", "video"])]
    inputs = vl_processor(text=texts, images=[random_image(1), random_image(2)], videos=[clip(1), clip(2)],
                          return_tensors="pt", padding=True)
    items = adapter.items(dict(inputs))
    video, image = vl_model.config.video_token_id, vl_model.config.image_token_id
    assert [(i.token_id, i.vanilla, i.frames) for i in items] == [
        (video, FRAMES * FRAME, FRAMES), (image, PATCHES, 1), (image, PATCHES, 1), (video, FRAMES * FRAME, FRAMES)]
    with vlmzip.compressed(vl_model, "visionzip", tokens=40), vlmzip.recorded(vl_model) as selections:
        out = logits(vl_model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] - (FRAMES * FRAME + PATCHES) + 2 * 40
    video_units = [u for s in selections for u in s.units if s.features.shape[1] == 10]
    assert video_units == [(0, f) for f in range(FRAMES)] + [(3, f) for f in range(FRAMES)]


# -- keep-all, batching, generate --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", BUDGET_METHODS)
def test_keep_all_reproduces_vanilla_logits(vl_model, mixed, method):
    inputs, _ = mixed
    before = logits(vl_model, inputs)
    with vlmzip.compressed(vl_model, method, ratio=1.0):
        during = logits(vl_model, inputs)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=0)
    if method in PRE_METHODS:
        with vlmzip.compressed(vl_model, method, ratio=1.0, scope="video"):
            during = logits(vl_model, inputs)
        torch.testing.assert_close(during, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "knobs"), [
    ("visionzip", {"tokens": 68}), ("visionzip", {"tokens": 68, "scope": "video"}), ("random", {"ratio": 0.2}),
    ("fastv", {"tokens": 60}), ("sparsevlm", {"tokens": 60}),
])
def test_padded_mixed_batch_equals_single_runs(vl_model, vl_processor, mixed, method, knobs):
    inputs, _ = mixed
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    vlmzip.compress(vl_model, method, **knobs)
    batched = greedy(vl_model, inputs, return_dict_in_generate=True, output_logits=True)
    new = batched.sequences[:, inputs["input_ids"].shape[1]:]
    for row in range(3):
        alone = single(vl_processor, row)
        out = greedy(vl_model, alone, return_dict_in_generate=True, output_logits=True)
        torch.testing.assert_close(out.logits[0][0], batched.logits[0][row], atol=1e-4, rtol=1e-4)
        assert torch.equal(out.sequences[0, alone["input_ids"].shape[1]:], new[row])


@pytest.mark.parametrize(("method", "knobs"), [
    ("visionzip", {"tokens": 68}), ("visionzip", {"tokens": 68, "scope": "video"}), ("random", {"tokens": 30}),
])
def test_cached_generate_equals_recomputation(vl_model, mixed, method, knobs):
    """Pre-LLM methods: generate with the cache == recomputing the whole prompt at every step. (In-LLM methods rank
    by the newest tokens' attention, so recomputation is not their reference: see the cache test below.)"""
    inputs, _ = mixed
    vlmzip.compress(vl_model, method, **knobs)
    cached = greedy(vl_model, inputs)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(NEW):
            out = vl_model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                           pixel_values_videos=inputs["pixel_values_videos"], use_cache=False)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(cached, ids)


# -- budgets of a video ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_frames(vl_processor):
    """One video of 8 frames (the papers' setting: 8 x 101 = 808 tokens here, 2,056 on Video-LLaVA-7B)."""
    return vl_processor(text=[prompt(vl_processor, ["video"])], videos=[clip(4, 8)], return_tensors="pt")


@pytest.mark.parametrize("method", PRE_METHODS)
def test_per_frame_budget_holds(vl_model, eight_frames, method):
    with vlmzip.compressed(vl_model, method, tokens=136), vlmzip.recorded(vl_model) as selections:
        out = logits(vl_model, eight_frames)
    assert out.shape[1] == eight_frames["input_ids"].shape[1] - 8 * FRAME + 136
    assert len(selections) == 1, "the 8 frames are one batched call"
    assert tuple(selections[0].features.shape[:2]) == (8, 17)
    assert selections[0].units == tuple((0, f) for f in range(8))
    assert bool((selections[0].indices < FRAME).all())


def test_tokens_per_frame_and_uneven_splits(vl_model, eight_frames):
    with vlmzip.compressed(vl_model, "visionzip", tokens_per_frame=9), vlmzip.recorded(vl_model) as selections:
        logits(vl_model, eight_frames)
    assert [tuple(s.features.shape[:2]) for s in selections] == [(8, 9)]
    with vlmzip.compressed(vl_model, "random", tokens=138), vlmzip.recorded(vl_model) as selections:
        logits(vl_model, eight_frames)  # 138 over 8: two frames of 18, six of 17
    assert [(tuple(s.features.shape[:2]), s.units) for s in selections] == [
        ((2, 18), ((0, 0), (0, 1))), ((6, 17), tuple((0, f) for f in range(2, 8)))]


def test_more_frames_for_the_same_tokens(vl_model, vl_processor):
    # VisionZip's other use: at the LLM's same 136 tokens, encode twice the frames (16: 8 frames of 9, 8 of 8)
    inputs = vl_processor(text=[prompt(vl_processor, ["video"])], videos=[clip(6, 16)], return_tensors="pt")
    with vlmzip.compressed(vl_model, "visionzip", tokens=136), vlmzip.recorded(vl_model) as selections:
        out = logits(vl_model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] - 16 * FRAME + 136
    assert [tuple(s.features.shape[:2]) for s in selections] == [(8, 9), (8, 8)]


def test_scope_video_chooses_across_the_frames(vl_model, eight_frames):
    with vlmzip.compressed(vl_model, "visionzip", tokens=136, scope="video"), \
            vlmzip.recorded(vl_model) as selections:
        out = logits(vl_model, eight_frames)
    assert out.shape[1] == eight_frames["input_ids"].shape[1] - 8 * FRAME + 136
    assert len(selections) == 1 and tuple(selections[0].features.shape[:2]) == (1, 136)
    # the same as VisionZip on the 8 frames' 800 patches joined into one unit, ranked by each frame's CLS attention
    adapter = adapter_for(vl_model)
    with torch.no_grad():
        frames = eight_frames["pixel_values_videos"].flatten(0, 1)
        tokens = adapter.video_tower.run(frames, adapter.frame_layout, frozenset({"keys", "cls_attention"}))
        joined = replace(tokens, layout=replace(adapter.frame_layout, send_prefix=False)).joined(8)
        expected = visionzip(joined, 136)
    assert torch.equal(selections[0].indices, expected.indices)
    per_frame = torch.bincount(selections[0].indices[0] // PATCHES, minlength=8)
    assert int(per_frame.sum()) == 136 and len(per_frame) == 8


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_in_llm_methods_hold_a_papers_like_budget_on_a_video(vl_model, eight_frames, method):
    # the papers' 135 of 2,048 for FastV / SparseVLM on Video-LLaVA; here 135 of 808: the logits past the pruning
    # layer are those of the kept tokens
    # (SparseVLM's 135 is its nominal budget: its schedule, scaled to the video's 808 tokens, sets each step's count)
    with vlmzip.compressed(vl_model, method, tokens=135):
        out = logits(vl_model, eight_frames)
        _, final, _ = image_counts(None, vl_model._vlmzip.steps, 8 * FRAME, SPEC.text_layers)
    assert final == 135 if method == "fastv" else 0 < final < 135
    assert out.shape[1] == eight_frames["input_ids"].shape[1] - (8 * FRAME - final)


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_in_llm_generate_caches_only_the_kept_video_tokens(vl_model, eight_frames, method):
    with vlmzip.compressed(vl_model, method, tokens=135):
        out = vl_model.generate(**eight_frames, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        _, final, _ = image_counts(None, vl_model._vlmzip.steps, 8 * FRAME, SPEC.text_layers)
    full = eight_frames["input_ids"].shape[1] + 1
    lengths = [layer.keys.shape[2] for layer in out.cache.layers]
    assert lengths[0] == full and lengths[-1] == full - (8 * FRAME - final)


def test_bad_video_budgets_are_refused(vl_model, eight_frames):
    with vlmzip.compressed(vl_model, "visionzip", tokens=5), pytest.raises(ValueError, match="8 frames"):
        logits(vl_model, eight_frames)
    with vlmzip.compressed(vl_model, "random", tokens=805, scope="video"), \
            pytest.raises(ValueError, match="800 patch tokens"):
        logits(vl_model, eight_frames)
    with vlmzip.compressed(vl_model, "visionzip", tokens=5, scope="video"):
        assert logits(vl_model, eight_frames).shape[1] == eight_frames["input_ids"].shape[1] - 8 * FRAME + 5
    with pytest.raises(ValueError, match="tokens_per_frame and scope apply to methods before the LLM"):
        vlmzip.compress(vl_model, "fastv", tokens_per_frame=17)


def test_video_llava_7b_shapes():
    arch = get_arch("video-llava-7b")
    model, processor = arch.build(spec=replace(arch.spec, text_layers=1), device="meta")
    adapter = adapter_for(model)
    assert adapter.layout.vanilla == 256 and adapter.frame_layout.vanilla == 257
    assert model.config.video_seq_length == 8 * 257
    assert model.config.text_config.hidden_size == 4096 and model.config.vision_config.hidden_size == 1024
    assert isinstance(processor, FrameVideoLlavaProcessor)
    frames = [np.zeros((240, 320, 3), dtype=np.uint8)] * 8
    inputs = processor(text=[prompt(processor, ["video"])], videos=[frames], return_tensors="pt")
    assert tuple(inputs["pixel_values_videos"].shape) == (1, 8, 3, 224, 224)
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 2056


# -- bench with a video input ------------------------------------------------------------------------------------


def test_bench_times_a_video_by_default(vl_dir, tmp_path, capsys):
    from vlmzip.cli import main

    # a video model is timed on its own clip length (8 frames: 808 tokens here, 2,056 on Video-LLaVA-7B) -> 136
    argv = ["bench", "--model", str(vl_dir), "--methods", "visionzip,fastv", "--tokens", "136", "--batch-sizes", "1",
            "--repeats", "1", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "video of 8 frames" in out and "808 -> 136" in out
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert data["frames"] == 8
    vz, fv = data["rows"]
    assert (vz["vanilla_tokens"], vz["tokens"]) == (fv["vanilla_tokens"], fv["tokens"]) == (8 * FRAME, 136)
    assert vz["ideal_kind"] == "flops" and vz["ideal_speedup"] > 1 and fv["ideal_speedup"] > 1
    assert vz["overhead_of"] == "vision_tower" and vz["overhead_share"] > 0, "timed against the video tower"


def test_legacy_image_key_is_compressed_alike(vl_model, vl_processor):
    inputs = vl_processor(text=[prompt(vl_processor, ["image"])], images=[random_image(9)], return_tensors="pt")
    legacy = {**inputs, "pixel_values_images": inputs["pixel_values"]}
    del legacy["pixel_values"]
    with vlmzip.compressed(vl_model, "visionzip", tokens=20):
        torch.testing.assert_close(logits(vl_model, legacy), logits(vl_model, inputs))
        assert logits(vl_model, legacy).shape[1] == inputs["input_ids"].shape[1] - PATCHES + 20


def test_bench_frames_follow_the_adapter(vl_model, llava_dir):
    from transformers import LlavaForConditionalGeneration

    from vlmzip.bench.video import bench_frames, synthetic_clip

    adapter = adapter_for(vl_model)
    assert bench_frames(adapter, None) == 8 and bench_frames(adapter, 32) == 32
    llava = adapter_for(LlavaForConditionalGeneration.from_pretrained(llava_dir))
    assert bench_frames(llava, None) is None
    with pytest.raises(ValueError, match="does not compress videos of this model"):
        bench_frames(llava, 8)
    frames = synthetic_clip(random_image(1), 4)
    assert len(frames) == 4 and len({f.tobytes() for f in frames}) == 4
