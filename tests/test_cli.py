"""End-to-end runs of the ``vlmzip`` command line on a small saved LLaVA."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import random_image

from vlmzip.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmzip.cli", *args], capture_output=True, text=True, timeout=300)


def test_run_prints_answers_tokens_and_ttft(llava_dir, tmp_path):
    image = tmp_path / "img.png"
    random_image(7).save(image)
    result = run_cli("run", "--model", str(llava_dir), "--image", str(image), "--prompt", "what color ?",
                     "--method", "visionzip", "--tokens", "16", "--repeats", "2", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "visual tokens per image: 64 -> 16" in out
    assert "answer (vanilla):" in out and "answer (visionzip):" in out
    assert re.search(r"median of 2 interleaved runs: vanilla [\d.]+ ms, visionzip [\d.]+ ms -> speedup [\d.]+x", out)
    assert "'split': 'dominant 14 + contextual 2'" in out


def test_list_shows_methods(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "visionzip" in out and "--dominant" in out and "random" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "CORRUPT"], "cannot read image"),
        (["--image", "/nonexistent.png"], "does not exist"),
        (["--image", "GOOD"], "--prompt is required with --image"),
        (["--tokens", "65"], "larger than the 64"),
        (["--tokens", "0"], "must be >= 1"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--knob", "bogus=1"], "no knob 'bogus'"),
    ],
)
def test_bad_input_exits_2_with_a_message(llava_dir, tmp_path, capsys, args, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = tmp_path / "good.png"
    random_image(3).save(good)
    args = [{"CORRUPT": str(corrupt), "GOOD": str(good)}.get(a, a) for a in args]
    code = main(["run", "--model", str(llava_dir), "--repeats", "1", "--max-new-tokens", "1", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_model_folder_must_exist(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path), "--repeats", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_run_without_image_asks_a_lab_test_scene_its_own_question(llava_dir, capsys):
    from vlmzip.lab import scenes

    question = scenes.sample(scenes.SPLITS["test"].seed, 0)[2][0].question
    assert main(["run", "--model", str(llava_dir), "--repeats", "1", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "image:   lab test scene 0" in out and f"prompt:  {question}" in out
    assert "visual tokens per image: 64 -> 7" in out  # 64 of 576 at the same share of 64 patches
