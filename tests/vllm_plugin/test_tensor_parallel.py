"""vlmzip's vLLM plugin under vLLM's tensor parallelism, two worker processes on the CPU: each rank holds half of
the vision tower's heads, the signals are combined across the ranks, and the answer is vlmzip's on transformers
(within the rounding of the split matmuls)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor

vllm = pytest.importorskip("vllm")

from vllm_engine import PROMPT, assert_same, close, generate, reference  # noqa: E402

from vlmzip.adapters.qwen_vl import load_processor  # noqa: E402
from vlmzip.builders.llava import LlavaSpec, build_llava  # noqa: E402
from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl  # noqa: E402
from vlmzip.vllm.checkpoints import rewrite_for_vllm  # noqa: E402

QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is in the picture<|im_end|>\n" \
              "<|im_start|>assistant\n"


def cpus_for_two_ranks() -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for two workers: one allowed CPU each (vLLM's automatic binding wants a NUMA
    node per worker)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("tensor parallelism on the CPU needs two CPUs")
    return f"{allowed[0]}|{allowed[1]}"


def llava(folder: Path) -> tuple[Any, Any, str]:
    model, _ = build_llava(folder, LlavaSpec(image_size=112, text_hidden=128, text_heads=4, text_kv_heads=2,
                                             vision_layers=3, vision_heads=4, seed=3))
    assert rewrite_for_vllm(folder) > 0
    return model, AutoProcessor.from_pretrained(folder), PROMPT


def qwen(folder: Path) -> tuple[Any, Any, str]:
    model, _ = build_qwen_vl(folder, QwenVLSpec(version="2.5", vision_hidden=64, vision_heads=2, text_hidden=128,
                                                text_heads=4, text_kv_heads=2, seed=3))
    return model, load_processor(folder), QWEN_PROMPT


@pytest.mark.parametrize(("family", "method"), [(llava, "visionzip"), (qwen, "visionzip"), (llava, "tome")],
                         ids=["llava-visionzip", "qwen2.5-vl-visionzip", "llava-tome"])
def test_two_tensor_parallel_ranks_equal_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      family: Any, method: str) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", cpus_for_two_ranks())
    model, processor, prompt = family(tmp_path)
    want = reference(model.eval(), processor, method, {"tokens": 24}, prompt)
    llm = vllm.LLM(model=str(tmp_path), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=64 << 20, tensor_parallel_size=2,
                   hf_overrides={"vlmzip": {"method": method, "tokens": 24}})
    try:
        got = generate(llm, prompt)
    finally:
        close(llm)
    assert_same(got, want)
