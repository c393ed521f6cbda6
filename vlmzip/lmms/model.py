"""``--model vlmzip`` for lmms-eval: any model vlmzip supports, compressed with any vlmzip method.

``--model_args`` (comma-separated ``key=value``):

- ``pretrained``: checkpoint folder (``vlmzip.io.load_model``; default: vlmzip's default model, the shipped
  lab mini-VLM), or ``arch:NAME`` (random weights: for speed only);
- ``method``: a vlmzip method (``vlmzip list``), default ``vanilla`` (uncompressed);
- ``tokens``: visual tokens per image (per video for a video) the LLM ends with (or any other knob of the
  method, e.g. ``ratio=0.25``, ``dominant=54,contextual=10``, ``tokens_per_frame=17``), passed to
  ``vlmzip.compress``;
- ``frames``: frames sampled per video (default 8, the papers' Video-LLaVA setting; ``vlmzip.video``);
- ``device`` (default ``auto``), ``dtype`` (default ``float32``), ``batch_size`` (default 1; lmms-eval's
  ``--batch_size`` and ``--device`` set them too).

Questions are answered in lmms-eval's request order (task, split, document id) in batches of
``batch_size`` with the model's own chat prompt, left padded, exactly as ``vlmzip eval`` answers the
same questions with the same ``--batch-size``, so both give the same answers.

A question is about one visual: an image (a ``PIL.Image`` from the task's ``doc_to_visual``) or a video, given
as lmms-eval's video tasks give it, a path (a video file, or a folder of frames) that this model reads and
samples (``vlmzip.video.read_video``). On a model that takes videos as images, a video's budget is split over
its frames (``vlmzip.video.frame_knobs``): the model is compressed with per-frame knobs while it answers a batch
of videos, with the knobs as given while it answers images.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from .. import api
from ..devices import resolve_device
from ..eval.distributed import from_env
from ..io import batch_visual_inputs, chat_prompt, load_model, takes_videos
from ..video import DEFAULT_FRAMES, Video, check_frames, frame_knobs, read_video

VANILLA = "vanilla"


def _resolve_device(device: str) -> str:
    name = resolve_device(device)
    return from_env().device(name)  # under accelerate launch / torchrun: cuda -> cuda:LOCAL_RANK


def _batch_size(value: Any) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ValueError(f"vlmzip: batch_size must be a whole number >= 1, got {value!r} ('auto' is not supported)")
    return size


def cut_at_stops(text: str, until: list[str]) -> str:
    """``text`` up to the first of the stop strings ``until`` (empty strings ignored), stripped."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def _where(request: Instance) -> tuple[str, str, int]:
    """(task, split, document id) of a request: the order ``vlmzip eval`` answers questions in."""
    return request.args[4], request.args[5], request.args[3]


