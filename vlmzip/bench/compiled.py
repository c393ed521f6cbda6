"""``--compile``: the model run the way a latency-minded user runs it, a static KV cache and
``torch.compile`` of the language model's forward (every decoder layer, the norm, the rotary embedding).

What is compiled and what is not:
- the vision tower, the projector and the pre-LLM method (selection / merging) run eager, before the
  compiled region: their shapes are fixed per image, the method's host-side bookkeeping (how many
  tokens each image keeps) never enters a graph;
- the language model is compiled with ``dynamic=False``: each (batch, sequence length) a run meets is
  one graph (vanilla's prompt, the shrunk prompt, the one-token decode step), so the warm-up round of
  the bench compiles and the timed rounds reuse;
- ``generate`` uses a static KV cache (``cache_implementation="static"``), so decode steps keep one shape;
  transformers' own auto-compile of the decode step is turned off (the language model is already compiled).
- in-LLM methods (FastV-style pruning between decoder layers) are not compiled: their hooks keep
  per-call Python state and prune the KV cache layer by layer, which a static cache cannot hold, and the
  compiled model gave wrong logits with them. Their bench rows run eager on both sides (``compiled`` is
  false in the row), so their ratios stay fair.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for
from ..api import STATE_ATTR, plan


def compilable(model: nn.Module, method: str | None, **knobs: Any) -> bool:
    """Whether ``method`` runs inside a compiled model: vanilla and pre-LLM methods do, methods with an
    in-LLM stage do not (see the module docstring)."""
    if method is None or method == "vanilla":
        return True
    return all(stage.spec.stage != "llm" for stage in plan(model, method, **knobs).stages)


def _limit_name() -> str:
    config = torch._dynamo.config
    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"


@contextmanager
def compiled(model: nn.Module, backend: str = "inductor", recompile_limit: int = 64) -> Iterator[nn.Module]:
    """Inside: ``model``'s language model runs ``torch.compile``d (``backend``, static shapes) and
    ``model.generate`` uses a static KV cache. Restored on exit (the compiled graphs stay cached, so a
    second ``compiled`` of the same model does not compile again).

    ``backend``: torch.compile's (``"inductor"``: generated kernels, on CUDA with CUDA graphs, mode
    ``"reduce-overhead"``; ``"aot_eager"``: traced but eager kernels, for checking the plumbing quickly).
    ``recompile_limit``: graphs dynamo keeps per code object (one per batch size x sequence length met);
    raised from torch's default of 8 for the bench's many shapes.
    """
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("compile the vanilla model, then compress it inside: vlmzip.compressed(...) within compiled()")
    lm = adapter_for(model).language_model()
    config = model.generation_config
    saved = {name: getattr(config, name, None) for name in ("cache_implementation", "disable_compile")}
    limit = _limit_name()
    saved_limit = getattr(torch._dynamo.config, limit)
    calls = model.__dict__.setdefault("_vlmzip_compiled_calls", {})  # one compiled call per backend, kept
    if backend not in calls:
        cuda = next(model.parameters()).device.type == "cuda"
        mode = "reduce-overhead" if backend == "inductor" and cuda else None
        calls[backend] = torch.compile(lm._call_impl, backend=backend, mode=mode, dynamic=False)
    previous = lm.__dict__.get("_compiled_call_impl")
    lm._compiled_call_impl = calls[backend]  # what nn.Module.compile() sets: __call__ goes through it
    config.cache_implementation, config.disable_compile = "static", True
    setattr(torch._dynamo.config, limit, max(saved_limit, recompile_limit))
    try:
        yield model
    finally:
        if previous is None:
            lm.__dict__.pop("_compiled_call_impl", None)
        else:
            lm._compiled_call_impl = previous
        for name, value in saved.items():
            setattr(config, name, value)
        setattr(torch._dynamo.config, limit, saved_limit)
