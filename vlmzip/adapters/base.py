"""What every model-family adapter provides to vlmzip's generic machinery (runtime.py, llm_hooks.py, viz, bench).

An adapter knows, for one family of Hugging Face VLM classes: how each image of a call sits in the token
sequence (its runs of placeholders, :class:`~vlmzip.sequence.Item`), how to run the vision tower and capture
the signals a method needs (forward hooks on this one instance), how to cut an image into units (crops,
tiles, frames) and put the chosen tokens back together, where the LLM's decoder layers are, how positions
work (1-D, or Qwen's M-RoPE), and what the tower sees of an image (for pictures). It holds no algorithm: it
calls ``state.select_rows(VisionTokens, keeps, units)`` on each batch of units.

A family is one file: a subclass of :class:`Adapter` registered with
:func:`vlmzip.adapters.register_adapter`. Objects an adapter sets on the model must be instances of
module-level classes (not closures), so a compressed model can be deep-copied and pickled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..instance import InstanceAttr
from ..methods.base import TokenLayout
from ..sequence import Item
from ..views import ImageView


class Adapter:
    """The contract between a model family and vlmzip (adapters/llava.py is the reference).

    Subclasses set ``family`` (a short name) and ``model_classes`` (the transformers classes they take) and
    implement the methods that raise ``NotImplementedError`` here.
    """

    family: str = ""
    model_classes: tuple[type, ...] = ()
    rope_axes: int = 1  # axes of the LLM's rotary positions: 1 (1-D), 3 (Qwen's M-RoPE (t, h, w))
    takes_videos: bool = False  # the processor takes videos= and the adapter compresses them

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model.model
        self.config = model.config
        self.image_token_id = int(self.config.image_token_id)
        self.pad_token_id = pad_token_id(self.config)

    # -- the images of a call ------------------------------------------------------------------------

    def has_images(self, call: dict[str, Any]) -> bool:
        """True when this call carries images to encode (pixel values)."""
        return call.get("pixel_values") is not None

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Every image of ``call`` as the sequence holds it (its placeholder runs), in the processor's order."""
        raise NotImplementedError

    def split(self, item: Item, keep: int, number: int, method: str) -> tuple[int, ...]:
        """How many placeholders each run of ``item`` (image ``number`` of the call) keeps when the image sends
        ``keep < item.vanilla`` tokens. One run: all of them; families whose images are several runs override
        this (e.g. one budget share per tile)."""
        if len(item.segments) != 1:
            raise NotImplementedError(f"{type(self).__name__} must say how a budget splits over an image's runs")
        return (keep,)

    def static_tokens_per_image(self) -> int | None:
        """The vanilla count when every image has the same one (LLaVA-1.5), else None."""
        return None

    def unit_layout(self) -> TokenLayout:
        """The layout of one base image / crop (grid and prefix), e.g. for scaling the papers' budgets."""
        raise NotImplementedError

    # -- the model's parts -----------------------------------------------------------------------------

    def sequence_modules(self) -> list[nn.Module]:
        """The modules whose ``forward`` takes ``input_ids`` with image placeholders, outermost first: the
        model (it takes labels) and its inner model (which may be called directly)."""
        return [self.model, self.inner]

    def language_model(self) -> nn.Module:
        """The decoder stack (has ``.layers`` and ``.config``)."""
        return self.inner.language_model

    def vision_module(self) -> nn.Module:
        """The vision tower's module (what ``vlmzip bench`` times the compression overhead against)."""
        raise NotImplementedError

    # -- compression -----------------------------------------------------------------------------------

    def install(self, state: Any) -> list[Any]:
        """Make this instance send ``state``'s selected tokens to the LLM; returns the undo records."""
        raise NotImplementedError

    def prepare(self, call: Any, kwargs: dict[str, Any], original_ids: torch.Tensor, shrunk: Any) -> None:
        """Note what positions need for a shrunk ``call`` (a forward's or a generate's ``kwargs``, already
        shrunk from ``original_ids``); default: 1-D positions, nothing to do."""

    # -- loading and describing --------------------------------------------------------------------------

    def load_processor(self, folder: Any) -> Any:
        """The processor saved with this model in ``folder`` (default: ``AutoProcessor``)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder)

    def describe_positions(self) -> str:
        """How a compressed model's positions work, in words."""
        return "1-D positions, renumbered contiguously over the shrunk sequence (as the released VisionZip code)"

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """What the vision tower sees of the first image of ``inputs`` (a processor batch): one picture per unit,
        for drawing what a method keeps of it."""
        raise NotImplementedError


def pad_token_id(config: Any) -> int:
    """The padding token of a VLM config: its text config's, else its own, else 0."""
    for source in (getattr(config, "text_config", None), config):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return 0


def set_instance_attr(obj: object, name: str, value: object) -> InstanceAttr:
    """Set ``obj.name`` on the instance only (shadowing the class attribute); returns the undo record."""
    return InstanceAttr(obj, name, value)


def feature_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments an image-feature override passes on to its tower (transformers adds
    ``return_dict``, which the override answers itself)."""
    return {k: v for k, v in kwargs.items() if k != "return_dict"}


class _Store:
    """A forward hook that stores the module's output under ``name``; with ``inputs``, a pre-hook (with
    kwargs) that stores the module's (args, kwargs) instead."""

    def __init__(self, store: dict[str, Any], name: str, inputs: bool = False) -> None:
        self.store, self.name, self.inputs = store, name, inputs

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> None:
        self.store[self.name] = (args, rest[0]) if self.inputs else rest[0]


@contextmanager
def captured(outputs: dict[str, nn.Module], inputs: dict[str, nn.Module] | None = None,
             active: bool = True) -> Iterator[dict[str, Any]]:
    """Inside the block, the yielded dict receives each module's output under its name in ``outputs`` and each
    ``inputs`` module's (args, kwargs); the hooks are removed on leaving. ``active=False``: no hooks at all (a
    method that needs no signal pays nothing)."""
    store: dict[str, Any] = {}
    handles = []
    if active:
        handles += [module.register_forward_hook(_Store(store, name)) for name, module in outputs.items()]
        handles += [module.register_forward_pre_hook(_Store(store, name, inputs=True), with_kwargs=True)
                    for name, module in (inputs or {}).items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
