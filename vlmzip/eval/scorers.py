"""Answer scorers: VQA-style normalisation, exact match, POPE metrics and a per-type summary.

Default metric: ``exact_match`` = 1.0 iff the normalised prediction equals one of the normalised answers.
``relaxed_match`` also accepts a prediction that *starts* with a whole answer ("yes, there is" for
"yes", "2 circles" for "2"); use it for chatty models, and say so when reporting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

ARTICLES = frozenset({"a", "an", "the"})
UNITS: dict[str, int] = {
    "zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
TENS: dict[str, int] = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip


def _numbers_to_digits(tokens: list[str]) -> list[str]:
    """Number words -> digits: "two" -> "2", "twenty one" -> "21" (0-99), "none" -> "0"."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in TENS:
            value = TENS[tok]
            if i + 1 < len(tokens) and tokens[i + 1] in UNITS and 0 < UNITS[tokens[i + 1]] < 10:
                value += UNITS[tokens[i + 1]]
                i += 1
            out.append(str(value))
        elif tok in UNITS:
            out.append(str(UNITS[tok]))
        else:
            out.append(tok)
        i += 1
    return out


def normalize_answer(s: str) -> str:
    """VQA-style normalisation of an answer or prediction.

    Keeps the first non-empty line; lower-cases; removes thousands commas ("1,000" -> "1000") and
    apostrophes; turns other punctuation into spaces, except a period between digits ("3.5"); drops the
    articles a/an/the; maps number words to digits ("Two." -> "2", "twenty-one" -> "21"); collapses
    whitespace.
    """
    lines = [line for line in str(s).splitlines() if line.strip()]
    text = lines[0].strip().lower() if lines else ""
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"['\u2019`]", "", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    text = re.sub(r"[^\w\s.]|_", " ", text)
    tokens = [t for t in text.split() if t not in ARTICLES]
    return " ".join(_numbers_to_digits(tokens))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def relaxed_match(prediction: str, answers: Sequence[str]) -> float:
    """Like ``exact_match``, but also 1.0 if the normalised prediction starts with a whole answer."""
    pred = normalize_answer(prediction)
    for answer in answers:
        a = normalize_answer(answer)
        if a and (pred == a or pred.startswith(a + " ")):
            return 1.0
    return 0.0


MATCHERS: dict[str, Callable[[str, Sequence[str]], float]] = {"exact": exact_match, "relaxed": relaxed_match}


def is_yes(prediction: str) -> bool:
    """POPE reading of a prediction: yes iff its normalised first word is "yes"; anything else is no."""
    words = normalize_answer(prediction).split()
    return bool(words) and words[0] == "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE binary metrics with "yes" as the positive class.

    ``labels`` must normalise to "yes" or "no". A prediction counts as yes iff ``is_yes`` (first word
    "yes"); everything else, including empty or off-topic output, counts as no. Returns n, tp, fp, tn, fn,
    accuracy, precision, recall, f1 and yes_ratio (share of yes predictions); a ratio with a zero
    denominator is 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    tp = fp = tn = fn = 0
    for prediction, label in zip(predictions, labels, strict=True):
        gold = normalize_answer(label)
        if gold not in ("yes", "no"):
            raise ValueError(f"POPE label must be yes or no, got {label!r}")
        pred_yes = is_yes(prediction)
        if gold == "yes":
            tp += pred_yes
            fn += not pred_yes
        else:
            fp += pred_yes
            tn += not pred_yes
    n = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
    }


def _unpack(item: Any) -> tuple[str, list[str], str, str | None]:
    """(prediction, answers, type, subtype) from a (record, prediction) pair or a mapping."""
    if isinstance(item, Mapping):
        extra = item.get("extra") or {}
        subtype = item.get("subtype", extra.get("subtype"))
        return str(item["prediction"]), list(item["answers"]), str(item["type"]), subtype
    record, prediction = item
    subtype = getattr(record, "extra", {}).get("subtype")
    return str(prediction), list(record.answers), str(record.type), subtype


def answer_vocabulary(records: Iterable[Any]) -> dict[str, set[str]]:
    """Every normalised gold answer of each question type: ``{type: {answer, ...}}``.

    ``records``: ``Record`` objects or mappings with ``answers`` and ``type``. Pass the whole dataset to
    ``score_records(vocabulary=...)`` when scoring a subset of it.
    """
    vocabulary: dict[str, set[str]] = {}
    for record in records:
        if isinstance(record, Mapping):
            answers, qtype = record["answers"], record["type"]
        else:
            answers, qtype = record.answers, record.type
        vocabulary.setdefault(str(qtype), set()).update(normalize_answer(a) for a in answers)
    return vocabulary


