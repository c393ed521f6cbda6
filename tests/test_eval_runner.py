"""`vlmzip eval` end to end on a small random LLaVA: outputs, resumability, batching, errors, table."""

from __future__ import annotations

import ast
import copy
import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlmzip.cli import main
from vlmzip.eval.data import ensure_lab_dataset, load_dataset
from vlmzip.eval.format import load_folder
from vlmzip.eval.report import accuracy_figure, plot_accuracy, retention_table
from vlmzip.eval.runner import evaluate as run_eval
from vlmzip.eval.runs import EvalConfig
from vlmzip.eval.scorers import answer_vocabulary, normalize_answer
from vlmzip.lab import scenes
from vlmzip.lab.scenes import SplitSpec, write_split

ARGS = ["--methods", "vanilla,visionzip,random", "--tokens", "16,8", "--limit", "6", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "val4"
    write_split("val", out, n_images=4)
    return out


def evaluate(llava_dir, data_dir, out, *extra):
    return main(["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(out), *ARGS, *extra])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_predictions_results_table_and_plot(llava_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert evaluate(llava_dir, data_dir, out, "--batch-size", "4") == 0
    keys = ["vanilla", "visionzip@16", "visionzip@8", "random@16", "random@8"]
    for key in keys:
        rows = lines(out / "predictions" / f"{key}.jsonl")
        assert len(rows) == 6 and {"id", "prediction", "answers", "type"} <= set(rows[0])
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == keys
    assert results["vanilla_tokens"] == 64 and results["n_questions"] == 6
    assert all(r["scores"]["n"] == 6 for r in results["runs"])
    table = (out / "table.md").read_text()
    assert "**Retain 16 tokens (25.0%)**" in table and "| visionzip | 8 |" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| vanilla | 64 |" in capsys.readouterr().out


def test_the_plans_notes_reach_the_results_and_the_table(six_layer_dir, data_dir, tmp_path):
    """SparseVLM on a 6-layer LLM prunes after scaled layers: the evaluation says so where its numbers are."""
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(six_layer_dir), "--data", str(data_dir), "--out", str(out),
                 "--methods", "vanilla,sparsevlm", "--tokens", "16", "--limit", "2", "--max-new-tokens", "2"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[0]["notes"] == [] and len(runs[1]["notes"]) == 1
    assert "pruning after layers (0, 1, 3)" in runs[1]["notes"][0]
    assert f"Note: {runs[1]['notes'][0]}." in (out / "table.md").read_text()


def test_eval_resumes_and_batching_does_not_change_answers(llava_dir, data_dir, tmp_path):
    out = tmp_path / "ev"
    assert evaluate(llava_dir, data_dir, out, "--batch-size", "4") == 0
    path = out / "predictions" / "visionzip@8.jsonl"
    full = lines(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in full[:2]) + '{"id": "torn')  # interrupted mid-write
    untouched = (out / "predictions" / "vanilla.jsonl").read_text()
    assert evaluate(llava_dir, data_dir, out, "--batch-size", "4") == 0
    assert (out / "predictions" / "vanilla.jsonl").read_text() == untouched, "finished runs are skipped"
    resumed = {r["id"]: r["prediction"] for r in lines(path) if "prediction" in r}
    assert resumed == {r["id"]: r["prediction"] for r in full}

    single = tmp_path / "single"
    assert evaluate(llava_dir, data_dir, single, "--batch-size", "1") == 0
    for key in ("vanilla", "visionzip@8"):
        a = {r["id"]: r["prediction"] for r in lines(out / "predictions" / f"{key}.jsonl") if "prediction" in r}
        b = {r["id"]: r["prediction"] for r in lines(single / "predictions" / f"{key}.jsonl")}
        assert a == b, f"batched and unbatched answers differ for {key}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--methods", "vanilla,nosuch"], "unknown method 'nosuch'"),
        (["--tokens", "16,100"], "larger than the 64"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_eval_bad_arguments(llava_dir, data_dir, tmp_path, capsys, override, message):
    argv = ["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(tmp_path / "x"), *ARGS, *override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "predictions").exists(), "nothing runs before every run is validated"


def test_eval_rejects_a_malformed_data_folder(llava_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "data.jsonl").write_text('{"id": "a", "image": "images/a.png", "question": "q?", "type": "count"}\n')
    assert main(["eval", "--model", str(llava_dir), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "answers" in err


def test_eval_refuses_to_mix_different_evaluations(llava_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert evaluate(llava_dir, data_dir, out, "--methods", "vanilla") == 0
    assert evaluate(llava_dir, data_dir, out, "--max-new-tokens", "5") == 2
    assert "different evaluation" in capsys.readouterr().err


def test_retention_table_percentages():
    def scores(p, c, f1):
        return {"per_type": {"presence": {"accuracy": p}, "count": {"accuracy": c}}, "macro_accuracy": (p + c) / 2,
                "pope": {"all": {"f1": f1}}}

    results = {
        "config": {"data": "d", "match": "exact"}, "identity": {"model": "m"}, "n_questions": 4,
        "runs": [
            {"method": "vanilla", "knobs": {}, "tokens": 576, "scores": scores(0.8, 0.5, 0.8)},
            {"method": "visionzip", "knobs": {"tokens": 64}, "tokens": 64,
             "scores": {**scores(0.4, 0.5, 0.6), "off_vocabulary": 0.25}},
        ],
    }
    table = retention_table(results)
    assert "| Avg | Off-vocab |" in table and "| 45.0 (75.0%) | 25.0 |" in table
    assert "| presence | count | POPE F1 | Avg |" in table
    assert "| visionzip | 64 | 40.0 (50.0%) | 50.0 (100.0%) | 60.0 (75.0%) | 45.0 (75.0%) |" in table
    assert "**Retain 64 tokens (11.1%)**" in table


def test_accuracy_plot_ticks_the_budgets_run(tmp_path):
    def scores(acc):
        return {"per_type": {"count": {"accuracy": acc}}, "macro_accuracy": acc}

    results = {
        "config": {"data": "d"}, "n_questions": 4,
        "runs": [{"method": "vanilla", "tokens": 256, "scores": scores(0.8)}]
        + [{"method": m, "tokens": t, "scores": scores(0.5)} for m in ("visionzip", "random") for t in (85, 57, 28)],
    }
    fig = accuracy_figure(results)
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [28, 57, 85]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["28", "57", "85"]
    assert ax.get_xlabel() == "visual tokens per image (of 256)"
    plot_accuracy(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_accuracy_plot_gives_every_method_its_own_colour_and_marker():
    """13 methods (a full lab sweep draws 12): the default 10-colour cycle would draw the 1st and 11th alike."""
    results = {
        "config": {"data": "d"}, "n_questions": 4,
        "runs": [{"method": "vanilla", "tokens": 256, "scores": {"macro_accuracy": 0.8}}]
        + [{"method": f"m{i:02d}", "tokens": t, "scores": {"macro_accuracy": 0.5}}
           for i in range(13) for t in (85, 28)],
    }
    ax = accuracy_figure(results).axes[0]
    styles = [(line.get_color(), line.get_marker()) for line in ax.get_lines() if line.get_label().startswith("m")]
    assert len(styles) == 13 and len(set(styles)) == 13
    assert len({color for color, _ in styles}) == 13
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()][:13] == [f"m{i:02d}" for i in range(13)]


def test_eval_default_budgets_are_the_papers_scaled_to_the_model(llava_dir, data_dir, tmp_path):
    # the test model has 64 patches: 192/128/64 of 576 -> 21/14/7 of 64 (the same share of the image)
    out = tmp_path / "ev"
    code = main(["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(out),
                 "--methods", "visionzip", "--limit", "2", "--max-new-tokens", "2"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["vanilla", "visionzip@21", "visionzip@14", "visionzip@7"]
    assert [r["tokens"] for r in results["runs"]] == [64, 21, 14, 7]


def test_eval_interrupted_says_how_to_resume(llava_dir, data_dir, tmp_path, capsys, monkeypatch):
    from vlmzip.eval import runner

    out = tmp_path / "ev"
    real, calls = runner.answer_batch, []

    def interrupted_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "answer_batch", interrupted_on_second_batch)
    argv = ["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(out), *ARGS, "--batch-size", "4"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "vlmzip eval: interrupted" in err and "rerun the same command" in err
    assert "vlmzip " + " ".join(argv) in err
    kept = lines(out / "predictions" / "vanilla.jsonl")
    assert len(kept) == 4, "the batch answered before Ctrl-C is kept"

    monkeypatch.setattr(runner, "answer_batch", real)
    assert main(argv) == 0
    resumed = lines(out / "predictions" / "vanilla.jsonl")
    assert resumed[:4] == kept and len(resumed) == 6


def test_eval_refuses_a_folder_holding_other_files(llava_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert evaluate(llava_dir, data_dir, out) == 2
    assert "is not empty and holds no vlmzip evaluation (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    (tmp_path / "file").write_text("x")
    assert evaluate(llava_dir, data_dir, tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (["--limit", "6"], ["--limit", "4"], "limit: 6 there, 4 now"),
        (["--batch-size", "4"], ["--batch-size", "2"], "batch_size: 4 there, 2 now"),
        (["--match", "exact"], ["--match", "relaxed"], "match: exact there, relaxed now"),
    ],
)
def test_eval_refuses_another_evaluation_into_the_same_folder(llava_dir, data_dir, tmp_path, capsys, first, second,
                                                              message):
    out = tmp_path / "ev"
    assert evaluate(llava_dir, data_dir, out, *first) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert evaluate(llava_dir, data_dir, out, *second) == 2
    err = capsys.readouterr().err
    assert "holds results of a different evaluation" in err and message in err and "new --out folder" in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing was overwritten"


def test_eval_never_resumes_a_new_checkpoint_into_old_predictions(llava_dir, data_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(llava_dir, model_dir)
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out), *ARGS]
    assert main(argv) == 0
    identity = json.loads((out / "identity.json").read_text())
    assert len(identity["weights_sha256"]) == 64
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # a new checkpoint saved over the old one, same path
    model.save_pretrained(model_dir)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different evaluation (weights_sha256: " + identity["weights_sha256"][:12] in err
    assert "model:" not in err, "only the weights differ"


def test_eval_with_other_methods_keeps_the_earlier_columns(llava_dir, data_dir, tmp_path):
    out = tmp_path / "ev"
    base = ["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(out), "--limit", "4",
            "--max-new-tokens", "2"]
    assert main([*base, "--methods", "vanilla,visionzip", "--tokens", "16"]) == 0
    vanilla = (out / "predictions" / "vanilla.jsonl").read_text()
    assert main([*base, "--methods", "random", "--tokens", "8,16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["vanilla", "visionzip@16", "random@8", "random@16"]
    assert (out / "predictions" / "vanilla.jsonl").read_text() == vanilla, "vanilla is not evaluated again"
    table = (out / "table.md").read_text()
    assert "| visionzip | 16 |" in table and "| random | 8 |" in table


def test_off_vocabulary_is_judged_against_the_whole_dataset(llava_dir, data_dir, tmp_path, monkeypatch):
    from vlmzip.eval import runner

    dataset = load_folder(data_dir)
    subset = dataset[:6]  # --limit 6 (ARGS)
    outside = {}  # per type, a gold answer of the dataset that no question of the subset has
    for record in dataset[6:]:
        if not any(record.answers[0] in r.answers for r in subset if r.type == record.type):
            outside.setdefault(record.type, record.answers[0])
    wrong = sum(r.type in outside for r in subset)
    assert wrong >= 3

    def valid_but_wrong(model, processor, records, max_new_tokens):
        return [outside.get(r.type, r.answers[0]) for r in records]

    monkeypatch.setattr(runner, "answer_batch", valid_but_wrong)
    out = tmp_path / "ev"
    assert evaluate(llava_dir, data_dir, out, "--methods", "vanilla") == 0
    scores = json.loads((out / "results.json").read_text())["runs"][0]["scores"]
    assert scores["off_vocabulary"] == 0.0, "answers in the dataset's vocabulary are in format"
    assert scores["accuracy"] == pytest.approx(1 - wrong / 6)


def test_eval_sweeps_methods_with_bracketed_knobs_as_their_own_columns(llava_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    methods = "vanilla,random,random[seed=0],random[seed=7],visionzip[ratio=0.25]"
    argv = ["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(out), "--limit", "6",
            "--max-new-tokens", "3", "--tokens", "8", "--methods", methods]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    keys = ["vanilla", "random@8", "random[seed=0]@8", "random[seed=7]@8", "visionzip[ratio=0.25]"]
    assert [r["key"] for r in results["runs"]] == keys
    assert results["runs"][3]["knobs"] == {"seed": 7, "tokens": 8}
    assert results["runs"][4]["tokens"] == 16, "a budget fixed in brackets is not swept"
    # the default seed spelled out is the same run; the table names each column as spelled
    same = [[r["prediction"] for r in lines(out / "predictions" / f"{k}.jsonl")] for k in keys[1:3]]
    assert same[0] == same[1]
    table = (out / "table.md").read_text()
    assert "| random[seed=7] | 8 |" in table and "| visionzip[ratio=0.25] | 16 |" in table
    assert main([*argv[:-1], "vanilla,random[seed]"]) == 2
    assert "cannot read knob 'seed'" in capsys.readouterr().err
    assert main([*argv[:-1], "vanilla,random[nosuch=1]"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_off_vocabulary_of_a_lab_split_is_judged_against_every_answer_of_the_benchmark(llava_dir, tmp_path,
                                                                                         monkeypatch):
    """A lab split (any --limit) knows every answer a type can have; a folder knows its records' answers."""
    from vlmzip.eval import runner

    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(scenes.SPLITS, "test-small", SplitSpec(seed=2002, n_images=7, id_prefix="test"))
    monkeypatch.delitem(scenes.EXPECTED_HASHES, "test-small")
    gold = answer_vocabulary(load_dataset("lab-test-small"))
    unseen = {qtype: next(a for a in answers if normalize_answer(a) not in gold.get(qtype, set()))
              for qtype, answers in scenes.answers_by_type().items() if qtype not in ("presence", "spatial")}
    monkeypatch.setattr(runner, "answer_batch", lambda model, processor, records, max_new_tokens: [
        unseen.get(r.type, "maybe") for r in records])  # valid answers no question of the split has; "maybe": none
    base = ["eval", "--model", str(llava_dir), "--methods", "vanilla", "--limit", "14", "--max-new-tokens", "2"]
    assert main([*base, "--data", "lab-test-small", "--out", str(tmp_path / "lab")]) == 0
    scores = json.loads((tmp_path / "lab" / "results.json").read_text())["runs"][0]["scores"]
    yes_no = sum(scores["per_type"].get(t, {"n": 0})["n"] for t in ("presence", "spatial"))
    assert 0 < yes_no < 14
    assert scores["accuracy"] == 0.0 and scores["off_vocabulary"] == pytest.approx(yes_no / 14)

    folder = ensure_lab_dataset("lab-test-small")  # the same records as a dataset folder: its own answers only
    assert main([*base, "--data", str(folder), "--out", str(tmp_path / "folder")]) == 0
    scores = json.loads((tmp_path / "folder" / "results.json").read_text())["runs"][0]["scores"]
    assert scores["off_vocabulary"] == 1.0


def test_evaluate_leaves_the_config_it_was_given_unchanged(llava_dir, data_dir, tmp_path):
    cfg = EvalConfig(data=str(data_dir), out=str(tmp_path / "ev"), model=str(llava_dir), methods=["visionzip"],
                     limit=2, max_new_tokens=2)
    before = copy.deepcopy(cfg)
    results = run_eval(cfg)
    assert cfg == before and cfg.tokens is None
    assert results["config"]["tokens"] == [21, 14, 7], "results.json records the budgets resolved"
    assert [r["key"] for r in results["runs"]] == ["vanilla", "visionzip@21", "visionzip@14", "visionzip@7"]
    assert run_eval(cfg)["runs"] == results["runs"] and cfg == before


def test_a_second_eval_into_a_folder_being_written_is_refused_at_once(llava_dir, data_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from vlmzip.eval import loop, runner

    out = tmp_path / "ev"
    out.mkdir()
    cfg = EvalConfig(data=str(data_dir), out=str(out), model=str(llava_dir), methods=["vanilla"], limit=2,
                     max_new_tokens=2)
    real_load = loop.load_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model is loaded although the folder is locked")

    monkeypatch.setattr(loop, "load_model", no_model)
    with (out / ".lock").open("w") as first:  # an eval that is writing to the folder holds its lock
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another vlmzip eval is writing to this folder") as info:
            run_eval(cfg)
        assert "wait until it has finished and rerun this command" in str(info.value)
        assert "pass another --out folder" in str(info.value)
        argv = ["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(out), *ARGS]
        assert main(argv) == 2
        assert f"--out {out}: another vlmzip eval is writing to this folder" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".lock"], "the refused evals wrote nothing"
    monkeypatch.setattr(loop, "load_model", real_load)

    def crash(*args, **kwargs):
        raise RuntimeError("crashed mid-run")

    monkeypatch.setattr(runner, "answer_batch", crash)
    with pytest.raises(RuntimeError, match="crashed mid-run"):
        run_eval(cfg)  # an eval that crashed leaves the folder free
    monkeypatch.undo()
    assert run_eval(cfg)["n_questions"] == 2
    with (out / ".lock").open("w") as after:  # and free once an eval has finished
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_folder_holding_only_the_lock_is_an_evaluation_folder(llava_dir, data_dir, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / ".lock").touch()  # left by an eval stopped before it wrote identity.json
    assert evaluate(llava_dir, data_dir, out, "--methods", "vanilla") == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "identity.json", "plot.png", "predictions",
                                                     "results.json", "table.md"]


def test_the_eval_modules_import_each_other_one_way():
    """No import circle between the modules of vlmzip.eval, imports inside functions included."""
    folder = Path(__file__).resolve().parents[1] / "vlmzip" / "eval"
    graph = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlmzip.eval."):
                names.add(node.module.split(".")[2])
        graph[path.stem] = {n.split(".")[0] for n in names}
    assert "multiturn" in graph["runner"] and "loop" in graph["multiturn"]

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for name in graph.get(todo.pop(), ()):
                if name not in seen:
                    seen.add(name)
                    todo.append(name)
        return seen

    circles = sorted(m for m in graph if m in reachable(m))
    assert circles == [], f"modules on an import circle: {circles}"
