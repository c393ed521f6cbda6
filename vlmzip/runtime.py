"""What runs inside a compressed model: the forward / generate wrappers and the per-call context.

``compress`` (api.py) builds a :class:`CompressionState` and sets, on the model instance only:
- the adapter's image-feature override (pre-LLM stage: each image's tokens -> the method -> K_i tokens),
- a ``forward`` on each module that takes ``input_ids`` with image placeholders: it shrinks each image's
  placeholder runs from N_i to K_i (on the host, once per prefill), lets the adapter note what positions
  need, and tells the in-LLM pruner (llm_hooks.py) where the visual tokens are,
- a ``generate`` that shrinks the prompt once, keeps ``max_length`` / ``min_length`` counting from the
  caller's prompt, and returns sequences that start with the caller's own prompt.

Every user call (one ``forward``, or one whole ``generate`` with all its forward steps) gets one
:class:`Call`: the images of its prompt, how the prompt was shrunk, what the adapter noted for positions,
and the in-LLM pruner's state of the forward in flight. The outermost wrapper creates it and makes it the
current call of this thread (a context variable) while the model runs; the hooks deeper inside (the image
features, Qwen's positions, the pruner) read it with :func:`current_call`. Two threads sharing one compressed
model each have their own call.

Every object set on the model is a picklable instance of a class here, so ``copy.deepcopy`` and pickling
a compressed model work (the copy is compressed the same way and independent of the original).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import kvcache, llm_hooks, sequence
from .budgets import Budget, split_frames
from .methods.base import LLMStep, MethodSpec, Selection, VisionTokens, get_method
from .sequence import Item

# Tensors aligned with input_ids (B, L) that shrink with it, and the value their added padding gets.
ALIGNED = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}

Unit = tuple[int, int]  # (image number in the call, unit number within the image: a crop, tile or frame)


@dataclass
class Stage:
    """One method of a compression: its name, the knobs ``fn`` gets, its budget and the user's knobs."""

    method: str
    knobs: dict[str, Any]
    budget: Budget | None
    given: dict[str, Any]

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def keep(self, vanilla: int, image: str = "an image", frames: int = 1) -> int:
        """Tokens this stage keeps of an image (a video of ``frames`` frames) that reaches it with ``vanilla``
        tokens."""
        if self.budget is None:
            return vanilla
        try:
            return self.budget.keep(vanilla, image, frames)
        except ValueError as err:
            raise ValueError(f"{self.method}: {err}") from None


def name_of(stages: Sequence[Stage]) -> str:
    """A compression's name: its stages joined by ``+`` (``vanilla`` without any)."""
    return "+".join(s.method for s in stages) or "vanilla"


@dataclass
class Call:
    """One user call of a compressed model: a ``forward``, or a whole ``generate`` and its forward steps.

    - ``items``: the images of the caller's prompt in the processor's order (None: a call without images);
      ``rows``: how many of them each row of the caller's batch holds.
    - ``shrunk``: how the caller's ids were shrunk (None when nothing was).
    - ``note``: what the adapter noted for this call (Qwen-VL: the unshrunk layout its positions come from).
    - ``step``: the in-LLM pruner's state of the forward in flight (None between forward steps).
    - ``in_forward``: a wrapped forward runs (an inner wrapped module passes its call through).
    """

    state: CompressionState
    generating: bool = False
    items: list[Item] | None = None
    rows: list[int] | None = None
    shrunk: sequence.Shrunk | None = None
    note: Any = None
    step: llm_hooks.StepState | None = None
    in_forward: bool = False

    def items_for(self, batch: int) -> list[Item]:
        """The call's images for a batch of ``batch`` rows: generate repeats each of the caller's rows for beams
        and ``num_return_sequences`` (rows ``b * r .. b * r + r - 1`` are copies of row ``b``)."""
        assert self.items is not None and self.rows is not None
        repeat = batch // max(len(self.rows), 1)
        if repeat == 1:
            return self.items
        if self.shrunk is not None:  # each row's own items (their numbers need not be row-major: images, videos)
            return [self.items[s.image] for b in range(len(self.rows))
                    for _ in range(repeat) for s in self.shrunk.spans if s.row == b and s.segment == 0]
        out: list[Item] = []
        at = 0
        for count in self.rows:
            out += self.items[at : at + count] * repeat
            at += count
        return out


_CALL: ContextVar[Call | None] = ContextVar("vlmzip_call", default=None)


