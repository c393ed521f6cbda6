"""Videos end to end on the families that take them (``Adapter.takes_videos``): a video file read and sampled,
sent through the family's own processor with its timing, compressed per video or per frame; ``vlmzip eval`` and
``vlmzip run`` answer as the library does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_image
from video_cases import write_mp4

from vlmzip import compressed
from vlmzip.builders.llava_next_video import build_llava_next_video
from vlmzip.builders.llava_onevision import build_llava_onevision
from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl
from vlmzip.builders.video_llava import VideoLlavaSpec, build_video_llava
from vlmzip.cli import main
from vlmzip.eval.format import load_folder
from vlmzip.io import batch_visual_inputs, generate_answers, llm_lengths, load_model, takes_videos
from vlmzip.video import read_video

FRAMES = 4
BUILDERS = {
    "video-llava": lambda d: build_video_llava(d, VideoLlavaSpec(image_size=56, patch_size=14, frames=FRAMES,
                                                                 vision_layers=2, text_layers=2)),
    "llava-next-video": lambda d: build_llava_next_video(d),
    "qwen2.5-vl": lambda d: build_qwen_vl(d, QwenVLSpec(version="2.5", text_layers=2)),
    "llava-onevision": lambda d: build_llava_onevision(d),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](folder)
    return request.param, folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video-data")
    (root / "videos").mkdir()
    write_mp4(root / "videos" / "a.mp4", 9, 0)
    write_mp4(root / "videos" / "b.mp4", 12, 1)
    random_image(9).save(root / "x.png")
    records = [
        {"id": "a", "video": "videos/a.mp4", "question": "what moved?", "answers": ["left"], "type": "direction"},
        {"id": "b", "video": "videos/b.mp4", "question": "what color?", "answers": ["red"], "type": "color"},
        {"id": "x", "image": "x.png", "question": "what color?", "answers": ["red"], "type": "color"},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_video_goes_through_the_familys_processor_with_its_timing(family, data) -> None:
    name, folder = family
    model, processor = load_model(str(folder))
    assert takes_videos(model)
    video = read_video(data / "videos" / "b.mp4", FRAMES)  # 12 frames at 10 fps: frames 1, 4, 7, 10
    inputs = batch_visual_inputs(processor, [video, random_image(3)], ["what?", "what?"], model)
    assert "pixel_values_videos" in inputs
    if name == "qwen2.5-vl":  # 4 of 12 frames of a 1.2 s clip: 2 frames per temporal patch = 0.6 s
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([0.6])
    # the LLM's lengths on a compressed model, rows holding images and videos (items numbered per token)
    rows = [[random_image(4), video], [video], [random_image(5)]]
    inputs = batch_visual_inputs(processor, rows, ["what?"] * 3, model)
    ids, real = inputs["input_ids"], inputs["attention_mask"].sum(dim=1)
    image_id, video_id = model.config.image_token_id, model.config.video_token_id
    with compressed(model, "random", tokens=8):
        expected = [int(real[b]) - int((ids[b] == video_id).sum()) - int((ids[b] == image_id).sum())
                    + 8 * len(rows[b]) + (1 if name == "llava-onevision" and b < 2 else 0) for b in range(3)]
        assert llm_lengths(model, inputs) == expected


def test_eval_and_run_answer_videos_as_the_library_does(family, data, tmp_path, capsys) -> None:
    name, folder = family
    out = tmp_path / "ev"
    code = main(["eval", "--model", str(folder), "--data", str(data), "--out", str(out), "--methods", "visionzip",
                 "--tokens", "16", "--tokens-per-frame", "8", "--frames", str(FRAMES), "--batch-size", "2",
                 "--max-new-tokens", "3", "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["vanilla", "visionzip@16", "visionzip@8pf"]
    model, processor = load_model(str(folder))
    records = load_folder(data)
    for key, knobs in [("visionzip@16", {"tokens": 16}), ("visionzip@8pf", {"tokens_per_frame": 8})]:
        rows = {json.loads(line)["id"]: json.loads(line) for line in (out / "predictions" / f"{key}.jsonl").open()}
        for r in records:
            visual = read_video(r.image_path, FRAMES) if r.is_video else random_image(9)
            if not r.is_video and "tokens_per_frame" in knobs:
                knobs = {"tokens": 8}  # an image is one frame
            with compressed(model, "visionzip", **knobs):
                expected = generate_answers(model, processor, [visual], [r.question], 3)[0]
            assert rows[r.id]["prediction"] == expected, (name, key, r.id)
    code = main(["run", "--model", str(folder), "--video", str(data / "videos" / "a.mp4"), "--frames", str(FRAMES),
                 "--prompt", "what moved?", "--method", "visionzip", "--tokens", "8", "--repeats", "1",
                 "--max-new-tokens", "2", "--device", "cpu"])
    assert code == 0
    assert "-> 8" in capsys.readouterr().out
