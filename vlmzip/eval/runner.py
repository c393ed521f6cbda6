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

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..io import ContextError, generate_answers, takes_videos
from ..video import DEFAULT_FRAMES, frame_knobs
from .data import video_frames
from .distributed import launched
from .format import Record, load_visual
from .loop import Task, evaluate_task
from .multiturn import ConversationTask
from .outdir import write_atomically
from .report import plot_accuracy, retention_table
from .runs import EvalConfig, check_config
from .scorers import score_records


def answer_batch(model: nn.Module, processor: Any, records: list[Record], max_new_tokens: int,
                 frames: int | None = None) -> list[str]:
    """Greedy answers to a batch of questions (one image or video each; ``frames`` sampled per video),
    decoded without special tokens."""
    visuals = [load_visual(r, frames or DEFAULT_FRAMES) for r in records]
    return generate_answers(model, processor, visuals, [r.question for r in records], max_new_tokens)


class QuestionTask(Task[Record]):
    """One question about one image or video per item, scored by ``score_records``; reports table.md and
    plot.png. ``frames``: frames sampled per video (None: a dataset of images only)."""

    unit = "question"
    bar_unit = "q"
    label = "vlmzip eval"
    count_key = "n_questions"

    def __init__(self, frames: int | None = None) -> None:
        self.frames = frames
        self.has_videos = False
        self.warned = False

    def items(self, dataset: list[Record], data: str) -> list[Record]:
        """Every question of the dataset, in file order."""
        self.has_videos = any(r.is_video for r in dataset)
        return dataset

    def identity(self) -> dict[str, Any]:
        """The frames sampled per video, for a dataset with videos."""
        return {"frames": self.frames} if self.has_videos else {}

    def video_frames(self, items: Sequence[Record]) -> int | None:
        """The frames per video when every question is about a video."""
        return self.frames if items and all(r.is_video for r in items) else None

    def knobs(self, model: nn.Module, item: Record, knobs: dict[str, Any]) -> dict[str, Any]:
        """A video sent to the model as images: its budget split over its frames (``frame_knobs``); an image
        budgeted per frame (``tokens_per_frame``): as one frame."""
        if item.is_video and not takes_videos(model):
            return frame_knobs(knobs, self.frames or 1)
        if not item.is_video and "tokens_per_frame" in knobs and not takes_videos(model):
            return frame_knobs(knobs, 1)
        return knobs

    def answer(
        self, model: nn.Module, processor: Any, batch: list[Record], max_new_tokens: int
    ) -> list[dict[str, Any]]:
        """Per question: the prediction, the gold answers, the type and the subtype. A question about a video whose
        prompt does not fit the model's context (too many frames for a vanilla model) gets an empty prediction,
        scored wrong, and says why under ``over_context``; an image's raises, as before any answer."""
        try:
            answers = self._answers(model, processor, batch, max_new_tokens)
            return [{"prediction": prediction, "answers": r.answers, "type": r.type, "subtype": r.subtype}
                    for r, prediction in zip(batch, answers, strict=True)]
        except ContextError:
            if not any(r.is_video for r in batch):
                raise
        rows = []
        for r in batch:  # one at a time: which of them do not fit
            row = {"answers": r.answers, "type": r.type, "subtype": r.subtype}
            try:
                row["prediction"] = self._answers(model, processor, [r], max_new_tokens)[0]
            except ContextError as err:
                if not r.is_video:
                    raise
                row.update(prediction="", over_context=str(err))
                if not self.warned:
                    warnings.warn(f"question {r.id}: {err}; such questions get an empty answer, scored wrong",
                                  stacklevel=2)
                    self.warned = True
            rows.append({"prediction": row.pop("prediction"), **row})
        return rows

    def _answers(self, model: nn.Module, processor: Any, batch: list[Record], max_new_tokens: int) -> list[str]:
        if any(r.is_video for r in batch):
            return answer_batch(model, processor, batch, max_new_tokens, frames=self.frames)
        return answer_batch(model, processor, batch, max_new_tokens)

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
    if cfg.multi_turn:
        task: Task[Any] = ConversationTask(cfg.turn2_from_scratch)
    else:
        task = QuestionTask(video_frames(cfg.data, cfg.frames))
    with launched() as procs:
        return evaluate_task(cfg, task, procs)
