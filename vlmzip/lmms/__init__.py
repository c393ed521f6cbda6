"""vlmzip inside lmms-eval, the field's evaluation harness (``pip install "vlmzip[lmms]"``).

lmms-eval finds the model through the entry point ``vlmzip`` of the group ``lmms_eval.models`` (declared
in pyproject.toml), which calls :func:`manifest`::

    lmms-eval eval --model vlmzip --model_args pretrained=DIR,method=visionzip,tokens=64 --tasks TASK

The model class is :class:`vlmzip.lmms.model.VlmzipLMM`; ``python -m vlmzip.lmms.task`` turns a vlmzip
dataset (a lab split or any dataset folder) into a local lmms-eval task. Nothing here imports lmms-eval
until lmms-eval itself asks for the model.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "vlmzip"
CLASS_PATH = "vlmzip.lmms.model.VlmzipLMM"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` registering ``--model vlmzip``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
