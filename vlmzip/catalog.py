"""The registry as data, for ``vlmzip list``: answering it must not import torch (seconds on a loaded machine).

``catalog.json`` next to this file holds :func:`vlmzip.api.list_methods`'s output. Regenerate it after
adding or changing a method with ``python -m vlmzip.catalog``; a test fails while it is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("catalog.json")


def read() -> list[dict[str, Any]]:
    """The registered methods as :func:`vlmzip.api.list_methods` gives them, read from ``catalog.json``."""
    return json.loads(PATH.read_text())


def write() -> None:
    """Regenerate ``catalog.json`` from the live registry (imports torch)."""
    from .api import list_methods

    PATH.write_text(json.dumps(list_methods(), indent=1) + "\n")


if __name__ == "__main__":
    write()
    print(f"wrote {PATH}")
