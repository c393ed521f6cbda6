"""What the vLLM tests share: the tiny LLaVA's prompt and image, an in-process engine, one greedy request."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import vllm
from PIL import Image

PROMPT = "USER: <image>\nwhat is in the picture ASSISTANT:"
NEW_TOKENS = 6
TOP = 5


def image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(120, 150, 3) * 255).astype("uint8"))


def serve(folder: Path, overrides: dict[str, Any] | None) -> vllm.LLM:
    """An in-process engine (fp32, eager, 64 MiB of KV cache) on ``folder`` with these ``hf_overrides``."""
    kwargs = {} if overrides is None else {"hf_overrides": overrides}
    return vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                    limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=64 << 20, **kwargs)


def generate(llm: vllm.LLM) -> tuple[list[int], dict[int, float], int]:
    """Greedy tokens, the first step's top log-probabilities {token: logprob}, the engine's prompt length."""
    params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=TOP)
    out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": image()}}], params, use_tqdm=False)[0]
    first = {tok: lp.logprob for tok, lp in out.outputs[0].logprobs[0].items()}
    return list(out.outputs[0].token_ids), first, len(out.prompt_token_ids)


def close(llm: vllm.LLM) -> None:
    del llm
    gc.collect()


if __name__ == "__main__":  # one request on FOLDER, printed as JSON (the plugin-off test runs it without plugins)
    import json
    import sys

    import vllm.plugins

    engine = serve(Path(sys.argv[1]), None)
    tokens, first, length = generate(engine)
    plugins = sorted(vllm.plugins.load_plugins_by_group(vllm.plugins.DEFAULT_PLUGINS_GROUP))
    print("RESULT", json.dumps([tokens, first, length, plugins]))
