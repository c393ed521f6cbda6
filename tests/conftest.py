"""Shared fixtures: a small LLaVA checkpoint written to disk and loaded back like a real one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmzip.builders.llava import LlavaSpec, build_llava
from vlmzip.lab.train_config import TrainConfig

# The vLLM plugin's tests run in their own venv (tools/test-vllm.sh, which stops conftest lookup there); here their
# conftest would replace this one as the module "conftest" that tests import helpers from.
collect_ignore = ["vllm_plugin"]

# 112 px / patch 14 -> an 8 x 8 grid: 64 patches + CLS, LLaVA-1.5's layout at a smaller scale.
TEST_CFG = LlavaSpec(image_size=112, patch_size=14, vision_layers=4, text_layers=2)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llava")
    build_llava(out, TEST_CFG)
    return out


@pytest.fixture(scope="session")
def six_layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test LLaVA with 6 decoder layers (in-LLM methods that prune at several layers)."""
    out = tmp_path_factory.mktemp("tiny-llava-6")
    build_llava(out, replace(TEST_CFG, text_layers=6))
    return out


def load(path: Path, **kwargs) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(path, **kwargs).eval()


@pytest.fixture()
def model(llava_dir: Path) -> LlavaForConditionalGeneration:
    return load(llava_dir)


@pytest.fixture(scope="session")
def processor(llava_dir: Path):
    return AutoProcessor.from_pretrained(llava_dir)


def random_image(seed: int, size: tuple[int, int] = (130, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="session")
def batch_inputs(processor):
    """Three different images and questions of different lengths, left padded."""
    questions = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]
    images = [random_image(i) for i in range(3)]
    texts = [chat_prompt(processor, q) for q in questions]
    return processor(images=images, text=texts, return_tensors="pt", padding=True), images, texts


torch.set_num_threads(max(1, torch.get_num_threads()))


# lab training tests: 112 px / patch 14 -> 64 patch tokens; a model small enough for dozens of updates in a few seconds.
TINY_TRAIN = TrainConfig(
    steps=6, batch_size=2, lr=3e-3, warmup_steps=2, image_size=112, patch_size=14,
    vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
    text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1, text_intermediate=64,
    threads=1, checkpoint_every=2, log_every=1, eval_limit=0, progress=False, attn_weight=1.0, attn_layer=0,
    drop_prob=0.0, drop_from=0.0,
)  # fmt: skip
