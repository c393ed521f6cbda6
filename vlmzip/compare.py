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
    stage decides it inside the LLM). ``notes``: what ``vlmzip.plan`` says about how the method fits this model."""

    vanilla_answer: str
    method_answer: str
    tokens_before: int | None
    tokens_after: int | None
    knobs: dict[str, Any]
    selection: Selection | None
    timing: TTFTComparison
    notes: tuple[str, ...] = ()


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
    inputs = batch_inputs(processor, [image], [question], model)
    per_image = planned.vanilla_tokens is None  # the count depends on the image (LLaVA-NeXT, Qwen-VL)
    if per_image:
        planned = planned.for_image(planned.adapter.items(inputs)[0].vanilla)
    before, sent, after = planned.vanilla_tokens, planned.tokens, planned.final_tokens
    resolved = dict(planned.knobs)
    share = next((s.knobs["contextual_share"] for s in planned.stages if "contextual_share" in s.knobs), None)
    if share is not None:  # VisionZip: say how the tokens it sends split
        resolved["contextual_share"] = share
        dominant = sent - round(sent * share)
        if per_image and selections and all(s.dominant is not None for s in selections):
            dominant = sum(s.features.shape[0] * s.dominant for s in selections)  # as split over this image's crops
        resolved["split"] = f"dominant {dominant} + contextual {sent - dominant}"
    timing = compare_ttft(model, inputs, method, knobs, repeats=repeats)
    return Comparison(vanilla_answer, method_answer, before, after, resolved, selection, timing, planned.notes)


def describe(c: Comparison, method: str, repeats: int) -> str:
    """The lines ``vlmzip run`` / ``demo`` print about a comparison."""
    t = c.timing
    return "\n".join([
        f"method:  {method} {c.knobs}",
        *(f"note:    {note}" for note in c.notes),
        f"visual tokens per image: {c.tokens_before} -> {c.tokens_after}",
        f"answer (vanilla):      {c.vanilla_answer!r}",
        f"answer ({method}): {c.method_answer!r}",
        f"time to first token, median of {repeats} interleaved runs: "
        f"vanilla {t.vanilla_median * 1e3:.1f} ms, {method} {t.compressed_median * 1e3:.1f} ms "
        f"-> speedup {t.speedup:.2f}x (vanilla / compressed)",
    ])
