"""Random-weight VLMs of every supported family, built from transformers config classes (no download).

One module per family (``llava``, ``llava_next``, ``qwen_vl``), each with a spec dataclass that carries every
size knob and a ``build_*(out_dir, spec, device, dtype) -> (model, processor)`` that writes a folder loading
like a real checkpoint. Small specs serve tests and examples; each module registers the family's real
architectures as ``arch:NAME`` speed models (:mod:`vlmzip.builders.registry`). The lab mini-VLM is built
with the LLaVA builder. Importing this package registers every architecture.
"""

from . import llava, llava_next, qwen_vl  # noqa: F401  (registration)
from .registry import Arch, arch_names, build_arch, get_arch, register_arch

__all__ = ["Arch", "arch_names", "build_arch", "get_arch", "register_arch"]
