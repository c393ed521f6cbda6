"""What the vLLM tests share: the prompt and image, the methods' cases, an in-process engine, one greedy request,
and the reference (vlmzip on transformers) they are compared with."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import vllm
from PIL import Image

import vlmzip

PROMPT = "USER: <image>\nwhat is in the picture ASSISTANT:"
NEW_TOKENS = 6
TOP = 5


# Every pre-LLM method of `vlmzip list`, with a budget (and the knobs that exercise its variants).
CASES: dict[str, dict[str, Any]] = {
    "visionzip": {"tokens": 24},
    "pool": {"ratio": 0.25},
    "spatial": {"tokens": 16},
    "random": {"tokens": 20, "seed": 5},
    "tome": {"tokens": 24},
    "divprune": {"tokens": 24},
    "cluster_aggregate": {"tokens": 24},
    "cluster_saliency": {"tokens": 24, "variant": 2, "k": 6},
}


def image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(120, 150, 3) * 255).astype("uint8"))


def serve(folder: Path, overrides: dict[str, Any] | None) -> vllm.LLM:
    """An in-process engine (fp32, eager, 64 MiB of KV cache) on ``folder`` with these ``hf_overrides``."""
    kwargs = {} if overrides is None else {"hf_overrides": overrides}
    return vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                    limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=64 << 20, **kwargs)


def generate(llm: vllm.LLM, prompt: str = PROMPT, picture: Image.Image | None = None,
             media: dict[str, Any] | None = None) -> tuple[list[int], dict[int, float], int]:
    """Greedy tokens, the first step's top log-probabilities {token: logprob}, the engine's prompt length, for one
    request with ``picture`` (default: :func:`image`) or the ``media`` given (vLLM's ``multi_modal_data``)."""
    params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=TOP)
    request = {"prompt": prompt, "multi_modal_data": media or {"image": picture or image()}}
    out = llm.generate([request], params, use_tqdm=False)[0]
    first = {tok: lp.logprob for tok, lp in out.outputs[0].logprobs[0].items()}
    return list(out.outputs[0].token_ids), first, len(out.prompt_token_ids)


def close(llm: vllm.LLM) -> None:
    del llm
    gc.collect()


def reference(model: Any, processor: Any, method: str | None, knobs: dict[str, Any], prompt: str = PROMPT,
              picture: Image.Image | None = None) -> tuple[list[int], torch.Tensor]:
    """vlmzip on transformers: greedy tokens and the first step's log-probabilities (vocab,)."""
    inputs = processor(text=prompt, images=picture or image(), return_tensors="pt")
    if method is not None:
        vlmzip.compress(model, method, **knobs)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        if method is not None:
            vlmzip.decompress(model)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.log_softmax(out.logits[0][0].float(), dim=-1)


def assert_same(got: tuple[list[int], dict[int, float], int], want: tuple[list[int], torch.Tensor]) -> None:
    tokens, first, _ = got
    assert tokens == want[0]
    assert len(first) >= TOP
    for tok, logprob in first.items():
        assert logprob == pytest.approx(float(want[1][tok]), abs=1e-4), tok


if __name__ == "__main__":  # one request on FOLDER, printed as JSON (the plugin-off test runs it without plugins)
    import json
    import sys

    import vllm.plugins

    engine = serve(Path(sys.argv[1]), None)
    tokens, first, length = generate(engine)
    plugins = sorted(vllm.plugins.load_plugins_by_group(vllm.plugins.DEFAULT_PLUGINS_GROUP))
    print("RESULT", json.dumps([tokens, first, length, plugins]))
