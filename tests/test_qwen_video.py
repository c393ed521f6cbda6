"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL videos (tiny random weights, saved and reloaded, the torchvision-free video
processor): keep-all exactness for every method, padded batches, cached generation, per-frame budgets, scope=video,
M-RoPE positions of the kept tokens, in-LLM methods, and the clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from transformers import AutoModelForImageTextToText

import vlmzip
import vlmzip.methods
from vlmzip.adapters.qwen_vl import QwenVideoProcessorPil, load_processor, patchify_video
from vlmzip.budgets import split_frames
from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl

NEW = 3
METHODS = sorted(name for name, spec in vlmzip.methods.registered().items() if spec.takes_budget)


def clip(seed: int, frames: int, size: tuple[int, int]) -> list[Image.Image]:
    """``frames`` frames (width, height = ``size``): a noisy background with a bright square moving right."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
    out = []
    for f in range(frames):
        frame = base.copy()
        x = (f * 9) % max(size[0] - 12, 1)
        frame[10:22, x : x + 12] = 255
        out.append(Image.fromarray(frame))
    return out


@pytest.fixture(scope="module", params=["2", "2.5", "3"], ids=["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def qwen(request, tmp_path_factory):
    """A Qwen-VL with 6 decoder layers (Qwen3-VL: DeepStack into the first 3), its processor as loaded here
    (torchvision-free: transformers' processor class with vlmzip's video processor), and three prompts."""
    out = tmp_path_factory.mktemp(f"tiny-qwen{request.param}-video")
    build_qwen_vl(out, QwenVLSpec(version=request.param, text_layers=6, deepstack_layers=(0, 1, 2)))
    return request.param, out, load_processor(out)


def text(processor, parts: list[str], question: str) -> str:
    content = [{"type": p} for p in parts] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# rows: (parts in order, images, videos): a video alone; an image then a video; two videos; an image alone
ROWS = [
    (["video"], [], [clip(0, 4, (80, 64))]),
    (["image", "video"], [random_image(5, (64, 64))], [clip(1, 3, (48, 48))]),
    (["video", "video"], [], [clip(2, 4, (64, 48)), clip(3, 2, (48, 64))]),
    (["image"], [random_image(8, (48, 64))], []),
]
QUESTIONS = ["what moved ?", "what color is the shape ?", "how many ?", "is there a red circle ?"]


def inputs_of(processor, rows: list[int], **kwargs):
    texts = [text(processor, ROWS[r][0], QUESTIONS[r]) for r in rows]
    images = [im for r in rows for im in ROWS[r][1]]
    videos = [v for r in rows for v in ROWS[r][2]]
    return processor(text=texts, images=images or None, videos=videos or None, return_tensors="pt", padding=True,
                     **kwargs)


def load(folder, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(folder, **kwargs).eval()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def video_counts(model, inputs) -> list[int]:
    return [int(t * h * w) // 4 for t, h, w in inputs["video_grid_thw"].tolist()]


# -- the processor -------------------------------------------------------------------------------------------------


def transformers_patchify(videos: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """transformers' Qwen2VLVideoProcessor.patchify (torch, as in transformers 5.24), for one (1, F, C, H, W) batch."""
    batch, frames, channel, height, width = videos.shape
    if pad := -frames % temporal:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        frames += pad
    grid_t, grid_h, grid_w = frames // temporal, height // patch, width // patch
    patches = videos.view(batch, grid_t, temporal, channel, grid_h // merge, merge, patch, grid_w // merge, merge,
                          patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(batch, grid_t * grid_h * grid_w, channel * temporal * patch * patch)[0]


@pytest.mark.parametrize("frames", [2, 3, 5])
def test_patchify_is_transformers_layout(frames):
    x = np.random.default_rng(frames).standard_normal((frames, 3, 32, 48)).astype(np.float32)
    ours, grid = patchify_video(x, patch=8, merge=2, temporal=2)
    assert grid == [(frames + 1) // 2, 4, 6]
    assert np.array_equal(ours, transformers_patchify(torch.from_numpy(x)[None], 8, 2, 2).numpy())


def test_processor_matches_the_image_path_and_transformers_processor_outputs(qwen):
    """A 2-frame clip of one picture gives exactly the image processor's patches and grid (Qwen's image path
    repeats an image over the temporal patch); a 3-frame clip is padded with its last frame; the outputs are the
    ones transformers' processor returns (Qwen2.5-VL: second_per_grid_ts = temporal_patch_size / fps, fps 24 when
    unknown as transformers assumes, else from video_metadata; Qwen3-VL: one run per temporal patch)."""
    version, _, processor = qwen
    assert isinstance(processor.video_processor, QwenVideoProcessorPil)
    picture = random_image(7, (64, 48))
    as_video = processor.video_processor([[picture, picture]], return_tensors="pt")
    as_image = processor.image_processor([picture], return_tensors="pt")
    assert torch.equal(as_video["video_grid_thw"], as_image["image_grid_thw"])
    assert torch.equal(as_video["pixel_values_videos"], as_image["pixel_values"])
    frames = clip(4, 3, (64, 48))
    padded = processor.video_processor([frames], return_tensors="pt")
    repeated = processor.video_processor([[*frames, frames[-1]]], return_tensors="pt")
    assert torch.equal(padded["pixel_values_videos"], repeated["pixel_values_videos"])
    assert padded["video_grid_thw"][0, 0] == 2
    inputs = inputs_of(processor, [0])
    keys = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"}
    assert keys <= set(inputs)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    video_id = processor.video_token_id
    runs = vlmzip.sequence.image_runs(inputs["input_ids"][0], video_id)
    assert [n for _, n in runs] == ([h * w // 4] * t if version == "3" else [t * h * w // 4])
    if version == "2.5":
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])
        timed = inputs_of(processor, [0], video_metadata=[{"total_num_frames": 40, "fps": 10.0,
                                                           "frames_indices": [0, 13, 26, 39]}])
        assert timed["second_per_grid_ts"].tolist() == pytest.approx([2 / 1.0])  # 4 of 40 frames at 10 fps: 1 fps
    else:
        assert "second_per_grid_ts" not in inputs
    with pytest.raises(ValueError, match="does not sample them"):
        processor.video_processor([frames], do_sample_frames=True)


# -- exactness, batching, generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_reproduces_vanilla_logits(qwen, method):
    """ratio=1.0 gives the vanilla logits for every method on a padded batch of a video row, an image + video row
    and a two-video row."""
    _, folder, processor = qwen
    model = load(folder)
    inputs = inputs_of(processor, [0, 1, 2])
    before = logits(model, inputs)
    with vlmzip.compressed(model, method, ratio=1.0):
        torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 8}), ("random", {"tokens_per_frame": 3}),
                                               ("fastv", {"layer": 2, "tokens": 8}), ("sparsevlm", {"tokens": 8})])
