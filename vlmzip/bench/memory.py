"""Peak memory of one configuration measured in a fresh child process (``vlmzip bench --peak-memory child``).

In the benchmark's own process the CPU's peak resident set carries heap the allocator kept from every
earlier call, so vanilla and method differ by noise. Here each configuration (vanilla, or one method at
one budget, at one batch size) gets a new Python process that loads the same model, builds the same
inputs, resets its peak resident set after loading (``/proc/self/clear_refs``; the load's own peak is
not the forward's) and runs one ``model(**inputs)``: the number is that process's peak, weights
included (``peak_memory``). On CUDA the child reports the allocator's peak, as in-process.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ChildSpec:
    """What a child loads and runs: ``vlmzip.io.load_model(model, device, dtype, layers)``, the bench's
    image (``image_size`` px square, or its own size; a clip of ``frames`` of it when set) and ``prompt``,
    ``batch_size`` copies."""

    model: str | None
    device: str
    dtype: str
    layers: int | None
    image_size: int | None
    prompt: str
    batch_size: int
    method: str | None = None  # None: vanilla
    knobs: dict[str, Any] = field(default_factory=dict)
    frames: int | None = None  # a synthetic clip of this many frames of the image instead of the image


def child_peak_memory(spec: ChildSpec, timeout_s: float = 3600) -> int | None:
    """Peak bytes of one forward of ``spec`` in a fresh process (None where Linux refuses the reset).

    Raises RuntimeError with the child's error output when it fails."""
    cmd = [sys.executable, "-m", "vlmzip.bench.memory", json.dumps(asdict(spec))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"the peak-memory child for {spec.method or 'vanilla'} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_memory_bytes"]


def _release_heap() -> None:
    """Give freed heap back to the system before the reset, so the peak counts what the forward needs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(model: nn.Module, fn: Callable[[], Any]) -> int | None:
    """Peak memory in bytes while ``fn()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's peak of live tensors, weights
    included), reset before. CPU: this process's peak resident set (VmHWM in /proc/self/status, weights
    included) after resetting it through /proc/self/clear_refs; None where Linux does not allow that.
    On the CPU, memory the allocator keeps from earlier calls counts as resident, so small differences
    between configurations are within noise.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        fn()
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@torch.no_grad()
def _run(spec: ChildSpec) -> int | None:
    from ..api import compressed
    from ..io import batch_inputs, load_model
    from ..lab import default_image

    model, processor = load_model(spec.model, device=spec.device, dtype=spec.dtype, layers=spec.layers)
    image = default_image()
    if spec.image_size:
        image = image.resize((spec.image_size, spec.image_size))
    if spec.frames is not None:
        from .video import synthetic_clip, video_inputs

        clips = [synthetic_clip(image, spec.frames)] * spec.batch_size
        inputs = video_inputs(processor, clips, [spec.prompt] * spec.batch_size, model)
    else:
        inputs = batch_inputs(processor, [image] * spec.batch_size, [spec.prompt] * spec.batch_size, model)
    context = compressed(model, spec.method, **spec.knobs) if spec.method is not None else nullcontext()
    with context:
        _release_heap()
        return peak_memory(model, lambda: model(**inputs))


if __name__ == "__main__":
    peak = _run(ChildSpec(**json.loads(sys.argv[1])))
    print(json.dumps({"peak_memory_bytes": peak}))
