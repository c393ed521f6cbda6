"""Budgets: how many visual tokens of an image reach the LLM, and the papers' arithmetic around them.

- :class:`Budget` is what a method keeps of an image: ``tokens`` per image (summed over its crops, tiles or
  frames) or ``ratio`` of the image's own vanilla count; :func:`parse_budget` reads it from a method's knobs.
- The papers (VisionZip, arXiv 2412.04467; SparseVLM, arXiv 2410.04417; FastV, arXiv 2403.06764) report budgets
  of 192 / 128 / 64 of LLaVA-1.5's 576 patches per image; :func:`scale_paper_budget` keeps the same share on
  a model with another patch count (``vlmzip.paper_budget(model, tokens)`` asks the model's adapter for it).
- VisionZip splits a budget into dominant and contextual tokens (:func:`split_budget`: 64 = 54 + 10); multi-crop
  and tiled models split an image's budget over its units evenly (:func:`split_evenly`: VisionZip's LLaVA-NeXT
  setting, 160 = 5 x 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The papers' budgets count tokens kept of LLaVA-1.5's 576 patches per image.
PAPER_PATCHES = 576
PAPER_BUDGETS = (192, 128, 64)
# VisionZip's LLaVA-1.5 splits of a budget into dominant + contextual tokens: 64 = 54 + 10, 128 = 108 + 20,
# 192 = 162 + 30; the contextual share of any other budget.
CONTEXTUAL_FRACTION = 10 / 64


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Validate an integer knob: an int (not bool) >= 1 (or >= 0); a clear error naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class Budget:
    """How many visual tokens of an image reach the LLM: ``tokens`` per image, or ``ratio`` of its count.

    ``tokens`` counts tokens per image summed over its crops; ``ratio`` is a share of the image's
    vanilla count, rounded (at least 1); ``ratio=1.0`` keeps everything. ``label``: how the user spelled
    the budget (a knob name such as ``tokens``, or words such as ``dominant + contextual``), for errors.
    """

    tokens: int | None = None
    ratio: float | None = None
    label: str = "tokens"

    def keep(self, vanilla: int, image: str = "an image") -> int:
        """Tokens kept of an image the vanilla model sends ``vanilla`` tokens for (clear error if impossible)."""
        if self.tokens is not None:
            if self.tokens > vanilla:
                label, tokens = self.label, self.tokens
                spelled = f"{label}={tokens}" if label.isidentifier() else f"{label} = {tokens}"
                instead = ("ratio=r for a share of each image's tokens" if label == "tokens" else
                           "tokens=N or ratio=r instead of them")
                raise ValueError(
                    f"{spelled} is larger than the {vanilla} visual tokens {image} has; choose {label} <= "
                    f"{vanilla} (or {instead})"
                )
            return self.tokens
        assert self.ratio is not None
        return max(1, min(vanilla, round(self.ratio * vanilla)))

    def describe(self) -> str:
        """``tokens=N`` or ``ratio=r``, as a user would pass it."""
        return f"tokens={self.tokens}" if self.tokens is not None else f"ratio={self.ratio}"


def parse_budget(knobs: dict[str, Any], required: bool = True) -> Budget | None:
    """Pop ``tokens`` / ``ratio`` from ``knobs`` and validate them: one of the two, never both."""
    tokens, ratio = knobs.pop("tokens", None), knobs.pop("ratio", None)
    if tokens is not None and ratio is not None:
        raise ValueError(f"pass tokens=N or ratio=r, not both (got tokens={tokens}, ratio={ratio})")
    if tokens is not None:
        return Budget(tokens=positive_int("tokens", tokens))
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}; ratio=1.0 keeps every token")
        return Budget(ratio=float(ratio))
    if required:
        raise ValueError("this method needs a budget: pass tokens=N (visual tokens per image) or ratio=r (0 < r <= 1)")
    return None


def scale_paper_budget(tokens: int, patches: int) -> int:
    """``tokens`` of LLaVA-1.5's 576 patches as the same share of ``patches``: rounded, at least 1.

    576 patches: unchanged; the 256-patch lab model: 192 / 128 / 64 -> 85 / 57 / 28.
    """
    if tokens < 1:
        raise ValueError(f"a budget must be >= 1 token, got {tokens}")
    return max(1, round(tokens * patches / PAPER_PATCHES))


def split_budget(tokens: int) -> tuple[int, int]:
    """Split a VisionZip budget into (dominant, contextual) at the paper's ~84:16 ratio.

    64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30); other values at the same ratio, rounded.
    """
    contextual = round(tokens * CONTEXTUAL_FRACTION)
    return tokens - contextual, contextual


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` units, the remainder to the first: 162 over 5 -> 33, 33, 32, 32, 32."""
    base, extra = divmod(total, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]
