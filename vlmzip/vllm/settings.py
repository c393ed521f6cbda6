"""The ``vlmzip`` key of a served model's config: which pre-LLM method runs inside vLLM, with which budget.

Pure: it imports vlmzip's methods and budgets only (no transformers-side runtime, no vLLM), so it is also what the
plugin's start-up checks and the tests use. Turned on per server with
``--hf-overrides '{"vlmzip": {"method": "visionzip", "tokens": 64}}'``: the key travels inside the model's config to
every vLLM process (front end, engine core, workers), so they cannot disagree, and vLLM logs it with the config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..budgets import Budget, parse_budget
from ..methods import MethodSpec, Selection, VisionTokens, get_method, registered
from ..methods.base import check_knobs

CONFIG_KEY = "vlmzip"
USAGE = '--hf-overrides \'{"vlmzip": {"method": "visionzip", "tokens": 64}}\''


def pre_llm_methods() -> list[str]:
    """The methods the plugin can run: every registered method that acts before the LLM (stage vision /
    projector)."""
    return sorted(name for name, spec in registered().items() if spec.stage != "llm")


@dataclass(frozen=True)
class Settings:
    """A validated ``vlmzip`` config entry: the method, the knobs its function gets, the per-image budget.

    ``signature``: the canonical spelling of what the user asked for; it enters every cache key (see
    :func:`salted`)."""

    method: str
    knobs: dict[str, Any]
    budget: Budget | None
    signature: str

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def keep(self, vanilla: int, image: str = "an image") -> int:
        """Tokens sent of an image (or crop) the vanilla model sends ``vanilla`` tokens for; a budget larger than
        that is an error naming the knob."""
        if self.budget is None:
            return vanilla
        try:
            return self.budget.keep(vanilla, image)
        except ValueError as err:
            raise ValueError(f"vlmzip in vLLM: {self.method}: {err}") from None


def parse(raw: Any) -> Settings | None:
    """Validate the ``vlmzip`` config value (None: the plugin is off for this model).

    Raises ``ValueError`` naming what is wrong and how to fix it: not a mapping, no or unknown method, an in-LLM
    method (FastV, SparseVLM, ...), an unknown knob, a bad budget.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"vlmzip in vLLM: the 'vlmzip' config entry must be a mapping such as {USAGE}, got {raw!r}")
    knobs = dict(raw)
    name = knobs.pop("method", None)
    if not isinstance(name, str):
        raise ValueError(f"vlmzip in vLLM: name the method, e.g. {USAGE}; pre-LLM methods: "
                         f"{', '.join(pre_llm_methods())}")
    try:
        spec = get_method(name)
    except ValueError as err:
        raise ValueError(f"vlmzip in vLLM: {err}; vLLM runs the pre-LLM ones: {', '.join(pre_llm_methods())}") from None
    if spec.stage == "llm":
        raise ValueError(
            f"vlmzip in vLLM: {name!r} prunes tokens inside the LLM (between decoder layers, scored by the prompt's "
            "attention), which vLLM cannot host: its paged KV cache gives every prompt token a slot in every layer, "
            "and chunked prefill runs a long prompt in pieces, so no layer sees an image's tokens together with the "
            "text that scores them. Use a pre-LLM method, which sends fewer tokens to the LLM in the first place: "
            f"{', '.join(pre_llm_methods())}"
        )
    if "scope" in knobs:
        raise ValueError(f"vlmzip in vLLM: {name}: 'scope' says how a video's budget is spent over its frames, but "
                         "the plugin compresses images only (videos pass uncompressed); drop it")
    try:
        check_knobs(spec, knobs)
        rest = dict(knobs)
        budget = parse_budget(rest, required=False) if spec.takes_budget else None
        resolved = spec.resolve(rest)
        own = spec.budget(resolved)
    except ValueError as err:
        raise ValueError(f"vlmzip in vLLM: {name}: {err}") from None
    if budget is not None and own is not None:
        raise ValueError(f"vlmzip in vLLM: {name}: pass either tokens / ratio or its own budget knobs, not both")
    budget = budget if budget is not None else own if own is not None else spec.default_budget
    if budget is None and spec.takes_budget:
        raise ValueError(f"vlmzip in vLLM: {name} needs a budget: add \"tokens\": N (visual tokens per image) or "
                         "\"ratio\": r (0 < r <= 1) next to \"method\"")
    signature = json.dumps({"method": name, **knobs}, sort_keys=True, separators=(",", ":"))
    return Settings(method=name, knobs=resolved, budget=budget, signature=signature)


def from_config(config: Any) -> Settings | None:
    """The settings in a model's (Hugging Face) config, None when it has no ``vlmzip`` entry."""
    return parse(getattr(config, CONFIG_KEY, None))


def salted(mm_hash: str, settings: Settings | None) -> str:
    """A multimodal item's cache identity with the method and budget in it (unchanged when the plugin is off).

    vLLM keys its processor cache and encoder cache by this identity, and prefix caching hashes it into the
    blocks that hold the item's placeholders, so two settings (or a vanilla server) never share an entry."""
    if settings is None:
        return mm_hash
    return hashlib.sha256(f"{mm_hash}|vlmzip:{settings.signature}".encode()).hexdigest()


def select(settings: Settings, tokens: VisionTokens, keep: int) -> Selection:
    """Run the method on a batch of units (B, T, D) -> Selection of (B, keep, D), as vlmzip does on transformers:
    a budget that keeps every token (or the ``vanilla`` method) sends the vanilla tokens unchanged."""
    vanilla = tokens.layout.vanilla
    if settings.budget is None or keep >= vanilla:
        idx = tokens.vanilla_indices().expand(tokens.hidden.shape[0], -1)
        return Selection(features=tokens.hidden[:, idx[0]], indices=idx)
    chosen = settings.spec.fn(tokens, keep, **settings.knobs)
    if chosen.features.shape[1] != keep:
        raise RuntimeError(f"method {settings.method!r} returned {chosen.features.shape[1]} tokens, expected {keep}")
    return chosen

