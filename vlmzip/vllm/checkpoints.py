"""Checkpoints saved by transformers 5, rewritten with the weight names vLLM 0.32 loads.

transformers 5 saves a LLaVA's CLIP / SigLIP tower without its ``vision_model`` level
(``vision_tower.embeddings...``); vLLM's ``CLIPVisionModel`` / ``SiglipVisionModel`` expect
``vision_tower.vision_model.embeddings...`` and reject the others. Real released checkpoints already use vLLM's
names; this is for checkpoints built by ``vlmzip.builders`` (tests, ``vlmzip bench --engine vllm``).
"""

from __future__ import annotations

from pathlib import Path

TOWER = "vision_tower."
NESTED = "vision_tower.vision_model."


def vllm_names(folder: str | Path) -> int:
    """Rename the tower's weights in every ``*.safetensors`` file of ``folder`` in place; returns how many were
    renamed (0 when the folder already uses vLLM's names)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iteration)
        out = {}
        for key, value in tensors.items():
            if key.startswith(TOWER) and not key.startswith(NESTED):
                key = NESTED + key[len(TOWER):]
                renamed += 1
            out[key] = value
        if renamed:
            save_file(out, str(path), metadata={**metadata, "format": "pt"})
    return renamed
