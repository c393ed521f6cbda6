"""Questions about videos on a model that takes images: each video's frames become that many images of one
multi-image prompt; mixed batches (an image, a video, several videos per row) answer as single rows do, and a
compressed model's prompt is measured as the LLM receives it."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image

from vlmzip import compressed
from vlmzip.io import batch_visual_inputs, chat_prompt, content_kinds, generate_answers, llm_lengths, takes_videos
from vlmzip.video import Video, frame_knobs

PATCHES = 64  # the test LLaVA: 112 px / 14 -> 8 x 8 patches per image


def clip(seed: int, frames: int) -> Video:
    images = tuple(random_image(100 * seed + i) for i in range(frames))
    return Video(images, tuple(range(frames)), frames, None, None, f"test clip {seed}")


def test_a_video_is_one_image_per_frame_unless_the_model_takes_videos(processor) -> None:
    row = [random_image(0), clip(1, 3)]
    assert content_kinds(row, videos=False) == ["image"] * 4
    assert content_kinds(row, videos=True) == ["image", "video"]
    prompt = chat_prompt(processor, "What moved?", content_kinds(row, videos=False))
    assert prompt.count("<image>") == 4 and "video" not in prompt

    class NoTemplate:
        chat_template = None

    assert chat_prompt(NoTemplate(), "What moved?", ["video"]) == "USER: <video>\nWhat moved? ASSISTANT:"
    assert chat_prompt(NoTemplate(), "What?") == "USER: <image>\nWhat? ASSISTANT:"


def test_mixed_rows_hold_their_frames_as_images(model, processor) -> None:
    assert takes_videos(model) is False  # LLaVA-1.5: frames as images
    rows = [random_image(5), clip(2, 3), [clip(3, 2), clip(4, 2)]]
    inputs = batch_visual_inputs(processor, rows, ["a", "b", "c"], model)
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert placeholders == [PATCHES, 3 * PATCHES, 4 * PATCHES]
    assert inputs["pixel_values"].shape[0] == 1 + 3 + 4


@pytest.mark.parametrize("knobs", [None, {"tokens": 8}])
def test_a_mixed_batch_answers_as_each_row_alone(model, processor, knobs) -> None:
    rows = [random_image(5), clip(2, 3), [clip(3, 2), random_image(6), clip(4, 2)]]
    questions = ["what is in the image?", "what color is it?", "how many are there?"]

    def answers() -> tuple[list[str], list[str]]:
        together = generate_answers(model, processor, rows, questions, max_new_tokens=6)
        alone = [generate_answers(model, processor, [row], [q], max_new_tokens=6)[0]
                 for row, q in zip(rows, questions, strict=True)]
        return together, alone

    if knobs is None:
        together, alone = answers()
    else:
        with compressed(model, "visionzip", **knobs):
            together, alone = answers()
    assert together == alone
    assert any(a for a in together)  # the random model says something


def test_many_frames_fit_the_context_once_compressed_and_are_measured_as_the_llm_sees_them(model, processor) -> None:
    video = clip(7, 40)  # 40 x 64 = 2560 placeholders, over the test model's context of 2048
    with pytest.raises(ValueError, match=r"sample fewer frames \(--frames; this prompt has 40\)"):
        batch_visual_inputs(processor, [video], ["what moved?"], model)
    knobs = frame_knobs({"tokens": 320}, len(video))  # 320 per video: 8 per frame
    assert knobs == {"tokens": 8}
    seen: list[int] = []

    def record(module, args, kwargs) -> None:
        seen.append(int(kwargs["attention_mask"].sum()) if kwargs.get("attention_mask") is not None
                    else kwargs["inputs_embeds"].shape[1])

    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with compressed(model, "visionzip", **knobs), torch.no_grad():
            inputs = batch_visual_inputs(processor, [video, random_image(1)], ["what moved?", "what?"], model)
            lengths = llm_lengths(model, inputs)
            model(**inputs)
    finally:
        handle.remove()
    raw = inputs["attention_mask"].sum(dim=1).tolist()
    assert lengths == [raw[0] - 40 * (PATCHES - 8), raw[1] - (PATCHES - 8)]
    assert seen[0] == sum(lengths)
