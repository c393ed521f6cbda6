"""Budgets: how many visual tokens of an image reach the LLM, and the papers' arithmetic around them.

- :class:`Budget` is what a method keeps of an image or a video: ``tokens`` per image or video (summed over its
  crops, tiles or frames), ``ratio`` of its own vanilla count, or ``tokens_per_frame`` (a video's frames times
  that); ``scope`` says whether a video's budget is spent frame by frame (each frame an even share, the papers'
  setting) or across the whole video; :func:`parse_budget` reads it from a method's knobs.
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
    per_frame: int | None = None
    scope: str = "frame"

    def keep(self, vanilla: int, image: str = "an image", frames: int = 1) -> int:
        """Tokens kept of an image (or a video of ``frames`` frames) the vanilla model sends ``vanilla`` tokens for
        (clear error if impossible)."""
        if self.per_frame is not None:
            if self.per_frame * frames > vanilla:
                raise ValueError(
                    f"tokens_per_frame={self.per_frame} is larger than the {vanilla // frames} visual tokens per frame "
                    f"{image} has; choose tokens_per_frame <= {vanilla // frames}"
                )
            return self.per_frame * frames
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
        """``tokens=N``, ``ratio=r`` or ``tokens_per_frame=M`` (with ``scope=video`` when set), as a user would
        pass it."""
        if self.per_frame is not None:
            text = f"tokens_per_frame={self.per_frame}"
        else:
            text = f"tokens={self.tokens}" if self.tokens is not None else f"ratio={self.ratio}"
        return text + (f", scope={self.scope}" if self.scope != "frame" else "")


SCOPES = ("frame", "video")


def parse_scope(knobs: dict[str, Any]) -> str:
    """Pop ``scope`` from ``knobs``: how a video's budget is spent, ``"frame"`` (default: each frame its even
    share, the papers' setting) or ``"video"`` (the method chooses across all the video's frames at once)."""
    scope = knobs.pop("scope", None)
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"scope must be 'frame' (each frame of a video its even share of the budget) or 'video' "
                         f"(the budget spent across the video's frames), got {scope!r}")
    return scope or "frame"


def parse_budget(knobs: dict[str, Any], required: bool = True) -> Budget | None:
    """Pop ``tokens`` / ``ratio`` / ``tokens_per_frame`` from ``knobs`` (one of them, never two) and validate it."""
    tokens, ratio = knobs.pop("tokens", None), knobs.pop("ratio", None)
    per_frame = knobs.pop("tokens_per_frame", None)
    given = {k: v for k, v in (("tokens", tokens), ("ratio", ratio), ("tokens_per_frame", per_frame)) if v is not None}
    if len(given) > 1:
        spelled = ", ".join(f"{k}={v}" for k, v in given.items())
        several = "both" if len(given) == 2 else "all three"
        raise ValueError(f"pass one of tokens=N, ratio=r or tokens_per_frame=M, not {several} (got {spelled})")
    if tokens is not None:
        return Budget(tokens=positive_int("tokens", tokens))
    if per_frame is not None:
        return Budget(per_frame=positive_int("tokens_per_frame", per_frame), label="tokens_per_frame")
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


def split_frames(keep: int, frames: int, image: str = "a video") -> list[int]:
    """A video's ``keep`` tokens over its ``frames`` frames, evenly (the remainder to the first frames): 136 over 8
    -> 17 each. A clear error when a frame would get no token (fewer tokens than frames)."""
    if keep < frames:
        raise ValueError(
            f"{keep} tokens cannot be split over the {frames} frames of {image} (at least one token per frame); "
            f"pass tokens >= {frames}, or scope=video to spend the budget across the video's frames"
        )
    return split_evenly(keep, frames)
