"""Where vlmzip's files live on disk: the lab checkpoint shipped inside the package.

Imports nothing of vlmzip, so that every module (``io``, ``lab``, ``eval``) can ask it without an
import circle.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "lab" / "checkpoint"


def checkpoint_dir() -> Path | None:
    """The shipped lab checkpoint folder, or None if this install carries none."""
    return CHECKPOINT_DIR if (CHECKPOINT_DIR / "config.json").is_file() else None
