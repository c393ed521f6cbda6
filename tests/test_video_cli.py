"""``vlmzip run --video``: a video's frames sampled, its budget per video or per frame, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import random_image

from vlmzip.cli import main

RUN = ["run", "--repeats", "1", "--max-new-tokens", "2", "--device", "cpu"]


def frames_folder(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        random_image(i, (112, 112)).save(root / f"frame{i}.png")
    return root


def test_run_samples_a_video_and_budgets_it_per_video(llava_dir, tmp_path, capsys) -> None:
    video = frames_folder(tmp_path / "v", 10)
    code = main([*RUN, "--model", str(llava_dir), "--video", str(video), "--frames", "3", "--prompt", "what moved ?",
                 "--method", "visionzip", "--tokens", "48"])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 of 10 frames, numbers [1, 5, 8]" in out
    assert "visual tokens per video (3 frames as images): 192 -> 48 (per frame 64 -> 16)" in out
    assert "answer (vanilla):" in out and "speedup" in out


def test_run_per_frame_budget_default_budget_and_a_prompt_over_the_context(llava_dir, tmp_path, capsys) -> None:
    video = frames_folder(tmp_path / "v", 40)
    assert main([*RUN, "--model", str(llava_dir), "--video", str(video), "--frames", "4", "--prompt", "what ?",
                 "--method", "random"]) == 0
    out = capsys.readouterr().out
    assert "the papers' 17 of 256 tokens per frame" in out and "256 -> 16 (per frame 64 -> 4)" in out
    assert main([*RUN, "--model", str(llava_dir), "--video", str(video), "--frames", "40", "--prompt", "what ?",
                 "--method", "visionzip", "--tokens-per-frame", "8"]) == 0
    out = capsys.readouterr().out
    assert "2560 -> 320 (per frame 64 -> 8)" in out
    assert "answer (vanilla):      not run: its prompt takes" in out and "over the model's context of 2048" in out
    assert "time to first token: not compared" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--frames", "3"], "--frames sets how many frames of a --video are sampled"),
    (["--tokens-per-frame", "8"], "--tokens-per-frame budgets the frames of a --video"),
    (["--video", "VIDEO", "--image", "VIDEO"], "give --image or --video, not both"),
    (["--video", "VIDEO"], "--prompt is required with --video"),
    (["--video", "VIDEO", "--prompt", "x", "--frames", "6"], "asked for 6 frames but the video has only 5"),
    (["--video", "VIDEO", "--prompt", "x", "--frames", "4", "--tokens", "3"],
     "--tokens 3 is a budget per video, split evenly over its 4 frames"),
    (["--video", "VIDEO", "--prompt", "x", "--tokens", "8", "--tokens-per-frame", "2"], "not both"),
    (["--video", "MISSING", "--prompt", "x"], "does not exist"),
    (["--frames", "0"], "must be >= 1"),
])
def test_bad_video_input_exits_2_with_a_message(llava_dir, tmp_path, capsys, args, message) -> None:
    video = frames_folder(tmp_path / "v", 5)
    args = [{"VIDEO": str(video), "MISSING": str(tmp_path / "none.mp4")}.get(a, a) for a in args]
    code = main([*RUN, "--model", str(llava_dir), *args])
    assert code == 2
    assert message in capsys.readouterr().err
