"""Token-compression algorithms: pure tensor functions registered by name.

Importing this package registers every built-in method. To add one: write one file here with the
function and a ``register(MethodSpec(...))`` call, and import it below.
"""

from . import cluster, divprune, fastv, pool, sampling, sparsevlm, tome, vanilla, visionzip  # noqa: F401  (registration)
from .base import MethodSpec, Selection, TokenLayout, VisionTokens, get_method, registered

__all__ = ["MethodSpec", "Selection", "TokenLayout", "VisionTokens", "get_method", "registered"]
