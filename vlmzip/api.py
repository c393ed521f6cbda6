"""The public API: compress / decompress / compressed / list_methods.

Compression is instance-level and reversible. ``compress(model, ...)`` sets attributes on this model
object only (the adapter's image-feature override, ``forward`` wrappers that shrink the image
placeholder runs, a ``generate`` wrapper); no class or module is patched, so another model object in
the same process is untouched, and ``decompress`` deletes exactly what was set.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import sequence
from .adapters import Adapter, adapter_for
from .adapters.base import set_instance_attr
from .methods import MethodSpec, Selection, VisionTokens, get_method, registered
from .methods.base import check_knobs

STATE_ATTR = "_vlmzip"

# The papers' budgets (VisionZip, SparseVLM, ...) count tokens kept of LLaVA-1.5's 576 patches per image.
PAPER_PATCHES = 576
PAPER_BUDGETS = (192, 128, 64)


@dataclass
class CompressionState:
    """What ``compress`` did to one model instance (stored on it as ``model._vlmzip``)."""

    method: MethodSpec
    knobs: dict[str, Any]
    budget: int
    adapter: Adapter
    undo: list[Callable[[], None]] = field(default_factory=list)
    last_selection: Selection | None = None
    _local: threading.local = field(default_factory=threading.local)

    @property
    def tokens_before(self) -> int:
        """Visual tokens per image the vanilla model sends."""
        return self.adapter.placeholders_per_image()

    @contextlib.contextmanager
    def shrunk_scope(self) -> Iterator[None]:
        """Inside: the sequence was already shrunk by an outer wrapper; nested wrappers pass through."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth

    @property
    def inside(self) -> bool:
        return getattr(self._local, "depth", 0) > 0


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: name, one-line description, and knobs (name, type, default, help)."""
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "knobs": [
                {"name": k.name, "type": k.type.__name__, "default": k.default, "help": k.help} for k in spec.knobs
            ],
        }
        for spec in sorted(registered().values(), key=lambda s: s.name)
    ]


def is_compressed(model: nn.Module) -> bool:
    """True if ``model`` currently carries a vlmzip compression."""
    return getattr(model, STATE_ATTR, None) is not None


def state_of(model: nn.Module) -> CompressionState:
    """The compression state of a compressed model (error if it is not compressed)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not compressed; call vlmzip.compress(model, method, ...) first")
    return state


def plan(model: nn.Module, method: str, **knobs: Any) -> tuple[MethodSpec, Adapter, dict[str, Any], int]:
    """Validate ``method`` and ``knobs`` for this model without changing it.

    Returns (method spec, adapter, resolved knobs, visual tokens per image sent to the LLM). Raises
    ``ValueError`` for an unknown method or knob, a bad budget, or an unsupported model.
    """
    spec = get_method(method)
    check_knobs(spec, knobs)
    adapter = adapter_for(model)
    resolved = spec.resolve(dict(knobs), adapter.layout)
    return spec, adapter, resolved, spec.budget(resolved, adapter.layout)


def paper_budget(model: nn.Module, tokens: int) -> int:
    """``tokens`` of LLaVA-1.5's 576 patches, as the same fraction of this model's patches per image.

    Rounded, at least 1. A 576-patch model gets ``tokens`` back; the 256-patch lab model gets 85 / 57 / 28
    for the papers' 192 / 128 / 64, so that a budget keeps the same share of the image on both.
    """
    if tokens < 1:
        raise ValueError(f"a budget must be >= 1 token, got {tokens}")
    patches = adapter_for(model).layout.num_patches
    return max(1, round(tokens * patches / PAPER_PATCHES))


def compress(model: nn.Module, method: str, **knobs: Any) -> nn.Module:
    """Compress this model instance in place with a registered method and return it.

    Example: ``vlmzip.compress(model, "visionzip", dominant=54, contextual=10)`` makes every later
    ``model(...)`` / ``model.generate(...)`` send 64 visual tokens per image to the LLM. Raises
    ``ValueError`` for an unknown method or knob, a bad budget, an unsupported model, or a model that
    is already compressed.
    """
    if is_compressed(model):
        current = state_of(model)
        raise ValueError(
            f"this model is already compressed with {current.method.name!r} {current.knobs}; "
            "call vlmzip.decompress(model) first (or use the vlmzip.compressed(...) context manager)"
        )
    spec, adapter, resolved, budget = plan(model, method, **knobs)
    state = CompressionState(method=spec, knobs=resolved, budget=budget, adapter=adapter)

    def select(tokens: VisionTokens) -> Selection:
        chosen = spec.fn(tokens, **resolved)
        if chosen.features.shape[1] != budget:
            raise RuntimeError(f"method {spec.name!r} returned {chosen.features.shape[1]} tokens, expected {budget}")
        state.last_selection = Selection(
            features=chosen.features.detach(),
            indices=chosen.indices.detach(),
            merged_from=None if chosen.merged_from is None else chosen.merged_from.detach(),
        )
        return chosen

    try:
        state.undo.append(adapter.install(select, spec.needs))
        for module in adapter.sequence_modules():
            state.undo.append(set_instance_attr(module, "forward", _wrap_forward(module.forward, state)))
        state.undo.append(set_instance_attr(model, "generate", _wrap_generate(model.generate, state)))
    except Exception:
        for undo in reversed(state.undo):
            undo()
        raise
    setattr(model, STATE_ATTR, state)
    return model


