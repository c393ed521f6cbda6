"""Where vlmzip's files live on disk: the user's cache folder and the lab checkpoint shipped inside the
package.

Imports nothing of vlmzip, so that every module (``io``, ``lab``, ``eval``) can ask it without an
import circle.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "lab" / "checkpoint"


def checkpoint_dir() -> Path | None:
    """The shipped lab checkpoint folder, or None if this install carries none."""
    return CHECKPOINT_DIR if (CHECKPOINT_DIR / "config.json").is_file() else None


def cache_dir() -> Path:
    """vlmzip's cache folder; every cached file lives under it (this is the one place that decides it).

    - ``$VLMZIP_CACHE`` set and not empty: that folder itself (``~`` expanded);
    - else ``$XDG_CACHE_HOME/vlmzip`` when ``XDG_CACHE_HOME`` is an absolute path (the XDG spec says to
      ignore a relative one);
    - else ``~/.cache/vlmzip``.

    The generated lab datasets live in its ``data/`` subfolder (``vlmzip.eval.data``). Not created here.
    """
    env = os.environ.get("VLMZIP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "vlmzip"


def import_package_modules(package: str, folder: str | Path, skip: set[str]) -> None:
    """Import every module of ``package`` (whose files are in ``folder``) but those named in ``skip``, in name
    order: how the adapter and builder registries find every family file without a list to edit."""
    for module in sorted(m.name for m in pkgutil.iter_modules([str(folder)])):
        if module not in skip:
            importlib.import_module(f"{package}.{module}")

