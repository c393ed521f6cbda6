"""``vlmzip eval`` on questions about videos: the record format, per-frame budgets in the harness (answers equal the
library's own), prompts over the context, and the lab's procedural video split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from video_cases import write_mp4

from vlmzip import compressed
from vlmzip.cli import main
from vlmzip.eval.format import DatasetFormatError, content_hash, load_folder
from vlmzip.io import generate_answers
from vlmzip.lab import clips
from vlmzip.video import frame_knobs, read_video, sample_indices

FRAMES = 3


@pytest.fixture()
def video_data(tmp_path: Path) -> Path:
    """A dataset of two mp4 videos, a frame folder and an image."""
    root = tmp_path / "data"
    (root / "videos" / "c").mkdir(parents=True)
    write_mp4(root / "videos" / "a.mp4", 7, 0)
    write_mp4(root / "videos" / "b.mp4", 9, 1)
    for i in range(5):
        random_image(40 + i).save(root / "videos" / "c" / f"{i}.png")
    (root / "images").mkdir()
    random_image(9).save(root / "images" / "x.png")
    records = [
        {"id": "a", "video": "videos/a.mp4", "question": "what moved?", "answers": ["left"], "type": "direction"},
        {"id": "b", "video": "videos/b.mp4", "question": "what color?", "answers": ["red"], "type": "color"},
        {"id": "c", "video": "videos/c", "question": "how many?", "answers": ["2"], "type": "count"},
        {"id": "x", "image": "images/x.png", "question": "what color?", "answers": ["red"], "type": "color"},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_video_records_load_and_bad_ones_are_refused(video_data: Path) -> None:
    records = load_folder(video_data)
    assert [r.kind for r in records] == ["video", "video", "video", "image"]
    assert records[2].image_path.is_dir() and "video" not in records[0].extra
    digest = content_hash(video_data)
    (video_data / "videos" / "c" / "0.png").unlink()
    random_image(99).save(video_data / "videos" / "c" / "0.png")
    assert content_hash(video_data) != digest  # a frame of a folder counts
    lines = (video_data / "data.jsonl").read_text().splitlines()
    for bad, message in [
        ({"image": "images/x.png"}, 'has "image" or "video", not both'),
        ({"video": "videos/none.mp4"}, "video 'videos/none.mp4' not found"),
        ({"video": "/abs/clip.mp4"}, "video '/abs/clip.mp4' is an absolute path"),
    ]:
        record = {**json.loads(lines[0]), **bad}
        (video_data / "data.jsonl").write_text(json.dumps(record) + "\n")
        with pytest.raises(DatasetFormatError, match=message):
            load_folder(video_data)


def test_eval_answers_videos_with_the_per_frame_budget_the_library_gives(llava_dir, video_data, tmp_path, model,
                                                                          processor) -> None:
    out = tmp_path / "ev"
    code = main(["eval", "--model", str(llava_dir), "--data", str(video_data), "--out", str(out), "--methods",
                 "visionzip", "--tokens", "24", "--tokens-per-frame", "8", "--frames", str(FRAMES),
                 "--batch-size", "1", "--max-new-tokens", "4", "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["identity"]["frames"] == FRAMES
    assert [r["key"] for r in results["runs"]] == ["vanilla", "visionzip@24", "visionzip@8pf"]
    assert set(results["runs"][0]["scores"]["per_type"]) == {"direction", "color", "count"}
    records = load_folder(video_data)
    for key, video_knobs, image_knobs in [("visionzip@24", {"tokens": 8}, {"tokens": 24}),
                                          ("visionzip@8pf", {"tokens": 8}, {"tokens": 8})]:
        rows = {json.loads(line)["id"]: json.loads(line) for line in (out / "predictions" / f"{key}.jsonl").open()}
        for r in records:
            visual = read_video(r.image_path, FRAMES) if r.is_video else random_image(9)
            knobs = video_knobs if r.is_video else image_knobs
            with compressed(model, "visionzip", **knobs):
                expected = generate_answers(model, processor, [visual], [r.question], 4)[0]
            assert rows[r.id]["prediction"] == expected, (key, r.id)
    assert frame_knobs({"tokens": 24}, FRAMES) == {"tokens": 8}


def test_a_video_over_the_context_gets_an_empty_answer_vanilla_but_fits_compressed(llava_dir, tmp_path) -> None:
    root = tmp_path / "long"
    (root / "v").mkdir(parents=True)
    for i in range(40):  # 40 frames x 64 tokens: over the test model's 2048
        random_image(i, (112, 112)).save(root / "v" / f"{i:02d}.png")
    record = {"id": "q", "video": "v", "question": "what?", "answers": ["red"], "type": "color"}
    (root / "data.jsonl").write_text(json.dumps(record) + "\n")
    out = tmp_path / "ev"
    with pytest.warns(UserWarning, match="question q: .* over|leaves no room"):
        code = main(["eval", "--model", str(llava_dir), "--data", str(root), "--out", str(out), "--methods",
                     "visionzip", "--tokens-per-frame", "8", "--frames", "40", "--max-new-tokens", "3",
                     "--device", "cpu"])
    assert code == 0
    vanilla = json.loads((out / "predictions" / "vanilla.jsonl").read_text())
    assert vanilla["prediction"] == "" and "sample fewer frames" in vanilla["over_context"]
    compressed_row = json.loads((out / "predictions" / "visionzip@8pf.jsonl").read_text())
    assert "over_context" not in compressed_row and compressed_row["prediction"]
    results = json.loads((out / "results.json").read_text())
    assert [r["tokens"] for r in results["runs"]] == [40 * 64, 40 * 8]  # per video


@pytest.mark.parametrize("frames", [6, 12, 24])
def test_lab_clips_show_their_answer_in_any_uniform_sample(frames: int) -> None:
    seen = sample_indices(clips.FRAMES, frames)
    first, last = seen[0], seen[-1]
    for index in range(24):
        clip = clips.sample(clips.SPLITS["test"].seed, index)
        event = [t for t in clip.tracks if t.start > 0 or t.end_bbox is not None or t.recolor_at is not None]
        if clip.type == "appeared":
            visible = [sum(t.at(f) is not None for t in clip.tracks) for f in (first, last)]
            assert visible[1] - visible[0] == int(clip.answer)
        elif clip.type == "direction":
            (track,) = event
            (x0, y0), (x1, y1) = track.at(first).center, track.at(last).center
            moved = {"left": x0 - x1, "right": x1 - x0, "above": y0 - y1, "below": y1 - y0}
            assert max(moved, key=moved.get) == clip.answer and moved[clip.answer] >= 100
        elif clip.type == "first":
            alone = [[t.shape for t in event if t.at(f) is not None] for f in seen]
            assert [clip.answer] in alone and alone[0] == [] and len(alone[-1]) == 2
        else:
            (track,) = event
            assert track.at(last).color == clip.answer != track.at(first).color


def test_lab_clips_are_deterministic_and_answerable_in_the_lab_models_words() -> None:
    tokenizer = Path(clips.__file__).parent / "checkpoint" / "tokenizer.json"
    vocab = set(json.loads(tokenizer.read_text())["model"]["vocab"])
    for answers in clips.answers_by_type().values():
        assert set(answers) <= vocab
    a, b = clips.sample(7, 3), clips.sample(7, 3)
    assert a == b and [np.asarray(f).tobytes() for f in a.frames()] == [np.asarray(f).tobytes() for f in b.frames()]
    assert clips.sample(7, 4) != a
    types = [clips.sample(7, i).type for i in range(8)]
    assert types == list(clips.QUESTION_TYPES) * 2


def test_a_written_lab_video_split_reads_back_with_its_hash(tmp_path: Path) -> None:
    digest = clips.write_split("val", tmp_path / "split", n_clips=4)
    records = load_folder(tmp_path / "split")
    assert [r.kind for r in records] == ["video"] * 4
    assert content_hash(tmp_path / "split") == digest
    video = read_video(records[0].image_path, 6)
    assert video.total == clips.FRAMES and video.indices == tuple(sample_indices(clips.FRAMES, 6))
    clip = clips.sample(clips.SPLITS["val"].seed, 0)
    assert np.array_equal(np.asarray(video.frames[2]), np.asarray(clip.frame(video.indices[2])))
