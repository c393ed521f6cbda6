"""``vlmzip eval``: model + methods x budgets -> raw predictions, scores, retention table and plot.

The unit of work is one question about one image (``QuestionTask``); with ``--multi-turn`` it is a two-turn
conversation (``vlmzip.eval.multiturn.ConversationTask``). Both run through the same loop
(``vlmzip.eval.loop``): resumable, data-parallel under ``torchrun`` / ``accelerate launch``, one evaluation
per output folder (``vlmzip.eval.outdir``).

A question run writes ``OUT/predictions/<run>.jsonl`` (one line per question: id, prediction, gold answers,
type, subtype, run), results.json (per run its ``scores``: ``vlmzip.eval.scorers.score_records``),
table.md (``retention_table``) and plot.png (``plot_accuracy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..io import generate_answers
from .distributed import launched
from .format import Record, load_image
from .loop import Task, evaluate_task
from .multiturn import ConversationTask
from .outdir import write_atomically
from .report import plot_accuracy, retention_table
from .runs import EvalConfig, check_config
from .scorers import score_records


def answer_batch(model: nn.Module, processor: Any, records: list[Record], max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of questions (one image each), decoded without special tokens."""
    images = [load_image(r) for r in records]
    return generate_answers(model, processor, images, [r.question for r in records], max_new_tokens)


class QuestionTask(Task[Record]):
    """One question about one image per item, scored by ``score_records``; reports table.md and plot.png."""

    unit = "question"
    bar_unit = "q"
    label = "vlmzip eval"
    count_key = "n_questions"

    def items(self, dataset: list[Record], data: str) -> list[Record]:
        """Every question of the dataset, in file order."""
        return dataset

    def answer(
        self, model: nn.Module, processor: Any, batch: list[Record], max_new_tokens: int
    ) -> list[dict[str, Any]]:
        """Per question: the prediction, the gold answers, the type and the subtype."""
        answers = answer_batch(model, processor, batch, max_new_tokens)
        return [{"prediction": prediction, "answers": r.answers, "type": r.type, "subtype": r.subtype}
                for r, prediction in zip(batch, answers, strict=True)]

    def score(self, rows: list[dict[str, Any]], match: str, vocabulary: Mapping[str, set[str]]) -> dict[str, Any]:
        """``{"scores": score_records(rows)}``."""
        return {"scores": score_records(rows, match=match, vocabulary=vocabulary)}

    def write_reports(self, results: dict[str, Any], out: Path) -> None:
        """table.md (the retention table) and plot.png (accuracy vs visual tokens)."""
        write_atomically(out / "table.md", lambda p: p.write_text(retention_table(results)))
        write_atomically(out / "plot.png", lambda p: plot_accuracy(results, p))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` (questions, or with ``cfg.multi_turn`` two-turn conversations);
    write predictions, results.json and the reports; ``cfg`` itself is left unchanged.

    Started by ``torchrun`` / ``accelerate launch`` (``RANK`` / ``WORLD_SIZE`` in the environment), each
    process answers its share and rank 0 writes the results (``vlmzip.eval.loop``); every process returns
    them.
    """
    check_config(cfg)
    task = ConversationTask(cfg.turn2_from_scratch) if cfg.multi_turn else QuestionTask()
    with launched() as procs:
        return evaluate_task(cfg, task, procs)
