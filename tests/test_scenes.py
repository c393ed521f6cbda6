"""Tests of the procedural VQA generator (vlmzip.lab.scenes)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmzip.lab import scenes
from vlmzip.lab.scenes import (
    COLORS,
    NEGATIVE_KINDS,
    QUESTION_TYPES,
    SHAPES,
    TEMPLATES,
    TEXT_FILL,
    WORDS,
    Scene,
    SceneConfig,
    combo_weight,
    question_types_for_index,
    render,
    sample,
    sample_scene,
    solve,
    spatial_relation,
    tokenize,
    vocabulary,
)

SEED = 7
N_BALANCE = 350  # images: 50 blocks of 7, so every type appears exactly 150 times


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@lru_cache(maxsize=1)
def many_scenes() -> list[tuple[Scene, list[scenes.QA]]]:
    return [sample_scene(SEED, i) for i in range(N_BALANCE)]


# --- determinism ------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10**6))
def test_same_seed_and_index_give_identical_bytes_and_questions(seed: int, index: int) -> None:
    image_a, scene_a, qas_a = sample(seed, index)
    image_b, scene_b, qas_b = sample(seed, index)
    assert png_bytes(image_a) == png_bytes(image_b)
    assert scene_a == scene_b
    assert qas_a == qas_b


def test_different_index_or_seed_gives_different_images() -> None:
    images = {png_bytes(sample(SEED, i)[0]) for i in range(10)}
    assert len(images) == 10
    assert png_bytes(sample(SEED, 0)[0]) != png_bytes(sample(SEED + 1, 0)[0])


def test_output_does_not_depend_on_hash_seed() -> None:
    """Set iteration order depends on PYTHONHASHSEED; the generator must never rely on it."""
    # A bare package module skips vlmzip/__init__ (which imports torch: seconds per process).
    package_dir = str(Path(scenes.__file__).parents[1])
    code = (
        f"import sys, types; pkg = types.ModuleType('vlmzip'); pkg.__path__ = [{package_dir!r}];"
        "sys.modules['vlmzip'] = pkg;"
        "import json; from vlmzip.lab.scenes import sample_scene;"
        "print(json.dumps([[s.to_dict(), [q.question + '=' + q.answer for q in qs]]"
        " for s, qs in (sample_scene(3, i) for i in range(30))]))"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(run.stdout)
    assert len(outputs) == 1


def test_render_is_a_pure_function_of_the_scene_dict() -> None:
    image, scene, _ = sample(SEED, 5)
    restored = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    assert restored == scene
    assert render(restored).tobytes() == image.tobytes()


# --- answers agree with the scene graph and with the pixels -----------------------------------------------


def test_every_answer_is_derivable_from_the_scene_graph() -> None:
    """``solve`` re-parses each question and answers it from the graph (raising on any ambiguity)."""
    for scene, qas in many_scenes():
        for qa in qas:
            assert solve(scene, qa.question) == qa.answer, (qa, scene)


def test_pixels_match_the_scene_graph() -> None:
    """Each object's colour at its centre; every pixel of a colour lies in a bbox of an object of that
    colour (so no hidden or extra object: counts and absent combinations hold in the image too); text
    ink only inside the text bbox; background everywhere else."""
    for i in range(40):
        image, scene, _ = sample(SEED, i)
        pixels = np.asarray(image)
        free = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            cx, cy = obj.center
            assert tuple(pixels[int(cy), int(cx)]) == COLORS[obj.color], obj
            x0, y0, x1, y1 = obj.bbox
            free[y0:y1, x0:x1] = False
        for color, rgb in COLORS.items():
            inside = np.zeros_like(free)
            for obj in scene.objects:
                if obj.color == color:
                    x0, y0, x1, y1 = obj.bbox
                    inside[y0:y1, x0:x1] = True
            mask = np.all(pixels == rgb, axis=-1)
            assert not (mask & ~inside).any(), (i, color)
        ink = np.all(pixels == TEXT_FILL, axis=-1)
        if scene.text is None:
            assert not ink.any()
        else:
            x0, y0, x1, y1 = scene.text.bbox
            assert ink[y0:y1, x0:x1].sum() > 5
            ink[y0:y1, x0:x1] = False
            free[y0:y1, x0:x1] = False
            assert not ink.any()
        assert np.all(pixels[free] == scene.background)


def test_object_sizes_and_no_overlap() -> None:
    config = SceneConfig()
    for scene, _ in many_scenes()[:100]:
        assert config.min_objects <= len(scene.objects) <= config.max_objects
        boxes = [o.bbox for o in scene.objects] + ([scene.text.bbox] if scene.text else [])
        for k, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= scene.width and 0 <= a[1] < a[3] <= scene.height
            for b in boxes[k + 1 :]:
                assert scenes._separated(a, b, config.min_gap)
        for obj in scene.objects:
            side = obj.bbox[2] - obj.bbox[0]
            lo, hi = config.small_size if obj.size == "small" else config.large_size
            assert lo <= side <= hi


def ink_center(pixels: np.ndarray, obj: scenes.SceneObject) -> tuple[float, float]:
    x0, y0, x1, y1 = obj.bbox
    ys, xs = np.nonzero(np.all(pixels[y0:y1, x0:x1] == COLORS[obj.color], axis=-1))
    return (x0 + (xs.min() + xs.max() + 1) / 2, y0 + (ys.min() + ys.max() + 1) / 2)


def test_spatial_answers_agree_with_rendered_centres() -> None:
    margin = SceneConfig().spatial_margin
    checked = 0
    for i in range(140):
        if "spatial" not in question_types_for_index(i):
            continue
        image, scene, qas = sample(SEED, i)
        pixels = np.asarray(image)
        (qa,) = [qa for qa in qas if qa.type == "spatial"]
        a_name, b_name = qa.question[len("Is the ") : -1].split(f" {_relation_phrase(qa.subtype)} the ")
        a = next(o for o in scene.objects if o.name == a_name)
        b = next(o for o in scene.objects if o.name == b_name)
        (ax, ay), (bx, by) = ink_center(pixels, a), ink_center(pixels, b)
        d = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[qa.subtype]
        assert abs(d) >= margin - 8  # ink bbox of a star is a few pixels off its square bbox
        assert (d > 0) == (qa.answer == "yes")
        checked += 1
    assert checked >= 50


def _relation_phrase(relation: str) -> str:
    return {"left": "to the left of", "right": "to the right of"}.get(relation, relation)


def test_spatial_relation_margin() -> None:
    a = scenes.SceneObject("circle", "red", "small", (0, 0, 10, 10))
    b = scenes.SceneObject("square", "blue", "small", (40, 0, 50, 10))
    assert spatial_relation(a, b, "left", 30) is True
    assert spatial_relation(b, a, "left", 30) is False
    assert spatial_relation(a, b, "left", 41) is None
    assert spatial_relation(a, b, "above", 5) is None


def test_presence_negatives_follow_their_sampling_kind() -> None:
    for scene, qas in many_scenes():
        present = {(o.shape, o.color) for o in scene.objects}
        for qa in qas:
            if qa.type != "presence" or qa.answer != "no":
                continue
            shape, color = qa.question.split()[-1][:-1], qa.question.split()[-2]
            assert (shape, color) not in present
            if qa.subtype == "adversarial":
                assert any(shape == s or color == c for s, c in present)
            elif qa.subtype == "popular":
                absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
                top = sorted(absent, key=lambda sc: -combo_weight(*sc))[:3]
                assert combo_weight(shape, color) >= combo_weight(*top[-1])


def test_detail_targets_are_small_and_unique() -> None:
    for scene, qas in many_scenes():
        for qa in qas:
            if qa.type == "detail":
                word = qa.question.split()[5].rstrip("?")  # "What color is the small X?", "... small C object?"
                key = "shape" if qa.subtype == "color" else "color"
                matches = [o for o in scene.objects if o.size == "small" and getattr(o, key) == word]
                assert len(matches) == 1
                assert scene.objects and (matches[0].bbox[2] - matches[0].bbox[0]) <= SceneConfig().small_size[1]


# --- balance ----------------------------------------------------------------------------------------------


def test_question_types_are_balanced() -> None:
    qas = [qa for _, qs in many_scenes() for qa in qs]
    counts = Counter(qa.type for qa in qas)
    assert set(counts) == set(QUESTION_TYPES)
    assert set(counts.values()) == {N_BALANCE * 3 // len(QUESTION_TYPES)}


def test_yes_no_balance_and_pope_kinds() -> None:
    qas = [qa for _, qs in many_scenes() for qa in qs]
    presence = [qa for qa in qas if qa.type == "presence"]
    assert Counter(qa.answer for qa in presence) == {"yes": 75, "no": 75}
    kinds = Counter((qa.subtype, qa.answer) for qa in presence)
    assert {kinds[(k, a)] for k in NEGATIVE_KINDS for a in ("yes", "no")} == {25}
    spatial = Counter(qa.answer for qa in qas if qa.type == "spatial")
    assert spatial == {"yes": 75, "no": 75}


def test_answer_ranges_and_variety() -> None:
    qas = [qa for _, qs in many_scenes() for qa in qs]
    counts = Counter(qa.answer for qa in qas if qa.type == "count")
    assert set(counts) <= {str(n) for n in range(9)}
    assert "0" in counts and len(counts) >= 6
    for qa in qas:
        if qa.type == "text":
            assert qa.answer in WORDS if qa.subtype == "word" else 0 <= int(qa.answer) <= 99
        if qa.type in ("color", "shape", "detail"):
            assert qa.answer in COLORS or qa.answer in SHAPES
    assert len({qa.answer for qa in qas if qa.type == "color"}) == len(COLORS)
    assert len({qa.answer for qa in qas if qa.type == "shape"}) == len(SHAPES)
    assert Counter(qa.subtype for qa in qas if qa.type == "detail").keys() == {"color", "shape"}
    assert Counter(qa.subtype for qa in qas if qa.type == "spatial").keys() == set(TEMPLATES["spatial"])


@pytest.mark.parametrize("per_image", [1, 2, 3, 5, 7])
def test_type_rotation_counts(per_image: int) -> None:
    for index in range(0, 40, 3):
        for qtype in QUESTION_TYPES:
            brute = sum(question_types_for_index(j, per_image).count(qtype) for j in range(index))
            assert scenes._type_count_before(index, qtype, per_image) == brute
    block = Counter(t for j in range(7) for t in question_types_for_index(j, per_image))
    assert set(block.values()) == {per_image}


# --- vocabulary and config --------------------------------------------------------------------------------


def test_vocabulary_is_closed() -> None:
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    assert all(v == v.lower() for v in vocab)
    assert "?" in vocab and "yes" in vocab and "99" in vocab
    vocab_set = set(vocab)
    for _, qas in many_scenes():
        for qa in qas:
            assert set(tokenize(qa.question)) <= vocab_set, qa.question
            assert set(tokenize(qa.answer)) <= vocab_set, qa.answer
    assert len(vocab) < 200


def test_tokenize() -> None:
    assert tokenize("Is there an orange star?") == ["is", "there", "an", "orange", "star", "?"]
    assert tokenize("42") == ["42"]


def test_config_knobs() -> None:
    small = SceneConfig().for_size(224)
    assert small.image_size == 224 and small.small_size == (8, 13) and small.large_size == (33, 53)
    image, scene, qas = sample(SEED, 3, small)
    assert image.size == (224, 224) and len(qas) == 3
    image, scene, qas = sample(SEED, 4, SceneConfig(questions_per_image=7, max_objects=3))
    assert [qa.type for qa in qas] == list(QUESTION_TYPES) and len(scene.objects) <= 3
    with pytest.raises(ValueError, match="questions_per_image"):
        SceneConfig(questions_per_image=8)
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(max_objects=9)
    with pytest.raises(RuntimeError, match="too tight"):
        sample_scene(SEED, 0, SceneConfig(min_objects=8, large_size=(150, 160), small_prob=0.0, max_attempts=3))


def test_iter_samples_matches_random_access() -> None:
    stream = scenes.iter_samples(SEED, start=10)
    for index in (10, 11):
        _, scene, qas = next(stream)
        assert (scene, qas) == sample_scene(SEED, index)
