"""Tests of the answer scorers (vlmzip.eval.scorers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmzip.eval.format import Record
from vlmzip.eval.scorers import (
    answer_vocabulary,
    exact_match,
    is_yes,
    normalize_answer,
    pope_metrics,
    relaxed_match,
    score_records,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two.", "2"),
        ("two", "2"),
        ("Zero", "0"),
        ("twenty", "20"),
        ("Twenty-one", "21"),
        ("none", "0"),
        ("the red", "red"),
        ("A red circle.", "red circle"),
        ("An orange star!", "orange star"),
        ("Yes", "yes"),
        ("yes.\nBecause the circle is red.", "yes"),
        ("\n  Blue  \n", "blue"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("don't know", "dont know"),
        ("red, blue", "red blue"),
        ("  ", ""),
        ("", ""),
        ("42", "42"),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    ("prediction", "answers", "exact", "relaxed"),
    [
        ("Two.", ["2"], 1.0, 1.0),
        ("the red", ["red"], 1.0, 1.0),
        ("Yes", ["yes"], 1.0, 1.0),
        ("yes, there is", ["yes"], 0.0, 1.0),
        ("2 circles", ["2"], 0.0, 1.0),
        ("12", ["2"], 0.0, 0.0),
        ("reddish", ["red"], 0.0, 0.0),
        ("green", ["red", "green"], 1.0, 1.0),
        ("", ["red"], 0.0, 0.0),
    ],
)
def test_exact_and_relaxed_match(prediction: str, answers: list[str], exact: float, relaxed: float) -> None:
    assert exact_match(prediction, answers) == exact
    assert relaxed_match(prediction, answers) == relaxed


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_normalize_is_idempotent_and_matches_itself(s: str) -> None:
    n = normalize_answer(s)
    assert normalize_answer(n) == n
    assert exact_match(s, [s]) == 1.0
    assert "\n" not in n and n == n.strip()


def test_is_yes() -> None:
    assert is_yes("Yes.") and is_yes("yes, there is") and is_yes("YES")
    assert not is_yes("no") and not is_yes("") and not is_yes("I think yes") and not is_yes("yesterday")


def test_pope_metrics_hand_computed() -> None:
    # labels:      y    y    y     y    n    n     n   n
    # predictions: y    y    y     n    y    n     n   garbage (= no)
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    predictions = ["yes", "Yes.", "yes it is", "no", "yes", "No", "no.", "maybe"]
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["yes_ratio"] == pytest.approx(4 / 8)


def test_pope_metrics_zero_division_and_errors() -> None:
    empty = pope_metrics([], [])
    assert empty["n"] == 0 and empty["accuracy"] == 0.0 and empty["f1"] == 0.0
    all_no = pope_metrics(["no", "no"], ["no", "yes"])
    assert all_no["precision"] == 0.0 and all_no["recall"] == 0.0 and all_no["f1"] == 0.0
    assert all_no["accuracy"] == 0.5 and all_no["yes_ratio"] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="yes or no"):
        pope_metrics(["yes"], ["red"])


def record(i: int, qtype: str, answer: str, subtype: str | None = None) -> Record:
    extra = {} if subtype is None else {"subtype": subtype}
    return Record(f"q{i}", Path(f"/x/{i}.png"), "?", [answer], qtype, extra)


def test_score_records() -> None:
    pairs = [
        (record(0, "count", "2"), "two"),
        (record(1, "count", "3"), "4"),
        (record(2, "color", "red"), "Red."),
        (record(3, "presence", "yes", "random"), "yes"),
        (record(4, "presence", "no", "random"), "yes"),
        (record(5, "presence", "yes", "adversarial"), "yes"),
        (record(6, "presence", "no", "adversarial"), "no"),
    ]
    result = score_records(pairs)
    assert result["n"] == 7
    assert result["accuracy"] == pytest.approx(5 / 7)
    assert result["per_type"] == {
        "color": {"n": 1, "accuracy": 1.0},
        "count": {"n": 2, "accuracy": 0.5},
        "presence": {"n": 4, "accuracy": 0.75},
    }
    assert result["macro_accuracy"] == pytest.approx((1.0 + 0.5 + 0.75) / 3)
    assert result["off_vocabulary"] == pytest.approx(1 / 7)  # "4" is no count answer here; "two" -> "2" is
    assert result["per_subtype"]["presence/random"] == {"n": 2, "accuracy": 0.5}
    pope = result["pope"]
    assert set(pope) == {"all", "random", "adversarial"}
    assert pope["all"]["n"] == 4 and pope["all"]["yes_ratio"] == 0.75
    assert pope["random"]["precision"] == 0.5 and pope["adversarial"]["accuracy"] == 1.0


def test_score_records_mappings_relaxed_and_empty() -> None:
    rows = [
        {"prediction": "yes, there is", "answers": ["yes"], "type": "presence", "subtype": "popular"},
        {"prediction": "2 circles", "answers": ["2"], "type": "count"},
    ]
    assert score_records(rows)["accuracy"] == 0.0
    relaxed = score_records(rows, match="relaxed")
    assert relaxed["accuracy"] == 1.0 and relaxed["pope"]["popular"]["tp"] == 1
    empty = score_records([])
    assert empty == {"n": 0, "accuracy": 0.0, "macro_accuracy": 0.0, "per_type": {}, "per_subtype": {},
                     "off_vocabulary": 0.0}
    shape = [{"prediction": p, "answers": [a], "type": "shape"} for p, a in [("yes", "circle"), ("star", "circle"),
                                                                              ("Circle.", "star")]]
    assert score_records(shape)["off_vocabulary"] == pytest.approx(1 / 3)  # wrong "star" is still in format
    with pytest.raises(ValueError, match="unknown match"):
        score_records(rows, match="fuzzy")


def test_off_vocabulary_takes_the_whole_datasets_vocabulary() -> None:
    dataset = [record(0, "shape", "circle"), record(1, "shape", "star"), record(2, "count", "3")]
    subset = [(dataset[0], "star"), (dataset[2], "three"), (record(3, "color", "red"), "blue")]
    # alone, the subset knows no "star" shape: a valid wrong answer would count as out of format
    assert score_records(subset)["off_vocabulary"] == pytest.approx(2 / 3)
    vocabulary = answer_vocabulary(dataset)
    assert vocabulary == {"shape": {"circle", "star"}, "count": {"3"}}
    assert answer_vocabulary([{"answers": ["Two."], "type": "count"}]) == {"count": {"2"}}
    # with it, only "blue" (no color in the dataset's vocabulary, nor in the subset's) is out of format
    result = score_records(subset, vocabulary=vocabulary)
    assert result["off_vocabulary"] == pytest.approx(1 / 3)
    assert result["accuracy"] == score_records(subset)["accuracy"], "the vocabulary changes no score"
