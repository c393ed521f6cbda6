"""Knobs spelled in text, torch-free (the command line parses its flags without importing torch).

``--knob key=value`` values and method entries with bracketed knobs, ``"cluster_saliency[variant=2]"``,
which ``vlmzip eval --methods`` sweeps like any method (its knobs go where the run's knobs go: to the
method, or to a composition's last stage).
"""

from __future__ import annotations

import re
from typing import Any

_KNOBBED = re.compile(r"([^\[\]]+)\[([^\[\]]*)\]")
KNOB_HINT = (
    'spell knobs as "method[key=value,key=value]", e.g. "cluster_saliency[variant=2]" or "sparsevlm[version=2.0]"'
)


def parse_value(raw: str) -> Any:
    """A knob value from text: ``true`` / ``false`` -> bool, then int, then float, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def split_knobs(method: str) -> tuple[str, dict[str, Any]]:
    """``"cluster_saliency[variant=2,share=0.5]"`` -> ``("cluster_saliency", {"variant": 2, "share": 0.5})``;
    a method (or composition) without brackets -> ``(method, {})``. The knobs go where the run's knobs go
    (the last stage of a composition)."""
    method = method.strip()
    if "[" not in method and "]" not in method:
        return method, {}
    m = _KNOBBED.fullmatch(method)
    if m is None:
        raise ValueError(f"cannot read the knobs of {method!r}; {KNOB_HINT}")
    knobs: dict[str, Any] = {}
    for part in m[2].split(","):
        key, eq, raw = part.partition("=")
        if not eq or not key.strip() or not raw.strip():
            raise ValueError(f"cannot read knob {part!r} of {method!r}; {KNOB_HINT}")
        knobs[key.strip()] = parse_value(raw.strip())
    return m[1].strip(), knobs


def split_methods(text: str) -> list[str]:
    """A comma-separated list of methods whose bracketed knobs may hold commas:
    ``"vanilla,cluster_saliency[variant=3,share=0.5],tome"`` -> three entries."""
    out, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [part.strip() for part in out if part.strip()]
