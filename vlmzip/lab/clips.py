"""Procedural video benchmark: deterministic clips of coloured shapes that move, appear or change colour, and
one single-word question about each clip.

A clip is ``FRAMES`` (24) frames of 336 x 336 pixels drawn like the lab's scenes (``vlmzip.lab.scenes``: same
shapes, colours, background), a pure function of ``(seed, index)``: ``sample(seed, index)`` rebuilds any clip
on its own. All randomness goes through ``random.Random(f"vlmzip-lab-video:{seed}:{index}")`` and only its
``random()`` method, whose output CPython guarantees across versions.

Question types (``QUESTION_TYPES``), one per clip, rotating with the index; answers are words the lab model's
tokenizer can spell:

- ``direction`` "Where did the red circle move?" -> left / right / above / below: the object slides at least
  120 pixels along one axis over the clip (y grows downwards: "above" = moved up).
- ``appeared``  "How many objects appeared?" -> 1-4: objects appear one by one, each for the rest of the clip.
- ``first``     "Which shape appeared first?" -> a shape: two objects of different shapes appear, apart in time.
- ``color``     "What color did the square become?" -> a colour: the clip's only square changes colour once.

Every event happens between frames 3 and 21 of 24 and lasts to the end, with at least 4 frames between two
events of a ``first`` clip, so that uniform sampling of 6 or more frames (``vlmzip.video.sample_indices``: one
frame in every 4 of the 24) sees the state before and after each event. 0-2 other objects stand still.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..eval.format import write_dataset
from .scenes import COLOR_WEIGHTS, COLORS, SHAPE_WEIGHTS, SHAPES, Scene, SceneObject, render
from .scenes import _chance as chance
from .scenes import _choice as choice
from .scenes import _randint as randint
from .scenes import _weighted_choice as weighted_choice

GENERATOR_VERSION = "1"
SIZE = 336
FRAMES = 24  # frames per clip
DEFAULT_FRAMES = 6  # frames sampled per clip: 6 x 256 tokens fit the lab model's 2048-token context
FIRST_EVENT, LAST_EVENT = 3, 21  # events happen in these frames
FIRST_GAP = 4  # frames between the two appearances of a "first" clip
OBJECT_SIDE = (44, 70)
MOVE = 120  # pixels a "direction" object travels, at least
BORDER, GAP = 6, 8

CONFIG: dict[str, Any] = {"size": SIZE, "frames": FRAMES}  # what a cached split must have been written with
QUESTION_TYPES: tuple[str, ...] = ("direction", "appeared", "first", "color")
DIRECTIONS: tuple[str, ...] = ("left", "right", "above", "below")
TEMPLATES: dict[str, str] = {
    "direction": "Where did the {color} {shape} move?",
    "appeared": "How many objects appeared?",
    "first": "Which shape appeared first?",
    "color": "What color did the {shape} become?",
}
MAX_APPEARED = 4


@dataclass(frozen=True)
class Track:
    """One object over the clip: visible from frame ``start`` on, at ``bbox`` until it moves to ``end_bbox``
    (linearly over frames ``move_from`` .. ``FRAMES - 1``), drawn in ``color`` until frame ``recolor_at``, then in
    ``new_color``."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    start: int = 0
    end_bbox: tuple[int, int, int, int] | None = None
    recolor_at: int | None = None
    new_color: str | None = None

    def at(self, frame: int) -> SceneObject | None:
        """The object as frame ``frame`` shows it (None before it appears)."""
        if frame < self.start:
            return None
        box = self.bbox
        if self.end_bbox is not None:
            t = frame / (FRAMES - 1)
            box = tuple(round(a + (b - a) * t) for a, b in zip(self.bbox, self.end_bbox, strict=True))  # type: ignore[assignment]
        color = self.new_color if self.recolor_at is not None and frame >= self.recolor_at else self.color
        return SceneObject(self.shape, color or self.color, "large", box)


