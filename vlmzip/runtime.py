"""What runs inside a compressed model: the forward / generate wrappers and the per-call plan.

``compress`` (api.py) builds a :class:`CompressionState` and sets, on the model instance only:
- the adapter's image-feature override (pre-LLM stage: each image's tokens -> the method -> K_i tokens),
- a ``forward`` on each module that takes ``input_ids`` with image placeholders: it shrinks each image's
  placeholder run from N_i to K_i (on the host, once per prefill), lets the adapter fix positions
  (Qwen's M-RoPE), and tells the in-LLM pruner (llm_hooks.py) where the visual tokens are,
- a ``generate`` that shrinks the prompt once, keeps ``max_length`` / ``min_length`` counting from the
  caller's prompt, and returns sequences that start with the caller's own prompt.
Every object set on the model is a picklable instance of a class here, so ``copy.deepcopy`` and pickling
a compressed model work (the copy is compressed the same way and independent of the original).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import llm_hooks, sequence
from .methods.base import Budget, LLMStep, MethodSpec, Selection, VisionTokens, get_method

# Tensors aligned with input_ids (B, L) that shrink with it, and the value their added padding gets.
ALIGNED = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}


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

    def keep(self, vanilla: int, image: str = "an image") -> int:
        """Tokens this stage keeps of an image that reaches it with ``vanilla`` tokens."""
        if self.budget is None:
            return vanilla
        try:
            return self.budget.keep(vanilla, image)
        except ValueError as err:
            raise ValueError(f"{self.method}: {err}") from None


class InstanceAttr:
    """An attribute set on one object (shadowing its class's); ``undo`` restores what was there."""

    def __init__(self, obj: object, name: str, value: object) -> None:
        self.obj, self.name = obj, name
        self.had = name in vars(obj)
        self.previous = vars(obj).get(name)
        setattr(obj, name, value)

    def undo(self) -> None:
        if self.had:
            setattr(self.obj, self.name, self.previous)
        else:
            delattr(self.obj, self.name)


_LOCAL = threading.local()


def forget(state: CompressionState) -> None:
    """Drop this thread's flags of a state that is being removed (decompress)."""
    getattr(_LOCAL, "table", {}).pop(id(state), None)


def _flags(state: CompressionState) -> dict[str, Any]:
    table = getattr(_LOCAL, "table", None)
    if table is None:
        table = _LOCAL.table = {}
    return table.setdefault(id(state), {"in_forward": False, "in_generate": False})


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
    recording: list[Any] | None = None
    steps: list[LLMStep] = field(default_factory=list)  # the in-LLM stages' pruning points, by layer

    @property
    def stages(self) -> list[Stage]:
        return ([self.pre] if self.pre is not None else []) + self.llm

    @property
    def name(self) -> str:
        return "+".join(s.method for s in self.stages) or "vanilla"

    # -- pre-LLM stage, called by the adapter's image-feature override --------------------------

    def pre_keep(self, vanilla: int, image: int = 0) -> int:
        """Tokens image number ``image`` sends to the LLM after the pre-LLM stage."""
        return vanilla if self.pre is None else self.pre.keep(vanilla, f"image {image} of this batch")

    def select(self, tokens: VisionTokens, keep: int) -> Selection:
        """Run the pre-LLM method on a batch of units, ``keep`` tokens each; keep-all is the identity.

        (B, T, D) -> Selection of (B, keep, D). A budget that keeps every token sends the vanilla tokens
        unchanged, whatever the method, so ``ratio=1.0`` reproduces the vanilla model exactly.
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
                dominant=chosen.dominant,
            ))
        return chosen

    # -- per call ----------------------------------------------------------------------------------

    def shrink_call(self, call: dict[str, Any], ids: torch.Tensor, counts: list[int]) -> sequence.Shrunk:
        """Shrink ``call``'s input_ids and aligned tensors from the images' vanilla ``counts`` to the kept ones."""
        adapter = self.adapter
        kept = [self.pre_keep(c, i) for i, c in enumerate(counts)]
        spans = sequence.image_spans(ids, adapter.image_token_id, counts, kept)
        aligned = {k: call[k] for k in ALIGNED if isinstance(call.get(k), torch.Tensor) and call[k].shape == ids.shape}
        mask = aligned.get("attention_mask")
        shrunk = sequence.shrink(ids, spans, self.padding_side, attention_mask=None if mask is None else mask.cpu(),
                                 pad_token_id=adapter.pad_token_id)
        device = call["input_ids"].device
        call["input_ids"] = shrunk.input_ids.to(device)
        if shrunk.attention_mask is not None:
            call["attention_mask"] = shrunk.attention_mask.to(device)
        for name, value in aligned.items():
            if name != "attention_mask":
                call[name] = sequence.take(value, shrunk.columns, ALIGNED[name])
        if isinstance(call.get("position_ids"), torch.Tensor) and call["position_ids"].ndim == 2:
            call["position_ids"] = sequence.shrink_positions(call["position_ids"], shrunk.columns)
        return shrunk

    def prefill_plan(
        self, ids: torch.Tensor, counts: list[int], mask: torch.Tensor | None = None
    ) -> llm_hooks.PrefillPlan:
        """Where the visual tokens sit in the LLM's (already shrunk) ids (B, L), and each in-LLM step's
        counts, from the images' vanilla ``counts``; ``mask``: the call's (B, L) attention mask, if any."""
        kept = [self.pre_keep(c, i) for i, c in enumerate(counts)]
        spans = sequence.image_spans(ids, self.adapter.image_token_id, kept, kept)
        batch, length = ids.shape
        visual = torch.zeros(batch, length, dtype=torch.bool)
        image = torch.full((batch, length), -1, dtype=torch.long)
        per_row: list[list[int]] = [[] for _ in range(batch)]
        vanilla: list[list[int]] = [[] for _ in range(batch)]
        for s in spans:
            visual[s.row, s.start : s.start + s.kept] = True
            image[s.row, s.start : s.start + s.kept] = len(per_row[s.row])
            per_row[s.row].append(s.kept)
            vanilla[s.row].append(counts[s.image])
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

    def map_to_cache(self, call: dict[str, Any], cache: Any) -> bool:
        """A later turn: the caller's ids begin with the prompt whose shrunk form the cache holds; map them."""
        record = llm_hooks.cache_record(cache)
        if record is None or record.prompt is None:
            return False
        prompt_len, columns = record.prompt
        ids = call["input_ids"]
        if ids.shape[1] < prompt_len or ids.shape[0] != columns.shape[0]:
            return False
        tail = torch.arange(prompt_len, ids.shape[1]).expand(ids.shape[0], -1)
        cols = torch.cat([columns, tail], dim=1)
        for name in ("input_ids", *ALIGNED):
            value = call.get(name)
            if isinstance(value, torch.Tensor) and value.shape == ids.shape:
                fill = self.adapter.pad_token_id if name == "input_ids" else ALIGNED[name]
                call[name] = sequence.take(value, cols, fill)
        return True

    def run_forward(self, original: Callable[..., Any], call: dict[str, Any]) -> Any:
        """Prepare one forward call (shrink, positions, in-LLM plan) and run the original forward."""
        flags = _flags(self)
        adapter = self.adapter
        ids = call.get("input_ids")
        encoded = call.get("mm_encoder_outputs")
        encoded = encoded.get("image") if isinstance(encoded, dict) else None
        has_pixels = adapter.has_images(call) or encoded is not None  # generate() encodes images up front
        if call.get("mm_encoder_outputs") is not None and self.pre is not None and not flags["in_generate"]:
            raise ValueError(
                "a compressed model computes its image features itself: pass pixel_values, not "
                "mm_encoder_outputs (precomputed features would not match the shrunk placeholders)"
            )
        if has_pixels and ids is None:
            raise ValueError(
                "a compressed model needs input_ids (with image placeholders), not inputs_embeds, "
                "alongside pixel_values; pass the processor's input_ids"
            )
        if call.get("labels") is not None and self.llm:
            raise ValueError("in-LLM methods shorten the sequence inside the LLM; labels (training) are not supported")
        cache = call.get("cache", call.get("past_key_values"))
        prefill = None
        if has_pixels:
            if flags["in_generate"] and flags.get("counts") is not None:
                counts = flags["counts"]
            elif adapter.has_images(call):
                counts = adapter.image_counts(call)
            else:  # the caller's own uncompressed features (allowed only without a pre-LLM stage)
                counts = [int(t.shape[0]) for t in encoded.pooler_output]
            host_ids = ids.cpu()
            if not flags["in_generate"]:
                original_ids = call["input_ids"]
                shrunk = self.shrink_call(call, host_ids, counts)
                adapter.prepare_call(self, call, original_ids, shrunk)
                host_ids = shrunk.input_ids
            if self.llm:
                mask = call.get("attention_mask")
                prefill = self.prefill_plan(host_ids, counts, mask if isinstance(mask, torch.Tensor) else None)
        elif ids is not None and not flags["in_generate"] and cache is not None:
            self.map_to_cache(call, cache)
        return self._run(original, call, prefill, cache)

    def _run(self, original: Callable[..., Any], call: dict[str, Any], prefill: Any, cache: Any) -> Any:
        flags = _flags(self)
        flags["in_forward"] = True
        pruner = self.pruner
        if pruner is not None:
            past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
            pruner.current = llm_hooks.StepState(prefill=prefill, past_full=past)
        try:
            return original(**call)
        finally:
            flags["in_forward"] = False
            if pruner is not None:
                pruner.current = None


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


def _class_forward(module: nn.Module) -> Callable[..., Any]:
    return type(module).forward.__get__(module)


class CompressedForward:
    """The ``forward`` vlmzip sets on a module that takes ``input_ids`` with image placeholders."""

    def __init__(self, state: CompressionState, module: nn.Module, previous: Callable[..., Any] | None) -> None:
        self.state, self.module, self.previous = state, module, previous

    @property
    def original(self) -> Callable[..., Any]:
        return self.previous if self.previous is not None else _class_forward(self.module)

    @property
    def __signature__(self) -> inspect.Signature:  # generate() inspects forward's parameters
        return inspect.signature(self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original
        if _flags(self.state)["in_forward"]:
            return original(*args, **kwargs)
        call = _bind(inspect.signature(original), args, kwargs)
        return self.state.run_forward(original, call)


class CompressedGenerate:
    """The ``generate`` vlmzip sets on the model: shrinks the prompt once, keeps generate's meaning."""

    def __init__(self, state: CompressionState, model: nn.Module, previous: Callable[..., Any] | None) -> None:
        self.state, self.model, self.previous = state, model, previous

    @property
    def original(self) -> Callable[..., Any]:
        return self.previous if self.previous is not None else type(self.model).generate.__get__(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state, flags = self.state, _flags(self.state)
        if flags["in_generate"] or flags["in_forward"]:
            return self.original(*args, **kwargs)
        if args:
            if "input_ids" in kwargs or "inputs" in kwargs:
                raise TypeError("pass the prompt ids once (positionally or as input_ids)")
            kwargs["input_ids"], args = args[0], args[1:]
        elif "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            return self._run(args, kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("mm_encoder_outputs") is not None and state.pre is not None:
            raise ValueError(
                "a compressed model computes its image features itself: pass pixel_values, not "
                "mm_encoder_outputs (precomputed features would not match the shrunk placeholders)"
            )
        counts = None
        if state.adapter.has_images(kwargs):
            counts = state.adapter.image_counts(kwargs)
            shrunk = state.shrink_call(kwargs, ids.cpu(), counts)
            state.adapter.prepare_generate(state, kwargs, ids, shrunk)
            columns = shrunk.columns
        elif cache is not None and state.map_to_cache(kwargs, cache):
            record = llm_hooks.cache_record(cache)
            prompt_len, old = record.prompt
            columns = torch.cat([old, torch.arange(prompt_len, ids.shape[1]).expand(ids.shape[0], -1)], dim=1)
        else:
            return self._run(args, kwargs)
        removed = ids.shape[1] - kwargs["input_ids"].shape[1]
        _count_from_callers_prompt(self.model, kwargs, removed)
        out = self._run(args, kwargs, counts)
        _remember_prompt(out, cache, ids.shape[1], columns)
        return _restore_prompt(out, ids, kwargs["input_ids"].shape[1])

    def _run(self, args: tuple, kwargs: dict[str, Any], counts: list[int] | None = None) -> Any:
        """Run the original generate; its forward calls know the prompt is shrunk and the images' counts."""
        flags = _flags(self.state)
        flags["in_generate"], flags["counts"] = True, counts
        try:
            return self.original(*args, **kwargs)
        finally:
            flags["in_generate"], flags["counts"] = False, None


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


def _remember_prompt(out: Any, cache: Any, prompt_len: int, columns: torch.Tensor) -> None:
    """Note on the cache how the caller's prompt maps to the shrunk one (for a later turn's ids)."""
    for candidate in (cache, getattr(out, "cache", None), getattr(out, "past_key_values", None)):
        if candidate is not None:
            record = llm_hooks.cache_record(candidate, create=True)
            rows = columns.shape[0]
            record.prompt = (prompt_len, columns) if rows else None


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