def decompress(model: nn.Module) -> nn.Module:
    """Undo ``compress`` on this instance: it behaves exactly as before (same logits). Returns it."""
    state = state_of(model)
    for undo in reversed(state.undo):
        undo()
    delattr(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def compressed(model: nn.Module, method: str, **knobs: Any) -> Iterator[nn.Module]:
    """Context manager: the model is compressed inside the block and restored after, even on error."""
    compress(model, method, **knobs)
    try:
        yield model
    finally:
        decompress(model)


def _shrink_for(state: CompressionState, input_ids: torch.Tensor, **tensors: Any) -> sequence.Shrunk:
    """Shrink on the CPU (one small copy before any GPU work of this call), then move back."""
    adapter = state.adapter
    device = input_ids.device
    cpu = {k: None if v is None else v.cpu() for k, v in tensors.items()}
    ids = input_ids.cpu()
    keep = sequence.keep_mask(ids, adapter.image_token_id, adapter.placeholders_per_image(), state.budget)
    shrunk = sequence.shrink(ids, keep, pad_token_id=adapter.pad_token_id, **cpu)
    for name in ("input_ids", "attention_mask", "labels", "position_ids"):
        value = getattr(shrunk, name)
        if value is not None:
            setattr(shrunk, name, value.to(device))
    return shrunk


def _has_images(input_ids: Any, state: CompressionState) -> bool:
    return isinstance(input_ids, torch.Tensor) and bool((input_ids == state.adapter.image_token_id).any())


def _wrap_forward(original: Callable[..., Any], state: CompressionState) -> Callable[..., Any]:
    """A ``forward`` that shrinks each image's placeholder run from N to the budget K before running."""
    signature = inspect.signature(original)

    @functools.wraps(original)  # generate() inspects forward's signature
    def forward(*args: Any, **kwargs: Any) -> Any:
        if state.inside:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop("kwargs", {})
        input_ids = arguments.get("input_ids")
        if _has_images(input_ids, state):
            shrunk = _shrink_for(
                state,
                input_ids,
                attention_mask=_mask_2d(arguments.get("attention_mask")),
                labels=arguments.get("labels"),
                position_ids=arguments.get("position_ids"),
            )
            arguments["input_ids"] = shrunk.input_ids
            for name in ("attention_mask", "labels", "position_ids"):
                if arguments.get(name) is not None:
                    arguments[name] = getattr(shrunk, name)
        elif arguments.get("pixel_values") is not None and arguments.get("inputs_embeds") is not None:
            raise ValueError(
                "a compressed model needs input_ids (with image placeholders), not inputs_embeds, "
                "alongside pixel_values; pass the processor's input_ids"
            )
        with state.shrunk_scope():
            return original(**arguments, **extra)

    return forward


def _wrap_generate(original: Callable[..., Any], state: CompressionState) -> Callable[..., Any]:
    """A ``generate`` that runs on the shrunk prompt and returns sequences that start with the
    caller's own (unshrunk) prompt, so ``out[:, inputs.input_ids.shape[1]:]`` is the new text."""

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if state.inside:
            return original(*args, **kwargs)
        if args:
            if "input_ids" in kwargs or "inputs" in kwargs:
                raise TypeError("pass the prompt ids once (positionally or as input_ids)")
            kwargs["input_ids"], args = args[0], args[1:]
        elif "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        input_ids = kwargs.get("input_ids")
        if not _has_images(input_ids, state):
            if kwargs.get("pixel_values") is not None:
                raise ValueError(
                    "a compressed model needs input_ids with image placeholders alongside pixel_values; "
                    "pass the processor's input_ids"
                )
            with state.shrunk_scope():
                return original(*args, **kwargs)
        mask = kwargs.get("attention_mask")
        shrunk = _shrink_for(state, input_ids, attention_mask=_mask_2d(mask))
        kwargs["input_ids"] = shrunk.input_ids
        if mask is not None:
            kwargs["attention_mask"] = shrunk.attention_mask
        with state.shrunk_scope():
            out = original(*args, **kwargs)
        return _restore_prompt(out, input_ids, shrunk.input_ids.shape[1])

    return generate


def _mask_2d(mask: Any) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ValueError("a compressed model needs a 2-D (batch, sequence) attention_mask, as the processor returns")
    return mask


def _restore_prompt(out: Any, prompt: torch.Tensor, shrunk_len: int) -> Any:
    def restore(seq: torch.Tensor) -> torch.Tensor:
        return torch.cat([prompt.to(seq.device), seq[:, shrunk_len:]], dim=1)

    if isinstance(out, torch.Tensor):
        return restore(out)
    if getattr(out, "sequences", None) is not None:
        out.sequences = restore(out.sequences)
    return out
