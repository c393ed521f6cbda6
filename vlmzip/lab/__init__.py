"""The offline lab: the procedural benchmark (``scenes``), small LLaVA builders (``tiny``), the
mini-VLM training (``train``) and the trained checkpoint that ships inside the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"


def checkpoint_dir() -> Path | None:
    """The shipped lab checkpoint folder, or None if this install carries none."""
    return CHECKPOINT_DIR if (CHECKPOINT_DIR / "config.json").is_file() else None


def load(device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """(model, processor) of the shipped lab mini-VLM: a real ``LlavaForConditionalGeneration``."""
    folder = checkpoint_dir()
    if folder is None:
        raise ValueError(
            f"no lab checkpoint in {CHECKPOINT_DIR}; train one with `vlmzip lab train --out DIR` "
            "and pass --model DIR/model"
        )
    from ..io import load_model

    return load_model(folder, device=device, dtype=dtype)
