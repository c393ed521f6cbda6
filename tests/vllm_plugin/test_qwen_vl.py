"""vlmzip's vLLM plugin on a tiny random Qwen2.5-VL (windowed ViT, 2x2 merger, M-RoPE), Qwen2-VL (the same without
windows) and Qwen3-VL (DeepStack levels, interleaved M-RoPE, a video as one run per temporal patch; and its MoE):
every pre-LLM method gives, in vLLM, the greedy tokens and first-step log-probabilities of vlmzip on transformers
(fp32), with a prompt of budget + text tokens and every kept token at its vanilla (t, h, w) position; the plugin
off is vLLM's own model, and videos pass through whole at vLLM's own positions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

vllm = pytest.importorskip("vllm")

from vllm_engine import CASES, assert_same, close, generate, reference, serve  # noqa: E402

import vlmzip  # noqa: E402
from vlmzip.adapters.qwen_vl import load_processor  # noqa: E402
from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl  # noqa: E402
from vlmzip.vllm import settings as vz  # noqa: E402
from vlmzip.vllm.checkpoints import rewrite_for_vllm  # noqa: E402
from vlmzip.vllm.qwen_vl import read_positions, relative_positions, with_positions  # noqa: E402

# patch 8, merge 2: the 120 x 150 test image is 14 x 16 patches -> 7 x 8 = 56 merged tokens; vision heads of 32,
# Qwen2 decoder head size 32 (vLLM's CPU attention takes 32, 64, 80, ...); Qwen2.5-VL: window 32 px = 2 x 2 merged
# tokens, full attention at blocks 1 and 2 (the signal block is 2), the last block windowed
SIZES = dict(vision_hidden=64, vision_heads=2, text_hidden=128, text_heads=4, text_kv_heads=2, seed=3)
PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is in the picture<|im_end|>\n" \
         "<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["2.5", "2", "3"], ids=["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    folder = tmp_path_factory.mktemp(f"qwen{request.param}-vl")
    model, _ = build_qwen_vl(folder, QwenVLSpec(version=request.param, **SIZES))
    return folder, model.eval(), load_processor(folder)


def tall() -> Image.Image:
    """An image taller than wide (the text after it starts at its height, not its width)."""
    return Image.fromarray((np.random.RandomState(1).rand(170, 90, 3) * 255).astype("uint8"))


def counts(processor: Any, picture: Image.Image | None = None) -> tuple[int, int]:
    """(the image's vanilla merged tokens, the prompt's text tokens) as the processor lays them out."""
    from vllm_engine import image

    ids = processor(text=PROMPT, images=picture or image(), return_tensors="pt")["input_ids"][0]
    visual = int((ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    return visual, len(ids) - visual


def served(folder: Path, method: str, knobs: dict[str, Any]) -> tuple[list[int], dict[int, float], int]:
    """:func:`generate`'s answer to the prompt from an engine serving ``folder`` with the plugin on."""
    llm = serve(folder, {"vlmzip": {"method": method, **knobs}})
    try:
        return generate(llm, PROMPT)
    finally:
        close(llm)


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_equals_transformers(checkpoint: tuple[Path, Any, Any], method: str) -> None:
    folder, model, processor = checkpoint
    knobs = CASES[method]
    want = reference(model, processor, method, knobs, PROMPT)
    got = served(folder, method, knobs)
    vanilla, text = counts(processor)
    keep = vz.parse({"method": method, **knobs}).keep(vanilla)
    assert keep < vanilla
    assert got[2] == keep + text  # the engine's prompt: budget + text
    assert_same(got, want)
    plain = reference(model, processor, None, {}, PROMPT)
    assert want[0] != plain[0] or not torch.allclose(want[1], plain[1])  # the method changed the answer


def test_tall_image_keeps_vanilla_positions(checkpoint: tuple[Path, Any, Any]) -> None:
    """An image more merged tokens high than wide: the kept tokens keep their (h, w) and the text after the image
    starts as many positions after it as the image is high, as on transformers."""
    folder, model, processor = checkpoint
    _, h, w = processor(text=PROMPT, images=tall(), return_tensors="pt")["image_grid_thw"][0].tolist()
    assert h > w
    knobs = {"tokens": 20}
    want = reference(model, processor, "visionzip", knobs, PROMPT, tall())
    llm = serve(folder, {"vlmzip": {"method": "visionzip", **knobs}})
    try:
        got = generate(llm, PROMPT, tall())
    finally:
        close(llm)
    assert got[2] == 20 + counts(processor, tall())[1]
    assert_same(got, want)


