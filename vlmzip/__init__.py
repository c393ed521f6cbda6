"""vlmzip: send a vision-language model far fewer visual tokens, and measure what it costs.

    import vlmzip
    vlmzip.compress(model, "visionzip", dominant=54, contextual=10)
    ...  # the usual processor -> model.generate(...) code
    vlmzip.decompress(model)
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import (
        PAPER_BUDGETS,
        Plan,
        compress,
        compressed,
        decompress,
        is_compressed,
        list_methods,
        paper_budget,
        plan,
        recorded,
        state_of,
    )

__all__ = [
    "PAPER_BUDGETS",
    "Plan",
    "compress",
    "compressed",
    "decompress",
    "is_compressed",
    "list_methods",
    "paper_budget",
    "plan",
    "recorded",
    "state_of",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The API and the subpackages (vlmzip.lab, vlmzip.builders, ...) are imported on first use, not with the
    # package: `import vlmzip.cli` (and so `vlmzip --help`) must not pay for importing torch and transformers.
    if name in __all__:
        value = getattr(importlib.import_module(".api", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
