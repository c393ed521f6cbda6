"""vlmzip: send a vision-language model far fewer visual tokens, and measure what it costs.

    import vlmzip
    vlmzip.compress(model, "visionzip", dominant=54, contextual=10)
    ...  # the usual processor -> model.generate(...) code
    vlmzip.decompress(model)
"""

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