def hf_positions(model: Any, processor: Any, method: str, knobs: dict[str, Any]) -> torch.Tensor:
    """(3, L) M-RoPE positions of the prefill vlmzip gives transformers' language model (L: the shrunk prompt)."""
    seen: list[torch.Tensor] = []

    def keep(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["position_ids"][-3:, 0].clone())

    from vllm_engine import image

    inputs = processor(text=PROMPT, images=image(), return_tensors="pt")
    handle = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with vlmzip.compressed(model, method, **knobs), torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    return seen[0]


SEEN: list[torch.Tensor] = []


def watch_positions(model: Any) -> None:
    """In each vLLM worker (here: this process): record the positions of every forward of the language model (its
    instance's forward: vLLM's compile decorator calls it without module hooks)."""
    lm = model.language_model.model
    original = lm.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        SEEN.append(kwargs["positions"].clone())
        return original(*args, **kwargs)

    lm.forward = forward


@pytest.mark.parametrize(("method", "chunk"),
                         [("visionzip", None), ("tome", None), ("random", 16), ("cluster_aggregate", None)])
def test_kept_tokens_get_their_vanilla_positions(checkpoint: tuple[Path, Any, Any], method: str,
                                                 chunk: int | None) -> None:
    """The positions vLLM's language model gets for the prompt are those vlmzip gives transformers' (each kept token
    its own (t, h, w), the text after the image at its vanilla position), also when chunked prefill splits the
    image over engine steps (16 tokens a step)."""
    folder, model, processor = checkpoint
    knobs = CASES[method]
    want = hf_positions(model, processor, method, knobs)
    extra = {} if chunk is None else {"enable_chunked_prefill": True, "max_num_batched_tokens": chunk}
    llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=64 << 20,
                   hf_overrides={"vlmzip": {"method": method, **knobs}}, **extra)
    try:
        SEEN.clear()
        llm.apply_model(watch_positions)
        generate(llm, PROMPT)
    finally:
        close(llm)
    length = want.shape[1]
    got = torch.cat(SEEN, dim=1)[:, :length]  # the prefill's steps, then the decode steps
    assert got.shape[1] == length and (chunk is None or SEEN[0].shape[1] <= chunk < length)
    assert torch.equal(got, want), (got != want).nonzero().tolist()[:12]
    vanilla_next = int(want.max()) + 1  # the first generated token continues at the vanilla position
    assert int(torch.cat(SEEN, dim=1)[0, length]) == vanilla_next


def test_chunked_prefill_splits_an_image(checkpoint: tuple[Path, Any, Any]) -> None:
    """16 prompt tokens per engine step: the 24 kept tokens of the image reach the LLM over two steps, each at its
    own position, and the answer is still vlmzip's on transformers."""
    folder, model, processor = checkpoint
    entry = {"method": "visionzip", "tokens": 24}
    want = reference(model, processor, "visionzip", {"tokens": 24}, PROMPT)
    llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=64 << 20, hf_overrides={"vlmzip": entry},
                   enable_chunked_prefill=True, max_num_batched_tokens=16)
    try:
        got = generate(llm, PROMPT)
    finally:
        close(llm)
    assert got[2] == 24 + counts(processor)[1] > 16
    assert_same(got, want)


def test_off_is_vanilla(checkpoint: tuple[Path, Any, Any]) -> None:
    folder, model, processor = checkpoint
    llm = serve(folder, None)
    try:
        got = generate(llm, PROMPT)
    finally:
        close(llm)
    vanilla, text = counts(processor)
    assert got[2] == vanilla + text
    assert_same(got, reference(model, processor, None, {}, PROMPT))


