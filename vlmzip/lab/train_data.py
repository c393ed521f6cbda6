"""Training data of the lab mini-VLM: every update's batch is a pure function of ``(TrainConfig, step)``.

Update ``s`` sees train images ``s * batch_size ... (s + 1) * batch_size - 1`` of the unbounded train
stream (``scenes.sample(TRAIN_SEED, i, ...)``, random access), so training resumes exactly where it
stopped. All questions of one image are packed into ONE multi-turn LLaVA-1.5 conversation::

    <s> USER: <image>x256 Q1 ASSISTANT: A1 </s> USER: Q2 ASSISTANT: A2 </s> ...

so that the image (the expensive part: 257 vision tokens, 256 of them in the LM) is encoded once for
several answers; labels cover only answer tokens and their ``</s>``. The turn order is shuffled per
image so that every question type also appears in the first turn (the evaluation format).

Besides ids and labels a batch carries the targets of the training-only aids, read off the scene graph:
the size curriculum (``scene_scale``), what every patch shows (``patch_owners``, ``owner_words``), which
patches each answer should look at (``named_objects``) and which patches reach the LM (``kept_patches``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from vlmzip.builders.llava import build_tokenizer
from vlmzip.lab import scenes
from vlmzip.lab.train_config import TrainConfig, image_tokens, lab_words
from vlmzip.lab.train_mix import MixPlan, draw_plan

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One update's inputs. ``pixels``: uint8 (B, 3, H, W), normalised on the device by ``pixel_values``."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    patch_targets: torch.Tensor  # (B, n_patches, 2) token ids per patch, IGNORE_INDEX where none
    n_answers: int
    # attention supervision, one row per answer whose question names something visible:
    attn_rows: torch.Tensor  # (Q,) batch row
    attn_positions: torch.Tensor  # (Q,) sequence position that predicts the answer's first token
    attn_patches: torch.Tensor  # (Q, n_patches) bool: the kept patches of what the question names
    keep: torch.Tensor  # (B, n_patches) bool: the patches each image sends to the LM (kept_patches)
    # mixture augmentation (cfg.mix, from drop_start on): each row's MixPlan; then ``keep`` is all True,
    # ``attn_patches`` marks the named patches whether kept or not, and the losses build the image tokens
    mix: list[MixPlan] | None = None


def shuffled(items: Sequence[Any], rng: random.Random) -> list[Any]:
    """Fisher-Yates shuffle using only ``rng.random()`` (stable across Python versions)."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def encode_conversation(
    qas: Sequence[scenes.QA], tokenizer: PreTrainedTokenizerFast, n_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one image's multi-turn conversation (chat template, image run expanded).

    Equal to the processor's ids for ``tokenizer.apply_chat_template(messages)``; labels are
    ``IGNORE_INDEX`` except on each answer and its ``</s>``.
    """
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX]
    for k, qa in enumerate(qas):
        prompt = ids(f"USER: {qa.question} ASSISTANT:")
        if k == 0:  # "USER: <image>\n{question} ASSISTANT:"
            prompt = prompt[:2] + [image_id] * n_image_tokens + prompt[2:]
        answer = ids(f"{qa.answer}</s>")
        input_ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    return input_ids, labels


@functools.lru_cache(maxsize=4)
def _tokenizer(words: tuple[str, ...]) -> PreTrainedTokenizerFast:
    return build_tokenizer(words)


def scene_scale(cfg: TrainConfig, index: int) -> float:
    """Size multiplier of train image ``index``: uniform in [1, s_max], s_max decaying to 1 (curriculum)."""
    step = index // cfg.batch_size
    decay = max(0.0, 1.0 - step / max(1.0, cfg.easy_until * cfg.steps))
    s_max = 1.0 + (cfg.easy_scale - 1.0) * decay
    return 1.0 + (s_max - 1.0) * random.Random(f"vlmzip-scale:{cfg.seed}:{index}").random()


def scene_config(cfg: TrainConfig, index: int, scale: float = 1.0) -> scenes.SceneConfig:
    """SceneConfig of train image ``index``: its question count, objects/text ``scale`` x larger, fewer."""
    base = scenes.SceneConfig(questions_per_image=cfg.questions_per_image[index % len(cfg.questions_per_image)])
    if scale == 1.0:
        return base

    def grow(r: tuple[int, int]) -> tuple[int, int]:
        return (round(r[0] * scale), round(r[1] * scale))

    return dataclasses.replace(
        base,
        small_size=grow(base.small_size),
        large_size=grow(base.large_size),
        font_size=grow(base.font_size),
        max_objects=max(2, min(base.max_objects, round(2 * base.max_objects / scale**2))),
    )


def image_sample(cfg: TrainConfig, index: int) -> tuple[Image.Image, scenes.Scene, list[scenes.QA]]:
    """Train image ``index`` (of the stream from ``cfg.image_offset``), its scene graph and its questions in
    training order (deterministic)."""
    stream = cfg.image_offset + index
    try:
        image, scene, qas = scenes.sample(scenes.TRAIN_SEED, stream, scene_config(cfg, index, scene_scale(cfg, index)))
    except RuntimeError:  # scaled-up objects did not fit: fall back to the benchmark's scene
        image, scene, qas = scenes.sample(scenes.TRAIN_SEED, stream, scene_config(cfg, index))
    return image, scene, shuffled(qas, random.Random(f"vlmzip-train:{cfg.seed}:{index}"))


def patch_owners(image: Image.Image, scene: scenes.Scene, grid: int, min_cover: float) -> np.ndarray:
    """(grid * grid,) what each patch (row-major) of the rendered scene shows: ``i`` for
    ``scene.objects[i]``, ``len(scene.objects)`` for the text, -1 for background.

    A patch belongs to the object or text covering the largest share of its pixels if that share is
    >= ``min_cover``. Objects are filled with their exact palette colour and never overlap, so "pixel of
    the object's colour inside its bbox" is the object's mask; text ink is any pixel inside the text
    bbox that differs clearly from the background.
    """
    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    height, width = pixels.shape[:2]
    masks: list[np.ndarray] = []
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = (pixels[y0:y1, x0:x1] == np.array(scenes.COLORS[obj.color])).all(-1)
        masks.append(mask)
    if scene.text is not None:
        x0, y0, x1, y1 = scene.text.bbox
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = np.abs(pixels[y0:y1, x0:x1] - np.array(scene.background)).max(-1) > 40
        masks.append(mask)
    owners = np.full(grid * grid, -1, dtype=np.int64)
    if not masks:
        return owners
    ys = np.linspace(0, height, grid + 1).round().astype(int)
    xs = np.linspace(0, width, grid + 1).round().astype(int)
    stack = np.stack(masks).astype(np.float32)  # (n, H, W)
    # per-patch coverage of every mask: sum over the patch's pixels / patch area
    rows = np.add.reduceat(stack, ys[:-1], axis=1)
    cover = (np.add.reduceat(rows, xs[:-1], axis=2) / np.outer(np.diff(ys), np.diff(xs))[None]).reshape(len(masks), -1)
    labelled = cover.max(0) >= min_cover
    owners[labelled] = cover.argmax(0)[labelled]
    return owners


def owner_words(scene: scenes.Scene, owners: np.ndarray, tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """(n_patches, 2) token ids naming what each patch shows, given its ``patch_owners`` entry.

    Object patches: [colour word, shape word]; text patches: [the word/number, ignore]; background:
    [<pad>, ignore].
    """
    ids = tokenizer.convert_tokens_to_ids
    words = [[ids(o.color), ids(o.shape)] for o in scene.objects]
    if scene.text is not None:
        words.append([ids(scene.text.text.lower()), IGNORE_INDEX])
    targets = np.full((len(owners), 2), IGNORE_INDEX, dtype=np.int64)
    targets[:, 0] = tokenizer.pad_token_id
    for patch in np.nonzero(owners >= 0)[0]:
        targets[patch] = words[owners[patch]]
    return targets


_SINGULAR = {plural: shape for shape, plural in scenes.SHAPE_PLURALS.items()}


def named_objects(qa: scenes.QA, scene: scenes.Scene) -> set[int]:
    """What a question refers to, as ``patch_owners`` indices (``len(scene.objects)`` = the text).

    Read off the question's words: "written" -> the text; colour-shape pairs ("the red circle ... the
    blue square") -> the objects with one of those pairs; otherwise every object matching all the
    colour, shape and "small" words (none: "How many objects" -> all objects). Empty when nothing
    matches (a "no" presence question, a count of 0).
    """
    words = [_SINGULAR.get(w, w) for w in scenes.tokenize(qa.question)]
    if "written" in words:
        return {len(scene.objects)} if scene.text is not None else set()
    small = "small" in words
    pairs = {(a, b) for a, b in zip(words, words[1:], strict=False) if a in scenes.COLORS and b in scenes.SHAPES}
    colors = {w for w in words if w in scenes.COLORS}
    shapes = {w for w in words if w in scenes.SHAPES}

    def named(o: scenes.SceneObject) -> bool:
        if small and o.size != "small":
            return False
        if pairs:
            return (o.color, o.shape) in pairs
        return (not colors or o.color in colors) and (not shapes or o.shape in shapes)

    return {i for i, o in enumerate(scene.objects) if named(o)}


def to_uint8(image: Image.Image, size: int) -> np.ndarray:
    """(3, size, size) uint8 array of an RGB image that already has the model's input size."""
    if image.size != (size, size):
        raise ValueError(f"train images must be {size} x {size} (got {image.size}); render scenes at image_size")
    return np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1))


