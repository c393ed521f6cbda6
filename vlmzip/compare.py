"""One question, answered by the vanilla model and by a compressed one, timed in the same run
(what ``vlmzip run`` and ``vlmzip demo`` print)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from .api import compressed, plan, recorded
from .bench import TTFTComparison, compare_ttft
from .io import batch_inputs, generate_answers
from .methods import Selection


@dataclass
class Comparison:
    """Both answers, the token counts, the resolved knobs, the kept tokens and the TTFT timing.

    ``tokens_before`` / ``tokens_after``: visual tokens per image the vanilla model sends and the compressed one
    ends with; on a model whose count depends on the image, this image's (``tokens_after`` None where an in-LLM
    stage decides it inside the LLM)."""

    vanilla_answer: str
    method_answer: str
    tokens_before: int | None
    tokens_after: int | None
    knobs: dict[str, Any]
    selection: Selection | None
    timing: TTFTComparison


@torch.no_grad()
def compare_answers(
    model: nn.Module,
    processor: Any,
    image: Image.Image,
    question: str,
    method: str,
    knobs: dict[str, Any],
    repeats: int = 5,
    max_new_tokens: int = 16,
) -> Comparison:
    """Greedy answers of the vanilla and the compressed model, then interleaved TTFT timing."""
    def answer() -> str:
        return generate_answers(model, processor, [image], [question], max_new_tokens)[0]

    vanilla_answer = answer()
    planned = plan(model, method, **knobs)
    with compressed(model, method, **knobs), recorded(model) as selections:
        method_answer = answer()
    selection = selections[-1] if selections else None
    before, after = planned.vanilla_tokens, planned.final_tokens
    inputs = batch_inputs(processor, [image], [question], model)
    if before is None:  # the count depends on the image (LLaVA-NeXT's crops, Qwen2-VL's resolution): this one's
        before, after = image_tokens(model, inputs), None
        if selections and all(stage.spec.stage != "llm" for stage in planned.stages):
            after = sum(s.features.shape[0] * s.features.shape[1] for s in selections)
    resolved = dict(planned.knobs)
    share = next((s.knobs["contextual_share"] for s in planned.stages if "contextual_share" in s.knobs), None)
    if share is not None and after is not None:  # VisionZip: say how the budget splits
        resolved["contextual_share"] = share
        dominant = after - round(after * share)
        if planned.vanilla_tokens is None and all(s.dominant is not None for s in selections):
            dominant = sum(s.features.shape[0] * s.dominant for s in selections)  # as split over this image's crops
        resolved["split"] = f"dominant {dominant} + contextual {after - dominant}"
    timing = compare_ttft(model, inputs, method, knobs, repeats=repeats)
    return Comparison(vanilla_answer, method_answer, before, after, resolved, selection, timing)


def image_tokens(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int | None:
    """Visual tokens of the first image in ``inputs`` as the vanilla model sends them: its image placeholders in
    the processed prompt (None for a model whose config names no image token)."""
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = getattr(model.config, "image_token_index", None)
    return None if token is None else int((inputs["input_ids"][0] == token).sum())


def describe(c: Comparison, method: str, repeats: int) -> str:
    """The lines ``vlmzip run`` / ``demo`` print about a comparison."""
    t = c.timing
    after = "decided inside the LLM" if c.tokens_after is None else c.tokens_after
    return "\n".join([
        f"method:  {method} {c.knobs}",
        f"visual tokens per image: {c.tokens_before} -> {after}",
        f"answer (vanilla):      {c.vanilla_answer!r}",
        f"answer ({method}): {c.method_answer!r}",
        f"time to first token, median of {repeats} interleaved runs: "
        f"vanilla {t.vanilla_median * 1e3:.1f} ms, {method} {t.compressed_median * 1e3:.1f} ms "
        f"-> speedup {t.speedup:.2f}x (vanilla / compressed)",
    ])