def test_padded_batch_equals_single_rows(qwen, method, knobs):
    """A video row, an image + video row, a two-video row and an image row: each row's answer and first logits are
    the ones it gets alone."""
    _, folder, processor = qwen
    model = load(folder)
    batch = inputs_of(processor, [0, 1, 2, 3])
    with vlmzip.compressed(model, method, **knobs):
        together = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True)
        for r in range(4):
            alone = model.generate(**inputs_of(processor, [r]), max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False, return_dict_in_generate=True, output_logits=True)
            assert torch.equal(alone.sequences[0, -NEW:], together.sequences[r, -NEW:]), (method, r)
            torch.testing.assert_close(alone.logits[0][0], together.logits[0][r], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 8}), ("random", {"tokens_per_frame": 3}),
                                               ("visionzip", {"tokens": 9, "scope": "video"})])
def test_cached_generate_equals_recomputation(qwen, method, knobs):
    """Pre-LLM selections (in-LLM methods rank by the prompt's last token, which a recomputation changes)."""
    version, folder, processor = qwen
    if version == "3" and knobs.get("scope") == "video":
        pytest.skip("scope=video is refused on Qwen3-VL videos (test_scope_video_chooses_across_a_videos_patches)")
    model = load(folder)
    inputs = inputs_of(processor, [1, 2])
    vlmzip.compress(model, method, **knobs)
    cached = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        for _ in range(NEW):
            token = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                          **rest).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            types = torch.cat([types, torch.zeros_like(token)], dim=1)
    assert torch.equal(cached, ids)


