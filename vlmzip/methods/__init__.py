"""Token-compression algorithms: pure tensor functions registered by name.

Importing this package registers every built-in method. To add one: write one file here with the
function and a ``register(MethodSpec(...))`` call, import it below, and regenerate ``vlmzip/catalog.json``
(what ``vlmzip list`` prints) with ``python -m vlmzip.catalog``.
"""

from . import cluster, divprune, fastv, pool, saliency, sampling, sparsevlm, tome, vanilla, visionzip  # noqa: F401  (registration)
from .base import MethodSpec, Selection, TokenLayout, VisionTokens, get_method, registered

__all__ = ["MethodSpec", "Selection", "TokenLayout", "VisionTokens", "get_method", "registered"]
