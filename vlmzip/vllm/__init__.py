"""vlmzip inside vLLM: a general plugin that runs vlmzip's pre-LLM methods in vLLM's LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE).

Installed with ``pip install "vlmzip[vllm]"``, vLLM loads it by itself (entry point group ``vllm.general_plugins``;
``VLLM_PLUGINS`` without ``vlmzip`` switches it off). It is on for a server whose model config has a ``vlmzip``
entry::

    vllm serve MODEL --hf-overrides '{"vlmzip": {"method": "visionzip", "tokens": 64}}'

Only vlmzip's pure parts are imported here (``vlmzip.methods``, ``vlmzip.budgets``, ``vlmzip.signals``), never its
transformers-side runtime, so the plugin lives with whatever transformers vLLM pins.
"""

from __future__ import annotations

# architecture name in a Hugging Face config -> the plugin's class, imported by vLLM when a model needs it
MODELS = {
    "LlavaForConditionalGeneration": "vlmzip.vllm.llava:VlmzipLlava",
    "LlavaNextForConditionalGeneration": "vlmzip.vllm.llava_next:VlmzipLlavaNext",
    "Qwen2_5_VLForConditionalGeneration": "vlmzip.vllm.qwen_vl:VlmzipQwen2_5_VL",
    "Qwen2VLForConditionalGeneration": "vlmzip.vllm.qwen_vl:VlmzipQwen2VL",
    "Qwen3VLForConditionalGeneration": "vlmzip.vllm.qwen_vl:VlmzipQwen3VL",
    "Qwen3VLMoeForConditionalGeneration": "vlmzip.vllm.qwen_vl:VlmzipQwen3VLMoe",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the plugin's model classes (vLLM calls it in each of its
    processes; registering twice is harmless)."""
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
