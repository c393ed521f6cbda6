"""Checkpoints saved by transformers 5, rewritten the way vLLM 0.32 loads them (as real released checkpoints are).

- Names: transformers 5 saves a LLaVA's CLIP / SigLIP tower without its ``vision_model`` level
  (``vision_tower.embeddings...``); vLLM's ``CLIPVisionModel`` / ``SiglipVisionModel`` expect
  ``vision_tower.vision_model.embeddings...`` and reject the others.
- Layout: transformers 5 saves the fused experts of a Qwen3-VL-MoE as it holds them, ``experts.gate_up_proj``
  (E, 2I, H) and ``experts.down_proj`` (E, H, I); the released checkpoints, and vLLM's loader, have them transposed:
  (E, H, 2I) and (E, I, H).

Real released checkpoints already match vLLM; this is for checkpoints built by ``vlmzip.builders`` (tests,
``vlmzip bench --engine vllm``).
"""

from __future__ import annotations

import json
from pathlib import Path

TOWER = "vision_tower."
NESTED = "vision_tower.vision_model."
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def hidden_size(folder: Path) -> int | None:
    """The language model's hidden size from ``folder/config.json`` (None without one)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return (config.get("text_config") or config).get("hidden_size")


def transformers_experts(name: str, shape: list[int], hidden: int | None) -> bool:
    """Whether a fused experts tensor is in transformers' layout ((E, 2I, H) / (E, H, I)) rather than the released
    one ((E, H, 2I) / (E, I, H)), told by where the hidden size H sits."""
    if hidden is None or len(shape) != 3:
        return False
    if name.endswith("gate_up_proj"):
        return shape[2] == hidden and shape[1] != hidden
    return shape[1] == hidden and shape[2] != hidden


def rewrite_for_vllm(folder: str | Path) -> int:
    """Rewrite every ``*.safetensors`` file of ``folder`` in place with vLLM's tower names and experts layout;
    returns how many tensors changed (0 when the folder already loads in vLLM as it is)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    hidden = hidden_size(folder)
    changed = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iteration)
        out, before = {}, changed
        for key, value in tensors.items():
            if key.startswith(TOWER) and not key.startswith(NESTED):
                key = NESTED + key[len(TOWER):]
                changed += 1
            if key.endswith(EXPERTS) and transformers_experts(key, list(value.shape), hidden):
                value = value.transpose(1, 2).contiguous()
                changed += 1
            out[key] = value
        if changed > before:
            save_file(out, str(path), metadata={**metadata, "format": "pt"})
    return changed