def test_budget_larger_than_an_image_is_a_clear_error(checkpoint: tuple[Path, Any, Any]) -> None:
    """A tokens budget larger than the largest image the processor makes (64 merged tokens) is a start-up error; one
    that fits that image but not a smaller one (the count follows the image's size) fails that request, naming the
    knob, and the engine keeps serving."""
    folder = checkpoint[0]
    with pytest.raises(ValueError, match="tokens=80 is larger than the 64 visual tokens"):
        close(serve(folder, {"vlmzip": {"method": "pool", "tokens": 80}}))
    llm = serve(folder, {"vlmzip": {"method": "pool", "tokens": 60}})
    try:
        with pytest.raises(ValueError, match="vlmzip in vLLM: pool: tokens=60 is larger than the 56 visual tokens"):
            generate(llm, PROMPT)
        assert generate(llm, PROMPT, Image.new("RGB", (128, 128)))[2] == 60 + counts(checkpoint[2])[1]
    finally:
        close(llm)


def clip() -> tuple[np.ndarray, dict[str, Any]]:
    """4 frames of 64 x 96 at 2 fps with their metadata (Qwen3-VL writes each temporal patch's time as text)."""
    frames = (np.random.RandomState(2).rand(4, 64, 96, 3) * 255).astype("uint8")
    return frames, {"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3], "duration": 2.0,
                    "video_backend": "opencv"}


VIDEO_PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what happens<|im_end|>\n" \
               "<|im_start|>assistant\n"


def video_answer(folder: Path, overrides: dict[str, Any]) -> tuple[list[int], dict[int, float], int]:
    """:func:`generate`'s answer for the clip, from an engine that is gone when this returns (the next one starts
    clean)."""
    llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   limit_mm_per_prompt={"image": 1, "video": 1}, kv_cache_memory_bytes=64 << 20, **overrides)
    try:
        return generate(llm, VIDEO_PROMPT, media={"video": clip()})
    finally:
        close(llm)


def test_videos_pass_whole_at_vllms_positions(checkpoint: tuple[Path, Any, Any]) -> None:
    """With the plugin on, a video is sent whole (the plugin compresses images): the same prompt length, greedy tokens
    and log-probabilities as vLLM without the plugin, so each temporal patch's tokens (Qwen3-VL: each run after its
    timestamp) sit at vLLM's own positions."""
    tokens, first, length = video_answer(checkpoint[0], {})
    got_tokens, got_first, got_length = video_answer(
        checkpoint[0], {"hf_overrides": {"vlmzip": {"method": "visionzip", "tokens": 24}}})
    assert got_length == length > 24 and got_tokens == tokens
    assert got_first.keys() == first.keys()
    for tok, logprob in first.items():
        assert got_first[tok] == pytest.approx(logprob, abs=1e-5)


@pytest.mark.parametrize("method", ["visionzip", "tome"])
def test_qwen3_vl_moe_equals_transformers(tmp_path: Path, method: str) -> None:
    """Qwen3-VL-MoE (vLLM's fused experts; the builder's checkpoint rewritten to the released layout): the kept
    tokens and their DeepStack levels (merged with the same weights under ToMe) give vlmzip's answer on
    transformers."""
    model, _ = build_qwen_vl(tmp_path, QwenVLSpec(version="3-moe", **SIZES))
    assert rewrite_for_vllm(tmp_path) > 0
    processor = load_processor(tmp_path)
    knobs = CASES[method]
    want = reference(model.eval(), processor, method, knobs, PROMPT)
    got = served(tmp_path, method, knobs)
    vanilla, text = counts(processor)
    assert got[2] == knobs["tokens"] + text < vanilla + text
    assert_same(got, want)


def test_positions_travel_exactly_with_the_embeddings() -> None:
    """Relative positions packed into extra channels come back exactly, also in bf16 and beyond 256."""
    rel, extent = relative_positions((1, 2 * 300, 2 * 7), merge=2)
    assert extent == 300 and rel.shape == (3, 2100)
    for dtype in (torch.float32, torch.bfloat16):
        features = torch.randn(2100, 16).to(dtype)
        back, positions = read_positions(with_positions(features, rel))
        assert torch.equal(back, features) and torch.equal(positions, rel)
    video, extent = relative_positions((3, 4, 6), merge=2, t_factor=1.5)
    assert video[0].unique().tolist() == [0, 1, 3] and extent == 4