def drop_start(cfg: TrainConfig) -> int:
    """The first update whose images may lose patches to the token-count augmentation."""
    return math.ceil(cfg.drop_from * cfg.steps)


def kept_patches(cfg: TrainConfig, index: int, n_patches: int) -> np.ndarray:
    """(n_patches,) bool: the patches train image ``index`` sends to the LM (all, unless the token-count
    augmentation drops some: see ``TrainConfig.drop_prob`` and ``drop_from``). Deterministic per (seed, index)."""
    keep = np.ones(n_patches, dtype=bool)
    if cfg.drop_prob <= 0 or index // cfg.batch_size < drop_start(cfg):
        return keep
    rng = random.Random(f"vlmzip-lab-drop:{cfg.seed}:{index}")
    if rng.random() >= cfg.drop_prob:
        return keep
    share = cfg.drop_min_keep + (1 - cfg.drop_min_keep) * rng.random()
    chosen = shuffled(range(n_patches), rng)[: max(1, round(share * n_patches))]
    keep[:] = False
    keep[chosen] = True
    return keep


def mix_plan(cfg: TrainConfig, index: int, n_patches: int) -> MixPlan | None:
    """The MixPlan of train image ``index`` under the mixture augmentation (``cfg.mix``): None before
    ``drop_start`` or without ``cfg.mix``; with probability ``drop_prob`` a random component
    (``train_mix.draw_plan``), else the full image. Deterministic per (seed, index)."""
    if not cfg.mix or index // cfg.batch_size < drop_start(cfg):
        return None
    rng = random.Random(f"vlmzip-lab-mix:{cfg.seed}:{index}")
    if rng.random() >= cfg.drop_prob:
        return MixPlan("full", n_patches)
    return draw_plan(rng, n_patches, cfg.drop_min_keep)


