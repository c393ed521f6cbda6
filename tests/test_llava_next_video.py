"""LLaVA-NeXT-Video (tiny random weights, saved and reloaded): the torchvision-free processor, exact keep-all for every
method, padded batches of videos and images equal single runs, cached generation, per-frame budgets, selection among
the pooled tokens with pooled signals, scope=video, in-LLM methods on videos, clear errors, the 7B shapes."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from video_cases import (
    LLMPlaceholders,
    check_batch_equals_singles,
    check_cached_equals_recomputed,
    check_in_llm_on_videos,
    check_keep_all,
    frame_shares,
    frames,
    greedy,
    mixed_batch,
    prompt,
)

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.adapters.llava_next_video import LlavaNextVideoAdapter, load_processor
from vlmzip.builders import get_arch
from vlmzip.builders.llava_next_video import LlavaNextVideoSpec, build_llava_next_video
from vlmzip.methods import get_method, registered

# 112 px / patch 14 -> 8 x 8 CLIP patches + CLS per frame, average-pooled 2 x 2 to 4 x 4 = 16 tokens per frame.
SPEC = LlavaNextVideoSpec()
PER_FRAME = 16
FRAMES = 4
METHODS = sorted(registered())
PRE_LLM = [m for m in METHODS if get_method(m).stage != "llm"]
IN_LLM = [m for m in METHODS if get_method(m).stage == "llm"]


@pytest.fixture(scope="module")
def nv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llava-next-video")
    build_llava_next_video(out, SPEC)
    return out


@pytest.fixture()
def model(nv_dir) -> LlavaNextVideoForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(nv_dir).eval()


@pytest.fixture(scope="module")
def processor(nv_dir):
    return load_processor(nv_dir)


@pytest.fixture(scope="module")
def batch(processor):
    """Row 0: a video; row 1: an image; row 2: two videos; and each row alone."""
    return mixed_batch(processor, FRAMES)


def video_features(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    return [f.reshape(-1, f.shape[-1]) for f in out]


# -- the checkpoint and its processor -------------------------------------------------------------------------


def test_checkpoint_and_processor_give_what_the_model_expects(nv_dir, model, processor, batch):
    inputs, singles = batch
    assert isinstance(adapter_for(model), LlavaNextVideoAdapter) and adapter_for(model).takes_videos
    assert isinstance(processor, LlavaNextVideoProcessor)
    saved = json.loads((nv_dir / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaNextVideoProcessor"  # transformers builds its own where it can
    assert saved["video_processor"]["video_processor_type"] == "LlavaNextVideoVideoProcessor"
    assert inputs["pixel_values_videos"].shape == (3, FRAMES, 3, 112, 112)
    video_id, image_id = model.config.video_token_id, model.config.image_token_id
    assert (inputs["input_ids"] == video_id).sum(dim=1).tolist() == [FRAMES * PER_FRAME, 0, 2 * FRAMES * PER_FRAME]
    items = adapter_for(model).items(dict(inputs))
    image_count = int((inputs["input_ids"] == image_id).sum())
    assert [(i.token_id, i.vanilla, i.frames) for i in items] == [(image_id, image_count, 1)] + [
        (video_id, FRAMES * PER_FRAME, FRAMES)] * 3
    # each frame as the PIL CLIP processor makes it: shortest edge 112, centre crop, CLIP mean / std
    reference = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    expected = reference(frames(1, FRAMES), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values_videos"][0], expected)
    assert [f.shape[0] for f in video_features(model, inputs)] == [FRAMES * PER_FRAME] * 3
    assert greedy(model, inputs).shape == (3, inputs["input_ids"].shape[1] + 4)  # HF's own counts check passes


def test_processor_refuses_what_it_cannot_stack_or_sample(processor):
    text = prompt(processor, "what ?", videos=2)
    with pytest.raises(ValueError, match=r"different frame counts \[4, 3\]"):
        processor(text=[text], videos=[frames(0, 4), frames(1, 3)], return_tensors="pt")
    with pytest.raises(ValueError, match="sample the frames before calling it"):
        processor(text=[prompt(processor, "what ?", videos=1)], videos=[frames(0, 4)], do_sample_frames=True,
                  num_frames=2, return_tensors="pt")
    clip = np.stack([np.asarray(f) for f in frames(0, 2)])  # one video as a (frames, H, W, 3) array
    one = processor(text=[prompt(processor, "what ?", videos=1)], videos=clip, return_tensors="pt")
    assert one["pixel_values_videos"].shape == (1, 2, 3, 112, 112)


# -- every method ---------------------------------------------------------------------------------------------


def test_keep_all_reproduces_vanilla_logits_for_every_method(model, batch):
    inputs, singles = batch
    vanilla = video_features(model, inputs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        assert all(torch.equal(a, b) for a, b in zip(video_features(model, inputs), vanilla, strict=True))
    check_keep_all(model, [inputs], METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_padded_batch_equals_single_runs(model, batch, method):
    inputs, singles = batch
    check_batch_equals_singles(model, inputs, singles, method, tokens=24)


@pytest.mark.parametrize("method", PRE_LLM)
def test_pre_llm_cached_generate_equals_recomputation(model, batch, method):
    check_cached_equals_recomputed(model, batch[0], method, tokens=24)


@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_methods_prune_videos(model, batch, method):
    inputs, singles = batch
    check_in_llm_on_videos(model, inputs, method, tokens=20)


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_beams_over_a_row_with_a_video_and_an_image(model, processor, method):
    """Beam search repeats each row: the in-LLM plan follows each row's own image and video (row 0: a video and an
    image; row 1: an image of another size), as each row alone."""
    wide, tall = frames(7, 1, (200, 60))[0], frames(8, 1, (60, 190))[0]
    texts = [prompt(processor, "what moved ?", images=1, videos=1), prompt(processor, "how many ?", images=1)]
    inputs = processor(text=texts, images=[wide, tall], videos=[frames(1, FRAMES)], return_tensors="pt",
                       padding=True)
    singles = [processor(text=[texts[0]], images=[wide], videos=[frames(1, FRAMES)], return_tensors="pt"),
               processor(text=[texts[1]], images=[tall], return_tensors="pt")]
    vlmzip.compress(model, method, tokens=20)
    beams = {"num_beams": 2, "num_return_sequences": 2}
    batched = greedy(model, inputs, **beams)[:, inputs["input_ids"].shape[1]:]
    for i, single in enumerate(singles):
        alone = greedy(model, single, **beams)[:, single["input_ids"].shape[1]:]
        assert torch.equal(alone, batched[2 * i : 2 * i + 2]), i


# -- budgets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "knobs", "shares"), [
    ("visionzip", {"tokens": 26}, [7, 7, 6, 6]),
    ("random", {"tokens_per_frame": 5}, [5] * FRAMES),
    ("tome", {"ratio": 0.5}, [8] * FRAMES),
    ("divprune", {"tokens": 12}, [3] * FRAMES),
])
def test_per_frame_budgets_hold(model, batch, method, knobs, shares):
    inputs, _ = batch
    vlmzip.compress(model, method, **knobs)
    state = vlmzip.api.state_of(model)
    items = adapter_for(model).items(dict(inputs))
    image_keep = state.pre_keep(items[0].vanilla)
    seen = LLMPlaceholders(model)
    with vlmzip.recorded(model) as selections:
        greedy(model, inputs)
    seen.handle.remove()
    keep = sum(shares)
    assert seen.calls[0] == [(0, keep), (image_keep, 0), (0, 2 * keep)], "each video sends its budget"
    assert all(row == [(0, 0)] * 3 for row in seen.calls[1:]), "decode steps carry no image or video"
    for video in (1, 2, 3):  # the call's items: the image, then the three videos
        assert frame_shares(selections, video) == shares


def test_tokens_fewer_than_frames_is_a_clear_error_unless_scope_video(model, batch):
    _, singles = batch
    two_videos = singles[2]
    with vlmzip.compressed(model, "visionzip", tokens=3), \
            pytest.raises(ValueError, match="3 tokens cannot be split over the 4 frames of video 0 of this batch"):
        greedy(model, two_videos)
    with vlmzip.compressed(model, "visionzip", tokens=3, scope="video"):
        seen = LLMPlaceholders(model)
        greedy(model, two_videos)
        seen.handle.remove()
    assert seen.calls[0] == [(0, 6)]


@pytest.mark.parametrize("method", ["visionzip", "random", "divprune"])
def test_scope_video_chooses_across_the_frames(model, batch, method):
    inputs, _ = batch
    vlmzip.compress(model, method, tokens=10, scope="video")
    with vlmzip.recorded(model) as selections:
        out = greedy(model, inputs)
    assert out.shape[0] == 3
    units = {unit: s.features.shape[1] for s in selections for unit in s.units}
    assert {u: n for u, n in units.items() if u[0] >= 1} == {(1, 0): 10, (2, 0): 10, (3, 0): 10}
    for s in selections:
        if s.units[0][0] >= 1:
            assert int(s.indices.max()) < FRAMES * PER_FRAME  # indices over the joined frames' pooled tokens


# -- where the selection acts --------------------------------------------------------------------------------


@pytest.mark.parametrize(("knobs", "per_frame"), [({"tokens_per_frame": 5}, True), ({"tokens": 12, "scope": "video"},
                                                                                     False)])
def test_kept_tokens_are_the_pooled_tokens_the_vanilla_model_sends(model, batch, knobs, per_frame):
    inputs, _ = batch
    vanilla = video_features(model, inputs)
    with vlmzip.compressed(model, "random", **knobs):
        sent = video_features(model, inputs)
    for v, (mine, theirs) in enumerate(zip(sent, vanilla, strict=True)):
        assert mine.shape[0] == (FRAMES * 5 if per_frame else 12)
        for k, token in enumerate(mine):
            pool = theirs[(k // 5) * PER_FRAME : (k // 5 + 1) * PER_FRAME] if per_frame else theirs
            assert float((pool - token).abs().max(dim=1).values.min()) < 1e-5, (v, k)


def test_visionzip_ranks_pooled_blocks_by_the_frames_cls_attention(model, batch):
    """VisionZip's dominant tokens of a frame: its CLS, then the pooled tokens whose 2 x 2 block the frame's CLS
    attends to most (the block mean of the feature layer's CLS attention)."""
    inputs, _ = batch
    adapter = adapter_for(model)
    pixels = inputs["pixel_values_videos"].flatten(0, 1)
    with torch.no_grad():
        tokens = adapter.tower.run(pixels, adapter.layout, frozenset({"cls_attention"}))
    grid = tokens.cls_attention[:, 1:].reshape(-1, 1, 8, 8)
    pooled = F.avg_pool2d(grid, 2).flatten(1)
    vlmzip.compress(model, "visionzip", tokens_per_frame=8)  # 7 dominant (CLS + 6) + 1 contextual per frame
    with vlmzip.recorded(model) as selections:
        with torch.no_grad():
            model.model.get_video_features(inputs["pixel_values_videos"])
    (selection,) = selections
    assert selection.dominant == 7 and selection.units == tuple((v, f) for v in range(3) for f in range(FRAMES))
    top = pooled.topk(6, dim=1).indices + 1
    expected = torch.cat([torch.zeros(len(top), 1, dtype=torch.long), top], dim=1).sort(dim=1).values
    assert torch.equal(selection.indices[:, :7], expected)


def test_deepcopy_and_pickle_keep_the_video_compression(model, batch):
    _, singles = batch
    vlmzip.compress(model, "visionzip", tokens_per_frame=5)
    # before any forward: transformers' own lazily installed output-capturing hook is a closure
    twins = (copy.deepcopy(model), pickle.loads(pickle.dumps(model)))
    with torch.no_grad():
        expected = model(**singles[2]).logits
    for twin in twins:
        assert vlmzip.is_compressed(twin)
        with torch.no_grad():
            torch.testing.assert_close(twin(**singles[2]).logits, expected, atol=1e-6, rtol=0)


# -- the released shapes --------------------------------------------------------------------------------------


def test_real_architecture_shapes():
    arch = get_arch("llava-next-video-7b")
    assert arch.family == "llava-next-video"
    model, processor = arch.build(spec=arch.spec, device="meta")
    config = model.config
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.vision_config.num_hidden_layers,
            config.vision_config.hidden_size) == (336, 14, 24, 1024)
    assert (config.text_config.num_hidden_layers, config.text_config.hidden_size) == (32, 4096)
    assert (config.spatial_pool_mode, config.spatial_pool_stride) == ("average", 2)
    adapter = adapter_for(model)
    assert adapter.frame_tokens() == 144 and adapter.layout.vanilla == 576