def current_call(state: CompressionState) -> Call | None:
    """The call of ``state``'s model in flight on this thread (None outside one)."""
    call = _CALL.get()
    return call if call is not None and call.state is state else None


@dataclass
class CompressionState:
    """What ``compress`` did to one model instance (stored on it as ``model._vlmzip``).

    ``pre``: the stage before the LLM (vision tower or projector output), or None; ``llm``: the in-LLM
    stages in layer order. ``undo``: attributes set and hook handles, removed by ``decompress``.
    """

    adapter: Any
    pre: Stage | None
    llm: list[Stage]
    padding_side: str = "left"
    undo: list[Any] = field(default_factory=list)
    pruner: llm_hooks.Pruner | None = None
    recording: list[Selection] | None = None
    steps: list[LLMStep] = field(default_factory=list)  # the in-LLM stages' pruning points, by layer

    @property
    def stages(self) -> list[Stage]:
        return ([self.pre] if self.pre is not None else []) + self.llm

    @property
    def name(self) -> str:
        return name_of(self.stages)

    def current_step(self) -> llm_hooks.StepState | None:
        """The in-LLM pruner's state of this model's forward in flight on this thread (None outside one)."""
        call = current_call(self)
        return None if call is None else call.step

    # -- pre-LLM stage, called by the adapter's image-feature override --------------------------

    def pre_keep(self, vanilla: int, image: int = 0, frames: int = 1) -> int:
        """Tokens image (or video of ``frames`` frames) number ``image`` sends to the LLM after the pre-LLM stage."""
        if self.pre is None:
            return vanilla
        return self.pre.keep(vanilla, f"{'video' if frames > 1 else 'image'} {image} of this batch", frames)

    def frame_keeps(self, keep: int, frames: int, video: int = 0) -> list[int] | None:
        """How a video (number ``video`` of the call) that sends ``keep`` tokens spends them over its ``frames``
        frames: each frame's count (``scope=frame``, an even split: the papers' setting), or None when the method
        chooses across the whole video (``scope=video``: the adapter joins the frames' units with
        ``VisionTokens.joined`` and selects ``keep`` tokens of the joined unit)."""
        if self.pre is not None and self.pre.budget is not None and self.pre.budget.scope == "video":
            return None
        return split_frames(keep, frames, f"video {video} of this batch")

    def needs(self) -> frozenset[str]:
        """The signals the pre-LLM method asks the adapter for (none without one)."""
        return self.pre.spec.needs if self.pre is not None else frozenset()

    def select(self, tokens: VisionTokens, keep: int, units: Sequence[Unit] | None = None) -> Selection:
        """Run the pre-LLM method on a batch of units, ``keep`` tokens each; keep-all is the identity.

        (B, T, D) -> Selection of (B, keep, D). A budget that keeps every token sends the vanilla tokens
        unchanged, whatever the method, so ``ratio=1.0`` reproduces the vanilla model exactly. ``units``: the
        (image, unit) of each row, kept with a recorded selection (``vlmzip.recorded``).
        """
        vanilla = tokens.layout.vanilla
        if self.pre is None or keep >= vanilla:
            idx = tokens.vanilla_indices().expand(tokens.hidden.shape[0], -1)
            chosen = Selection(features=tokens.hidden[:, idx[0]], indices=idx)
        else:
            chosen = self.pre.spec.fn(tokens, keep, **self.pre.knobs)
        if chosen.features.shape[1] != min(keep, vanilla):
            raise RuntimeError(
                f"method {self.name!r} returned {chosen.features.shape[1]} tokens, expected {min(keep, vanilla)}"
            )
        if self.recording is not None and self.pre is not None:
            self.recording.append(Selection(
                features=chosen.features.detach().cpu(), indices=chosen.indices.detach().cpu(),
                merged_from=None if chosen.merged_from is None else chosen.merged_from.detach().cpu(),
                dominant=chosen.dominant, weights=None if chosen.weights is None else chosen.weights.detach().cpu(),
                units=None if units is None else tuple(units),
            ))
        return chosen

    def select_rows(self, tokens: VisionTokens, keeps: Sequence[int | None],
                    units: Sequence[Unit]) -> list[tuple[Selection, int] | None]:
        """Run the method on the rows of ``tokens`` (B units of one layout), row ``b`` keeping ``keeps[b]`` (None:
        not selected): one batched call per distinct count, in order of first appearance (the whole batch as it
        is when every row keeps the same). Returns, per row, (its selection, its row in it), or None."""
        groups: dict[int, list[int]] = {}
        for row, keep in enumerate(keeps):
            if keep is not None:
                groups.setdefault(keep, []).append(row)
        out: list[tuple[Selection, int] | None] = [None] * len(keeps)
        for keep, rows in groups.items():
            sub = tokens if len(rows) == len(keeps) else tokens.rows(rows)
            chosen = self.select(sub, keep, [units[r] for r in rows])
            for position, row in enumerate(rows):
                out[row] = (chosen, position)
        return out

    # -- per call ----------------------------------------------------------------------------------

    def item_keep(self, item: Item, number: int) -> tuple[int, ...]:
        """Placeholders image ``number`` (``item``) keeps in each of its runs after the pre-LLM stage."""
        if self.pre is None:
            return item.segments
        keep = self.pre_keep(item.vanilla, number, item.frames)
        return item.segments if keep >= item.vanilla else self.adapter.split(item, keep, number, self.name)

    def shrink_call(self, kwargs: dict[str, Any], ids: torch.Tensor, call: Call) -> sequence.Shrunk:
        """Shrink ``kwargs``' input_ids and aligned tensors from the images' vanilla counts to the kept ones."""
        assert call.items is not None
        kept = [self.item_keep(item, i) for i, item in enumerate(call.items)]
        spans = sequence.image_spans(ids, call.items, kept)
        aligned = {k: kwargs[k] for k in ALIGNED
                   if isinstance(kwargs.get(k), torch.Tensor) and kwargs[k].shape == ids.shape}
        mask = aligned.get("attention_mask")
        shrunk = sequence.shrink(ids, spans, self.padding_side, attention_mask=None if mask is None else mask.cpu(),
                                 pad_token_id=self.adapter.pad_token_id)
        device = kwargs["input_ids"].device
        kwargs["input_ids"] = shrunk.input_ids.to(device)
        if shrunk.attention_mask is not None:
            kwargs["attention_mask"] = shrunk.attention_mask.to(device)
        for name, value in aligned.items():
            if name != "attention_mask":
                kwargs[name] = sequence.take(value, shrunk.columns, ALIGNED[name])
        if isinstance(kwargs.get("position_ids"), torch.Tensor) and kwargs["position_ids"].ndim == 2:
            kwargs["position_ids"] = sequence.shrink_positions(kwargs["position_ids"], shrunk.columns)
        call.shrunk = shrunk
        call.rows = [sum(1 for s in spans if s.row == b and s.segment == 0) for b in range(ids.shape[0])]
        return shrunk

    def prefill_plan(self, ids: torch.Tensor, items: list[Item], mask: torch.Tensor | None = None
                     ) -> llm_hooks.PrefillPlan:
        """Where the visual tokens sit in the LLM's (already shrunk) ids (B, L), and each in-LLM step's
        counts, from the images' vanilla layouts ``items`` (one per image of the rows, in order); ``mask``: the
        call's (B, L) attention mask, if any."""
        kept = [self.item_keep(item, i) for i, item in enumerate(items)]
        shrunk_items = [replace(item, segments=k) for item, k in zip(items, kept, strict=True)]
        spans = sequence.image_spans(ids, shrunk_items, kept)
        batch, length = ids.shape
        visual = torch.zeros(batch, length, dtype=torch.bool)
        image = torch.full((batch, length), -1, dtype=torch.long)
        per_row: list[list[int]] = [[] for _ in range(batch)]
        vanilla: list[list[int]] = [[] for _ in range(batch)]
        for s in spans:
            if s.segment == 0:
                per_row[s.row].append(0)
                vanilla[s.row].append(items[s.image].vanilla)
            visual[s.row, s.start : s.start + s.kept] = True
            image[s.row, s.start : s.start + s.kept] = len(per_row[s.row]) - 1
            per_row[s.row][-1] += s.kept
        keeps, selected = [], []
        current = per_row
        for step in self.steps:
            plans = [[step.plan(n, vanilla[b][i], f"image {i} of row {b}") for i, n in enumerate(row)]
                     for b, row in enumerate(current)]
            selected.append([[k for k, _ in row] for row in plans])
            current = [[a for _, a in row] for row in plans]
            keeps.append(current)
        real = None if mask is None or mask.ndim != 2 else mask.cpu().bool()
        return llm_hooks.PrefillPlan(visual=visual, image=image, keeps=keeps, kept=selected, real=real)

    def map_to_cache(self, kwargs: dict[str, Any], cache: Any) -> torch.Tensor | None:
        """A later turn: the caller's ids begin with the prompt whose shrunk form the cache holds; map them
        (and the aligned tensors) onto it. Returns the columns used, or None when the ids do not continue it."""
        ids = kwargs["input_ids"]
        cols = kvcache.map_later_turn(cache, ids)
        if cols is None:
            return None
        for name in ("input_ids", *ALIGNED):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.shape == ids.shape:
                fill = self.adapter.pad_token_id if name == "input_ids" else ALIGNED[name]
                kwargs[name] = sequence.take(value, cols, fill)
        return cols

    def check_call(self, kwargs: dict[str, Any], call: Call) -> None:
        """Clear errors for calls a compressed model cannot run."""
        if kwargs.get("mm_encoder_outputs") is not None and self.pre is not None and not call.generating:
            raise ValueError(
                "a compressed model computes its image features itself: pass pixel_values, not "
                "mm_encoder_outputs (precomputed features would not match the shrunk placeholders)"
            )
        if (self.adapter.has_images(kwargs) or kwargs.get("mm_encoder_outputs") is not None) \
                and kwargs.get("input_ids") is None:
            raise ValueError(
                "a compressed model needs input_ids (with image placeholders), not inputs_embeds, "
                "alongside pixel_values; pass the processor's input_ids"
            )
        if kwargs.get("labels") is not None and self.llm:
            raise ValueError("in-LLM methods shorten the sequence inside the LLM; labels (training) are not supported")

    def forward_items(self, kwargs: dict[str, Any], call: Call) -> list[Item] | None:
        """The images of one forward (one per image of its rows, in order), or None for a call without any."""
        outputs = kwargs.get("mm_encoder_outputs")
        encoded = outputs.get("image") if isinstance(outputs, dict) else None
        encoded_any = isinstance(outputs, dict) and any(v is not None for v in outputs.values())
        if call.generating and call.items is not None and (self.adapter.has_images(kwargs) or encoded_any):
            return call.items_for(kwargs["input_ids"].shape[0])  # generate encodes the images (videos) up front
        if self.adapter.has_images(kwargs):
            return self.adapter.items(kwargs)
        if encoded is not None:  # the caller's own uncompressed features (allowed only without a pre-LLM stage)
            return [Item(self.adapter.image_token_id, (int(t.shape[0]),)) for t in encoded.pooler_output]
        return None

    def run_forward(self, original: Callable[..., Any], kwargs: dict[str, Any], call: Call) -> Any:
        """Prepare one forward (shrink, positions, in-LLM plan) and run the original forward."""
        self.check_call(kwargs, call)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not call.generating:
            kvcache.refuse_layer0(cache)
        prefill = None
        items = self.forward_items(kwargs, call)
        if items is not None:
            host_ids = kwargs["input_ids"].cpu()
            if not call.generating:
                original_ids = kwargs["input_ids"]
                call.items = items
                shrunk = self.shrink_call(kwargs, host_ids, call)
                self.adapter.prepare(call, kwargs, original_ids, shrunk)
                host_ids = shrunk.input_ids
            if self.llm:
                mask = kwargs.get("attention_mask")
                prefill = self.prefill_plan(host_ids, items, mask if isinstance(mask, torch.Tensor) else None)
        elif kwargs.get("input_ids") is not None and not call.generating and cache is not None:
            self.map_to_cache(kwargs, cache)
        return self._run(original, kwargs, prefill, cache, call)

    def _run(self, original: Callable[..., Any], kwargs: dict[str, Any], prefill: llm_hooks.PrefillPlan | None,
             cache: Any, call: Call) -> Any:
        call.in_forward = True
        if self.pruner is not None:
            past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
            mask = kwargs.get("attention_mask")
            padding = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
            call.step = llm_hooks.StepState(prefill=prefill, past_full=past, padding=padding)
        try:
            return original(**kwargs)
        finally:
            call.in_forward = False
            call.step = None


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call as one name -> value dict, whatever the forward's var-keyword parameter is called."""
    bound = signature.bind(*args, **kwargs)
    call: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("a compressed model's forward takes keyword arguments beyond its named parameters")
        else:
            call[name] = value
    return call


