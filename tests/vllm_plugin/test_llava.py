"""vlmzip's vLLM plugin on a tiny random LLaVA-1.5: every pre-LLM method gives, in vLLM, the greedy tokens and
first-step log-probabilities of vlmzip on transformers (fp32), with a prompt of budget + text tokens; the plugin off
is vanilla vLLM; bad knobs are start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor

vllm = pytest.importorskip("vllm")

from vllm_engine import CASES, PROMPT, assert_same, close, generate, image, reference, serve  # noqa: E402

from vlmzip.builders.llava import LlavaSpec, build_llava  # noqa: E402
from vlmzip.vllm import settings as vz  # noqa: E402
from vlmzip.vllm.checkpoints import rewrite_for_vllm  # noqa: E402

# CLIP 112 / 14 -> 8 x 8 = 64 patches + CLS; Llama head size 32 (vLLM's CPU attention takes 32, 64, 80, ...)
SPEC = LlavaSpec(image_size=112, text_hidden=128, text_heads=4, text_kv_heads=2, vision_layers=3, seed=3)
VANILLA = 64

def test_cases_cover_every_pre_llm_method() -> None:
    assert sorted(CASES) == [m for m in vz.pre_llm_methods() if m != "vanilla"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    folder = tmp_path_factory.mktemp("llava")
    model, _ = build_llava(folder, SPEC)
    assert rewrite_for_vllm(folder) > 0
    # the processor vLLM loads from the folder (transformers' default image processor class), so that both sides
    # encode the same pixels
    return folder, model, AutoProcessor.from_pretrained(folder)


def text_tokens(processor: Any) -> int:
    return processor(text=PROMPT, images=image(), return_tensors="pt")["input_ids"].shape[1] - VANILLA


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_equals_transformers(checkpoint: tuple[Path, Any, Any], method: str) -> None:
    folder, model, processor = checkpoint
    knobs = CASES[method]
    want = reference(model, processor, method, knobs)
    llm = serve(folder, {"vlmzip": {"method": method, **knobs}})
    try:
        got = generate(llm)
    finally:
        close(llm)
    keep = vz.parse({"method": method, **knobs}).keep(VANILLA)
    assert keep < VANILLA
    assert got[2] == keep + text_tokens(processor)  # the engine's prompt: budget + text
    assert_same(got, want)
    vanilla = reference(model, processor, None, {})
    assert want[0] != vanilla[0] or not torch.allclose(want[1], vanilla[1])  # the method changed the answer


def test_off_is_vanilla(checkpoint: tuple[Path, Any, Any]) -> None:
    """The plugin loaded but not turned on == vLLM without the plugin (another process, VLLM_PLUGINS empty) ==
    transformers."""
    folder, model, processor = checkpoint
    llm = serve(folder, None)
    try:
        got = generate(llm)
    finally:
        close(llm)
    assert got[2] == VANILLA + text_tokens(processor)
    assert_same(got, reference(model, processor, None, {}))
    env = {**os.environ, "VLLM_PLUGINS": ""}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_engine.py")), str(folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens, first, length, plugins = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert plugins == []  # vLLM without the plugin
    assert (tokens, length) == (got[0], got[2])
    assert {int(k): v for k, v in first.items()} == got[1]


@pytest.mark.parametrize(("entry", "message"), [
    ({"method": "fastv", "tokens": 16}, "prunes tokens inside the LLM"),
    ({"method": "sparsevlm", "tokens": 16}, "paged KV cache"),
    ({"method": "visionzipp", "tokens": 16}, "unknown method 'visionzipp'"),
    ({"method": "visionzip", "tokens": 100}, "tokens=100 is larger than the 64 visual tokens"),
    ({"method": "visionzip", "tokens": 16, "ratio": 0.5}, "not both"),
    ({"method": "pool", "tokenz": 16}, "has no knob 'tokenz'"),
    ({"method": "pool"}, "needs a budget"),
    ({"tokens": 16}, "name the method"),
    ("visionzip", "must be a mapping"),
])
def test_bad_knob_is_a_startup_error(checkpoint: tuple[Path, Any, Any], entry: Any, message: str) -> None:
    folder = checkpoint[0]
    with pytest.raises(Exception, match=message) as err:
        close(serve(folder, {"vlmzip": entry}))
    assert "vlmzip in vLLM" in str(err.value)


def test_bad_knob_stops_the_front_end_before_any_engine_process(checkpoint: tuple[Path, Any, Any]) -> None:
    """With vLLM's engine in its own process (its default), the error is raised in the front end, before the engine
    process starts: a clear ValueError for the caller, no crashed worker."""
    code = ("import sys, vllm\n"
            "try:\n"
            "    vllm.LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, max_model_len=512,\n"
            "             kv_cache_memory_bytes=64 << 20, hf_overrides={'vlmzip': {'method': 'fastv', 'tokens': 8}})\n"
            "except ValueError as err:\n"
            "    print('CAUGHT', err)\n")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(checkpoint[0])], env=env, capture_output=True, text=True,
                          timeout=600)
    assert "CAUGHT vlmzip in vLLM: 'fastv' prunes tokens inside the LLM" in done.stdout, done.stderr[-3000:]
    assert "EngineCore" not in done.stderr


def test_method_and_budget_are_in_every_cache_key() -> None:
    """The multimodal item identity (processor cache, encoder cache, prefix-caching block hashes) changes with the
    method and with the budget, and stays vLLM's own when the plugin is off."""
    base = "0" * 64
    a = vz.parse({"method": "visionzip", "tokens": 24})
    b = vz.parse({"method": "visionzip", "tokens": 32})
    c = vz.parse({"method": "pool", "tokens": 24})
    keys = {vz.salted(base, s) for s in (a, b, c)}
    assert len(keys) == 3 and base not in keys
    assert vz.salted(base, None) == base
    assert vz.salted(base, vz.parse({"tokens": 24, "method": "visionzip"})) == vz.salted(base, a)


def test_plugin_imports_no_transformers_runtime() -> None:
    code = ("import sys, vlmzip.vllm.settings, vlmzip.vllm.tower, vlmzip.vllm.checkpoints, vlmzip.vllm; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'transformers' or m in ('vlmzip.api', "
            "'vlmzip.runtime', 'vlmzip.adapters', 'vlmzip.builders', 'vlmzip.llm_hooks')]; print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
