"""Compositions spelled "first@N+second": parsing, the list form they expand to, and `vlmzip eval` / `run`
with one, equal to the same stages given to `vlmzip.compress` as a list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlmzip
from vlmzip.cli import main
from vlmzip.compose import expand, parse
from vlmzip.eval.format import load_folder
from vlmzip.eval.loop import batches
from vlmzip.eval.runner import answer_batch
from vlmzip.io import load_model
from vlmzip.lab.scenes import write_split

COMPOSITION = "visionzip@128+fastv"
STAGES = [("visionzip", {"tokens": 57}), ("fastv", {"tokens": 28})]  # 128 and 64 of 576 as shares of 256


@pytest.fixture(scope="module")
def lab():
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4 images of lab-test-small (same ids, questions and pixels)."""
    out = tmp_path_factory.mktemp("data") / "test-small4"
    write_split("test-small", out, n_images=4)
    return out


def test_parse_and_expand_map_the_earlier_budget_from_the_papers_576(lab):
    model, _ = lab
    assert parse(COMPOSITION) == [("visionzip", 128), ("fastv", None)]
    assert expand(COMPOSITION, {"tokens": 28}, patches=256) == (STAGES, {})
    assert expand("visionzip", {"tokens": 5}, patches=256) == ("visionzip", {"tokens": 5})  # not a composition
    planned = vlmzip.plan(model, COMPOSITION, tokens=28)
    assert (planned.tokens, planned.final_tokens, planned.layer_avg_tokens) == (57, 28, (57 * 2 + 28 * 2) / 4)
    assert planned.method == "visionzip+fastv"


@pytest.mark.parametrize(
    ("method", "knobs", "message"),
    [
        ("visionzip+fastv", {"tokens": 28}, "needs its budget as visionzip@N"),
        ("nosuch@64+fastv", {}, "unknown method 'nosuch'"),
        ("visionzip@0+fastv", {"tokens": 28}, "must be >= 1"),
        ("visionzip@@1+fastv", {}, "cannot read stage"),
        ("visionzip@128+fastv@64", {"tokens": 28}, "fixes its budget with @64"),
        ("fastv@64+visionzip", {"tokens": 28}, "list pre-LLM methods before in-LLM ones"),
        (COMPOSITION, {"tokens": 100}, "larger than the 57"),
    ],
)
def test_bad_compositions_say_what_is_wrong(lab, method, knobs, message):
    with pytest.raises(ValueError, match=message):
        vlmzip.plan(lab[0], method, **knobs)


def test_eval_of_a_composition_equals_compress_with_the_stage_list(lab, small_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--data", str(small_dir), "--out", str(out), "--methods", COMPOSITION, "--tokens", "85,28",
            "--limit", "6", "--batch-size", "4", "--max-new-tokens", "4"]
    with pytest.warns(UserWarning, match="skipping budget 85"):  # more than the 57 VisionZip sends
        assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["vanilla", f"{COMPOSITION}@28"]
    run = results["runs"][1]
    assert (run["budget"], run["sent_tokens"], run["tokens"], run["layer_avg_tokens"]) == (28, 57, 28, 42.5)
    assert "| visionzip@128+fastv | 28 (sent 57, final 28, layer avg 42.5) |" in (out / "table.md").read_text()
    rows = [json.loads(line) for line in (out / "predictions" / f"{COMPOSITION}@28.jsonl").read_text().splitlines()]

    model, processor = lab
    records = load_folder(small_dir)[:6]
    with vlmzip.compressed(model, STAGES):
        expected = [a for chunk in batches(records, 4) for a in answer_batch(model, processor, chunk, 4)]
    assert [r["prediction"] for r in rows] == expected
    assert [r["id"] for r in rows] == [r.id for r in records]

def test_run_accepts_a_composition(capsys):
    code = main(["run", "--method", COMPOSITION, "--tokens", "28", "--repeats", "1", "--max-new-tokens", "2"])
    assert code == 0
    assert "visual tokens per image: 256 -> 28" in capsys.readouterr().out


def test_seed_000_table_5_composition_plans_and_groups_by_its_nominal_budget(lab):
    from vlmzip.eval.report import retention_table
    from vlmzip.eval.runs import plan_runs

    runs = plan_runs(lab[0], ["visionzip@128+sparsevlm", "sparsevlm"], [28])
    composed, alone = runs[1], runs[2]
    assert (composed.key, composed.budget, composed.sent_tokens) == ("visionzip@128+sparsevlm@28", 28, 57)
    planned = vlmzip.plan(lab[0], [("visionzip", {"tokens": 57}), ("sparsevlm", {"tokens": 28})])
    assert (composed.tokens, composed.layer_avg_tokens) == (planned.final_tokens, planned.layer_avg_tokens)
    assert alone.tokens != 28 and alone.budget == 28  # SparseVLM's schedule ends elsewhere than its budget
    scores = {"per_type": {"color": {"accuracy": 0.5}}, "macro_accuracy": 0.5}
    results = {"config": {"data": "d", "match": "exact"}, "identity": {"model": "m"}, "n_questions": 1,
               "runs": [{**vars(run), "scores": scores} for run in runs]}
    table = retention_table(results)
    assert table.count("**Retain 28 tokens") == 1  # both under their nominal budget, not their final count
    assert f"| sparsevlm | 28 (sent 256, final {alone.tokens}, layer avg {alone.layer_avg_tokens:.1f}) |" in table


def test_bracketed_knobs_and_method_lists_parse_as_written() -> None:
    from vlmzip.knobs import split_knobs, split_methods

    assert split_knobs("cluster_saliency[variant=2, share=0.5]") == ("cluster_saliency", {"variant": 2, "share": 0.5})
    assert split_knobs("sparsevlm[version=2.0,recycle=none,keep_positions=false]") == (
        "sparsevlm", {"version": 2.0, "recycle": "none", "keep_positions": False})
    assert split_knobs("visionzip@128+fastv[layer=1]") == ("visionzip@128+fastv", {"layer": 1})
    assert split_knobs("tome") == ("tome", {})
    for bad in ("tome[", "tome[r]", "tome[=1]", "tome[a=1]x", "to[m]e[a=1]"):
        with pytest.raises(ValueError, match="method\\[key=value"):
            split_knobs(bad)
    assert split_methods("vanilla, a[x=1,y=2] ,b,,c[z=3]") == ["vanilla", "a[x=1,y=2]", "b", "c[z=3]"]
