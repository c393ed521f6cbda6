"""Procedural VQA benchmark: deterministic scenes of coloured shapes (plus an optional word or number)
and single-word questions about them.

Every image is a pure function of ``(seed, index, config)``: ``sample(seed, index, config)`` rebuilds any
scene on its own, so training can resume anywhere and any test image can be regenerated alone. All
randomness goes through ``random.Random(f"vlmzip-lab:{seed}:{index}")`` and only its ``random()`` method,
whose output CPython guarantees across versions.

Question types (``QUESTION_TYPES``), answers are one word or one number:

- ``presence``  "Is there a red circle?" / "Is there an orange star?" -> yes/no. Balanced yes/no; the
  subtype says how the question pair was sampled, as in POPE: ``random`` (negative = any absent
  shape-colour combination), ``popular`` (negative = one of the 3 most frequent absent combinations,
  frequency = the fixed object prior ``combo_weight``, i.e. the dataset frequency in expectation) and
  ``adversarial`` (negative = an absent combination sharing a colour or a shape with an object present).
- ``count``     "How many circles / red objects / objects are there?" -> 0-8.
- ``color``     "What color is the triangle?" (asked only if exactly one triangle).
- ``shape``     "What shape is the blue object?" (asked only if exactly one blue object).
- ``spatial``   "Is the red circle to the left of / to the right of / above / below the blue square?"
  -> yes/no; both objects are named by a unique colour-shape pair, and their centres differ by at least
  ``SceneConfig.spatial_margin`` pixels along the asked axis (y grows downwards: "above" = smaller y).
- ``text``      "What word / number is written in the image?" -> a word of ``WORDS`` or 0-99.
- ``detail``    "What color is the small square?" / "What shape is the small red object?" (the target is
  the only small object of that shape / colour) -> needs fine detail.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlmzip.eval.format import write_dataset

GENERATOR_VERSION = "1"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 50, 180),
    "orange": (250, 130, 0),
}
SIZES: tuple[str, ...] = ("small", "large")
WORDS: tuple[str, ...] = (
    "apple", "bike", "boat", "book", "bus", "cake", "car", "cat", "cow", "cup",
    "dog", "door", "duck", "egg", "fish", "frog", "hat", "key", "kite", "lamp",
    "leaf", "milk", "moon", "pen", "rain", "road", "sock", "sun", "tree", "wolf",
)  # fmt: skip
NUMBERS: tuple[str, ...] = tuple(str(n) for n in range(100))
TEXT_FILL: tuple[int, int, int] = (20, 20, 20)

QUESTION_TYPES: tuple[str, ...] = ("presence", "count", "color", "shape", "spatial", "text", "detail")
NEGATIVE_KINDS: tuple[str, ...] = ("random", "popular", "adversarial")

# Object prior: how often each shape and colour is drawn (combination weight = product). Mildly uneven on
# purpose, so that "popular" presence negatives (frequent but absent objects) mean something.
SHAPE_WEIGHTS: dict[str, float] = {"circle": 4.0, "square": 3.5, "triangle": 3.0, "star": 2.5, "cross": 2.0}
COLOR_WEIGHTS: dict[str, float] = {
    "red": 4.0, "blue": 3.5, "green": 3.0, "yellow": 2.5, "orange": 2.0, "purple": 2.0,
}  # fmt: skip

# type -> form -> template. The record's ``subtype`` is the form, except for presence where it is the
# POPE negative-sampling kind of the question's pair.
TEMPLATES: dict[str, dict[str, str]] = {
    "presence": {"default": "Is there {article} {color} {shape}?"},  # article: "a" or "an"
    "count": {
        "shape": "How many {shapes} are there?",
        "color": "How many {color} objects are there?",
        "total": "How many objects are there?",
    },
    "color": {"default": "What color is the {shape}?"},
    "shape": {"default": "What shape is the {color} object?"},
    "spatial": {
        "left": "Is the {a} to the left of the {b}?",
        "right": "Is the {a} to the right of the {b}?",
        "above": "Is the {a} above the {b}?",
        "below": "Is the {a} below the {b}?",
    },
    "text": {
        "word": "What word is written in the image?",
        "number": "What number is written in the image?",
    },
    "detail": {
        "color": "What color is the small {shape}?",
        "shape": "What shape is the small {color} object?",
    },
}

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class SceneConfig:
    """Difficulty knobs. Pixel quantities are for ``image_size``; ``for_size`` rescales them."""

    image_size: int = 336
    min_objects: int = 1
    max_objects: int = 8
    small_size: tuple[int, int] = (12, 20)  # side of the object's square bbox, inclusive range
    large_size: tuple[int, int] = (50, 80)
    small_prob: float = 0.5  # chance that an object is small
    text_prob: float = 0.5  # chance of a word/number in a scene not asked a text question
    number_prob: float = 0.5  # chance that the text item is a number rather than a word
    font_size: tuple[int, int] = (14, 26)
    min_gap: int = 4  # pixels between any two bboxes (objects and text never overlap)
    border: int = 4  # pixels kept free at the image edge
    spatial_margin: int = 30  # min centre difference for a spatial question
    background_range: tuple[int, int] = (200, 240)  # plain grey background, level drawn per scene
    count_zero_prob: float = 0.15  # chance that a shape/colour count asks for an absent one (answer 0)
    questions_per_image: int = 3
    placement_tries: int = 100
    max_attempts: int = 200

    def __post_init__(self) -> None:
        if not 1 <= self.questions_per_image <= len(QUESTION_TYPES):
            raise ValueError(f"questions_per_image must be in 1..{len(QUESTION_TYPES)}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError("need 1 <= min_objects <= max_objects <= 8 (count answers are 0-8)")

    def for_size(self, image_size: int) -> SceneConfig:
        """Return a copy with every pixel quantity scaled from ``self.image_size`` to ``image_size``."""
        f = image_size / self.image_size

        def px(v: int) -> int:
            return max(1, round(v * f))

        return replace(
            self,
            image_size=image_size,
            small_size=(px(self.small_size[0]), px(self.small_size[1])),
            large_size=(px(self.large_size[0]), px(self.large_size[1])),
            font_size=(px(self.font_size[0]), px(self.font_size[1])),
            min_gap=px(self.min_gap),
            border=px(self.border),
            spatial_margin=px(self.spatial_margin),
        )


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``bbox`` is the square box it is drawn in."""

    shape: str
    color: str
    size: str
    bbox: Box

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the bbox (x, y); always a pixel of the shape's fill colour."""
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def name(self) -> str:
        """Referring expression, e.g. "red circle"."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class TextItem:
    """A rendered word or number: drawn at ``xy`` (Pillow's left-ascender anchor), ink inside ``bbox``."""

    text: str
    kind: str  # "word" or "number"
    font_size: int
    xy: tuple[int, int]
    bbox: Box


@dataclass(frozen=True)
class Scene:
    """Scene graph: everything needed to render the image and answer any question."""

    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    text: TextItem | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return {
            "width": self.width,
            "height": self.height,
            "background": list(self.background),
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "bbox": list(o.bbox)} for o in self.objects
            ],
            "text": None
            if self.text is None
            else {
                "text": self.text.text,
                "kind": self.text.kind,
                "font_size": self.text.font_size,
                "xy": list(self.text.xy),
                "bbox": list(self.text.bbox),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """Inverse of ``to_dict``."""
        t = d.get("text")
        return cls(
            width=int(d["width"]),
            height=int(d["height"]),
            background=tuple(d["background"]),
            objects=tuple(SceneObject(o["shape"], o["color"], o["size"], tuple(o["bbox"])) for o in d["objects"]),
            text=None
            if t is None
            else TextItem(t["text"], t["kind"], int(t["font_size"]), tuple(t["xy"]), tuple(t["bbox"])),
        )


@dataclass(frozen=True)
class QA:
    """One question about a scene with its single answer."""

    question: str
    answer: str
    type: str
    subtype: str


@dataclass(frozen=True)
class SplitSpec:
    """A named split: ``n_images`` scenes ``sample(seed, 0..n_images-1)``; ids are ``{id_prefix}-{index}``."""

    seed: int
    n_images: int | None
    id_prefix: str


SPLITS: dict[str, SplitSpec] = {
    "train": SplitSpec(seed=0, n_images=None, id_prefix="train"),  # unbounded: use sample(0, i)
    "val": SplitSpec(seed=1001, n_images=210, id_prefix="val"),
    "test": SplitSpec(seed=2002, n_images=1050, id_prefix="test"),
    # The first 140 images of test, same ids and questions: a quick subset for smoke runs.
    "test-small": SplitSpec(seed=2002, n_images=140, id_prefix="test"),
}
TRAIN_SEED = SPLITS["train"].seed

# Content hashes (vlmzip.eval.format.content_hash) of the named splits with the default SceneConfig, as
# generated with GENERATOR_VERSION under Pillow 13.0. Change the generator -> bump GENERATOR_VERSION and
# update these. A mismatch with the same version means rendering differs (another Pillow/FreeType build).
EXPECTED_HASHES: dict[str, str] = {
    "val": "29996275c0eeacb5af5f780febe62e9aa16915f6aae32b1d1423fdb377ff9186",
    "test": "20c9891f740cb4ce29eec23e6dca6e0fc73fe1b3c4416e06c1a38262656332b6",
    "test-small": "b60704ac1f529f49819dc682241e835a040879d5aecceb70a31cc6bb2f827471",
}

# ---------------------------------------------------------------------------------------------------------
# Random helpers built only on Random.random(), whose stream is stable across Python versions
# (randrange/choice/shuffle are not guaranteed to be).


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    return lo + int(rng.random() * (hi - lo + 1))


def _choice(rng: random.Random, seq: Sequence[Any]) -> Any:
    return seq[int(rng.random() * len(seq))]


def _chance(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _weighted_choice(rng: random.Random, weights: dict[str, float]) -> str:
    keys = list(weights)
    r = rng.random() * sum(weights.values())
    for key in keys:
        r -= weights[key]
        if r < 0:
            return key
    return keys[-1]


# ---------------------------------------------------------------------------------------------------------
# Vocabulary


def tokenize(text: str) -> list[str]:
    """Split a question or answer into vocabulary tokens: lower-case words, whole numbers, punctuation."""
    return re.findall(r"[a-z]+|\d+|[^\sa-z\d]", text.lower())


def vocabulary() -> list[str]:
    """Every token that can occur in a question or answer (``tokenize`` output), sorted."""
    tokens: set[str] = {"yes", "no", "a", "an"}
    tokens.update(SHAPES, SHAPE_PLURALS.values(), COLORS, SIZES, WORDS, NUMBERS)
    for forms in TEMPLATES.values():
        for template in forms.values():
            tokens.update(tokenize(re.sub(r"\{\w+\}", " ", template)))
    return sorted(tokens)


def answers_by_type(config: SceneConfig | None = None) -> dict[str, tuple[str, ...]]:
    """Every answer a question of each type (``QUESTION_TYPES``) can have, as the generator writes it.

    presence and spatial: yes/no; count: 0 to ``config.max_objects``; color: the colours; shape: the
    shapes; text: the words and the numbers 0-99; detail: the colours and the shapes (its two forms).
    """
    config = config or SceneConfig()
    yes_no = ("yes", "no")
    colors, shapes = tuple(COLORS), SHAPES
    return {
        "presence": yes_no,
        "count": tuple(str(n) for n in range(config.max_objects + 1)),
        "color": colors,
        "shape": shapes,
        "spatial": yes_no,
        "text": WORDS + NUMBERS,
        "detail": colors + shapes,
    }


def combo_weight(shape: str, color: str) -> float:
    """Prior weight of a shape-colour combination (proportional to its expected dataset frequency)."""
    return SHAPE_WEIGHTS[shape] * COLOR_WEIGHTS[color]


def question_types_for_index(index: int, questions_per_image: int = 3) -> list[str]:
    """Question types asked about image ``index``: a rotation that balances types over every 7 images."""
    n = len(QUESTION_TYPES)
    return [QUESTION_TYPES[(questions_per_image * index + k) % n] for k in range(questions_per_image)]


def _type_count_before(index: int, qtype: str, questions_per_image: int) -> int:
    """How many ``qtype`` questions images 0..index-1 carry (used to alternate yes/no exactly)."""
    n = len(QUESTION_TYPES)
    block_start = index - index % n
    per_block = sum(question_types_for_index(j, questions_per_image).count(qtype) for j in range(n))
    partial = sum(question_types_for_index(j, questions_per_image).count(qtype) for j in range(block_start, index))
    return (index // n) * per_block + partial


# ---------------------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)  # Aileron Regular, embedded in Pillow: nothing to download
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("vlmzip scenes need Pillow >= 10.1 built with FreeType (for scalable text)")
    return font


def _star_points(x0: int, y0: int, s: int) -> list[tuple[float, float]]:
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return pts


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    s = x1 - x0
    fill = COLORS[obj.color]
    cx = x0 + s / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star_points(x0, y0, s), fill=fill)
    elif obj.shape == "cross":
        arm = max(2, round(s / 3))
        a0 = x0 + (s - arm) // 2
        draw.rectangle((a0, y0, a0 + arm - 1, y1 - 1), fill=fill)
        b0 = y0 + (s - arm) // 2
        draw.rectangle((x0, b0, x1 - 1, b0 + arm - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene (RGB). Deterministic: the same scene gives the same pixels."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    if scene.text is not None:
        draw.text(scene.text.xy, scene.text.text, font=_font(scene.text.font_size), fill=TEXT_FILL)
    return image


# ---------------------------------------------------------------------------------------------------------
# Scene sampling


def _separated(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(rng: random.Random, w: int, h: int, occupied: list[Box], config: SceneConfig) -> Box | None:
    """A free w x h box: inside the border and ``min_gap`` away from every occupied box, or None."""
    size = config.image_size
    for _ in range(config.placement_tries):
        x0 = _randint(rng, config.border, size - config.border - w)
        y0 = _randint(rng, config.border, size - config.border - h)
        box = (x0, y0, x0 + w, y0 + h)
        if all(_separated(box, other, config.min_gap) for other in occupied):
            return box
    return None


def _sample_text(rng: random.Random, config: SceneConfig, occupied: list[Box]) -> TextItem | None:
    if _chance(rng, config.number_prob):
        kind, text = "number", str(_randint(rng, 0, 99))
    else:
        kind, text = "word", _choice(rng, WORDS)
    font_size = _randint(rng, *config.font_size)
    left, top, right, bottom = _font(font_size).getbbox(text)
    box = _place(rng, right - left, bottom - top, occupied, config)
    if box is None:
        return None
    return TextItem(text, kind, font_size, (box[0] - left, box[1] - top), box)


def _sample_scene(rng: random.Random, config: SceneConfig, need_text: bool) -> Scene | None:
    """One random scene, or None when placement failed (the caller retries)."""
    level = _randint(rng, *config.background_range)
    occupied: list[Box] = []
    text = None
    if need_text or _chance(rng, config.text_prob):
        text = _sample_text(rng, config, occupied)
        if text is None:
            return None
        occupied.append(text.bbox)
    specs = []
    for _ in range(_randint(rng, config.min_objects, config.max_objects)):
        size = "small" if _chance(rng, config.small_prob) else "large"
        side = _randint(rng, *(config.small_size if size == "small" else config.large_size))
        specs.append((_weighted_choice(rng, SHAPE_WEIGHTS), _weighted_choice(rng, COLOR_WEIGHTS), size, side))
    specs.sort(key=lambda spec: -spec[3])  # place big objects first: they are the hard ones to fit
    objects = []
    for shape, color, size, side in specs:
        box = _place(rng, side, side, occupied, config)
        if box is None:
            return None
        occupied.append(box)
        objects.append(SceneObject(shape, color, size, box))
    return Scene(config.image_size, config.image_size, (level, level, level), tuple(objects), text)


# ---------------------------------------------------------------------------------------------------------
# Questions. Each builder returns None when its type cannot be asked unambiguously about the scene.


def _unique(objects: Sequence[SceneObject], key: Callable[[SceneObject], str]) -> dict[str, SceneObject]:
    """Objects whose key occurs once, by key (sorted: never iterate a set, str hashes are salted)."""
    counts: dict[str, int] = {}
    for o in objects:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return {key(o): o for o in sorted(objects, key=key) if counts[key(o)] == 1}


def _presence(rng: random.Random, scene: Scene, n_before: int, config: SceneConfig) -> QA | None:
    kind = NEGATIVE_KINDS[(n_before // 2) % len(NEGATIVE_KINDS)]
    present = sorted({(o.shape, o.color) for o in scene.objects})
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
    if n_before % 2 == 0:
        shape, color = _choice(rng, present)
        answer = "yes"
    else:
        if kind == "random":
            candidates = absent
        elif kind == "popular":
            candidates = sorted(absent, key=lambda sc: (-combo_weight(*sc), sc))[:3]
        else:
            shapes = {s for s, _ in present}
            colors = {c for _, c in present}
            candidates = [(s, c) for s, c in absent if s in shapes or c in colors]
        if not candidates:
            return None
        shape, color = _choice(rng, candidates)
        answer = "no"
    article = "an" if color[0] in "aeiou" else "a"
    question = TEMPLATES["presence"]["default"].format(article=article, color=color, shape=shape)
    return QA(question, answer, "presence", kind)


def _count(rng: random.Random, scene: Scene, n_before: int, config: SceneConfig) -> QA | None:
    form = _choice(rng, list(TEMPLATES["count"]))
    objs = scene.objects
    if form == "total":
        return QA(TEMPLATES["count"]["total"], str(len(objs)), "count", form)
    values: tuple[str, ...] = SHAPES if form == "shape" else tuple(COLORS)
    attr = (lambda o: o.shape) if form == "shape" else (lambda o: o.color)
    present = sorted({attr(o) for o in objs})
    absent = [v for v in values if v not in present]
    if absent and _chance(rng, config.count_zero_prob):
        value = _choice(rng, absent)
    else:  # the attribute of a random object: favours larger counts over "1"
        value = attr(_choice(rng, objs))
    answer = str(sum(attr(o) == value for o in objs))
    if form == "shape":
        question = TEMPLATES["count"]["shape"].format(shapes=SHAPE_PLURALS[value])
    else:
        question = TEMPLATES["count"]["color"].format(color=value)
    return QA(question, answer, "count", form)


def _color(rng: random.Random, scene: Scene, n_before: int, config: SceneConfig) -> QA | None:
    unique = _unique(scene.objects, lambda o: o.shape)
    if not unique:
        return None
    obj = unique[_choice(rng, list(unique))]
    return QA(TEMPLATES["color"]["default"].format(shape=obj.shape), obj.color, "color", "default")


def _shape(rng: random.Random, scene: Scene, n_before: int, config: SceneConfig) -> QA | None:
    unique = _unique(scene.objects, lambda o: o.color)
    if not unique:
        return None
    obj = unique[_choice(rng, list(unique))]
    return QA(TEMPLATES["shape"]["default"].format(color=obj.color), obj.shape, "shape", "default")


def spatial_relation(a: SceneObject, b: SceneObject, relation: str, margin: float) -> bool | None:
    """Whether ``a`` is <relation> ``b`` (left/right/above/below, by centres), None if within ``margin``."""
    (ax, ay), (bx, by) = a.center, b.center
    d = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[relation]
    if abs(d) < margin:
        return None
    return d > 0


def _spatial(rng: random.Random, scene: Scene, n_before: int, config: SceneConfig) -> QA | None:
    want_yes = n_before % 2 == 0
    named = list(_unique(scene.objects, lambda o: o.name).values())
    candidates = []
    for a in named:
        for b in named:
            if a is b:
                continue
            for relation in TEMPLATES["spatial"]:
                if spatial_relation(a, b, relation, config.spatial_margin) == want_yes:
                    candidates.append((relation, a, b))
    if not candidates:
        return None
    relation, a, b = _choice(rng, candidates)
    question = TEMPLATES["spatial"][relation].format(a=a.name, b=b.name)
    return QA(question, "yes" if want_yes else "no", "spatial", relation)


def _text(rng: random.Random, scene: Scene, n_before: int, config: SceneConfig) -> QA | None:
    if scene.text is None:
        return None
    return QA(TEMPLATES["text"][scene.text.kind], scene.text.text, "text", scene.text.kind)


def _detail(rng: random.Random, scene: Scene, n_before: int, config: SceneConfig) -> QA | None:
    small = [o for o in scene.objects if o.size == "small"]
    by_shape = _unique(small, lambda o: o.shape)
    by_color = _unique(small, lambda o: o.color)
    forms = [form for form, options in (("color", by_shape), ("shape", by_color)) if options]
    if not forms:
        return None
    form = _choice(rng, forms)
    if form == "color":
        obj = by_shape[_choice(rng, list(by_shape))]
        return QA(TEMPLATES["detail"]["color"].format(shape=obj.shape), obj.color, "detail", form)
    obj = by_color[_choice(rng, list(by_color))]
    return QA(TEMPLATES["detail"]["shape"].format(color=obj.color), obj.shape, "detail", form)


_BUILDERS: dict[str, Callable[[random.Random, Scene, int, SceneConfig], QA | None]] = {
    "presence": _presence,
    "count": _count,
    "color": _color,
    "shape": _shape,
    "spatial": _spatial,
    "text": _text,
    "detail": _detail,
}


# ---------------------------------------------------------------------------------------------------------
# Public sampling API


def sample_scene(seed: int, index: int, config: SceneConfig | None = None) -> tuple[Scene, list[QA]]:
    """Scene graph and questions of image ``index`` of the stream ``seed`` (no rendering)."""
    config = config or SceneConfig()
    rng = random.Random(f"vlmzip-lab:{seed}:{index}")
    types = question_types_for_index(index, config.questions_per_image)
    n_before = {t: _type_count_before(index, t, config.questions_per_image) for t in types}
    for _ in range(config.max_attempts):
        scene = _sample_scene(rng, config, need_text="text" in types)
        if scene is None:
            continue
        qas = [_BUILDERS[t](rng, scene, n_before[t], config) for t in types]
        if all(qa is not None for qa in qas):
            return scene, qas  # type: ignore[return-value]
    raise RuntimeError(
        f"no scene with questions {types} after {config.max_attempts} attempts (seed={seed}, index={index});"
        " the SceneConfig is too tight (objects too big or too many for the image?)"
    )


def sample(seed: int, index: int, config: SceneConfig | None = None) -> tuple[Image.Image, Scene, list[QA]]:
    """Image, scene graph and questions of image ``index`` of the stream ``seed``; random access.

    Deterministic per ``(seed, index, config)``. Question types rotate with ``index`` so that any 7
    consecutive images carry every type ``questions_per_image`` times; presence and spatial answers
    alternate yes/no over the stream, and presence pairs cycle through ``NEGATIVE_KINDS``.
    """
    scene, qas = sample_scene(seed, index, config)
    return render(scene), scene, qas


def iter_samples(
    seed: int = TRAIN_SEED, config: SceneConfig | None = None, start: int = 0
) -> Iterator[tuple[Image.Image, Scene, list[QA]]]:
    """Unbounded stream ``sample(seed, start)``, ``sample(seed, start + 1)``, ... (the train split)."""
    index = start
    while True:
        yield sample(seed, index, config)
        index += 1


def image_name(index: int) -> str:
    """Relative path of image ``index`` inside a split folder."""
    return f"images/{index:05d}.png"


def split_records(
    split: str, index: int, scene: Scene, qas: list[QA], id_prefix: str | None = None
) -> list[dict[str, Any]]:
    """JSONL records (``vlmzip.eval.format``) for one image's questions."""
    prefix = id_prefix or split
    scene_dict = scene.to_dict()
    return [
        {
            "id": f"{prefix}-{index:05d}-{k}",
            "image": image_name(index),
            "question": qa.question,
            "answers": [qa.answer],
            "type": qa.type,
            "subtype": qa.subtype,
            "scene": scene_dict,
        }
        for k, qa in enumerate(qas)
    ]


def write_split(
    split: str,
    out_dir: str | Path,
    config: SceneConfig | None = None,
    *,
    n_images: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write split ``split`` (a key of ``SPLITS``) to ``out_dir`` as a dataset folder; return its hash.

    ``n_images`` overrides the split's size (required for ``train``). Writes ``images/*.png``,
    ``data.jsonl`` and ``meta.json`` (split, seed, counts per type, hash, generator version, config).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
    config = config or SceneConfig()
    spec = SPLITS[split]
    n = n_images if n_images is not None else spec.n_images
    if n is None or n < 1:
        raise ValueError(f"split {split!r} needs n_images >= 1")

    def items() -> Iterator[tuple[str, Image.Image, list[dict[str, Any]]]]:
        for index in range(n):
            image, scene, qas = sample(spec.seed, index, config)
            yield image_name(index), image, split_records(split, index, scene, qas, spec.id_prefix)

    meta = {
        "name": split,
        "split": split,
        "seed": spec.seed,
        "n_images": n,
        "generator": "vlmzip.lab.scenes",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
    }
    return write_dataset(out_dir, items(), meta, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------
# An independent answerer: parses a question and computes its answer from the scene graph alone.

_PLURAL_TO_SHAPE = {plural: shape for shape, plural in SHAPE_PLURALS.items()}


def _only(objects: list[SceneObject], what: str) -> SceneObject:
    if len(objects) != 1:
        raise ValueError(f"ambiguous or missing referent: {len(objects)} objects match {what!r}")
    return objects[0]


def _named(scene: Scene, color: str, shape: str) -> SceneObject:
    return _only([o for o in scene.objects if o.color == color and o.shape == shape], f"{color} {shape}")


def solve(scene: Scene, question: str, spatial_margin: float = SceneConfig.spatial_margin) -> str:
    """Answer a templated question from the scene graph; ValueError if unknown or ambiguous."""
    q = question.strip().lower()
    objs = list(scene.objects)
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
        return "yes" if any(o.color == m[1] and o.shape == m[2] for o in objs) else "no"
    if q == "how many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", q):
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        return str(sum(o.shape == _PLURAL_TO_SHAPE[m[1]] for o in objs))
    if m := re.fullmatch(r"what color is the small (\w+)\?", q):
        return _only([o for o in objs if o.size == "small" and o.shape == m[1]], q).color
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        return _only([o for o in objs if o.shape == m[1]], q).color
    if m := re.fullmatch(r"what shape is the small (\w+) object\?", q):
        return _only([o for o in objs if o.size == "small" and o.color == m[1]], q).shape
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        return _only([o for o in objs if o.color == m[1]], q).shape
    if m := re.fullmatch(r"is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", q):
        relation = m[3].split()[-2] if m[3].startswith("to") else m[3]
        truth = spatial_relation(_named(scene, m[1], m[2]), _named(scene, m[4], m[5]), relation, spatial_margin)
        if truth is None:
            raise ValueError(f"spatial relation within the margin: {question!r}")
        return "yes" if truth else "no"
    if m := re.fullmatch(r"what (word|number) is written in the image\?", q):
        if scene.text is None or scene.text.kind != m[1]:
            raise ValueError(f"no {m[1]} in the scene: {question!r}")
        return scene.text.text
    raise ValueError(f"not a lab question: {question!r}")


def main(argv: list[str] | None = None) -> None:
    """``python -m vlmzip.lab.scenes SPLIT OUT_DIR [--n-images N]``: write a split, print its hash."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("split", choices=sorted(SPLITS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-images", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    digest = write_split(args.split, args.out_dir, n_images=args.n_images, overwrite=args.overwrite)
    print(f"{args.split}: sha256 {digest} ({time.perf_counter() - start:.1f} s) -> {args.out_dir}")


if __name__ == "__main__":
    main()


__all__ = [
    "COLORS", "EXPECTED_HASHES", "GENERATOR_VERSION", "NEGATIVE_KINDS", "NUMBERS", "QA", "QUESTION_TYPES", "SHAPES",
    "SHAPE_PLURALS", "SIZES", "SPLITS", "TEMPLATES", "WORDS", "Scene", "SceneConfig", "SceneObject",
    "SplitSpec", "TextItem", "answers_by_type", "combo_weight", "iter_samples", "question_types_for_index", "render",
    "sample", "sample_scene", "solve", "spatial_relation", "split_records", "tokenize", "vocabulary",
    "write_split",
]  # fmt: skip
