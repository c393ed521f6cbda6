"""Random-weight VLMs of every supported family, built from transformers config classes (no download).

One module per family, each with a spec dataclass that carries every size knob and a
``build_*(out_dir, spec, device, dtype) -> (model, processor)`` that writes a folder loading like a real
checkpoint. Small specs serve tests and examples; each module registers the family's real architectures as
``arch:NAME`` speed models (:mod:`vlmzip.builders.registry`). The lab mini-VLM is built with the LLaVA builder.
Importing this package imports every family module in it (in name order), registering every architecture.
"""

import importlib
import pkgutil

from .registry import Arch, arch_names, build_arch, get_arch, register_arch

_SUPPORT = {"registry", "words"}  # the registry and the shared tokenizer, not families
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SUPPORT):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Arch", "arch_names", "build_arch", "get_arch", "register_arch"]
