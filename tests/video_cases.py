"""Checks shared by the video families' tests (LLaVA-NeXT-Video, LLaVA-OneVision): a family's test module builds its
tiny model and processor and calls these with them; and small video files written with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

import vlmzip
from vlmzip.methods import get_method

NEW = 4


def write_mp4(path: Path, n: int, seed: int) -> None:
    """An MPEG-4 file of ``n`` random 112 x 112 frames at 10 fps, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 112, 112, "yuv420p"
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frames(seed: int, count: int, size: tuple[int, int] = (130, 100)) -> list[Image.Image]:
    """``count`` random RGB frames of ``size`` (width, height), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def prompt(processor, question: str, images: int = 0, videos: int = 0) -> str:
    """A chat prompt with ``images`` images and ``videos`` videos before the question."""
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def knobs_of(method: str, **budget) -> dict:
    """``budget`` for a method that takes one (vanilla takes none)."""
    return budget if get_method(method).takes_budget else {}


def suppressed(model) -> list[int]:
    return [model.config.image_token_id, model.config.video_token_id]


def greedy(model, inputs, **kwargs):
    """Greedy generation that never emits a placeholder token (a random model may)."""
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, suppress_tokens=suppressed(model), **kwargs)


def next_token(model, logits: torch.Tensor) -> torch.Tensor:
    """(B, V) last-position logits -> (B, 1) greedy token, placeholders suppressed as in :func:`greedy`."""
    logits = logits.clone()
    logits[:, suppressed(model)] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


class LLMPlaceholders:
    """A pre-hook on the inner model: the image and video placeholders each row of every call sends to the LLM."""

    def __init__(self, model) -> None:
        self.ids = (model.config.image_token_id, model.config.video_token_id)
        self.calls: list[list[tuple[int, int]]] = []
        self.handle = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None:
            self.calls.append([(int((row == self.ids[0]).sum()), int((row == self.ids[1]).sum())) for row in ids])


def mixed_batch(processor, count: int) -> tuple[dict, list[dict]]:
    """Row 0: a video; row 1: an image; row 2: two videos (``count`` frames each), questions of different lengths,
    left padded. Returns the batch and each row's own inputs."""
    rows = [
        ([], [frames(1, count)], prompt(processor, "what moved ?", videos=1)),
        ([Image.fromarray(np.random.default_rng(2).integers(0, 256, (120, 130, 3), dtype=np.uint8))], [],
         prompt(processor, "how many shapes are there ?", images=1)),
        ([], [frames(3, count), frames(4, count)], prompt(processor, "which came first ?", videos=2)),
    ]
    texts = [text for _, _, text in rows]
    images = [image for row_images, _, _ in rows for image in row_images]
    videos = [video for _, row_videos, _ in rows for video in row_videos]
    batch = processor(text=texts, images=images, videos=videos, return_tensors="pt", padding=True)
    singles = [processor(text=[text], images=row_images or None, videos=row_videos or None, return_tensors="pt")
               for row_images, row_videos, text in rows]
    return batch, singles


def check_keep_all(model, calls: list[dict], methods: list[str]) -> None:
    """``ratio=1.0`` reproduces the vanilla logits for every method, on every call."""
    for call in calls:
        before = logits(model, call)
        for method in methods:
            with vlmzip.compressed(model, method, **knobs_of(method, ratio=1.0)):
                torch.testing.assert_close(logits(model, call), before, atol=1e-5, rtol=0, msg=method)


def check_batch_equals_singles(model, batch: dict, singles: list[dict], method: str, **knobs) -> None:
    """A padded batch generates, row by row, what each row generates alone (tokens and first-step logits)."""
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    vlmzip.compress(model, method, **knobs_of(method, **knobs))
    batched = greedy(model, batch, return_dict_in_generate=True, output_logits=True)
    new = batched.sequences[:, batch["input_ids"].shape[1]:]
    for i, single_inputs in enumerate(singles):
        single = greedy(model, single_inputs, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1]:], new[i]), (method, i)
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


def check_cached_equals_recomputed(model, inputs: dict, method: str, **knobs) -> None:
    """A pre-LLM selection does not depend on the text: cached generate's tokens are the argmax of a forward over
    the whole sequence so far, recomputed without a cache, at every step."""
    vlmzip.compress(model, method, **knobs_of(method, **knobs))
    cached = greedy(model, inputs)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **media)
            token = next_token(model, out.logits[:, -1])
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    assert torch.equal(cached, ids)


def check_in_llm_on_videos(model, inputs: dict, method: str, tokens: int) -> None:
    """An in-LLM method prunes the videos' tokens inside the LLM (``tokens`` per video): generate equals one
    compressed prefill then decode steps on its cache (or, for a method that prunes before layer 0, one token
    then the rest on that cache), and the last layer's cache holds fewer tokens than the prompt."""
    vlmzip.compress(model, method, tokens=tokens)
    out = greedy(model, inputs, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(out.logits[0], model(**inputs).logits[:, -1], atol=1e-5, rtol=1e-5)
    assert out.cache.layers[-1].keys.shape[-2] < inputs["input_ids"].shape[1], "the cache holds only kept tokens"
    if min(step.layer for step in vlmzip.api.state_of(model).steps) == 0:
        first = model.generate(**inputs, max_new_tokens=1, do_sample=False, suppress_tokens=suppressed(model),
                               return_dict_in_generate=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, -1:])], dim=1)
        rest = model.generate(input_ids=first.sequences, attention_mask=mask, cache=first.cache,
                              max_new_tokens=NEW - 1, do_sample=False, suppress_tokens=suppressed(model))
        assert torch.equal(rest, out.sequences)
        return
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        step = model(**inputs, use_cache=True)
        for _ in range(NEW):
            token = next_token(model, step.logits[:, -1])
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, cache=step.cache, use_cache=True)
    assert torch.equal(out.sequences, ids)


def frame_shares(selections, video: int) -> list[int]:
    """Tokens each frame of call item ``video`` sent, from recorded selections (units (item, frame))."""
    shares: dict[int, int] = {}
    for selection in selections:
        for unit in selection.units:
            if unit[0] == video:
                shares[unit[1]] = selection.features.shape[1]
    return [shares[f] for f in sorted(shares)]