class VlmzipLMM(lmms):
    """lmms-eval model: a vlmzip-supported VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / 2.5-VL) compressed by
    ``vlmzip.compress(model, method, **knobs)``; one image or one video per question."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = VANILLA,
        device: str | None = "auto",
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        frames: int | str = DEFAULT_FRAMES,
        **knobs: Any,
    ) -> None:
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        try:
            self.frames = check_frames(int(frames), "vlmzip: frames")
        except (TypeError, ValueError):
            raise ValueError(f"vlmzip: frames must be a whole number >= 1 (frames sampled per video), got "
                             f"{frames!r}") from None
        self.device = _resolve_device(device or "auto")
        self.model, self.processor = load_model(pretrained, device=self.device, dtype=dtype)
        self.method = method
        self.knobs = knobs
        self._active: dict[str, Any] | None = None  # the knobs the model is compressed with now
        if method != VANILLA:
            self._compress_for(video=False)
        elif knobs:
            raise ValueError(f"vlmzip: method=vanilla takes no knobs, got {sorted(knobs)}; pass method=NAME too")

    def _compress_for(self, video: bool) -> None:
        """Compress the model with the knobs for a batch of images, or of videos (per-frame knobs on a model that
        takes videos as images); recompress only when they change."""
        if self.method == VANILLA:
            return
        knobs = self.knobs
        if not takes_videos(self.model) and (video or "tokens_per_frame" in knobs):
            knobs = frame_knobs(knobs, self.frames if video else 1)
        if knobs == self._active:
            return
        if self._active is not None:
            api.decompress(self.model)
            self._active = None
        api.compress(self.model, self.method, **knobs)
        self._active = knobs

    # -- helpers -------------------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _visual(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> Image.Image | Video:
        """The question's one image, or its one video (a path, as lmms-eval's video tasks give it) read and
        sampled to ``frames`` frames."""
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        if isinstance(visuals, (str, Image.Image)):
            visuals = [visuals]
        images = [v for v in visuals if isinstance(v, Image.Image)]
        videos = [v for v in visuals if isinstance(v, str)]
        if len(visuals) != 1 or len(images) + len(videos) != 1:
            raise ValueError(
                f"vlmzip answers questions with exactly one image or one video (a path); task {task!r} document "
                f"{doc_id} gives {len(visuals)} visual(s) ({len(images)} image(s), {len(videos)} video path(s)). "
                "Use a single-image or single-video task"
            )
        if videos:
            return read_video(videos[0], self.frames)
        return images[0].convert("RGB")

    def _image(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> Image.Image:
        visual = self._visual(doc_to_visual, task, split, doc_id)
        if isinstance(visual, Video):
            raise ValueError(f"vlmzip: task {task!r} document {doc_id} is about a video; loglikelihood requests "
                             "are answered about images only (video tasks generate their answers)")
        return visual

    def _within_context(self, tokens: int, what: str) -> None:
        """A clear error when ``tokens`` positions exceed the model's context (``max_position_embeddings``)."""
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if context is not None and tokens > context:
            raise ValueError(f"vlmzip: {what} take {tokens} tokens (image tokens included), over the model's "
                             f"context of {context} tokens (max_position_embeddings)")

    @torch.no_grad()
    def _answer(self, images: list[Image.Image | Video], questions: list[str], gen: dict[str, Any]) -> list[str]:
        """Answers to a batch of (image or video, question), ``gen``: lmms-eval generation kwargs (greedy by
        default)."""
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen.get("do_sample", False)) and float(gen.get("temperature", 0) or 0) > 0
        kwargs: dict[str, Any] = {"max_new_tokens": int(gen.get("max_new_tokens", 16)), "do_sample": sample,
                                  "num_beams": int(gen.get("num_beams", 1) or 1)}
        if sample:
            kwargs.update(temperature=float(gen["temperature"]), top_p=float(gen.get("top_p", 1.0) or 1.0))
        self._compress_for(video=isinstance(images[0], Video))
        inputs = batch_visual_inputs(self.processor, images, questions, self.model)  # refuses a prompt over the context
        self._within_context(inputs["input_ids"].shape[1] + kwargs["max_new_tokens"],
                             f"the prompt and up to {kwargs['max_new_tokens']} new tokens (max_new_tokens)")
        out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [cut_at_stops(t, until) for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    # -- lmms-eval's interface -----------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; returns one
        string per request, in the order given."""
        order = sorted(range(len(requests)), key=lambda i: _where(requests[i]))
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"vlmzip {self.method}")
        start = 0
        loaded: dict[int, Image.Image | Video] = {}

        def visual(i: int) -> Image.Image | Video:
            if i not in loaded:
                a = requests[i].args
                loaded[i] = self._visual(a[2], a[4], a[5], a[3])
            return loaded[i]

        while start < len(order):
            first = requests[order[start]].args
            chunk = [order[start]]
            video = isinstance(visual(order[start]), Video)
            for i in order[start + 1 : start + self.batch_size]:  # same task, split, generation kwargs and kind
                if (requests[i].args[4], requests[i].args[5], requests[i].args[1]) != (first[4], first[5], first[1]):
                    break
                if isinstance(visual(i), Video) != video:
                    break
                chunk.append(i)
            start += len(chunk)
            args = [requests[i].args for i in chunk]
            images = [loaded.pop(i) for i in chunk]
            answers = self._answer(images, [a[0] for a in args], dict(first[1]))
            for i, a, answer in zip(chunk, args, answers, strict=True):
                results[i] = answer
                self.cache_hook.add_partial("generate_until", (a[0], a[1]), answer)
            bar.update(len(chunk))
        bar.close()
        return [r for r in results if r is not None]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request ``(context, continuation, doc_to_visual, doc_id, task, split)``: the summed log-probability
        of the continuation's tokens after the model's chat prompt for (image, context), and whether greedy
        decoding would produce exactly them."""
        results = []
        self._compress_for(video=False)
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            image = self._image(doc_to_visual, task, split, doc_id)
            prompt = chat_prompt(self.processor, context)
            enc = self.processor(images=[image], text=[prompt + continuation], return_tensors="pt").to(self.device)
            self._within_context(enc["input_ids"].shape[1], f"task {task!r} document {doc_id}: the context and "
                                 "continuation")
            prompt_len = self.processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
            n = enc["input_ids"].shape[1] - prompt_len
            if n < 1:
                raise ValueError(f"task {task!r} document {doc_id}: the continuation {continuation!r} adds no tokens")
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(next(self.model.parameters()).dtype)
            logits = self.model(**enc).logits[0, -n - 1 : -1].float()  # (n, vocab): predicts the last n tokens
            wanted = enc["input_ids"][0, -n:]
            logprob = torch.log_softmax(logits, dim=-1).gather(1, wanted[:, None]).sum()
            results.append((float(logprob), bool((logits.argmax(-1) == wanted).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: vlmzip's lmms-eval model answers single-round tasks."""
        raise NotImplementedError("vlmzip's lmms-eval model answers single-round tasks (generate_until, "
                                  "loglikelihood); multi-round tasks are not supported")
