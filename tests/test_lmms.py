"""lmms-eval integration: lmms-eval's own CLI with ``--model vlmzip`` on a local task built from the lab
benchmark gives the answers and the accuracy ``vlmzip eval`` gives on the same questions.

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

from vlmzip.eval.runner import evaluate
from vlmzip.eval.runs import EvalConfig
from vlmzip.lmms.task import write_task

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
REQUIRED = bool(os.environ.get("VLMZIP_REQUIRE_LMMS"))
pytestmark = pytest.mark.skipif(not HAVE_LMMS and not REQUIRED, reason="lmms-eval is not installed (the lmms extra)")

N_QUESTIONS, TOKENS, BATCH = 24, 28, 8  # 28 of the lab model's 256 patches: the papers' 64 of 576


@pytest.fixture(scope="module")
def lmms_eval_cli() -> Path:
    if not HAVE_LMMS:
        pytest.fail('VLMZIP_REQUIRE_LMMS is set but lmms-eval is not installed: '
                    'pip install -c constraints.txt -e ".[test]"')
    cli = Path(sys.executable).with_name("lmms-eval")
    assert cli.exists(), f"lmms-eval is importable but its command {cli} is missing"
    return cli


def offline_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_lmms_eval_cli_matches_vlmzip_eval(lmms_eval_cli: Path, tmp_path: Path) -> None:
    write_task("lab-test-small", tmp_path / "task", limit=N_QUESTIONS)
    out = tmp_path / "lmms-out"
    cmd = [str(lmms_eval_cli), "eval", "--model", "vlmzip", "--model_args", f"method=visionzip,tokens={TOKENS}",
           "--batch_size", str(BATCH), "--device", "cpu", "--include_path", str(tmp_path / "task"),
           "--tasks", "vlmzip_lab", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=offline_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    (samples_file,) = out.rglob("*_samples_vlmzip_lab.jsonl")
    lmms_accuracy = json.loads(results_file.read_text())["results"]["vlmzip_lab"]["accuracy,none"]
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == N_QUESTIONS

    ours = evaluate(EvalConfig(data="lab-test-small", out=str(tmp_path / "vlmzip-out"), methods=["visionzip"],
                               tokens=[TOKENS], limit=N_QUESTIONS, batch_size=BATCH, device="cpu"))
    run = next(r for r in ours["runs"] if r["key"] == f"visionzip@{TOKENS}")
    rows = [json.loads(line) for line in (tmp_path / "vlmzip-out/predictions" / f"visionzip@{TOKENS}.jsonl").open()]
    by_id = {row["id"]: row["prediction"] for row in rows}
    ids = [json.loads(line)["id"] for line in (tmp_path / "task/vlmzip_lab.jsonl").open()]
    assert [s["filtered_resps"] for s in samples] == [by_id[i] for i in ids]  # the same answer to every question
    assert lmms_accuracy == pytest.approx(run["scores"]["accuracy"], abs=1e-12)
    vanilla = next(r for r in ours["runs"] if r["key"] == "vanilla")
    assert vanilla["scores"]["accuracy"] > 0 and run["tokens"] == TOKENS


@pytest.fixture(scope="module")
def lab_lmm(lmms_eval_cli: Path):
    from vlmzip.lmms.model import VlmzipLMM

    return VlmzipLMM(method="visionzip", tokens=TOKENS, device="cpu", batch_size=4)


def requests(kind: str, docs: list[dict], second: list) -> list:
    from lmms_eval.api.instance import Instance

    from vlmzip.lmms.task import doc_to_visual

    return [Instance(request_type=kind, arguments=(d["question"], s, doc_to_visual, i, "lab", "test"), idx=0,
                     metadata={"task": "lab", "doc_id": i, "repeats": 1})
            for i, (d, s) in enumerate(zip(docs, second, strict=True))]


def test_loglikelihood_ranks_the_greedy_answer_first(lab_lmm, tmp_path: Path) -> None:
    write_task("lab-test-small", tmp_path, limit=6)
    docs = [json.loads(line) for line in (tmp_path / "vlmzip_lab.jsonl").open()]
    lab_lmm.task_dict = {"lab": {"test": docs}}
    greedy = {"max_new_tokens": 1, "do_sample": False, "until": []}
    answers = lab_lmm.generate_until(requests("generate_until", docs, [greedy] * len(docs)))
    assert all(answers)
    got = lab_lmm.loglikelihood(requests("loglikelihood", docs, [" " + a for a in answers]))
    assert all(is_greedy for _, is_greedy in got)
    other = ["no" if a == "yes" else "yes" for a in answers]  # a different one-token answer
    worse = lab_lmm.loglikelihood(requests("loglikelihood", docs, [" " + o for o in other]))
    for (lp, _), (lp_other, is_greedy) in zip(got, worse, strict=True):
        assert lp <= 0 and lp >= lp_other and not is_greedy


def test_bad_model_args_say_what_to_pass(lmms_eval_cli: Path) -> None:
    from vlmzip.lmms.model import VlmzipLMM

    with pytest.raises(ValueError, match="method=vanilla takes no knobs"):
        VlmzipLMM(tokens=28, device="cpu")
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        VlmzipLMM(method="visionzip", tokens=28, device="cpu", batch_size="auto")
    with pytest.raises(ValueError, match="nosuchmethod"):
        VlmzipLMM(method="nosuchmethod", device="cpu")


def test_a_question_without_exactly_one_image_is_refused(lab_lmm, tmp_path: Path) -> None:
    write_task("lab-test-small", tmp_path, limit=1)
    docs = [json.loads(line) for line in (tmp_path / "vlmzip_lab.jsonl").open()]
    lab_lmm.task_dict = {"lab": {"test": docs}}
    reqs = requests("generate_until", docs, [{"max_new_tokens": 1}])
    context, gen, one_image, *rest = reqs[0].arguments
    reqs[0].arguments = (context, gen, lambda doc: one_image(doc) * 2, *rest)  # the same image twice
    with pytest.raises(ValueError, match="exactly one image"):
        lab_lmm.generate_until(reqs)


def test_write_task_refuses_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        write_task("lab-test-small", tmp_path, limit=0)
    with pytest.raises(ValueError, match="--name"):
        write_task("lab-test-small", tmp_path, name="my-task")


def _build_family(family: str, out: Path) -> dict:
    """A tiny random-weight model of ``family`` saved to ``out``; returns the VisionZip budget to run it at."""
    from vlmzip.builders.gemma3 import Gemma3Spec, build_gemma3
    from vlmzip.builders.idefics3 import Idefics3Spec, build_idefics3
    from vlmzip.builders.internvl import InternVLSpec, build_internvl
    from vlmzip.builders.llava_next import LlavaNextSpec, build_llava_next
    from vlmzip.builders.llava_onevision import LlavaOnevisionSpec, build_llava_onevision
    from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl

    if family == "llava-next":
        build_llava_next(out, LlavaNextSpec(image_size=84, patch_size=14, vision_layers=2, text_layers=3))
        return {"tokens": 8}
    if family in ("qwen2-vl", "qwen3-vl"):
        build_qwen_vl(out, QwenVLSpec(version=family[4], text_layers=3))
        return {"tokens": 8}
    builders = {"llava-onevision": lambda: build_llava_onevision(out, LlavaOnevisionSpec()),
                "gemma3": lambda: build_gemma3(out, Gemma3Spec()),
                "internvl": lambda: build_internvl(out, InternVLSpec(image_size=64, patch_size=8, vision_layers=2,
                                                                     text_layers=3, max_patches=4)),
                "smolvlm": lambda: build_idefics3(out, Idefics3Spec(text_layers=3))}
    builders[family]()
    return {"ratio": 0.5}  # per-image counts differ with tiles and crops: half of each image's own


@pytest.mark.parametrize("family", ["llava-next", "qwen2-vl", "qwen3-vl", "llava-onevision", "gemma3", "internvl",
                                    "smolvlm"])
def test_other_families_answer_as_vlmzip_does(lmms_eval_cli: Path, family: str, tmp_path: Path) -> None:
    from vlmzip.api import compressed
    from vlmzip.io import generate_answers, load_model
    from vlmzip.lmms.model import VlmzipLMM

    budget = _build_family(family, tmp_path / "model")
    write_task("lab-test-small", tmp_path / "task", limit=5)
    docs = [json.loads(line) for line in (tmp_path / "task/vlmzip_lab.jsonl").open()]
    words = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]
    for i, doc in enumerate(docs):  # questions in the tiny models' vocabulary, so that they answer words
        doc["question"] = words[i % len(words)]
    lmm = VlmzipLMM(pretrained=str(tmp_path / "model"), method="visionzip", **budget, device="cpu", batch_size=2)
    lmm.task_dict = {"lab": {"test": docs}}
    gen = {"max_new_tokens": 4, "do_sample": False, "until": []}
    got = lmm.generate_until(requests("generate_until", docs, [gen] * len(docs)))

    from vlmzip.lmms.task import doc_to_visual

    model, processor = load_model(str(tmp_path / "model"))
    want = []
    with compressed(model, "visionzip", **budget):
        for start in range(0, len(docs), 2):  # vlmzip eval's batches of 2
            batch = docs[start : start + 2]
            images = [doc_to_visual(d)[0] for d in batch]
            want += generate_answers(model, processor, images, [d["question"] for d in batch], max_new_tokens=4)
    assert got == want and any(got)  # random weights: nonsense, but the same nonsense


def test_task_command_writes_a_task_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    from vlmzip.lmms.task import main

    assert main(["--data", "lab-test-small", "--out", str(tmp_path), "--limit", "3", "--name", "lab3"]) == 0
    assert "--tasks lab3" in capsys.readouterr().out
    assert len((tmp_path / "lab3.jsonl").read_text().splitlines()) == 3
    assert {p.name for p in tmp_path.iterdir()} == {"lab3.jsonl", "lab3.yaml", "utils.py"}
    with pytest.raises(SystemExit) as err:
        main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")])
    assert err.value.code == 2 and "error:" in capsys.readouterr().err