def score_records(
    items: Iterable[Any], match: str = "exact", vocabulary: Mapping[str, set[str]] | None = None
) -> dict[str, Any]:
    """Accuracy summary of predictions.

    ``items``: ``(Record, prediction)`` pairs, or mappings with ``prediction``, ``answers``, ``type`` and
    optionally ``subtype``. ``match``: "exact" (default) or "relaxed". Returns::

        {"n": int, "accuracy": mean over questions, "macro_accuracy": mean of per-type accuracies,
         "per_type": {type: {"n", "accuracy"}}, "per_subtype": {"type/subtype": {"n", "accuracy"}},
         "off_vocabulary": share of predictions that are no valid answer of their type (see below),
         "pope": {"all": pope_metrics, "random": ..., "popular": ..., "adversarial": ...}}

    ``off_vocabulary`` tells a wrong answer from an answer out of format (a shape question answered
    "yes"): a model that breaks under compression shows it there before it shows in accuracy. The
    vocabulary of a type is every normalised gold answer of the type among ``items``, plus
    ``vocabulary[type]`` when given. Pass every valid answer of the dataset when ``items`` are a subset of it
    (``vlmzip eval`` passes ``vlmzip.eval.data.dataset_vocabulary``: for a lab split every answer the
    benchmark can have, for a dataset folder its gold answers): without it, a valid answer that is gold for
    no question of the subset counts as out of vocabulary.

    ``pope`` (POPE metrics over presence questions whose answer is yes/no, overall and per subtype) is
    present only when there are such questions. Empty input gives n = 0 and accuracies 0.0.
    """
    if match not in MATCHERS:
        raise ValueError(f"unknown match {match!r}; known: {sorted(MATCHERS)}")
    matcher = MATCHERS[match]
    scores: dict[str, list[float]] = {}
    sub_scores: dict[str, list[float]] = {}
    all_scores: list[float] = []
    unpacked = [_unpack(item) for item in items]
    for prediction, answers, qtype, subtype in unpacked:
        score = matcher(prediction, answers)
        all_scores.append(score)
        scores.setdefault(qtype, []).append(score)
        if subtype is not None:
            sub_scores.setdefault(f"{qtype}/{subtype}", []).append(score)

    def summary(values: list[float]) -> dict[str, Any]:
        return {"n": len(values), "accuracy": _ratio(sum(values), len(values))}

    per_type = {t: summary(v) for t, v in sorted(scores.items())}
    result: dict[str, Any] = {
        "n": len(all_scores),
        "accuracy": _ratio(sum(all_scores), len(all_scores)),
        "macro_accuracy": _ratio(sum(s["accuracy"] for s in per_type.values()), len(per_type)),
        "per_type": per_type,
        "per_subtype": {k: summary(v) for k, v in sorted(sub_scores.items())},
        "off_vocabulary": _off_vocabulary(unpacked, vocabulary),
    }
    pope = _pope(unpacked)
    if pope:
        result["pope"] = pope
    return result


def _off_vocabulary(
    unpacked: list[tuple[str, list[str], str, str | None]], vocabulary: Mapping[str, set[str]] | None
) -> float:
    """Share of predictions that are no answer of their type: no gold answer of the type among the items,
    nor in ``vocabulary[type]``."""
    vocab = answer_vocabulary({"answers": a, "type": t} for _, a, t, _ in unpacked)
    for qtype, answers in (vocabulary or {}).items():
        vocab[qtype] = vocab.get(qtype, set()) | set(answers)
    off = sum(normalize_answer(p) not in vocab[t] for p, _, t, _ in unpacked)
    return _ratio(off, len(unpacked))


def _pope(unpacked: list[tuple[str, list[str], str, str | None]]) -> dict[str, dict[str, float]]:
    """POPE metrics of the presence questions answered yes/no: over all ("all") and per subtype."""
    pope_items: dict[str, tuple[list[str], list[str]]] = {}
    for prediction, answers, qtype, subtype in unpacked:
        if qtype == "presence" and normalize_answer(answers[0]) in ("yes", "no"):
            for key in ("all", subtype) if subtype else ("all",):
                preds, labels = pope_items.setdefault(key, ([], []))
                preds.append(prediction)
                labels.append(answers[0])
    return {k: pope_metrics(*v) for k, v in pope_items.items()}


__all__ = [
    "ARTICLES", "MATCHERS", "answer_vocabulary", "exact_match", "is_yes", "normalize_answer", "pope_metrics",
    "relaxed_match", "score_records",
]  # fmt: skip