def test_each_temporal_patch_is_ranked_by_its_own_signals(qwen, monkeypatch):
    """What a method sees of temporal patch f of a video (its merged tokens, the attention they receive, their keys)
    is what it sees of that patch given alone as a one-patch video: the tower attends within a temporal patch
    (Qwen2.5-VL: its windows too), so a patch's signals are its own."""
    _, folder, processor = qwen
    model = load(folder)
    video = processor.video_processor([clip(6, 6, (64, 48))], return_tensors="pt")
    pixels, grid = video["pixel_values_videos"], video["video_grid_thw"]
    t, h, w = grid[0].tolist()
    vlmzip.compress(model, "visionzip", tokens=2 * t)
    state = vlmzip.api.state_of(model)
    handed: list = []
    select = state.select
    monkeypatch.setattr(state, "select", lambda tokens, keep, units=None: handed.append(tokens)
                        or select(tokens, keep, units))
    with torch.no_grad():
        model.model.get_video_features(pixels, grid)
        whole = handed.pop()
        assert whole.hidden.shape[0] == t and whole.layout.grid == (h // 2, w // 2)
        assert whole.received_attention is not None and whole.keys is not None
        for f in range(t):
            model.model.get_video_features(pixels[f * h * w : (f + 1) * h * w], torch.tensor([[1, h, w]]))
            alone = handed.pop()
            for name in ("hidden", "received_attention", "keys"):
                torch.testing.assert_close(getattr(whole, name)[f], getattr(alone, name)[0], atol=1e-5, rtol=1e-4)


# -- budgets -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("knobs", "share"), [({"tokens": 8}, lambda t, n: split_frames(8, t)),
                                              ({"tokens_per_frame": 3}, lambda t, n: [3] * t),
                                              ({"ratio": 0.5}, lambda t, n: split_frames(round(0.5 * t * n), t))])
