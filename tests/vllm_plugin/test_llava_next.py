"""vlmzip's vLLM plugin on a tiny random LLaVA-NeXT (anyres: a base crop and a grid of high-resolution crops):
every pre-LLM method gives, in vLLM, the greedy tokens and first-step log-probabilities of vlmzip on transformers
(fp32), each image's budget split over its crops; the plugin off is vLLM's own packing (newline tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor

vllm = pytest.importorskip("vllm")

from vllm_engine import CASES, PROMPT, assert_same, close, generate, image, reference, serve  # noqa: E402

from vlmzip.builders.llava_next import LlavaNextSpec, build_llava_next  # noqa: E402
from vlmzip.vllm.checkpoints import rewrite_for_vllm  # noqa: E402

# CLIP 84 / 14 -> 6 x 6 = 36 patches per crop; Llama head size 32
SPEC = LlavaNextSpec(text_hidden=128, text_heads=4, text_kv_heads=2, vision_layers=3, seed=4)
RATIO = 0.3  # each image's own share: the budget splits over however many crops its size gives it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    folder = tmp_path_factory.mktemp("llava_next")
    model, _ = build_llava_next(folder, SPEC)
    assert rewrite_for_vllm(folder) > 0
    return folder, model, AutoProcessor.from_pretrained(folder)


def vanilla_count(processor: Any) -> tuple[int, int]:
    """(the image's vanilla token count, the prompt's text tokens) as the processor lays them out."""
    ids = processor(text=PROMPT, images=image(), return_tensors="pt")["input_ids"][0]
    image_tokens = int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    return image_tokens, len(ids) - image_tokens


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_equals_transformers(checkpoint: tuple[Path, Any, Any], method: str) -> None:
    folder, model, processor = checkpoint
    knobs = {k: v for k, v in CASES[method].items() if k not in ("tokens", "ratio")} | {"ratio": RATIO}
    want = reference(model, processor, method, knobs)
    llm = serve(folder, {"vlmzip": {"method": method, **knobs}})
    try:
        got = generate(llm)
    finally:
        close(llm)
    vanilla, text = vanilla_count(processor)
    assert got[2] == round(RATIO * vanilla) + text  # the engine's prompt: the image's budget + the text
    assert_same(got, want)
    plain = reference(model, processor, None, {})
    assert want[0] != plain[0] or not torch.allclose(want[1], plain[1])


def test_off_is_vllms_own_packing(checkpoint: tuple[Path, Any, Any]) -> None:
    folder, model, processor = checkpoint
    llm = serve(folder, None)
    try:
        got = generate(llm)
    finally:
        close(llm)
    vanilla, text = vanilla_count(processor)
    assert got[2] == vanilla + text
    assert_same(got, reference(model, processor, None, {}))
