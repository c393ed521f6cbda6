"""``arch:NAME`` models: real VLM architectures at their released sizes, built with random weights.

Prefill cost is set by the shapes, not by the weights, so a speed measurement needs only the architecture.
Each family's builder module registers its architectures with :func:`register_arch`; ``vlmzip bench
--model arch:NAME`` (``vlmzip.io.load_model``) builds one after checking that it fits in memory, and
``layers`` builds its LLM with fewer decoder layers (every layer costs the same, so reduced-depth
timings scale; say so wherever they are reported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..paths import import_package_modules

# Memory a forward needs beyond the weights: activations, KV cache and logits, as 10 % of the weights + 2 GB.
ACTIVATION_MARGIN = (0.10, 2e9)


@dataclass(frozen=True)
class Arch:
    """One registered architecture: its family, its builder and the spec the builder takes.

    ``build(out_dir=None, spec=..., device=..., dtype=...) -> (model, processor)``; ``spec`` is a dataclass
    with a ``text_layers`` field (the LLM's depth)."""

    name: str
    family: str
    build: Callable[..., tuple[Any, Any]]
    spec: Any
    description: str = ""


_ARCHS: dict[str, Arch] = {}
_SUPPORT = {"registry", "words"}  # the registry and the shared tokenizer, not families


def _load_families() -> None:
    """Import every family module of this package once (each registers its architectures)."""
    import_package_modules(__package__, Path(__file__).parent, _SUPPORT)


def register_arch(arch: Arch) -> Arch:
    """Add an ``arch:NAME`` model (one call per architecture, in its family's builder module)."""
    if arch.name in _ARCHS:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    _ARCHS[arch.name] = arch
    return arch


def arch_names() -> list[str]:
    """The registered architecture names, sorted."""
    _load_families()
    return sorted(_ARCHS)


def get_arch(name: str) -> Arch:
    """The architecture called ``name``; a clear error lists the known ones otherwise."""
    _load_families()
    try:
        return _ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(arch_names())}") from None


def with_layers(arch: Arch, layers: int | None) -> Any:
    """``arch``'s spec, with an LLM of ``layers`` decoder layers when given (>= 1)."""
    if layers is None:
        return arch.spec
    if layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    return replace(arch.spec, text_layers=layers)


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


def weight_bytes(arch: Arch, spec: Any, dtype: torch.dtype) -> tuple[int, int, int]:
    """(all weights, one decoder layer's weights, decoder layers) in bytes of ``dtype``, counted on a model
    built on the ``meta`` device (nothing allocated)."""
    from ..adapters import adapter_for

    model, _ = arch.build(spec=spec, device="meta", dtype=dtype)
    size = dtype.itemsize
    layers = adapter_for(model).language_model().layers
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return total * size, sum(p.numel() for p in layers[0].parameters()) * size, len(layers)


def check_memory(arch: Arch, spec: Any, device: str, dtype: str, layers: int | None) -> None:
    """Refuse, with a depth that fits, an architecture whose weights + activation margin exceed the memory
    available on ``device``."""
    free = available_memory(device)
    if free is None:
        return
    total, per_layer, depth = weight_bytes(arch, spec, getattr(torch, dtype))
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
        f"arch:{arch.name} in {dtype}{at} needs ~{needed(depth) / 1e9:.1f} GB (weights {total / 1e9:.1f} GB + "
        f"activation margin), {free / 1e9:.1f} GB available on {device}; {advice}"
    )


def build_arch(name: str, device: str = "cpu", dtype: str = "float32", layers: int | None = None) -> tuple[Any, Any]:
    """(model, processor) of ``arch:name`` with random weights on ``device`` in ``dtype`` (``layers``: the LLM's
    depth), after checking that it fits in the memory available."""
    arch = get_arch(name)
    spec = with_layers(arch, layers)
    check_memory(arch, spec, device, dtype, layers)
    return arch.build(spec=spec, device=device, dtype=getattr(torch, dtype))
