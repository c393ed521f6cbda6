"""The offline lab: the procedural benchmark (``scenes``), the mini-VLM training (``train``) and the
trained checkpoint that ships inside the package (built with ``vlmzip.tiny``'s LLaVA builders).

The lab sits on top of the library: it uses ``vlmzip.io``, ``vlmzip.tiny`` and ``vlmzip.eval``;
none of those imports the lab, except ``vlmzip.eval.data``, which generates the lab's named datasets.
"""

from __future__ import annotations

from typing import Any

from ..paths import CHECKPOINT_DIR, checkpoint_dir


def load(device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """(model, processor) of the shipped lab mini-VLM: a real ``LlavaForConditionalGeneration``."""
    folder = checkpoint_dir()
    if folder is None:
        raise ValueError(
            f"no lab checkpoint in {CHECKPOINT_DIR}; train one with `vlmzip lab train --out DIR` "
            "and pass --model DIR/model"
        )
    from ..io import load_model  # here, not at the top: the CLI imports the lab without torch

    return load_model(folder, device=device, dtype=dtype)


def default_image() -> Any:
    """The image ``vlmzip bench`` times (a ``PIL.Image``, 336 x 336): scene 0 of seed 0 of the lab benchmark's
    procedural scenes, the same on every machine."""
    from . import scenes  # here, not at the top: the CLI imports the lab to build its parser

    image, _, _ = scenes.sample(0, 0, scenes.SceneConfig())
    return image