def make_batch(cfg: TrainConfig, step: int) -> Batch:
    """The inputs of update ``step`` (a pure function of ``cfg`` and ``step``); right-padded."""
    tokenizer = _tokenizer(lab_words())
    n_img = image_tokens(cfg)
    grid = cfg.image_size // cfg.patch_size
    pixels, seqs, targets = [], [], []
    attn_rows: list[int] = []
    attn_positions: list[int] = []
    attn_patches: list[np.ndarray] = []
    keeps: list[np.ndarray] = []
    plans: list[MixPlan] = []
    for row, index in enumerate(range(step * cfg.batch_size, (step + 1) * cfg.batch_size)):
        image, scene, qas = image_sample(cfg, index)
        owners = patch_owners(image, scene, grid, cfg.aux_min_cover)
        targets.append(owner_words(scene, owners, tokenizer))
        if image.size != (cfg.image_size, cfg.image_size):
            image = image.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
        pixels.append(to_uint8(image, cfg.image_size))
        plan = mix_plan(cfg, index, n_img)
        keep = kept_patches(cfg, index, n_img) if plan is None else np.ones(n_img, dtype=bool)
        keeps.append(keep)
        if plan is not None:
            plans.append(plan)
        ids, labels = encode_conversation(qas, tokenizer, int(keep.sum()) if plan is None else plan.tokens)
        seqs.append((ids, labels))
        starts = [j for j in range(1, len(labels)) if labels[j] != IGNORE_INDEX and labels[j - 1] == IGNORE_INDEX]
        for qa, start in zip(qas, starts, strict=True):
            patches = np.isin(owners, sorted(named_objects(qa, scene))) & keep
            if patches.any():
                attn_rows.append(row)
                attn_positions.append(start - 1)
                attn_patches.append(patches)
    length = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    n_answers = int((labels == tokenizer.eos_token_id).sum().item())
    return Batch(
        torch.from_numpy(np.stack(pixels)),
        input_ids,
        mask,
        labels,
        torch.from_numpy(np.stack(targets)),
        n_answers,
        torch.tensor(attn_rows, dtype=torch.long),
        torch.tensor(attn_positions, dtype=torch.long),
        torch.from_numpy(np.stack(attn_patches)) if attn_patches else torch.zeros((0, n_img), dtype=torch.bool),
        torch.from_numpy(np.stack(keeps)),
        plans or None,
    )


def pixel_values(pixels: torch.Tensor, processor: LlavaProcessor) -> torch.Tensor:
    """CLIP normalisation of uint8 pixels, equal (to 1e-6) to the processor's for same-size images."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() * ip.rescale_factor - mean) / std


def batches(cfg: TrainConfig, start: int) -> Iterator[Batch]:
    """``make_batch(cfg, s)`` for s = start .. steps-1, rendered ahead by ``cfg.workers`` processes."""
    if cfg.workers <= 0:
        for step in range(start, cfg.steps):
            yield make_batch(cfg, step)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        pending: deque[Future[Batch]] = deque()
        next_step = start
        while next_step < cfg.steps or pending:
            while next_step < cfg.steps and len(pending) < 2 * cfg.workers:
                pending.append(pool.submit(make_batch, cfg, next_step))
                next_step += 1
            yield pending.popleft().result()


__all__ = [
    "IGNORE_INDEX", "Batch", "batches", "drop_start", "encode_conversation", "image_sample", "kept_patches",
    "make_batch", "mix_plan", "named_objects", "owner_words", "patch_owners", "pixel_values", "scene_config",
    "scene_scale", "shuffled", "to_uint8",
]  # fmt: skip
