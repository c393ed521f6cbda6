"""Random-weight VLMs of every supported family, built from transformers config classes (no download).

One module per family, each with a spec dataclass that carries every size knob and a
``build_*(out_dir, spec, device, dtype) -> (model, processor)`` that writes a folder loading like a real
checkpoint. Small specs serve tests and examples; each module registers the family's real architectures as
``arch:NAME`` speed models (:mod:`vlmzip.builders.registry`), which imports every family module of this
package the first time it is asked. The lab mini-VLM is built with the LLaVA builder.
"""

from .registry import Arch, arch_names, build_arch, get_arch, register_arch

__all__ = ["Arch", "arch_names", "build_arch", "get_arch", "register_arch"]
