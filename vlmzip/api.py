"""The public API: compress / decompress / compressed / plan / list_methods.

Compression is instance-level and reversible. ``compress(model, ...)`` sets attributes and hooks on this
model object only (the adapter's image-feature override, ``forward`` wrappers that shrink the image
placeholder runs, a ``generate`` wrapper, forward hooks on decoder layers for in-LLM methods); no class
or module is patched, so another model object in the same process is untouched, and ``decompress``
removes exactly what was set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from . import compose, llm_hooks
from .adapters import Adapter, adapter_for
from .budgets import PAPER_BUDGETS, parse_budget, parse_scope, scale_paper_budget
from .instance import InstanceAttr
from .methods import get_method, registered
from .methods.base import LLMStep, Selection, check_knobs
from .runtime import CompressedForward, CompressedGenerate, CompressionState, Stage, name_of

STATE_ATTR = "_vlmzip"
BUDGET_NAMES = ("tokens", "ratio", "tokens_per_frame", "scope")  # the shared budget knobs of every method

__all__ = [
    "PAPER_BUDGETS", "STATE_ATTR", "Plan", "compress", "compressed", "decompress", "is_compressed", "list_methods",
    "llm_steps", "paper_budget", "plan", "recorded", "state_of",
]  # fmt: skip

MethodArg = str | Sequence[str | tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Plan:
    """A validated compression for one model, before anything is changed.

    Token counts are per image and known only for models whose images all have the same count (LLaVA-1.5);
    None for dynamic layouts (LLaVA-NeXT, Qwen-VL), where they are decided per image at run time.

    - ``vanilla_tokens``: visual tokens the unmodified model sends per image.
    - ``tokens``: visual tokens per image the LLM receives (after any pre-LLM stage).
    - ``final_tokens``: visual tokens per image the LLM ends with (after its in-LLM stages).
    - ``layer_avg_tokens``: visual tokens per image averaged over the LLM's decoder layers (what a
      FLOP-fair comparison of in-LLM with pre-LLM methods uses).
    - ``notes``: what the user should know about how the methods fit this model (e.g. SparseVLM's pruning
      layers scaled to an LLM too shallow for the authors' layers 2, 6 and 15).
    """

    method: str
    stages: tuple[Stage, ...]
    adapter: Adapter
    vanilla_tokens: int | None
    tokens: int | None
    final_tokens: int | None
    layer_avg_tokens: float | None
    notes: tuple[str, ...] = ()
    steps: tuple[LLMStep, ...] = ()  # the in-LLM stages' pruning points, by layer
    num_layers: int = 0  # the LLM's decoder layers

    def for_image(self, vanilla: int) -> Plan:
        """The same plan with the token counts of an image the vanilla model sends ``vanilla`` tokens for (on
        models whose images each have their own count: LLaVA-NeXT's crops, Qwen-VL's resolutions)."""
        pre = next((s for s in self.stages if s.spec.stage != "llm"), None)
        tokens, final, avg = image_counts(pre, list(self.steps), vanilla, self.num_layers)
        return replace(self, vanilla_tokens=vanilla, tokens=tokens, final_tokens=final, layer_avg_tokens=avg)

    @property
    def knobs(self) -> dict[str, Any]:
        """The knobs the user gave, merged over all stages."""
        merged: dict[str, Any] = {}
        for stage in self.stages:
            merged.update(stage.given)
        return merged


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: name, stage, one-line description, and knobs (name, type, default, help)."""
    return [
        {
            "name": spec.name,
            "stage": spec.stage,
            "description": spec.description,
            "knobs": [
                {"name": k.name, "type": k.type.__name__, "default": k.default, "help": k.help}
                for k in spec.all_knobs()
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


def _stage(name: str, knobs: dict[str, Any]) -> Stage:
    spec = get_method(name)
    check_knobs(spec, knobs)
    rest = dict(knobs)
    budget = parse_budget(rest, required=False) if spec.takes_budget else None
    scope = parse_scope(rest) if spec.takes_budget else "frame"
    resolved = spec.resolve(rest)
    own = spec.budget(resolved)
    if budget is not None and own is not None and _gave_own_budget(spec, knobs):
        raise ValueError(
            f"{name}: pass either tokens=N / ratio=r or its own budget knobs "
            f"({', '.join(k for k in knobs if k not in BUDGET_NAMES)}), not both"
        )
    if budget is None:
        budget = own if own is not None else spec.default_budget
    if budget is None and spec.takes_budget:
        raise ValueError(f"{name} needs a budget: pass tokens=N (visual tokens per image) or ratio=r (0 < r <= 1)")
    if budget is not None and scope != budget.scope:
        budget = replace(budget, scope=scope)
    return Stage(method=name, knobs=resolved, budget=budget, given=dict(knobs))


def _gave_own_budget(spec: Any, knobs: dict[str, Any]) -> bool:
    """True when the user's knobs beyond tokens/ratio fixed a budget themselves (VisionZip's dominant).

    A method's default budget (FastV's ratio 0.5, there whatever its other knobs) is not one the user fixed.
    """
    rest = {k: v for k, v in knobs.items() if k not in BUDGET_NAMES}
    own = spec.budget(spec.resolve(rest))
    return own is not None and own != spec.budget(spec.resolve({}))


def _stages(method: MethodArg, knobs: dict[str, Any]) -> list[Stage]:
    if isinstance(method, str):
        return [_stage(method, knobs)]
    if knobs:
        raise ValueError("with a list of methods, give each its knobs: [('visionzip', {'tokens': 128}), ('fastv', {})]")
    stages = []
    for item in method:
        name, item_knobs = (item, {}) if isinstance(item, str) else item
        stages.append(_stage(name, dict(item_knobs)))
    return stages


def plan(model: nn.Module, method: MethodArg, **knobs: Any) -> Plan:
    """Validate ``method`` (a name, or a list of (name, knobs) applied in order) for this model, changing nothing.

    Raises ``ValueError`` for an unknown method or knob, a bad budget, an unsupported model or attention
    setting, or stages in the wrong order (pre-LLM first, then in-LLM by layer). A string such as
    ``"visionzip@128+fastv"`` is a composition (``vlmzip.compose``): ``knobs`` go to its last stage.
    """
    adapter = adapter_for(model)
    method, knobs = compose.expand(method, knobs, adapter.unit_layout().num_patches)
    stages = [s for s in _stages(method, knobs) if s.method != "vanilla"]
    pre = [s for s in stages if s.spec.stage != "llm"]
    llm = [s for s in stages if s.spec.stage == "llm"]
    if len(pre) > 1:
        raise ValueError(f"at most one method can act before the LLM, got {[s.method for s in pre]}")
    if stages != pre + llm:
        raise ValueError("list pre-LLM methods before in-LLM ones (e.g. ['visionzip', 'fastv'])")
    num_layers = len(adapter.language_model().layers)
    steps = llm_steps(llm, num_layers)
    _check_steps(steps, num_layers)
    if llm:
        _check_llm_supports_pruning(adapter.language_model())
    if adapter.rope_axes > 1 and any(step.positions == "renumber" for step in steps):
        raise ValueError(
            f"{name_of(stages)}: renumbering positions needs an LLM with 1-D RoPE positions (LLaVA, LLaVA-NeXT); this "
            f"LLM's positions have {adapter.rope_axes} axes (M-RoPE), which renumbering would scramble: pass "
            "keep_positions=True"
        )
    vanilla = adapter.static_tokens_per_image()
    tokens = final = avg = None
    if vanilla is not None:
        tokens, final, avg = image_counts(pre[0] if pre else None, steps, vanilla, num_layers)
    name = name_of(stages)
    notes = tuple(dict.fromkeys(step.note for step in steps if step.note))
    return Plan(name, tuple(stages), adapter, vanilla, tokens, final, avg, notes, tuple(steps), num_layers)


def _check_steps(steps: list[LLMStep], num_layers: int) -> None:
    """Every pruning point inside the LLM's decoder layers, in increasing order (a clear error otherwise)."""
    for step in steps:
        if not step.min_layer <= step.layer < num_layers:
            why = " (the scores come from the layer before)" if step.min_layer else ""
            raise ValueError(
                f"{step.group}: layer={step.layer} is outside this LLM's decoder layers "
                f"{step.min_layer}..{num_layers - 1}{why}"
            )
    layers = [step.layer for step in steps]
    if layers != sorted(set(layers)):
        raise ValueError(f"in-LLM stages must act at increasing layers, got {layers}")


def _check_llm_supports_pruning(lm: nn.Module) -> None:
    """In-LLM methods need one mask for every layer and an attention vlmzip can rebuild rows of."""
    layer_types = getattr(lm.config, "layer_types", None) or []
    if "linear_attention" in layer_types:
        raise ValueError(
            "in-LLM methods need attention layers with a KV cache in every decoder layer; this LLM has "
            "linear-attention (recurrent) layers (e.g. Qwen3.5's Gated DeltaNet), whose state cannot drop tokens: "
            "use a pre-LLM method"
        )
    other = sorted(set(layer_types) - {llm_hooks.FULL, llm_hooks.SLIDING})
    if other:
        raise ValueError(
            f"in-LLM methods support decoder layers of types {llm_hooks.FULL!r} and {llm_hooks.SLIDING!r}; this LLM "
            f"also has {other}: use a pre-LLM method"
        )
    window = getattr(lm.config, "sliding_window", None)
    if llm_hooks.SLIDING in layer_types and (not isinstance(window, int) or window < 1):
        raise ValueError(
            f"this LLM has sliding-window layers but its config's sliding_window is {window!r}; in-LLM methods need "
            "the window's length: use a pre-LLM method, or set text_config.sliding_window"
        )
    kind = lm.config._attn_implementation
    if kind not in llm_hooks.SUPPORTED_ATTENTION:
        raise ValueError(
            f"in-LLM methods need the LLM's attention to be one of {llm_hooks.SUPPORTED_ATTENTION}, got {kind!r}; "
            "load the model with attn_implementation='sdpa'"
        )


def image_counts(pre: Stage | None, steps: list[LLMStep], vanilla: int, num_layers: int) -> tuple[int, int, float]:
    """(visual tokens the LLM receives, ends with, averages over its ``num_layers`` decoder layers) for an image
    the vanilla model sends ``vanilla`` tokens for, through the pre-LLM stage ``pre`` and the in-LLM ``steps``."""
    counts = [vanilla if pre is None else pre.keep(vanilla)]
    for step in steps:
        counts.append(step.plan(counts[-1], vanilla)[1])
    bounds = [0, *(step.layer for step in steps), num_layers]
    avg = sum(counts[i] * (bounds[i + 1] - bounds[i]) for i in range(len(counts))) / num_layers
    return counts[0], counts[-1], avg


def llm_steps(llm: list[Stage], num_layers: int) -> list[LLMStep]:
    """The pruning points of the in-LLM stages, in order, for an LLM of ``num_layers`` decoder layers."""
    return [step for s in llm for step in s.spec.llm_steps(s.knobs, s.budget, num_layers)]


def paper_budget(model: nn.Module, tokens: int) -> int:
    """``tokens`` of LLaVA-1.5's 576 patches, as the same fraction of this model's patches per image (or crop).

    Rounded, at least 1. A 576-patch model gets ``tokens`` back; the 256-patch lab model gets 85 / 57 / 28
    for the papers' 192 / 128 / 64, so that a budget keeps the same share of the image on both.
    """
    return scale_paper_budget(tokens, adapter_for(model).unit_layout().num_patches)


def compress(model: nn.Module, method: MethodArg, *, padding_side: str | None = None, **knobs: Any) -> nn.Module:
    """Compress this model instance in place and return it.

    ``method`` is a registered method's name with its knobs, e.g.
    ``vlmzip.compress(model, "visionzip", dominant=54, contextual=10)`` (every later ``model(...)`` /
    ``model.generate(...)`` sends 64 visual tokens per image to the LLM), or a list applied in order,
    e.g. ``[("visionzip", {"tokens": 128}), ("fastv", {"tokens": 64})]``, or the same as one string,
    ``"visionzip@128+fastv"`` with ``tokens=64`` (``@N``: tokens of the papers' 576). ``padding_side``: the side your
    tokenizer pads on (``processor.tokenizer.padding_side``; default "left", as batched generation needs);
    rows that shrink by different amounts are padded there. Raises ``ValueError`` for an unknown method or
    knob, a bad budget, an unsupported model, or a model that is already compressed.
    """
    if is_compressed(model):
        current = state_of(model)
        raise ValueError(
            f"this model is already compressed with {current.name!r}; "
            "call vlmzip.decompress(model) first (or use the vlmzip.compressed(...) context manager)"
        )
    side = padding_side or "left"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    p = plan(model, method, **knobs)
    adapter = p.adapter
    pre = next((s for s in p.stages if s.spec.stage != "llm"), None)
    llm = [s for s in p.stages if s.spec.stage == "llm"]
    state = CompressionState(adapter=adapter, pre=pre, llm=llm, padding_side=side)
    try:
        state.undo.extend(adapter.install(state))
        for module in adapter.sequence_modules():
            previous = vars(module).get("forward")
            state.undo.append(InstanceAttr(module, "forward", CompressedForward(state, module, previous)))
        generate = CompressedGenerate(state, model, vars(model).get("generate"))
        state.undo.append(InstanceAttr(model, "generate", generate))
        if llm:
            lm = adapter.language_model()
            state.steps = llm_steps(llm, len(lm.layers))
            state.pruner = llm_hooks.Pruner(state, lm.layers, lm.config._attn_implementation, state.steps,
                                            rotary=getattr(lm, "rotary_emb", None),
                                            layer_types=getattr(lm.config, "layer_types", None),
                                            window=getattr(lm.config, "sliding_window", None), lm=lm)
            state.pruner.install()
    except Exception:
        _undo(state)
        raise
    setattr(model, STATE_ATTR, state)
    return model


def _undo(state: CompressionState) -> None:
    if state.pruner is not None:
        state.pruner.remove()
    for record in reversed(state.undo):
        record.undo()


def decompress(model: nn.Module) -> nn.Module:
    """Undo ``compress`` on this instance: it behaves exactly as before (same logits). Returns it."""
    _undo(state_of(model))
    delattr(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def compressed(model: nn.Module, method: MethodArg, **knobs: Any) -> Iterator[nn.Module]:
    """Context manager: the model is compressed inside the block and restored after, even on error."""
    compress(model, method, **knobs)
    try:
        yield model
    finally:
        decompress(model)


@contextlib.contextmanager
def recorded(model: nn.Module) -> Iterator[list[Selection]]:
    """Inside the block, every pre-LLM selection of this compressed model is appended (on the CPU) to the
    yielded list, one :class:`Selection` per batch of units (its ``units`` say which image and crop / tile /
    frame each row is); outside it nothing is kept alive."""
    state = state_of(model)
    state.recording = []
    try:
        yield state.recording
    finally:
        state.recording = None