def test_per_frame_budgets_hold(qwen, knobs, share):
    """Each temporal patch is one unit keeping its even share of its video's budget (the image: its own)."""
    version, folder, processor = qwen
    model = load(folder)
    inputs = inputs_of(processor, [1, 2])
    videos = inputs["video_grid_thw"].tolist()
    images = len(inputs["image_grid_thw"])
    with vlmzip.compressed(model, "visionzip", **knobs), vlmzip.recorded(model) as selections:
        out = logits(model, inputs)
    kept: dict[tuple[int, int], int] = {}
    for selection in selections:
        for row, unit in enumerate(selection.units):
            assert unit not in kept
            kept[unit] = int(selection.indices[row].numel())
    for v, (t, h, w) in enumerate(videos):
        assert [kept[(images + v, f)] for f in range(t)] == share(t, h * w // 4), (knobs, v)
    expected = sum(kept.values())
    assert expected < int((inputs["mm_token_type_ids"] > 0).sum())
    removed = int((inputs["mm_token_type_ids"] > 0).sum()) - expected
    assert out.shape[1] >= inputs["input_ids"].shape[1] - removed  # the rows' own shrink, padded to the longest


def test_scope_video_chooses_across_a_videos_patches(qwen):
    """scope=video: one unit per video (all its temporal patches joined), the budget spent where the method's
    scores are highest, whatever the patch; batch == singles. Qwen3-VL (a run per patch, timestamps between)
    refuses it clearly."""
    version, folder, processor = qwen
    model = load(folder)
    batch = inputs_of(processor, [0, 2])
    vlmzip.compress(model, "visionzip", tokens=9, scope="video")
    if version == "3":
        with pytest.raises(ValueError, match="scope=video cannot be used on Qwen3VLForConditionalGeneration videos"):
            logits(model, batch)
        return
    with vlmzip.recorded(model) as selections:
        logits(model, batch)
    units = [u for s in selections for u in s.units]
    assert sorted(units) == [(0, 0), (1, 0), (2, 0)]  # one joined unit per video
    for selection in selections:
        assert selection.indices.shape[1] == 9
    counts = video_counts(model, batch)
    per_video = {u[0]: s.indices[r] for s in selections for r, u in enumerate(s.units)}
    assert all(int(per_video[v].max()) < counts[v] for v in range(3))
    together = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    for i, r in enumerate([0, 2]):
        alone = model.generate(**inputs_of(processor, [r]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        assert torch.equal(alone[0, -NEW:], together[i, -NEW:])


# -- positions -------------------------------------------------------------------------------------------------------


def test_kept_tokens_keep_their_vanilla_positions(qwen):
    """Every kept video token is at the (t, h, w) M-RoPE position the vanilla model gives that token (Qwen2.5-VL:
    its time axis scaled by second_per_grid_ts, here from the clips' fps), text keeps its vanilla positions, and
    decoding continues at the vanilla sequence's next position."""
    version, folder, processor = qwen
    model = load(folder)
    meta = [{"total_num_frames": 8, "fps": 2.0, "frames_indices": list(range(0, 8, 8 // len(v)))[: len(v)]}
            for r in (0, 1) for v in ROWS[r][2]]
    inputs = inputs_of(processor, [0, 1], video_metadata=meta)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if version == "2.5" else {}
    vanilla, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            video_grid_thw=inputs["video_grid_thw"], attention_mask=mask, **extra)
    if version == "2.5":
        assert len(set(vanilla[0, 0][ids[0] == processor.video_token_id].tolist())) == 2
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["position_ids"], k["attention_mask"])), with_kwargs=True)
    vlmzip.compress(model, "visionzip", tokens=6)
    with vlmzip.recorded(model) as selections, torch.no_grad():
        model(**inputs)
    chosen = {u: s.indices[r] for s in selections for r, u in enumerate(s.units)}
    got, got_mask = seen[0]
    if got.shape[0] == 4:  # text positions first, then (t, h, w)
        got = got[1:]
    for b in range(ids.shape[0]):
        sources = expected_sources(version, ids[b], mask[b], inputs, chosen, processor, rows=[0, 1], row=b)
        assert torch.equal(got[:, b, got_mask[b].bool()], vanilla[:, b, sources]), b
    seen.clear()
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    hook.remove()
    decode = seen[-1][0]
    decode = decode[1:] if decode.shape[0] == 4 else decode
    assert torch.equal(decode[:, :, -1], (vanilla.amax(dim=(0, 2)) + 1).expand(3, -1))


def expected_sources(version, ids, mask, inputs, chosen, processor, rows, row) -> torch.Tensor:
    """The unshrunk column whose vanilla position each slot of the shrunk row should have: text columns as they
    are, each image / temporal patch's kept tokens (recorded selections, ``chosen[(item, patch)]``) at their own
    columns. Items: the call's images, then its videos, in processor order."""
    images = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
    videos = inputs["video_grid_thw"].tolist()
    before = [sum(ROWS[r][0].count(k) for r in rows[:row]) for k in ("image", "video")]
    image_number, video_number = before[0], len(images) + before[1]
    patch, current = 0, None  # Qwen3-VL: the temporal patch of the video whose runs are being read
    sources = []
    columns = mask.nonzero().squeeze(1).tolist()
    at = 0
    while at < len(columns):
        c = columns[at]
        token = int(ids[c])
        if token == processor.image_token_id:
            t, h, w = images[image_number]
            sources += [c + i for i in chosen[(image_number, 0)].tolist()]
            image_number += 1
            at += h * w // 4
        elif token == processor.video_token_id:
            if version == "3":  # one run per temporal patch
                if current is None or patch == videos[current - len(images)][0]:
                    current, patch = video_number, 0
                    video_number += 1
                t, h, w = videos[current - len(images)]
                sources += [c + i for i in chosen[(current, patch)].tolist()]
                patch += 1
                at += h * w // 4
            else:
                t, h, w = videos[video_number - len(images)]
                n = h * w // 4
                sources += [c + f * n + i for f in range(t) for i in chosen[(video_number, f)].tolist()]
                video_number += 1
                at += t * n
        else:
            sources.append(c)
            at += 1
    return torch.tensor(sources)


# -- in-LLM methods and errors -------------------------------------------------------------------------------------


def test_fastv_prunes_video_tokens_inside_the_llm(qwen):
    _, folder, processor = qwen
    model = load(folder)
    inputs = inputs_of(processor, [0])
    (n,) = video_counts(model, inputs)
    length = inputs["input_ids"].shape[1]
    vlmzip.compress(model, "fastv", layer=2, tokens=7)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.cache.layers[1].keys.shape[2] == length
    assert out.cache.layers[2].keys.shape[2] == length - n + 7
    vlmzip.decompress(model)
    with pytest.raises(ValueError, match="already ranks all of a video's tokens together"):
        vlmzip.compress(model, "fastv", layer=2, tokens_per_frame=2)


def test_clear_errors(qwen):
    version, folder, processor = qwen
    model = load(folder)
    inputs = inputs_of(processor, [0])
    (t, h, w), = inputs["video_grid_thw"].tolist()
    with vlmzip.compressed(model, "visionzip", tokens=1), \
            pytest.raises(ValueError, match=rf"1 tokens cannot be split over the {t} frames of video 0"):
        logits(model, inputs)
    with vlmzip.compressed(model, "visionzip", tokens_per_frame=h * w // 4 + 1), \
            pytest.raises(ValueError, match="tokens_per_frame=.* is larger than the .* visual tokens per frame"):
        logits(model, inputs)
    bad = {k: v for k, v in inputs.items() if k != "video_grid_thw"}
    with vlmzip.compressed(model, "visionzip", tokens=4), \
            pytest.raises(ValueError, match="video_grid_thw alongside pixel_values_videos"):
        logits(model, bad)
    with pytest.raises(ValueError, match="frames of different sizes"):
        processor.video_processor([[random_image(0, (32, 32)), random_image(1, (48, 32))]])
    with pytest.raises(ValueError, match="video 0 has no frames"):
        processor.video_processor([[]])


def test_beams_on_a_mixed_batch_with_an_in_llm_method(qwen):
    """generate repeats each row for beams after encoding: a row's images and videos go with it (here a video row
    and an image + video row, the images numbered before the videos), so keep-all beams are the vanilla beams."""
    _, folder, processor = qwen
    model = load(folder)
    inputs = inputs_of(processor, [0, 1])
    kwargs = dict(max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    vanilla = model.generate(**inputs, **kwargs)
    with vlmzip.compressed(model, "fastv", layer=2, ratio=1.0):
        same = model.generate(**inputs, **kwargs)
    assert torch.equal(vanilla.sequences, same.sequences)
    for a, b in zip(vanilla.scores, same.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("version", "layers"), [("3-moe", 3), ("3.5", 4)], ids=["qwen3-vl-moe", "qwen3.5"])
def test_qwen3_moe_and_qwen3_5_videos(tmp_path, version, layers):
    """Qwen3-VL-MoE and Qwen3.5 write videos as Qwen3-VL does (a run per temporal patch): keep-all is exact and a
    compressed padded batch of a video row and an image + video row equals its rows alone."""
    build_qwen_vl(tmp_path, QwenVLSpec(version=version, text_layers=layers))
    processor = load_processor(tmp_path)
    model = load(tmp_path)
    inputs = inputs_of(processor, [0, 1])
    before = logits(model, inputs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    with vlmzip.compressed(model, "visionzip", tokens=8):
        together = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        for r in range(2):
            alone = model.generate(**inputs_of(processor, [r]), max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False)
            assert torch.equal(alone[0, -NEW:], together[r, -NEW:])
