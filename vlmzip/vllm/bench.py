"""``vlmzip bench --engine vllm``: requests per second, time to first token and KV-cache blocks in vLLM, vanilla vs
each method, in one run.

Each configuration (vanilla, then every method at every budget) gets its own in-process vLLM engine on the same
checkpoint (``hf_overrides={"vlmzip": ...}``). At each concurrency C, rounds of C requests (the same image and
question) are submitted together; a round's wall time gives requests per second, vLLM's per-request metrics give the
time to first token (median over the rounds' requests), and the engine's prompt length and block size give the
KV-cache blocks a request holds at the end of its generation (C requests hold C times that).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..knobs import split_knobs
from . import settings as vz


def checkpoint(model: str | None, layers: int | None) -> tuple[str, str]:
    """(folder vLLM loads, description) for ``--model``: the lab mini-VLM by default, a checkpoint folder, or
    ``arch:NAME`` built with random weights. Weights saved by transformers 5 are rewritten for vLLM in a temporary
    copy (:mod:`vlmzip.vllm.checkpoints`); a folder vLLM can load as it is is used in place."""
    from .checkpoints import rewrite_for_vllm

    folder = tempfile.mkdtemp(prefix="vlmzip-vllm-")
    if model and model.startswith("arch:"):
        from ..builders import build_arch

        built, processor = build_arch(model[len("arch:"):], layers=layers)
        built.save_pretrained(folder)
        processor.save_pretrained(folder)
        del built
        rewrite_for_vllm(folder)
        return folder, f"{model} (random weights{f', {layers} decoder layers' if layers else ''})"
    source = Path(model) if model else Path(__file__).resolve().parents[1] / "lab" / "checkpoint"
    if not (source / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json there; give a checkpoint folder or arch:NAME")
    shutil.copytree(source, folder, dirs_exist_ok=True)
    if not rewrite_for_vllm(folder):
        shutil.rmtree(folder)
        folder = str(source)
    return folder, model or "the lab mini-VLM (LLaVA, 256 visual tokens per image)"


def measure(folder: str, entry: dict[str, Any] | None, image: Any, prompt: str, concurrency: list[int],
            rounds: int, new_tokens: int, dtype: str) -> list[dict[str, Any]]:
    """One configuration: a fresh engine, a warm-up round, then ``rounds`` rounds at each concurrency."""
    import vllm

    kwargs = {} if entry is None else {"hf_overrides": {"vlmzip": entry}}
    llm = vllm.LLM(model=folder, dtype=dtype, enforce_eager=True, seed=0, kv_cache_memory_bytes=256 << 20,
                   limit_mm_per_prompt={"image": 1}, disable_log_stats=False,
                   max_num_seqs=max(concurrency), **kwargs)
    try:
        block = llm.llm_engine.vllm_config.cache_config.block_size
        params = vllm.SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
        request = {"prompt": prompt, "multi_modal_data": {"image": image}}
        llm.generate([request] * max(concurrency), params, use_tqdm=False)  # warm-up
        rows = []
        for c in concurrency:
            walls, ttfts, length = [], [], 0
            for r in range(rounds):
                # a different image per round: no processor / encoder / prefix cache hit between rounds
                shifted = image.rotate(r + 1)
                start = time.perf_counter()
                outs = llm.generate([{**request, "multi_modal_data": {"image": shifted}}] * c, params,
                                    use_tqdm=False)
                walls.append(time.perf_counter() - start)
                ttfts += [o.metrics.first_token_latency for o in outs if o.metrics is not None]
                length = len(outs[0].prompt_token_ids)
            blocks = math.ceil((length + new_tokens) / block)
            rows.append({"concurrency": c, "requests_per_s": c * rounds / sum(walls),
                         "ttft_ms": 1000 * statistics.median(ttfts) if ttfts else None,
                         "prompt_tokens": length, "kv_blocks_per_request": blocks, "kv_blocks": c * blocks,
                         "block_size": block})
        return rows
    finally:
        del llm
        gc.collect()


# the single-image prompt of each family's chat format (the model type in config.json); LLaVA's otherwise
QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = {name: QWEN_PROMPT for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")}


def prompt_for(folder: str, question: str) -> str:
    """``question`` about one image, in the chat format of the model in ``folder``."""
    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")
    return PROMPTS.get(model_type, "USER: <image>\n{} ASSISTANT:").format(question)


def run(args: Any) -> int:
    """The ``vlmzip bench --engine vllm`` command (arguments of ``vlmzip bench``)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from ..budgets import PAPER_BUDGETS, PAPER_PATCHES

    folder, described = checkpoint(args.model, args.layers)
    from PIL import Image

    image = Image.new("RGB", (336, 336), (200, 120, 40))
    if args.image_size:
        image = image.resize((args.image_size, args.image_size))
    ratios = args.ratios or ([] if args.tokens else [t / PAPER_PATCHES for t in PAPER_BUDGETS[-1:]])
    budgets = [{"tokens": t} for t in args.tokens or []] + [{"ratio": r} for r in ratios]
    configs: list[tuple[str, dict[str, Any] | None]] = [("vanilla", None)]
    for name, knobs in map(split_knobs, args.methods):
        for budget in budgets:
            entry = {"method": name, **knobs, **budget}
            vz.parse(entry)  # a bad method or knob stops here, before any engine starts
            spelled = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in {**knobs, **budget}.items())
            configs.append((f"{name}[{spelled}]", entry))
    table = []
    for label, entry in configs:
        for row in measure(folder, entry, image, prompt_for(folder, args.prompt), args.concurrency,
                           args.repeats, args.new_tokens, args.dtype or "float32"):
            table.append({"config": label, **row})
    print(f"vLLM {__import__('vllm').__version__}, {described}, {args.repeats} rounds per concurrency, "
          f"{args.new_tokens} new tokens per request")
    print(f"{'config':<34} {'conc':>4} {'req/s':>8} {'TTFT ms':>8} {'prompt':>6} {'KV blocks':>9}")
    for row in table:
        ttft = "-" if row["ttft_ms"] is None else f"{row['ttft_ms']:.1f}"
        print(f"{row['config']:<34} {row['concurrency']:>4} {row['requests_per_s']:>8.2f} {ttft:>8} "
              f"{row['prompt_tokens']:>6} {row['kv_blocks']:>9}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-vllm.json").write_text(json.dumps({"model": described, "rows": table}, indent=2) + "\n")
        print(f"wrote {out / 'bench-vllm.json'}")
    return 0
