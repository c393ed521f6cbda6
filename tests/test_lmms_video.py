"""lmms-eval's model answers video questions as lmms-eval's video tasks ask them (``doc_to_visual`` gives a path),
with the same answers as ``vlmzip eval``; images and videos in one request list each get their own budget.

Skipped only when lmms-eval is not installed and VLMZIP_REQUIRE_LMMS is not set (CI sets it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmzip import compressed
from vlmzip.eval.runner import evaluate
from vlmzip.eval.runs import EvalConfig
from vlmzip.io import generate_answers
from vlmzip.lab import clips, scenes
from vlmzip.lmms.task import write_task
from vlmzip.video import read_video

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
REQUIRED = bool(os.environ.get("VLMZIP_REQUIRE_LMMS"))
pytestmark = pytest.mark.skipif(not HAVE_LMMS and not REQUIRED, reason="lmms-eval is not installed (the lmms extra)")

N_CLIPS, FRAMES, TOKENS, BATCH = 8, 6, 102, 4  # 102 per video: 17 per frame, VisionZip's Video-LLaVA share


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clips") / "data"
    clips.write_split("val", out, n_clips=N_CLIPS)
    return out


def test_lmms_eval_cli_answers_a_video_task_as_vlmzip_eval(clip_data: Path, tmp_path: Path) -> None:
    if not HAVE_LMMS:
        pytest.fail("VLMZIP_REQUIRE_LMMS is set but lmms-eval is not installed: "
                    'pip install -c constraints.txt -e ".[test]"')
    cli = Path(sys.executable).with_name("lmms-eval")
    write_task(str(clip_data), tmp_path / "task", name="vlmzip_video")
    docs = [json.loads(line) for line in (tmp_path / "task" / "vlmzip_video.jsonl").open()]
    assert all(Path(d["video"]).is_dir() for d in docs)  # a path, as lmms-eval's video tasks give
    out = tmp_path / "lmms-out"
    root = str(Path(__file__).resolve().parents[1])  # this checkout's vlmzip, whichever one pip installed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [str(cli), "eval", "--model", "vlmzip", "--model_args", f"method=visionzip,tokens={TOKENS},frames={FRAMES}",
           "--batch_size", str(BATCH), "--device", "cpu", "--include_path", str(tmp_path / "task"),
           "--tasks", "vlmzip_video", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (samples_file,) = out.rglob("*_samples_vlmzip_video.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    ours = evaluate(EvalConfig(data=str(clip_data), out=str(tmp_path / "ours"), methods=["visionzip"],
                               tokens=[TOKENS], batch_size=BATCH, device="cpu", frames=FRAMES))
    rows = {json.loads(line)["id"]: json.loads(line)["prediction"]
            for line in (tmp_path / "ours" / "predictions" / f"visionzip@{TOKENS}.jsonl").open()}
    assert [s["filtered_resps"] for s in samples] == [rows[d["id"]] for d in docs]
    assert ours["runs"][1]["tokens"] == TOKENS and ours["runs"][0]["tokens"] == 256 * FRAMES


def test_images_and_videos_in_one_request_list_each_get_their_budget(clip_data: Path, tmp_path: Path) -> None:
    from lmms_eval.api.instance import Instance

    from vlmzip.lmms.model import VlmzipLMM
    from vlmzip.lmms.task import doc_to_visual

    write_task(str(clip_data), tmp_path / "v", name="v", limit=2)
    write_task("lab-test-small", tmp_path / "i", name="i", limit=2)
    docs = [json.loads(line) for name in ("v/v", "i/i") for line in (tmp_path / f"{name}.jsonl").open()]
    lmm = VlmzipLMM(method="visionzip", tokens=TOKENS, frames=FRAMES, device="cpu", batch_size=4)
    lmm.task_dict = {"t": {"test": docs}}
    gen = {"max_new_tokens": 4, "do_sample": False, "until": []}
    reqs = [Instance(request_type="generate_until", arguments=(d["question"], gen, doc_to_visual, i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    answers = lmm.generate_until(reqs)

    model, processor = lmm.model, lmm.processor
    from vlmzip import decompress

    decompress(model)
    videos = [read_video(d["video"], FRAMES) for d in docs[:2]]
    images = [scenes.sample(scenes.SPLITS["test"].seed, 0)[0]] * 2  # the first two questions are about image 0
    with compressed(model, "visionzip", tokens=TOKENS // FRAMES):
        expected = generate_answers(model, processor, videos, [d["question"] for d in docs[:2]], 4)
    with compressed(model, "visionzip", tokens=TOKENS):
        expected += generate_answers(model, processor, images, [d["question"] for d in docs[2:]], 4)
    assert answers == expected
