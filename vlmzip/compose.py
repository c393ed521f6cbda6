"""Compositions spelled as one string: ``"visionzip@128+fastv"``.

Stages are joined by ``+`` and applied in order (pre-LLM first, then in-LLM by layer, as ``vlmzip.plan``
checks). ``name@N`` fixes a stage's budget at N visual tokens **of LLaVA-1.5's 576 patches** (the papers'
unit), mapped to the model as ``vlmzip.paper_budget`` does (the 256-patch lab model: 128 -> 57). The stage
without ``@N`` (the last one) takes the call's own knobs, e.g. ``tokens=28``; so on the lab model
``vlmzip.compress(model, "visionzip@128+fastv", tokens=28)`` is
``vlmzip.compress(model, [("visionzip", {"tokens": 57}), ("fastv", {"tokens": 28})])`` (VisionZip's Table 5
recipe, arXiv 2412.04467: VisionZip to the 128-equivalent, then the in-LLM method at the run's budget).
"""

from __future__ import annotations

import re
from typing import Any

from .budgets import scale_paper_budget
from .methods import get_method

SEPARATOR = "+"
_STAGE = re.compile(r"([A-Za-z_][\w-]*)(?:@(\d+))?")
HINT = 'spell a composition as "first@N+second", e.g. "visionzip@128+fastv" (N: tokens of the papers\' 576)'


def is_composition(method: object) -> bool:
    """True for a string that names stages with ``+`` or fixes a budget with ``@``."""
    return isinstance(method, str) and (SEPARATOR in method or "@" in method)


def parse(method: str) -> list[tuple[str, int | None]]:
    """``"visionzip@128+fastv"`` -> ``[("visionzip", 128), ("fastv", None)]`` (names checked, budgets in paper units).

    Every stage before the last that takes a budget must fix it with ``@N``: the call's knobs go to the
    last stage only.
    """
    stages: list[tuple[str, int | None]] = []
    for part in method.split(SEPARATOR):
        m = _STAGE.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"cannot read stage {part!r} of method {method!r}; {HINT}")
        budget = int(m[2]) if m[2] is not None else None
        if budget is not None and budget < 1:
            raise ValueError(f"{method!r}: the budget after @ must be >= 1 token, got {budget}; {HINT}")
        get_method(m[1])  # an unknown name: a clear error listing the known ones
        stages.append((m[1], budget))
    for name, budget in stages[:-1]:
        if budget is None and get_method(name).takes_budget:
            raise ValueError(
                f"{method!r}: stage {name!r} needs its budget as {name}@N (tokens of the papers' 576); only the "
                f"last stage takes the run's budget. {HINT}"
            )
    return stages


def expand(method: Any, knobs: dict[str, Any], patches: int) -> tuple[Any, dict[str, Any]]:
    """A composition string and the call's knobs -> the list form ``vlmzip.compress`` takes, and no knobs.

    ``patches``: the model's patches per image (or crop), which ``@N`` budgets are scaled to. The knobs go to
    the last stage (unless it fixed its budget with ``@N``: then they must not hold a budget). Anything that
    is not a composition string is returned unchanged.
    """
    if not is_composition(method):
        return method, knobs
    stages = parse(method)
    listed: list[tuple[str, dict[str, Any]]] = []
    for i, (name, budget) in enumerate(stages):
        own: dict[str, Any] = {} if budget is None else {"tokens": scale_paper_budget(budget, patches)}
        if i == len(stages) - 1:
            if budget is not None and {"tokens", "ratio"} & set(knobs):
                raise ValueError(
                    f"{method!r}: the last stage fixes its budget with @{budget}; drop tokens= / ratio= (or the @N)"
                )
            own = {**knobs, **own}
        listed.append((name, own))
    return listed, {}


def last_stage(method: str) -> str:
    """The name of the stage that takes the run's budget (the method itself when it is not a composition)."""
    return parse(method)[-1][0] if is_composition(method) else method


def fixed_budget(method: str) -> bool:
    """True when a composition's last stage fixed its own budget (``...+fastv@64``): not swept over budgets."""
    return is_composition(method) and parse(method)[-1][1] is not None

