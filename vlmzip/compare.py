"""One question about an image or a video, answered by the vanilla model and by a compressed one, timed in the
same run (what ``vlmzip run`` and ``vlmzip demo`` print)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from .api import compressed, plan, recorded
from .bench import TTFTComparison, compare_ttft
from .io import batch_visual_inputs, generate_answers, llm_lengths, takes_videos
from .methods import Selection
from .video import Video, frame_knobs


@dataclass
class Comparison:
    """Both answers, the token counts, the resolved knobs, the kept tokens and the TTFT timing.

    ``tokens_before`` / ``tokens_after``: visual tokens per image the vanilla model sends and the compressed one
    ends with; on a model whose count depends on the image, this image's (``tokens_after`` None where an in-LLM
    stage decides it inside the LLM). ``notes``: what ``vlmzip.plan`` says about how the method fits this model.

    A video: ``frames`` is its frame count; on a model that takes its frames as images, the counts are per frame
    (``knobs``: the per-frame knobs, :func:`vlmzip.video.frame_knobs`). ``vanilla_answer`` and ``timing`` are None
    when the vanilla prompt does not fit the model's context (``vanilla_prompt``: its length then)."""

    vanilla_answer: str | None
    method_answer: str
    tokens_before: int | None
    tokens_after: int | None
    knobs: dict[str, Any]
    selection: Selection | None
    timing: TTFTComparison | None
    notes: tuple[str, ...] = ()
    frames: int | None = None  # a video's frames
    per_frame: bool = False  # the counts are per frame (a video sent as images)
    vanilla_prompt: int | None = None  # tokens of a vanilla prompt too long for the context
    context: int | None = None


@torch.no_grad()
def compare_answers(
    model: nn.Module,
    processor: Any,
    visual: Image.Image | Video,
    question: str,
    method: str,
    knobs: dict[str, Any],
    repeats: int = 5,
    max_new_tokens: int = 16,
) -> Comparison:
    """Greedy answers of the vanilla and the compressed model about an image or a video, then interleaved TTFT
    timing. ``knobs`` budget a video as a whole (``tokens`` per video, ``tokens_per_frame``, ``ratio``); on a
    model that takes its frames as images they become per-frame knobs (:func:`vlmzip.video.frame_knobs`). A vanilla
    prompt too long for the model's context (many frames) is not answered nor timed; the compressed one is."""
    video = isinstance(visual, Video)
    per_frame = video and not takes_videos(model)
    if per_frame:
        knobs = frame_knobs(knobs, len(visual))

    def answer() -> str:
        return generate_answers(model, processor, [visual], [question], max_new_tokens)[0]

    inputs = batch_visual_inputs(processor, [visual], [question], model, check_context=False)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    length = max(llm_lengths(model, inputs))
    fits = context is None or length + max_new_tokens <= context
    vanilla_answer = answer() if fits else None
    planned = plan(model, method, **knobs)
    with compressed(model, method, **knobs), recorded(model) as selections:
        method_answer = answer()
    selection = selections[-1] if selections else None
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
    timing = compare_ttft(model, inputs, method, knobs, repeats=repeats) if fits else None
    return Comparison(vanilla_answer, method_answer, before, after, resolved, selection, timing, planned.notes,
                      frames=len(visual) if video else None, per_frame=per_frame,
                      vanilla_prompt=None if fits else length, context=context)


def describe(c: Comparison, method: str, repeats: int) -> str:
    """The lines ``vlmzip run`` / ``demo`` print about a comparison."""
    t = c.timing
    if c.per_frame and c.frames:
        total = [None if n is None else n * c.frames for n in (c.tokens_before, c.tokens_after)]
        tokens = (f"visual tokens per video ({c.frames} frames as images): {total[0]} -> {total[1]} "
                  f"(per frame {c.tokens_before} -> {c.tokens_after})")
    else:
        tokens = f"visual tokens per {'video' if c.frames else 'image'}: {c.tokens_before} -> {c.tokens_after}"
    if t is None:
        vanilla = (f"answer (vanilla):      not run: its prompt takes {c.vanilla_prompt} tokens, over the model's "
                   f"context of {c.context}")
        timing = "time to first token: not compared (the vanilla prompt does not fit the model's context)"
    else:
        vanilla = f"answer (vanilla):      {c.vanilla_answer!r}"
        timing = (f"time to first token, median of {repeats} interleaved runs: "
                  f"vanilla {t.vanilla_median * 1e3:.1f} ms, {method} {t.compressed_median * 1e3:.1f} ms "
                  f"-> speedup {t.speedup:.2f}x (vanilla / compressed)")
    return "\n".join([
        f"method:  {method} {c.knobs}",
        *(f"note:    {note}" for note in c.notes),
        tokens,
        vanilla,
        f"answer ({method}): {c.method_answer!r}",
        timing,
    ])
