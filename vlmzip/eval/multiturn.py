"""``vlmzip eval --multi-turn``: two questions about different objects of one image, in one conversation.

Turn 1 asks the first question as the normal eval does. Turn 2 continues the same conversation the way a
Hugging Face chat does: its prompt is turn 1's prompt + the answer the model gave + the chat template's
next user turn with the second question, and ``generate`` resumes from turn 1's KV cache (only the new
tokens are computed; a compressed model maps them onto the cached, shrunk prompt). So whatever a method
chose while reading question 1 is what question 2 sees: the argument of the VisionZip paper (Yang et al.,
"VisionZip: Longer is Better but Not Necessary in Vision Language Models", arXiv:2412.04467, Fig. 7) that
text-guided in-LLM pruning (FastV, SparseVLM) hurts a second question while VisionZip's text-agnostic
selection does not.

Conversations (``conversations``): for each image of the dataset, the first pair of its questions, in
file order, whose target objects (``question_targets``, read from the lab record's scene graph) are both
known and disjoint. Batches pad on the left for turn 1; in turn 2 each row's follow-up is padded in the
middle (masked out), after turn 1's tokens, so every row keeps the cache's columns.

The evaluation (``ConversationTask``) runs through the loop of every ``vlmzip eval`` (``vlmzip.eval.loop``):
resumable, and data-parallel under ``torchrun`` / ``accelerate launch``. A predictions line holds the
conversation's id, both turns (question id, prediction, gold answers, type, subtype) and the run;
results.json has per run ``turn1`` and ``turn2`` scores; table.md is ``multi_turn_table``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import batch_inputs
from ..lab import scenes
from .format import Record, load_image
from .loop import Task
from .outdir import write_atomically
from .report import notes_lines, token_cell
from .scorers import score_records

_PLURALS = {plural: shape for shape, plural in scenes.SHAPE_PLURALS.items()}
_SENTINEL = "\u0000ANSWER\u0000"


@dataclass(frozen=True)
class Conversation:
    """Two questions about different objects of one image, asked in this order."""

    first: Record
    second: Record

    @property
    def id(self) -> str:
        return f"{self.first.id}+{self.second.id}"


def question_targets(record: Record) -> frozenset[str]:
    """The scene objects a lab question is about: ``"o<i>"`` (index in the record's scene) or ``"text"``.

    Empty when the record has no scene graph, the question is no lab template, or it names nothing in the
    image (a presence question answered "no", a count of 0). A count of all objects targets all of them.
    """
    scene_dict = record.extra.get("scene")
    if not isinstance(scene_dict, dict):
        return frozenset()
    objs = list(scenes.Scene.from_dict(scene_dict).objects)
    q = record.question.strip().lower()

    def where(test: Any) -> frozenset[str]:
        return frozenset(f"o{i}" for i, o in enumerate(objs) if test(o))

    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
        return where(lambda o: o.color == m[1] and o.shape == m[2])
    if q == "how many objects are there?":
        return where(lambda o: True)
    if m := re.fullmatch(r"how many (\w+) objects are there\?", q):
        return where(lambda o: o.color == m[1])
    if (m := re.fullmatch(r"how many (\w+) are there\?", q)) and m[1] in _PLURALS:
        return where(lambda o: o.shape == _PLURALS[m[1]])
    if m := re.fullmatch(r"what color is the (small )?(\w+)\?", q):
        return where(lambda o: o.shape == m[2] and (not m[1] or o.size == "small"))
    if m := re.fullmatch(r"what shape is the (small )?(\w+) object\?", q):
        return where(lambda o: o.color == m[2] and (not m[1] or o.size == "small"))
    if m := re.fullmatch(r"is the (\w+) (\w+) (?:to the left of|to the right of|above|below) the (\w+) (\w+)\?", q):
        return where(lambda o: (o.color, o.shape) in ((m[1], m[2]), (m[3], m[4])))
    if re.fullmatch(r"what (word|number) is written in the image\?", q):
        return frozenset({"text"})
    return frozenset()


def conversations(records: list[Record]) -> list[Conversation]:
    """Per image (in order of first appearance), the first pair of its questions (in file order) about
    known, disjoint sets of objects; images with no such pair are left out."""
    by_image: dict[Path, list[Record]] = {}
    for record in records:
        by_image.setdefault(record.image_path, []).append(record)
    found = []
    for group in by_image.values():
        targets = [question_targets(r) for r in group]
        pair = next(
            ((i, j) for i in range(len(group)) for j in range(i + 1, len(group))
             if targets[i] and targets[j] and not targets[i] & targets[j]),
            None,
        )
        if pair is not None:
            found.append(Conversation(group[pair[0]], group[pair[1]]))
    return found


def follow_up_text(processor: Any, question: str) -> str:
    """What the chat template puts after the assistant's answer of turn 1 up to the turn-2 generation
    prompt (e.g. ``"</s> USER: What color is the star? ASSISTANT:"``)."""
    template = getattr(processor, "chat_template", None)
    if not template:
        eos = processor.tokenizer.eos_token or ""
        return f"{eos} USER: {question} ASSISTANT:"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return text.split(_SENTINEL, 1)[1]


def _answer_ends(generated: torch.Tensor, eos: set[int]) -> list[int]:
    """(B, G) generated ids -> per row the length of its answer, its first end-of-sequence token included."""
    ends = []
    for row in generated.tolist():
        ends.append(next((i + 1 for i, t in enumerate(row) if t in eos), len(row)))
    return ends


def _eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@torch.no_grad()
def answer_conversations(
    model: nn.Module, processor: Any, batch: list[Conversation], max_new_tokens: int, reuse_cache: bool = True
) -> list[tuple[str, str]]:
    """Greedy (turn 1, turn 2) answers of a batch of conversations, decoded without special tokens.

    Turn 2's ids are turn 1's (B, L1) sequences, then per row its follow-up (``follow_up_text``, less a
    leading end-of-sequence token when the answer already ended with one), padded in the middle; answer
    tokens after an end-of-sequence token and the middle padding are masked out. With ``reuse_cache``
    turn 2 continues turn 1's KV cache; without, it is computed from scratch from those ids and the images
    (for in-LLM methods that re-chooses the tokens for question 2).
    """
    images = [load_image(c.first) for c in batch]
    inputs = batch_inputs(processor, images, [c.first.question for c in batch], model)
    prompt_len = inputs["input_ids"].shape[1]
    turn1 = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    seq = turn1.sequences
    eos = _eos_ids(model)
    ends = _answer_ends(seq[:, prompt_len:], eos)
    eos_text = processor.tokenizer.eos_token or ""
    follow = []
    for c, end, row in zip(batch, ends, seq[:, prompt_len:].tolist(), strict=True):
        text = follow_up_text(processor, c.second.question)
        if end and row[end - 1] in eos and eos_text and text.startswith(eos_text):
            text = text[len(eos_text):]
        follow.append(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    width = max(len(f) for f in follow)
    pad = model.generation_config.pad_token_id or 0
    device = seq.device
    answer_mask = torch.tensor([[int(i < end) for i in range(seq.shape[1] - prompt_len)] for end in ends],
                               device=device, dtype=inputs["attention_mask"].dtype)
    tail_ids = torch.tensor([[pad] * (width - len(f)) + f for f in follow], device=device, dtype=seq.dtype)
    tail_mask = torch.tensor([[0] * (width - len(f)) + [1] * len(f) for f in follow], device=device,
                             dtype=answer_mask.dtype)
    ids = torch.cat([seq, tail_ids], dim=1)
    mask = torch.cat([inputs["attention_mask"], answer_mask, tail_mask], dim=1)
    if reuse_cache:
        turn2 = model.generate(input_ids=ids, attention_mask=mask, cache=turn1.cache,
                               max_new_tokens=max_new_tokens, do_sample=False)
    else:
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        turn2 = model.generate(input_ids=ids, attention_mask=mask, **extra, max_new_tokens=max_new_tokens,
                               do_sample=False)
    first = processor.batch_decode(seq[:, prompt_len:], skip_special_tokens=True)
    second = processor.batch_decode(turn2[:, ids.shape[1]:], skip_special_tokens=True)
    return [(a.strip(), b.strip()) for a, b in zip(first, second, strict=True)]


def multi_turn_table(results: dict[str, Any]) -> str:
    """Markdown: per run, turn-1 and turn-2 accuracy (% of vanilla's same turn), turn 2's drop from
    vanilla's turn 2 in points, and turn 2's retention minus turn 1's (negative: question 2 suffers more)."""
    runs = results["runs"]
    ref1, ref2 = (runs[0][t]["accuracy"] for t in ("turn1", "turn2"))

    def pct(value: float, ref: float) -> float | None:
        return 100 * value / ref if ref > 0 else None

    how = ("recomputed from the full two-turn prompt and the image" if results["config"].get("turn2_from_scratch")
           else "continuing turn 1's KV cache")
    lines = [
        f"Data: {results['config']['data']} ({results['n_conversations']} two-turn conversations, turn 2 "
        f"{how}); model: {results['identity']['model']}; scorer: "
        f"{results['config']['match']} match.",
        "Cells: accuracy over conversations (% of vanilla's same turn). Drop: vanilla's turn 2 minus this turn 2, "
        "in points. t2 - t1: turn-2 retention minus turn-1 retention, in points (negative: the second question "
        "suffers more than the first).",
        "",
        "| Method | Tokens | Turn 1 | Turn 2 | Turn-2 drop vs vanilla | t2 - t1 |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        a1, a2 = run["turn1"]["accuracy"], run["turn2"]["accuracy"]
        p1, p2 = pct(a1, ref1), pct(a2, ref2)
        cells = [f"{100 * a:.1f} ({'n/a' if p is None else f'{p:.1f}%'})" for a, p in ((a1, p1), (a2, p2))]
        delta = "n/a" if p1 is None or p2 is None else f"{p2 - p1:+.1f}"
        lines.append(f"| {run['method']} | {token_cell(run)} | {cells[0]} | {cells[1]} | "
                     f"{100 * (ref2 - a2):+.1f} | {delta} |")
    return "\n".join(lines + notes_lines(runs)) + "\n"


class ConversationTask(Task[Conversation]):
    """Two questions about different objects of one image per item, turn 2 on turn 1's KV cache (or, with
    ``turn2_from_scratch``, recomputed from its full prompt and the image: the control); each turn scored
    by ``score_records``; reports table.md (``multi_turn_table``)."""

    unit = "conversation"
    bar_unit = "conv"
    label = "vlmzip eval --multi-turn"
    count_key = "n_conversations"

    def __init__(self, turn2_from_scratch: bool = False) -> None:
        self.turn2_from_scratch = turn2_from_scratch

    def items(self, dataset: list[Record], data: str) -> list[Conversation]:
        """The dataset's conversations (``conversations``); ValueError when it has none."""
        if any(r.is_video for r in dataset):
            raise ValueError(f"--data {data}: --multi-turn evaluates conversations about images; this dataset has "
                             "questions about videos (evaluate it without --multi-turn)")
        found = conversations(dataset)
        if not found:
            raise ValueError(f"--data {data}: no image has two questions about different objects (the lab "
                             "datasets' records carry a scene graph; other datasets cannot be paired)")
        return found

    def answer(
        self, model: nn.Module, processor: Any, batch: list[Conversation], max_new_tokens: int
    ) -> list[dict[str, Any]]:
        """Per conversation, each turn's question id, prediction, gold answers, type and subtype."""
        answered = answer_conversations(model, processor, batch, max_new_tokens,
                                        reuse_cache=not self.turn2_from_scratch)
        return [{"turn1": _turn(c.first, a1), "turn2": _turn(c.second, a2)}
                for c, (a1, a2) in zip(batch, answered, strict=True)]

    def score(self, rows: list[dict[str, Any]], match: str, vocabulary: Mapping[str, set[str]]) -> dict[str, Any]:
        """``{"turn1": score_records(...), "turn2": score_records(...)}``."""
        return {t: score_records([r[t] for r in rows], match=match, vocabulary=vocabulary) for t in ("turn1", "turn2")}

    def write_reports(self, results: dict[str, Any], out: Path) -> None:
        """table.md (``multi_turn_table``)."""
        write_atomically(out / "table.md", lambda p: p.write_text(multi_turn_table(results)))

    def identity(self) -> dict[str, Any]:
        """``multi_turn``, and ``turn2_from_scratch`` when set: another evaluation than the cached one."""
        return {"multi_turn": True, **({"turn2_from_scratch": True} if self.turn2_from_scratch else {})}

    def flags(self) -> dict[str, Any]:
        """``{"multi_turn": True}``."""
        return {"multi_turn": True}


def _turn(record: Record, prediction: str) -> dict[str, Any]:
    """One turn of a predictions line."""
    return {"id": record.id, "prediction": prediction, "answers": record.answers, "type": record.type,
            "subtype": record.subtype}
