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
    """Both answers, the token counts, the resolved knobs, the kept tokens and the TTFT timing."""

    vanilla_answer: str
    method_answer: str
    tokens_before: int
    tokens_after: int
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
    resolved = dict(planned.knobs)
    share = next((s.knobs["contextual_share"] for s in planned.stages if "contextual_share" in s.knobs), None)
    if share is not None and after is not None:  # VisionZip: say how the budget splits
        resolved["contextual_share"] = share
        resolved["split"] = f"dominant {after - round(after * share)} + contextual {round(after * share)}"
    inputs = batch_inputs(processor, [image], [question], model)
    timing = compare_ttft(model, inputs, method, knobs, repeats=repeats)
    return Comparison(vanilla_answer, method_answer, before, after, resolved, selection, timing)


def describe(c: Comparison, method: str, repeats: int) -> str:
    """The lines ``vlmzip run`` / ``demo`` print about a comparison."""
    t = c.timing
    return "\n".join([
        f"method:  {method} {c.knobs}",
        f"visual tokens per image: {c.tokens_before} -> {c.tokens_after}",
        f"answer (vanilla):      {c.vanilla_answer!r}",
        f"answer ({method}): {c.method_answer!r}",
        f"time to first token, median of {repeats} interleaved runs: "
        f"vanilla {t.vanilla_median * 1e3:.1f} ms, {method} {t.compressed_median * 1e3:.1f} ms "
        f"-> speedup {t.speedup:.2f}x (vanilla / compressed)",
    ])
