"""`vlmzip eval --multi-turn`: the conversations, turn 2 on turn 1's cache equal to turn 2 from scratch
(vanilla and a pre-LLM method), batching, and the CLI end to end with resuming."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import pytest

import vlmzip
from vlmzip.cli import main
from vlmzip.eval.format import load_folder
from vlmzip.eval.multiturn import answer_conversations, conversations, follow_up_text, question_targets
from vlmzip.eval.runner import evaluate
from vlmzip.eval.runs import EvalConfig
from vlmzip.io import load_model
from vlmzip.lab.scenes import Scene, solve, write_split


@pytest.fixture(scope="module")
def lab():
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 12 images of lab-test-small (same ids, questions and pixels)."""
    out = tmp_path_factory.mktemp("data") / "test-small12"
    write_split("test-small", out, n_images=12)
    return out


def test_conversations_ask_about_different_objects_of_one_image(small_dir):
    records = load_folder(small_dir)
    convs = conversations(records)
    assert 6 <= len(convs) <= 12
    order = [r.id for r in records]
    for conv in convs:
        first, second = question_targets(conv.first), question_targets(conv.second)
        assert first and second and not first & second
        assert conv.first.image_path == conv.second.image_path
        assert order.index(conv.first.id) < order.index(conv.second.id)
        for record in (conv.first, conv.second):  # the targets are the objects the question names
            scene = Scene.from_dict(record.extra["scene"])
            assert solve(scene, record.question) == record.answers[0]
    assert len({c.first.image_path for c in convs}) == len(convs)  # one conversation per image


def test_targets_of_each_question_form(small_dir):
    record = load_folder(small_dir)[0]
    scene = record.extra["scene"]
    objs = scene["objects"]

    def ask(question: str) -> frozenset[str]:
        return question_targets(type(record)(record.id, record.image_path, question, ["x"], "t", {"scene": scene}))

    a, b = objs[0], objs[1]
    assert ask("How many objects are there?") == {f"o{i}" for i in range(len(objs))}
    assert "o0" in ask(f"Is there a {a['color']} {a['shape']}?")
    assert ask("Is there a zebra unicorn?") == frozenset()  # names nothing in the image
    assert {"o0", "o1"} <= ask(f"Is the {a['color']} {a['shape']} above the {b['color']} {b['shape']}?")
    assert ask("What word is written in the image?") == {"text"}
    assert ask("Why?") == frozenset()


def test_follow_up_is_the_chat_templates_next_user_turn(lab):
    _, processor = lab
    assert follow_up_text(processor, "What color is the star?") == "</s> USER: What color is the star? ASSISTANT:"


@pytest.mark.parametrize("method", ["vanilla", "visionzip"])
def test_turn_two_on_the_cache_equals_turn_two_from_scratch(lab, small_dir, method):
    model, processor = lab
    convs = conversations(load_folder(small_dir))[:6]
    with vlmzip.compressed(model, method, tokens=28) if method != "vanilla" else nullcontext():
        cached = answer_conversations(model, processor, convs, 6)
        scratch = answer_conversations(model, processor, convs, 6, reuse_cache=False)
        singles = [answer_conversations(model, processor, [c], 6)[0] for c in convs]
    assert cached == scratch
    assert cached == singles  # left padding and middle padding do not change an answer
    assert any(a2 for _, a2 in cached)


@pytest.mark.parametrize("method", ["saliency", "sparsevlm", "fastv"])
def test_text_guided_multi_turn_batch_equals_singles(lab, small_dir, method):
    """Text-guided methods keep question 1's tokens for question 2: a batch (left and middle padding)
    answers both turns as each conversation alone does."""
    model, processor = lab
    convs = conversations(load_folder(small_dir))[:5]
    with vlmzip.compressed(model, method, tokens=28):
        cached = answer_conversations(model, processor, convs, 6)
        singles = [answer_conversations(model, processor, [c], 6)[0] for c in convs]
    assert cached == singles
    assert any(a2 for _, a2 in cached)


def test_cli_multi_turn_writes_both_turns_and_resumes(lab, small_dir, tmp_path, capsys):
    out = tmp_path / "mt"
    args = ["eval", "--multi-turn", "--data", str(small_dir), "--out", str(out), "--methods",
            "vanilla,visionzip,fastv", "--tokens", "28", "--limit", "5", "--batch-size", "3", "--max-new-tokens", "4"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["multi_turn"] and results["n_conversations"] == 5
    assert [r["key"] for r in results["runs"]] == ["vanilla", "visionzip@28", "fastv@28"]
    assert all(r["turn1"]["n"] == 5 and r["turn2"]["n"] == 5 for r in results["runs"])
    table = (out / "table.md").read_text()
    assert "| Method | Tokens | Turn 1 | Turn 2 | Turn-2 drop vs vanilla | t2 - t1 |" in table
    assert "| fastv | 28 (sent 256, final 28, layer avg 142.0) |" in table

    model, processor = lab
    convs = conversations(load_folder(small_dir))[:5]
    path = out / "predictions" / "visionzip@28.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with vlmzip.compressed(model, "visionzip", tokens=28):
        expected = answer_conversations(model, processor, convs[:3], 4) + answer_conversations(
            model, processor, convs[3:], 4)
    assert [(r["turn1"]["prediction"], r["turn2"]["prediction"]) for r in rows] == expected
    assert [r["id"] for r in rows] == [c.id for c in convs]

    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"id": "torn')  # interrupted
    assert main(args) == 0
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]

    capsys.readouterr()
    assert main([a for a in args if a != "--multi-turn"]) == 2  # a normal eval cannot resume into it
    assert "multi_turn: True there, none now" in capsys.readouterr().err


def test_turn2_from_scratch_is_a_separate_evaluation(small_dir, tmp_path, capsys):
    out = tmp_path / "mt"
    base = ["eval", "--multi-turn", "--data", str(small_dir), "--out", str(out), "--methods", "vanilla",
            "--limit", "3", "--max-new-tokens", "4"]
    assert main([*base, "--turn2-from-scratch"]) == 0
    scratch = json.loads((out / "results.json").read_text())
    assert "recomputed from the full two-turn prompt" in (out / "table.md").read_text()
    assert main(base) == 2 and "turn2_from_scratch: True there, none now" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "cached")]) == 0
    cached = json.loads((tmp_path / "cached" / "results.json").read_text())
    assert scratch["runs"][0]["turn2"] == cached["runs"][0]["turn2"]  # vanilla: the same answers either way
    assert main(["eval", "--turn2-from-scratch", "--out", str(tmp_path / "x")]) == 2
    assert "add --multi-turn" in capsys.readouterr().err


def test_multi_turn_leaves_the_config_it_was_given_unchanged(small_dir, tmp_path):
    cfg = EvalConfig(data=str(small_dir), out=str(tmp_path / "mt"), methods=["vanilla"], limit=2, max_new_tokens=2,
                     multi_turn=True)
    before = copy.deepcopy(cfg)
    results = evaluate(cfg)
    assert cfg == before and cfg.tokens is None
    assert results["config"]["tokens"] == [85, 57, 28], "results.json records the budgets resolved"
    assert results["n_conversations"] == 2 and results["config"]["multi_turn"]
