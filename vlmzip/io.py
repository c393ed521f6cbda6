"""Loading models, processors and images from disk, with clear errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import AutoModelForImageTextToText

from .adapters import adapter_for
from .paths import cache_dir, checkpoint_dir
from .tiny import ARCHITECTURES, TinyLlavaConfig, build_llava

DEFAULT_MODEL_NAME = "tiny-llava-336"


def default_model_dir() -> Path:
    """The default model: the shipped lab mini-VLM when this install carries it; otherwise a small
    LLaVA-1.5-layout model (336 px, 576 patches + CLS, random weights) built from config on first use
    and cached, which answers nonsense and exists so that every path runs without a download."""
    shipped = checkpoint_dir()
    if shipped is not None:
        return shipped
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".partial")
        build_llava(tmp, TinyLlavaConfig())
        tmp.rename(out)
    return out


ARCH_PREFIX = "arch:"


def arch_builders() -> dict[str, tuple[Any, Any]]:
    """``arch:`` names -> (builder, config): real architectures with random weights, for speed."""
    from .tiny_next import ARCHITECTURES_NEXT, build_llava_next
    from .tiny_qwen import ARCHITECTURES_QWEN, build_qwen_vl

    builders = {name: (build_llava, cfg) for name, cfg in ARCHITECTURES.items()}
    builders.update({name: (build_llava_next, cfg) for name, cfg in ARCHITECTURES_NEXT.items()})
    builders.update({name: (build_qwen_vl, cfg) for name, cfg in ARCHITECTURES_QWEN.items()})
    return builders


ACTIVATION_MARGIN = (0.10, 2e9)  # activations, KV cache and logits: 10 % of the weights + 2 GB


def available_memory(device: str) -> int | None:
    """Bytes free for a new model on ``device``: CUDA ``mem_get_info``; CPU: MemAvailable of /proc/meminfo.
    None where it cannot be read (no check then)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def weight_bytes(build: Any, cfg: Any, dtype: torch.dtype) -> tuple[int, int, int]:
    """(all weights, one decoder layer's weights, decoder layers) in bytes of ``dtype``, counted on a model
    built on the ``meta`` device (nothing allocated)."""
    model, _ = build(cfg=cfg, device="meta", dtype=dtype)
    size = dtype.itemsize
    layers = adapter_for(model).language_model().layers
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return total * size, sum(p.numel() for p in layers[0].parameters()) * size, len(layers)


def check_memory(name: str, build: Any, cfg: Any, device: str, dtype: str, layers: int | None) -> None:
    """Refuse, with a depth that fits, an ``arch:`` model whose weights + activation margin exceed the
    memory available on ``device``."""
    free = available_memory(device)
    if free is None:
        return
    total, per_layer, depth = weight_bytes(build, cfg, getattr(torch, dtype))
    share, fixed = ACTIVATION_MARGIN

    def needed(n: int) -> float:
        return (total - (depth - n) * per_layer) * (1 + share) + fixed

    if needed(depth) <= free:
        return
    fits = [n for n in range(1, depth) if needed(n) <= free]
    at = "" if layers is None else f" with {depth} decoder layers"
    advice = (f"--layers {fits[-1]} fits" if fits else
              "not even --layers 1 fits; try --dtype bfloat16, or a machine with more memory")
    raise ValueError(
        f"arch:{name} in {dtype}{at} needs ~{needed(depth) / 1e9:.1f} GB (weights {total / 1e9:.1f} GB + "
        f"activation margin), {free / 1e9:.1f} GB available on {device}; {advice}"
    )


def load_model(
    path: str | Path | None, device: str = "cpu", dtype: str = "float32", layers: int | None = None
) -> tuple[nn.Module, object]:
    """Load (model, processor) from a checkpoint folder (default: the built-in small LLaVA), offline.

    ``arch:NAME`` (e.g. ``arch:llava-1.5-7b``) builds that real architecture with random weights in
    memory, for speed measurements: prefill cost depends on the shapes, not on the weights. ``layers``
    builds its LLM with that many decoder layers (every layer costs the same, so a reduced-depth
    model's timings scale; say so wherever they are reported).
    """
    if isinstance(path, str) and path.startswith(ARCH_PREFIX):
        name = path[len(ARCH_PREFIX) :]
        builders = arch_builders()
        if name not in builders:
            raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(builders))}")
        build, cfg = builders[name]
        if layers is not None:
            if layers < 1:
                raise ValueError(f"--layers must be >= 1, got {layers}")
            cfg = replace(cfg, text_layers=layers)
        check_memory(name, build, cfg, device, dtype, layers)
        return build(cfg=cfg, device=device, dtype=getattr(torch, dtype))
    if layers is not None:
        raise ValueError("--layers applies to arch:NAME models built from config, not to a checkpoint folder")
    folder = Path(path) if path else default_model_dir()
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a model folder (no config.json); pass --model DIR of a saved checkpoint")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    adapter = adapter_for(model)  # fail early, with the list of supported classes
    return model, adapter.load_processor(folder)


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; a clear ``ValueError`` if it is missing or cannot be decoded."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"image path {p} is a directory; pass an image file (PNG or JPEG)")
    if not p.is_file():
        raise ValueError(f"image file {p} does not exist")
    try:
        with Image.open(p) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {p}: {err}; pass a valid PNG or JPEG file") from None


def chat_prompt(processor: object, question: str) -> str:
    """The model's own chat format for one image + question (LLaVA-1.5 format if it has no template)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def batch_inputs(
    processor: object, images: list[Image.Image], questions: list[str], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch of (image, question), left padded, on the model's device and dtype."""
    texts = [chat_prompt(processor, q) for q in questions]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    param = next(model.parameters())
    inputs = inputs.to(param.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


@torch.no_grad()
def generate_answers(
    model: nn.Module, processor: object, images: list[Image.Image], questions: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers to a batch of (image, question), decoded without special tokens and stripped."""
    inputs = batch_inputs(processor, images, questions, model)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