class CompressedForward:
    """The ``forward`` vlmzip sets on a module that takes ``input_ids`` with image placeholders."""

    def __init__(self, state: CompressionState, module: nn.Module, previous: Callable[..., Any] | None) -> None:
        self.state, self.module, self.previous = state, module, previous

    @property
    def original(self) -> Callable[..., Any]:
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:  # generate() inspects forward's parameters
        return inspect.signature(self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original
        call = current_call(self.state)
        if call is not None and call.in_forward:  # an inner module of the forward in flight
            return original(*args, **kwargs)
        bound = _bind(inspect.signature(original), args, kwargs)
        if call is not None:  # a forward step of this model's generate
            return self.state.run_forward(original, bound, call)
        call = Call(self.state)
        token = _CALL.set(call)
        try:
            return self.state.run_forward(original, bound, call)
        finally:
            _CALL.reset(token)


class CompressedGenerate:
    """The ``generate`` vlmzip sets on the model: shrinks the prompt once, keeps generate's meaning."""

    def __init__(self, state: CompressionState, model: nn.Module, previous: Callable[..., Any] | None) -> None:
        self.state, self.model, self.previous = state, model, previous

    @property
    def original(self) -> Callable[..., Any]:
        return self.previous if self.previous is not None else type(self.model).generate.__get__(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if current_call(state) is not None:
            return self.original(*args, **kwargs)
        if args:
            if "input_ids" in kwargs or "inputs" in kwargs:
                raise TypeError("pass the prompt ids once (positionally or as input_ids)")
            kwargs["input_ids"], args = args[0], args[1:]
        elif "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        ids = kwargs.get("input_ids")
        call = Call(state, generating=True)
        if not isinstance(ids, torch.Tensor):
            return self._run(args, kwargs, call)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("mm_encoder_outputs") is not None and state.pre is not None:
            raise ValueError(
                "a compressed model computes its image features itself: pass pixel_values, not "
                "mm_encoder_outputs (precomputed features would not match the shrunk placeholders)"
            )
        kvcache.refuse_layer0(cache)
        if state.adapter.has_images(kwargs):
            call.items = state.adapter.items(kwargs)
            shrunk = state.shrink_call(kwargs, ids.cpu(), call)
            state.adapter.prepare(call, kwargs, ids, shrunk)
            columns = shrunk.columns
        elif cache is not None and (mapped := state.map_to_cache(kwargs, cache)) is not None:
            columns = mapped
        else:
            return self._run(args, kwargs, call)
        removed = ids.shape[1] - kwargs["input_ids"].shape[1]
        _count_from_callers_prompt(self.model, kwargs, removed)
        out = self._run(args, kwargs, call)
        kvcache.remember_prompt(cache, out, ids.shape[1], columns)
        kvcache.fold_layer0(cache, out)
        return _restore_prompt(out, ids, kwargs["input_ids"].shape[1])

    def _run(self, args: tuple, kwargs: dict[str, Any], call: Call) -> Any:
        """Run the original generate with ``call`` current: its forward steps know the prompt is shrunk."""
        token = _CALL.set(call)
        try:
            return self.original(*args, **kwargs)
        finally:
            _CALL.reset(token)


def _count_from_callers_prompt(model: nn.Module, kwargs: dict[str, Any], removed: int) -> None:
    """``max_length`` / ``min_length`` count the caller's prompt: shorten them by the tokens removed."""
    if removed == 0:
        return
    config = kwargs.get("generation_config") or model.generation_config
    for name, floor in (("max_length", 1), ("min_length", 0)):
        new_name = name.replace("length", "new_tokens")
        if kwargs.get(new_name) is not None or getattr(config, new_name, None) is not None:
            continue  # counted from the end of the prompt: nothing to adjust
        value = kwargs.get(name, getattr(config, name, None))
        if value:
            kwargs[name] = max(floor, value - removed)


def _restore_prompt(out: Any, prompt: torch.Tensor, shrunk_len: int) -> Any:
    """Sequences that start with the caller's prompt (rows repeated for beams / num_return_sequences)."""
    def restore(seq: torch.Tensor) -> torch.Tensor:
        repeat = seq.shape[0] // prompt.shape[0]
        head = prompt.to(seq.device).repeat_interleave(repeat, dim=0)
        return torch.cat([head, seq[:, shrunk_len:]], dim=1)

    if isinstance(out, torch.Tensor):
        return restore(out)
    if getattr(out, "sequences", None) is not None:
        out.sequences = restore(out.sequences)
    return out
