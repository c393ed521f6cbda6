"""The lab training loop: data encoding, learning, exact resume, export, CLI flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN as TINY
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmzip.builders.llava import build_llava
from vlmzip.lab import scenes
from vlmzip.lab.train import add_parser, autocast, cmd_train, evaluate, start_run, train
from vlmzip.lab.train_config import TrainConfig, config_from_args, image_tokens, lab_words, lr_at, model_config
from vlmzip.lab.train_data import (
    _tokenizer,
    drop_start,
    encode_conversation,
    image_sample,
    kept_patches,
    make_batch,
    named_objects,
    owner_words,
    patch_owners,
    pixel_values,
    scene_config,
    scene_scale,
    to_uint8,
)
from vlmzip.lab.train_losses import eager_attention, losses


def conversation(qas: list[scenes.QA]) -> list[dict]:
    messages = []
    for k, qa in enumerate(qas):
        content = [{"type": "image"}, {"type": "text", "text": qa.question}] if k == 0 else qa.question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": qa.answer}]
    return messages


def test_conversation_ids_equal_processor_and_labels_cover_answers() -> None:
    cfg = TrainConfig()
    _, processor = build_llava(None, model_config(replace(cfg, vision_layers=1, text_layers=1, attn_layer=0)))
    image, _, qas = image_sample(cfg, 3)
    assert len(qas) == cfg.questions_per_image[3]
    ids, labels = encode_conversation(qas, processor.tokenizer, image_tokens(cfg))
    text = processor.apply_chat_template(conversation(qas))
    reference = processor(images=[image], text=[text], return_tensors="pt")
    assert reference["input_ids"][0].tolist() == ids
    assert processor.tokenizer.unk_token_id not in ids
    answers = processor.tokenizer.convert_ids_to_tokens([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert answers == [tok for qa in qas for tok in (qa.answer.lower(), "</s>")]
    # fast pixel path == the processor's CLIP preprocessing
    batch_pixels = torch.from_numpy(to_uint8(image, cfg.image_size))[None]
    assert torch.allclose(pixel_values(batch_pixels, processor), reference["pixel_values"], atol=1e-5)


def test_batches_are_deterministic_and_question_order_varies() -> None:
    a, b = make_batch(TINY, 5), make_batch(TINY, 5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixels, b.pixels)
    assert a.pixels.shape == (2, 3, 112, 112) and a.pixels.dtype == torch.uint8
    first_types = {image_sample(TINY, i)[2][0].type for i in range(0, 40, 4)}  # 7-question images
    assert len(first_types) >= 3


def test_patch_targets_name_what_each_patch_shows() -> None:
    tok = _tokenizer(lab_words())
    square = scenes.SceneObject("square", "red", "large", (0, 0, 56, 56))  # exactly patches (0..3, 0..3)
    scene = scenes.Scene(336, 336, (220, 220, 220), (square,), None)
    targets = owner_words(scene, patch_owners(scenes.render(scene), scene, 24, 0.1), tok).reshape(24, 24, 2)
    red, sq = tok.convert_tokens_to_ids(["red", "square"])
    assert (targets[:4, :4] == [red, sq]).all()
    assert (targets[4:, :, 0] == tok.pad_token_id).all() and (targets[:, 4:, 0] == tok.pad_token_id).all()
    assert (targets[4:, :, 1] == -100).all()
    image, scene, _ = image_sample(TrainConfig(), 7)
    targets = owner_words(scene, patch_owners(image, scene, 24, 0.1), tok)
    named = set(tok.convert_ids_to_tokens([int(t) for t in targets.reshape(-1) if t >= 0]))
    assert {o.color for o in scene.objects} <= named and {o.shape for o in scene.objects} <= named


def test_named_objects_follow_the_question_words() -> None:
    objs = (
        scenes.SceneObject("circle", "red", "large", (0, 0, 60, 60)),
        scenes.SceneObject("square", "blue", "small", (100, 100, 116, 116)),
        scenes.SceneObject("square", "red", "small", (200, 200, 216, 216)),
        scenes.SceneObject("square", "blue", "large", (100, 200, 160, 260)),
    )
    text = scenes.TextItem("cat", "word", 20, (250, 20), (250, 20, 280, 35))
    scene = scenes.Scene(336, 336, (220, 220, 220), objs, text)

    def named(question: str) -> set[int]:
        return named_objects(scenes.QA(question, "", "", ""), scene)

    assert named("Is there a red circle?") == {0}
    assert named("Is there a green star?") == set()
    assert named("How many red objects are there?") == {0, 2}
    assert named("How many squares are there?") == {1, 2, 3}
    assert named("How many objects are there?") == {0, 1, 2, 3}
    assert named("What color is the small square?") == {1, 2}
    assert named("What shape is the small red object?") == {2}
    assert named("Is the red circle to the left of the blue square?") == {0, 1, 3}
    assert named("What word is written in the image?") == {4}


def test_attention_targets_point_at_answers_and_named_patches() -> None:
    batch = make_batch(TINY, 3)
    assert len(batch.attn_rows) > 0 and batch.attn_patches.shape[1] == image_tokens(TINY)
    assert batch.attn_patches.any(1).all()
    for row, pos in zip(batch.attn_rows.tolist(), batch.attn_positions.tolist(), strict=True):
        assert batch.labels[row, pos] == -100 and batch.labels[row, pos + 1] != -100  # predicts an answer
    square = scenes.SceneObject("square", "red", "large", (0, 0, 56, 56))  # exactly patches (0..3, 0..3)
    scene = scenes.Scene(336, 336, (220, 220, 220), (square,), None)
    owners = patch_owners(scenes.render(scene), scene, 24, 0.1).reshape(24, 24)
    assert (owners[:4, :4] == 0).all() and (owners[4:] == -1).all() and (owners[:, 4:] == -1).all()


def test_attention_layer_must_exist() -> None:
    with pytest.raises(ValueError, match="attn_layer=4 is not a layer of the 4-layer LM"):
        TrainConfig(attn_layer=4, attn_weight=1.0)
    TrainConfig(attn_layer=4, attn_weight=0.0)


def test_attention_loss_reads_the_causal_weights_of_its_layer() -> None:
    cfg = replace(TINY, text_layers=2, attn_layer=1)
    model, processor = build_llava(None, model_config(cfg))
    batch = make_batch(cfg, 3)
    restore = eager_attention(model)
    _, _, loss = losses(model, processor, batch, torch.device("cpu"), attn_layer=1)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=pixel_values(batch.pixels, processor),
        output_attentions=True,
    )
    weights = out.attentions[1]
    assert torch.triu(weights, diagonal=1).abs().max() == 0  # causal
    first = int((batch.input_ids[0] == model.config.image_token_id).nonzero()[0, 0])
    rows = weights[batch.attn_rows, :, batch.attn_positions].mean(1)[:, first : first + batch.attn_patches.shape[1]]
    expected = -torch.log((rows * batch.attn_patches).sum(-1) + 1e-6).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    restore()
    assert model.model.language_model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="eager"):
        losses(model, processor, batch, torch.device("cpu"), attn_layer=1)


def test_curriculum_scale_decays_to_the_benchmark() -> None:
    cfg = TrainConfig(steps=100, batch_size=4, easy_scale=3.0, easy_until=0.5)
    early = [scene_scale(cfg, i) for i in range(40)]  # updates 0-9
    assert max(early) > 2.0 and min(early) >= 1.0
    assert all(scene_scale(cfg, i) == 1.0 for i in range(200, 260))  # updates 50-64
    assert scene_config(cfg, 0, 1.0) == scenes.SceneConfig(questions_per_image=cfg.questions_per_image[0])


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=1e-2)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_loss_goes_down(tmp_path: Path) -> None:
    train(tmp_path, replace(TINY, steps=80, warmup_steps=5), resume=False)
    logged = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(logged) == 80
    assert sum(logged[-10:]) / 10 < 0.5 * sum(logged[:3]) / 3
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    train(tmp_path / "straight", TINY, resume=False)
    train(tmp_path / "resumed", TINY, resume=False, stop_after=3)  # "interrupted" after update 3
    assert not (tmp_path / "resumed" / "model").exists()
    train(tmp_path / "resumed", TINY, resume=True)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    with pytest.raises(ValueError, match="lr"):
        train(tmp_path / "resumed", replace(TINY, lr=1e-2), resume=True)


def test_export_loads_offline_and_generates(tmp_path: Path) -> None:
    model_dir = train(tmp_path, replace(TINY, steps=2, eval_limit=1), resume=False)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    image, _, qas = scenes.sample(scenes.SPLITS["val"].seed, 0)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qas[0].question}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 64
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    result = evaluate(model, processor, "val", limit=2, batch_size=4)
    assert result["n"] == 6 and set(result["per_type"]) <= set(scenes.QUESTION_TYPES)
    assert any("eval" in json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines())


def test_cli_flags_map_to_config() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "--out", "x", "--steps", "5", "--lr", "0.01", "--questions-per-image", "7,3", "--progress", "false"]
    )
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.questions_per_image, cfg.progress) == (5, 0.01, (7, 3), False)
    assert cfg.batch_size == TrainConfig().batch_size and args.func is cmd_train and args.out == "x"
    branch = parser.parse_args(["train", "--out", "y", "--branch-from", "x", "--mix", "true", "--stop-after", "9"])
    cfg = config_from_args(branch)
    assert (cfg.branch_from, cfg.mix, branch.stop_after) == ("x", True, 9)


def test_token_count_augmentation_drops_patches_deterministically() -> None:
    n = image_tokens(TINY)
    assert kept_patches(TINY, 5, n).all()  # drop_prob 0: every patch
    cfg = replace(TINY, drop_prob=1.0, drop_min_keep=0.25, steps=1000)
    keeps = [kept_patches(cfg, i, n) for i in range(20)]
    assert all(np.array_equal(k, kept_patches(cfg, i, n)) for i, k in enumerate(keeps))
    assert all(round(0.25 * n) <= k.sum() < n for k in keeps) and len({int(k.sum()) for k in keeps}) > 5
    half = replace(TINY, drop_prob=0.5, steps=1000)
    assert 5 <= sum(kept_patches(half, i, n).all() for i in range(40)) <= 35
    with pytest.raises(ValueError, match="drop_prob"):
        TrainConfig(drop_prob=1.5)


def test_a_dropped_batch_sends_only_kept_patches_and_supervises_only_them() -> None:
    cfg = replace(TINY, drop_prob=1.0, drop_min_keep=0.3, batch_size=4)
    batch = make_batch(cfg, 2)
    image_id = _tokenizer(lab_words()).convert_tokens_to_ids("<image>")
    assert ((batch.input_ids == image_id).sum(1) == batch.keep.sum(1)).all()
    assert not (batch.attn_patches & ~batch.keep[batch.attn_rows]).any()
    model, processor = build_llava(None, model_config(cfg))
    restore = eager_attention(model)
    answer, aux, attn = losses(model, processor, batch, torch.device("cpu"), attn_layer=0)
    restore()
    assert all(torch.isfinite(x) and x > 0 for x in (answer, aux, attn))
    answer.backward()
    patch_embedding = model.model.vision_tower.get_input_embeddings()
    assert patch_embedding.weight.grad is not None and patch_embedding.weight.grad.abs().sum() > 0


def test_losses_with_every_patch_kept_equal_the_stock_forward() -> None:
    cfg = replace(TINY, text_layers=2)
    model, processor = build_llava(None, model_config(cfg))
    batch = make_batch(cfg, 4)
    answer, _, _ = losses(model, processor, batch, torch.device("cpu"))
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                pixel_values=pixel_values(batch.pixels, processor))
    vocab = out.logits.shape[-1]
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, vocab),
                                                 batch.labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(answer, expected, atol=1e-5)


def test_token_count_augmentation_starts_at_drop_from() -> None:
    cfg = replace(TINY, drop_prob=1.0, drop_from=0.75, steps=8, batch_size=2)  # updates 6 and 7 drop
    n = image_tokens(cfg)
    assert drop_start(cfg) == 6
    assert all(kept_patches(cfg, i, n).all() for i in range(12))  # images of updates 0-5
    assert not any(kept_patches(cfg, i, n).all() for i in range(12, 16))
    assert make_batch(cfg, 5).keep.all() and not make_batch(cfg, 6).keep.all(1).any()
    with pytest.raises(ValueError, match="drop_from"):
        TrainConfig(drop_from=1.5)


def test_shipped_recipe_drops_only_in_its_last_updates() -> None:
    cfg = TrainConfig()
    assert cfg.drop_prob > 0 and 0.85 <= cfg.drop_from < 1
    n = image_tokens(cfg)
    last_clean = (drop_start(cfg) - 1) * cfg.batch_size
    assert all(kept_patches(cfg, i, n).all() for i in range(last_clean, last_clean + cfg.batch_size))
    first_drop = drop_start(cfg) * cfg.batch_size
    dropped = [not kept_patches(cfg, i, n).all() for i in range(first_drop, first_drop + 200)]
    assert 0.35 < sum(dropped) / len(dropped) < 0.65


def test_bf16_autocast_trains_and_fp32_is_plain() -> None:
    cpu = torch.device("cpu")
    with autocast(replace(TINY, precision="fp32"), cpu):
        assert not torch.is_autocast_enabled("cpu")
    cfg = replace(TINY, precision="bf16")
    with autocast(cfg, cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    model, processor = build_llava(None, model_config(cfg))
    restore = eager_attention(model)
    batch = make_batch(cfg, 1)
    with autocast(cfg, cpu):
        answer, aux, attn = losses(model, processor, batch, cpu, attn_layer=0)
    restore()
    assert all(x.dtype == torch.float32 and torch.isfinite(x) for x in (answer, aux, attn))
    plain, _, _ = losses(model, processor, batch, cpu)
    assert plain.item() != answer.item() and abs(plain.item() - answer.item()) < 0.05 * plain.item()
    answer.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_a_checkpoint_from_before_a_new_field_resumes_with_that_fields_default(tmp_path: Path) -> None:
    train(tmp_path / "old", TINY, resume=False, stop_after=2)
    path = tmp_path / "old" / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["freeze_vision"], state["config"]["distill"]  # a checkpoint whose config lacks these fields
    torch.save(state, path)
    with pytest.raises(ValueError, match="freeze_vision: checkpoint False vs now True"):
        start_run(tmp_path / "old", replace(TINY, freeze_vision=True), resume=True)
    assert start_run(tmp_path / "old", TINY, resume=True).step == 2
