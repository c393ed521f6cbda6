"""The records that flow between adapters and methods, and the method registry.

A method is a pure tensor function: it receives a :class:`VisionTokens` record (what the vision tower
produced for a batch of images, plus the signals the method asked for) and returns a :class:`Selection`
(the tokens to send to the LLM and where each came from). Methods never see a model class; adapters
never contain an algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Signals an adapter knows how to compute for a method (``MethodSpec.needs``).
SIGNALS = frozenset({"keys", "cls_attention", "received_attention"})


@dataclass(frozen=True)
class TokenLayout:
    """The static token layout of one image, known before any forward pass.

    ``num_prefix`` tokens (the CLS token of CLIP, none for SigLIP) come first, then ``grid[0] * grid[1]``
    patch tokens in row-major order. ``send_prefix`` says whether the vanilla model sends the prefix
    tokens to the LLM (LLaVA's ``vision_feature_select_strategy == "full"``).
    """

    num_prefix: int
    grid: tuple[int, int]
    send_prefix: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def total(self) -> int:
        """All tokens the vision layer produces per image (prefix + patches)."""
        return self.num_prefix + self.num_patches

    @property
    def vanilla(self) -> int:
        """Tokens the unmodified model sends to the LLM per image."""
        return self.num_patches + (self.num_prefix if self.send_prefix else 0)


@dataclass
class VisionTokens:
    """What the vision tower produced for a batch of images, for one method call.

    Shapes: B images, T = layout.total tokens, D hidden size, Dh head dim.

    - ``hidden``: (B, T, D) output of the vision layer the model feeds its projector, prefix first.
    - ``keys``: (B, T, Dh) that layer's ``k_proj`` output averaged over heads, or None.
    - ``cls_attention``: (B, T) attention of the CLS query over all tokens, summed over heads, or None.
    - ``received_attention``: (B, T) attention each token receives, mean over heads and queries, or None.
    """

    hidden: torch.Tensor
    layout: TokenLayout
    keys: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    received_attention: torch.Tensor | None = None

    def vanilla_indices(self) -> torch.Tensor:
        """(T_v,) indices into ``hidden`` of the tokens the vanilla model sends, in order."""
        start = 0 if self.layout.send_prefix else self.layout.num_prefix
        return torch.arange(start, self.layout.total, device=self.hidden.device)


@dataclass
class Selection:
    """The tokens a method sends to the LLM for a batch of images.

    - ``features``: (B, K, D) tokens in the order they are sent (before the projector).
    - ``indices``: (B, K) index into ``VisionTokens.hidden`` of the token each output came from (for a
      merged token, its target). Unique per row.
    - ``merged_from``: optional (B, T) long tensor: for each input token, the output slot it was merged
      into, or -1 if it was dropped (kept tokens map to their own slot). Used by visualisations.
    """

    features: torch.Tensor
    indices: torch.Tensor
    merged_from: torch.Tensor | None = None


@dataclass(frozen=True)
class Knob:
    """One tunable parameter of a method: its name, type, default (None = required or derived) and help."""

    name: str
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    - ``resolve(knobs, layout) -> dict``: validates user knobs against the model's token layout and
      returns the complete knob dict the function is called with; raises ``ValueError`` naming the
      problem and the fix.
    - ``budget(resolved, layout) -> int``: tokens sent to the LLM per image.
    - ``fn(tokens, **resolved) -> Selection``: the pure algorithm.
    - ``needs``: the signals (see ``SIGNALS``) the adapter must compute for ``fn``.
    """

    name: str
    description: str
    knobs: tuple[Knob, ...]
    fn: Callable[..., Selection]
    resolve: Callable[[dict[str, Any], TokenLayout], dict[str, Any]]
    budget: Callable[[dict[str, Any], TokenLayout], int]
    needs: frozenset[str] = field(default_factory=frozenset)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (one call per method file). Names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    unknown = spec.needs - SIGNALS
    if unknown:
        raise ValueError(f"method {spec.name!r} needs unknown signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; a clear error lists the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown method {name!r}; registered methods: {known} (see `vlmzip list`)") from None


def registered() -> dict[str, MethodSpec]:
    """All registered methods by name (a copy)."""
    return dict(_REGISTRY)


def check_knobs(spec: MethodSpec, knobs: dict[str, Any]) -> None:
    """Raise a clear error for a knob the method does not have."""
    names = {k.name for k in spec.knobs}
    for key in knobs:
        if key not in names:
            allowed = ", ".join(sorted(names)) or "none"
            raise ValueError(f"method {spec.name!r} has no knob {key!r}; its knobs are: {allowed}")


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Validate a budget-like knob: an int (not bool) > 0 (or >= 0); clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}; pass a positive token budget")
    return value


def check_budget(name: str, budget: int, available: int, what: str) -> None:
    """Raise if a budget exceeds the tokens available, saying how many there are."""
    if budget > available:
        raise ValueError(
            f"{name}={budget} is larger than the {available} {what} this model has per image; "
            f"choose {name} <= {available}"
        )