@dataclass(frozen=True)
class Clip:
    """A clip: its background level, its tracks, and its question."""

    background: int
    tracks: tuple[Track, ...]
    question: str
    answer: str
    type: str
    subtype: str

    def frame(self, number: int) -> Image.Image:
        """Frame ``number`` (0 .. FRAMES-1), RGB."""
        objects = tuple(o for o in (t.at(number) for t in self.tracks) if o is not None)
        return render(Scene(SIZE, SIZE, (self.background,) * 3, objects))

    def frames(self) -> list[Image.Image]:
        """Every frame of the clip, in order."""
        return [self.frame(i) for i in range(FRAMES)]


def answers_by_type() -> dict[str, tuple[str, ...]]:
    """Every answer a question of each type can have."""
    return {
        "direction": DIRECTIONS,
        "appeared": tuple(str(n) for n in range(1, MAX_APPEARED + 1)),
        "first": SHAPES,
        "color": tuple(COLORS),
    }


def _separated(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _box(rng: random.Random, w: int, h: int, taken: list[tuple[int, ...]]) -> tuple[int, int, int, int] | None:
    for _ in range(100):
        x0, y0 = randint(rng, BORDER, SIZE - BORDER - w), randint(rng, BORDER, SIZE - BORDER - h)
        box = (x0, y0, x0 + w, y0 + h)
        if all(_separated(box, other) for other in taken):
            return box
    return None


def _side(rng: random.Random) -> int:
    return randint(rng, *OBJECT_SIDE)


def _direction(rng: random.Random, taken: list[tuple[int, ...]]) -> tuple[list[Track], str, str] | None:
    shape, color = weighted_choice(rng, SHAPE_WEIGHTS), weighted_choice(rng, COLOR_WEIGHTS)
    direction = choice(rng, DIRECTIONS)
    side = _side(rng)
    travel = randint(rng, MOVE, SIZE - 2 * BORDER - side - 10)
    horizontal = direction in ("left", "right")
    swept = _box(rng, side + travel, side, taken) if horizontal else _box(rng, side, side + travel, taken)
    if swept is None:
        return None
    x0, y0, x1, y1 = swept
    near = (x0, y0, x0 + side, y0 + side)
    far = (x1 - side, y1 - side, x1, y1)
    start, end = (far, near) if direction in ("left", "above") else (near, far)
    taken.append(swept)
    track = Track(shape, color, start, end_bbox=end)
    return [track], TEMPLATES["direction"].format(color=color, shape=shape), direction


def _appeared(rng: random.Random, taken: list[tuple[int, ...]]) -> tuple[list[Track], str, str] | None:
    n = randint(rng, 1, MAX_APPEARED)
    tracks = []
    for _ in range(n):
        side = _side(rng)
        box = _box(rng, side, side, taken)
        if box is None:
            return None
        taken.append(box)
        start = randint(rng, FIRST_EVENT, LAST_EVENT)
        tracks.append(Track(weighted_choice(rng, SHAPE_WEIGHTS), weighted_choice(rng, COLOR_WEIGHTS), box, start))
    return tracks, TEMPLATES["appeared"], str(n)


def _first(rng: random.Random, taken: list[tuple[int, ...]]) -> tuple[list[Track], str, str] | None:
    a = choice(rng, SHAPES)
    b = choice(rng, [s for s in SHAPES if s != a])
    t1 = randint(rng, FIRST_EVENT, LAST_EVENT - FIRST_GAP)
    t2 = randint(rng, t1 + FIRST_GAP, LAST_EVENT)
    tracks = []
    for shape, start in ((a, t1), (b, t2)):
        side = _side(rng)
        box = _box(rng, side, side, taken)
        if box is None:
            return None
        taken.append(box)
        tracks.append(Track(shape, weighted_choice(rng, COLOR_WEIGHTS), box, start))
    return tracks, TEMPLATES["first"], a


def _color(rng: random.Random, taken: list[tuple[int, ...]]) -> tuple[list[Track], str, str] | None:
    shape = choice(rng, SHAPES)
    old = weighted_choice(rng, COLOR_WEIGHTS)
    new = choice(rng, [c for c in COLORS if c != old])
    side = _side(rng)
    box = _box(rng, side, side, taken)
    if box is None:
        return None
    taken.append(box)
    track = Track(shape, old, box, recolor_at=randint(rng, FIRST_EVENT, LAST_EVENT), new_color=new)
    return [track], TEMPLATES["color"].format(shape=shape), new


_BUILDERS = {"direction": _direction, "appeared": _appeared, "first": _first, "color": _color}


def _unambiguous(qtype: str, event: list[Track], still: list[Track]) -> bool:
    """The question names its object(s) uniquely among every object of the clip."""
    if qtype == "direction":
        return all((t.shape, t.color) != (event[0].shape, event[0].color) for t in still)
    if qtype == "color":
        return all(t.shape != event[0].shape for t in still)
    return True


def sample(seed: int, index: int) -> Clip:
    """Clip ``index`` of the stream ``seed``; deterministic, random access."""
    rng = random.Random(f"vlmzip-lab-video:{seed}:{index}")
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    for _ in range(200):
        background = randint(rng, 200, 240)
        taken: list[tuple[int, ...]] = []
        built = _BUILDERS[qtype](rng, taken)
        if built is None:
            continue
        event, question, answer = built
        still = []
        for _ in range(randint(rng, 0, 2)):
            side = _side(rng)
            box = _box(rng, side, side, taken)
            if box is None:
                break
            taken.append(box)
            still.append(Track(weighted_choice(rng, SHAPE_WEIGHTS), weighted_choice(rng, COLOR_WEIGHTS), box))
        if not _unambiguous(qtype, event, still):
            continue
        tracks = tuple(still + event) if chance(rng, 0.5) else tuple(event + still)
        subtype = "default" if qtype != "appeared" else f"still{len(still)}"
        return Clip(background, tracks, question, answer, qtype, subtype)
    raise RuntimeError(f"no clip of type {qtype} after 200 attempts (seed={seed}, index={index})")


@dataclass(frozen=True)
class SplitSpec:
    """A named split: clips ``sample(seed, 0..n_clips-1)``; ids ``{id_prefix}-{index}``."""

    seed: int
    n_clips: int
    id_prefix: str


SPLITS: dict[str, SplitSpec] = {
    "test": SplitSpec(seed=3003, n_clips=200, id_prefix="video-test"),
    "val": SplitSpec(seed=4004, n_clips=60, id_prefix="video-val"),
}


def video_name(index: int) -> str:
    """Relative path of clip ``index``'s frame folder inside a split folder."""
    return f"videos/{index:05d}"


def write_split(split: str, out_dir: str | Path, *, n_clips: int | None = None, overwrite: bool = False) -> str:
    """Write split ``split`` (a key of ``SPLITS``) to ``out_dir`` as a dataset folder of frame folders; returns
    its content hash (``vlmzip.eval.format``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown video split {split!r}; known: {sorted(SPLITS)}")
    spec = SPLITS[split]
    n = n_clips if n_clips is not None else spec.n_clips

    def items() -> Iterator[tuple[str, list[Image.Image], list[dict[str, Any]]]]:
        for index in range(n):
            clip = sample(spec.seed, index)
            record = {"id": f"{spec.id_prefix}-{index:05d}", "video": video_name(index), "question": clip.question,
                      "answers": [clip.answer], "type": clip.type, "subtype": clip.subtype}
            yield video_name(index), clip.frames(), [record]

    meta = {"name": split, "split": split, "seed": spec.seed, "n_clips": n, "default_frames": DEFAULT_FRAMES,
            "generator": "vlmzip.lab.clips", "generator_version": GENERATOR_VERSION, "config": CONFIG}
    return write_dataset(out_dir, items(), meta, overwrite=overwrite)


__all__ = [
    "Clip", "DEFAULT_FRAMES", "DIRECTIONS", "FRAMES", "GENERATOR_VERSION", "QUESTION_TYPES", "SPLITS", "TEMPLATES",
    "Track", "answers_by_type", "sample", "video_name", "write_split",
]  # fmt: skip
