"""CUDA smoke check (run on a machine with a GPU): every family x method runs on the GPU and agrees with
the CPU run of the same random-weight model (greedy tokens, logits).

    python tools/cuda_smoke.py
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

import vlmzip
from vlmzip.builders.llava import LlavaSpec, build_llava
from vlmzip.builders.llava_next import build_llava_next
from vlmzip.builders.qwen_vl import build_qwen_vl
from vlmzip.io import chat_prompt


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def run(model, processor, device: str, method: str, knobs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and forward logits of a left-padded batch of three image sizes, compressed."""
    images = [image(i, (130 + 40 * i, 120)) for i in range(3)]
    texts = [chat_prompt(processor, q) for q in ["what color ?", "how many ?", "is there a red circle ?"]]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
    model = model.to(device)
    with vlmzip.compressed(model, method, **knobs), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits = model(**inputs).logits.float().cpu()
    return out.cpu(), logits


def main() -> int:
    builders = {
        "llava": lambda: build_llava(None, replace(LlavaSpec(image_size=112, patch_size=14), text_layers=3)),
        "llava-next": lambda: build_llava_next(None, None),
        "qwen2.5-vl": lambda: build_qwen_vl(None, None, version="2.5"),
    }
    methods = [("visionzip", {"tokens": 12}), ("random", {"tokens": 12}), ("fastv", {"tokens": 12, "layer": 1})]
    fails = 0
    for family, build in builders.items():
        for method, knobs in methods:
            model, processor = build()
            cpu_tokens, cpu_logits = run(model, processor, "cpu", method, knobs)
            gpu_tokens, gpu_logits = run(model, processor, "cuda", method, knobs)
            same = torch.equal(cpu_tokens, gpu_tokens)
            diff = (cpu_logits - gpu_logits).abs().max().item()
            ok = same and diff < 1e-3
            fails += not ok
            print(f"{family:11s} {method:10s} greedy tokens equal: {same}  max |logit diff| {diff:.1e}  "
                  f"{'ok' if ok else 'FAIL'}")
    print(f"{fails} failures")
    return int(fails > 0)


if __name__ == "__main__":
    raise SystemExit(main())
