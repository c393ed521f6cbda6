"""Adapter for ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration`` (SmolVLM / Idefics3).

SmolVLM is Idefics3's architecture (SmolVLM-Instruct ships as ``Idefics3ForConditionalGeneration``; SmolVLM2 as
``SmolVLMForConditionalGeneration``, the same modules and image path): one adapter takes both.

Model quirks this file owns:
- Tiles. The processor resizes an image to its ``longest_edge``, cuts it into R x C tiles of the tower's
  ``image_size`` (raster order) and appends the whole image downscaled to one tile, the *global image*
  (an image no larger than one tile is the global image alone). ``pixel_values`` is (B, max frames, 3, H, W):
  every tile and global image of row b's images, in order, then all-zero padding frames, which the model drops
  (``real = not all zero``); ``pixel_attention_mask`` (B, max frames, H, W) marks padded pixels.
- Placeholder runs. Every tile and the global image is one run of ``image_seq_len`` ``<image>`` placeholders,
  preceded by text: ``<fake_token_around_image><row_i_col_j>`` before tile (i, j) (a newline after each row of
  tiles) and ``<fake_token_around_image><global-img>`` before the global image, which a
  ``<fake_token_around_image>`` closes. So an image is ``R * C + 1`` runs with text between them
  (``Item(segments=(n,) * (R * C + 1))``); the text is kept, only runs shrink. ``items`` reads the runs from
  ``input_ids`` alone: the token after each row's last run is ``<fake_token_around_image>``, a run's tag is the
  text between the last such token before it and the run, the global image's tag is the tag of each row's last
  run, and an image ends with each run of that tag. This holds whether the tags are special tokens
  (SmolVLM2, Idefics3) or ordinary text of several tokens (SmolVLM-Instruct's tokenizer).
- Tokens. The SigLIP-like tower (no CLS) encodes each frame into a g x g patch grid; the connector's pixel
  shuffle concatenates each ``scale_factor`` x ``scale_factor`` block of patches into one token
  (``image_seq_len = (g / scale_factor)^2``, row-major), then one linear layer without bias projects it to the
  LLM; ``inputs_merger`` scatters the features into the placeholders in order.
- Units: each tile and the global image, ``TokenLayout(0, (g / s, g / s), send_prefix=True)``; unit 0 is the
  global image, units 1.. the tiles in raster order (so ``vlmzip viz`` draws the global image first and the
  tiles as a grid beside it). "vision"-stage methods receive the pixel-shuffled tower output (what the
  projection takes, D = hidden * s^2); "projector"-stage methods the projected tokens. Frames with the same
  share go to the method in one batched call.
- Budget: ``tokens=N`` / ``ratio=r`` is per image, summed over its runs, and split evenly over them
  (:func:`vlmzip.budgets.split_evenly`, units in the order above: the remainder goes to the global image, then
  to the first tiles); every run keeps at least one token, so a budget below an image's run count is a
  ValueError. A run sends its unit's selection in the method's order; an image whose budget keeps every token
  sends the model's own features.
- Signals from the tower's last layer (the one the connector is fed), captured with forward hooks on its
  ``q_proj`` / ``k_proj`` (any attention implementation): ``received_attention`` of a token = the attention
  its s^2 patches receive (mean over heads and over the frame's real queries, padded patches masked as the
  tower masks them), summed over the group; ``keys`` = ``k_proj`` averaged over heads, then over the group
  (as vlmzip's Qwen adapter does for its 2x2 merged tokens; VisionZip, arXiv 2412.04467, ranks dominant tokens
  by received attention where there is no CLS token).
- Route: an instance-level ``get_image_features`` on ``model.model`` runs the model's own one (tower,
  connector) with hooks and returns, per row, that row's images' kept tokens; it learns each row's images
  (their tiles) from the call's items, so it needs the call's ``input_ids`` (a bare ``get_image_features``
  call on a compressed model is refused unless no pre-LLM method runs). Positions: 1-D, contiguous over the
  shrunk sequence (what the released VisionZip code does).
- Processor: SmolVLM's needs ``num2words`` and a video processor (torchvision). Where transformers cannot build
  it, ``load_processor`` builds :class:`ImageOnlySmolVLMProcessor` (the same image prompts, no videos) from the
  saved image processor, tokenizer and the checkpoint's own chat template.
- Videos (SmolVLM2): the video processor sends each frame as an unsplit image, with the same ``<image>``
  placeholders, the same ``<global-img>`` tag and the same ``pixel_values``; nothing the model receives tells a
  frame from an image (only the prompt's "Frame from ..." text does), so a frame is compressed like an unsplit
  image, and keep-all reproduces the vanilla model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Idefics3ForConditionalGeneration,
    ProcessorMixin,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import signals
from ..budgets import split_evenly
from ..methods.base import TokenLayout, VisionTokens
from ..runtime import current_call
from ..sequence import Item, image_runs
from ..views import ImageView, pixels_to_image
from .base import Adapter, captured, feature_kwargs, set_instance_attr
from .registry import register_adapter

# Attention probabilities held at once when rebuilding received attention (frames x heads x queries x keys).
ATTENTION_ELEMENTS = 1 << 26


# -- the layout of a prompt ------------------------------------------------------------------------------------


def row_images(ids: torch.Tensor, token_id: int, run: int) -> list[int]:
    """The runs of each image in one row of ids (L,), in order: tiles + 1 per split image, 1 for an unsplit one.

    Every run must hold ``run`` placeholders (one tile or global image); the image ends with the run whose tag
    (the text between the last ``<fake_token_around_image>`` before it and the run) is the global image's tag,
    the tag of the row's last run. ``<fake_token_around_image>`` is the token that closes the last run. Raises
    ``ValueError`` for a row the processor cannot have written.
    """
    runs = image_runs(ids, token_id)
    if not runs:
        return []
    for start, length in runs:
        if length != run:
            raise ValueError(
                f"a run of {length} image placeholders at position {start}; this model's processor writes runs of "
                f"{run} (one per tile and one for the global image); build the prompt with this model's processor"
            )
    row = ids.tolist()
    closing = runs[-1][0] + run
    if closing >= len(row):
        raise ValueError("the prompt ends inside an image (no <fake_token_around_image> after its last "
                         "placeholders); build the prompt with this model's processor")
    fake = row[closing]
    tags = []
    previous_end = 0
    for start, _ in runs:
        at = start - 1
        while at >= previous_end and row[at] != fake:
            at -= 1
        if at < previous_end or at == start - 1:
            raise ValueError(
                f"the image placeholders at position {start} are not preceded by <fake_token_around_image> and a "
                "tile tag (<row_i_col_j> or <global-img>); build the prompt with this model's processor"
            )
        tags.append(tuple(row[at + 1 : start]))
        previous_end = start + run
    images, count = [], 0
    for tag in tags:
        count += 1
        if tag == tags[-1]:
            images.append(count)
            count = 0
    return images


def tile_grid(tiles: torch.Tensor, global_image: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of an image's tiles (T, 3, S, S) in raster order: of the arrangements R x C = T, the one whose
    mosaic, downscaled to one tile, is closest to the global image (3, S, S), which is the whole image downscaled.
    The processor does not pass the grid to the model; ties (a uniform image) look the same either way."""
    count, _, side, _ = tiles.shape
    best, found = math.inf, (1, count)
    for rows in range(1, count + 1):
        if count % rows:
            continue
        cols = count // rows
        mosaic = tiles.float().view(rows, cols, 3, side, side).permute(2, 0, 3, 1, 4).reshape(3, rows * side,
                                                                                             cols * side)
        small = F.interpolate(mosaic[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        error = float((small[0] - global_image.float()).pow(2).mean())
        if error < best:
            best, found = error, (rows, cols)
    return found


# -- the tower ---------------------------------------------------------------------------------------------------


def masked_received_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, num_heads: int,
                              scale: float) -> torch.Tensor:
    """(F, T, H * Dh) queries and keys of F frames and their (F, T) bool patch mask -> (F, T) attention each patch
    receives: softmax over the frame's real keys, mean over heads and over its real queries (float32; frames
    in chunks of at most ``ATTENTION_ELEMENTS`` probabilities)."""
    frames, tokens, _ = q.shape
    qh, kh = signals.split_heads(q, num_heads), signals.split_heads(k, num_heads)  # (F, H, T, Dh)
    out = torch.empty(frames, tokens, dtype=torch.float32, device=q.device)
    chunk = max(1, ATTENTION_ELEMENTS // (num_heads * tokens * tokens))
    mask = mask.to(q.device)
    padded = not bool(mask.all())
    for a in range(0, frames, chunk):
        m = mask[a : a + chunk]
        logits = (qh[a : a + chunk] @ kh[a : a + chunk].transpose(-1, -2)) * scale
        if padded:
            logits = logits.masked_fill(~m[:, None, None, :], float("-inf"))
        queries = m.float()  # average over the real queries only
        summed = torch.einsum("fhqk,fq->fk", torch.softmax(logits, dim=-1), queries)
        out[a : a + chunk] = summed / (num_heads * queries.sum(dim=1, keepdim=True).clamp(min=1))
    return out


@dataclass
class Encoded:
    """One run of the model's image features with what vlmzip captured from it.

    - ``output``: the model's own ``get_image_features`` output (``pooler_output``: per row, (frames * n, D_lm));
    - ``shuffled``: (F, n, D * s^2) the connector's pixel-shuffled tokens of the F real frames (before projection);
    - ``received``: (F, n) received attention per token, or None; ``keys``: (F, n, Dh), or None.
    """

    output: Any
    shuffled: torch.Tensor
    received: torch.Tensor | None
    keys: torch.Tensor | None


class Idefics3Tower:
    """The SigLIP-like tower and connector of an Idefics3 / SmolVLM seen by vlmzip: run the model's own image
    features with hooks capturing the connector's input and the last layer's q / k."""

    def __init__(self, inner: nn.Module) -> None:
        self.inner = inner
        self.vision = inner.vision_model
        self.connector = inner.connector
        self.scale = int(inner.config.scale_factor)
        self.attn = self.vision.encoder.layers[-1].self_attn
        self.num_heads = int(self.attn.num_heads)

    def run(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None, needs: frozenset[str],
            **kwargs: Any) -> Encoded:
        """The model's own image features of (B, frames, 3, H, W) pixels, with the signals ``needs`` asks for."""
        inner = self.inner
        outputs = {"q": self.attn.q_proj, "k": self.attn.k_proj} if needs else {}
        inputs = {"projection": self.connector.modality_projection, "vision": self.vision}
        with captured(outputs, inputs=inputs) as store:
            out = type(inner).get_image_features(inner, pixel_values, pixel_attention_mask, return_dict=True,
                                                 **kwargs)
        shuffled = store["projection"][0][0]
        received = keys = None
        if needs:
            q, k = store["q"], store["k"]
            if "keys" in needs:
                keys = self.group(signals.head_mean_keys(k, self.num_heads)).mean(dim=2)
            if "received_attention" in needs:
                args, call_kwargs = store["vision"]
                mask = call_kwargs.get("patch_attention_mask", args[1] if len(args) > 1 else None)
                mask = mask.reshape(q.shape[0], -1).bool()
                scale = float(getattr(self.attn, "scale", (q.shape[-1] // self.num_heads) ** -0.5))
                per_patch = masked_received_attention(q, k, mask, self.num_heads, scale)
                received = self.group(per_patch.unsqueeze(-1)).sum(dim=(2, 3))
        return Encoded(out, shuffled, received, keys)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(F, T, C) per-patch values -> (F, n, s^2, C): each token's s x s patches, grouped by the connector's own
        pixel shuffle (patch-major chunks of C)."""
        frames, _, width = x.shape
        shuffled = self.connector.pixel_shuffle(x.float(), self.scale)
        return shuffled.view(frames, shuffled.shape[1], self.scale**2, width)


# -- the processor -----------------------------------------------------------------------------------------------


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor without its video part (transformers' needs ``num2words`` and torchvision).

    Same image prompts (``<fake_token_around_image><row_i_col_j>`` + ``image_seq_len`` placeholders per tile,
    ``<fake_token_around_image><global-img>`` + placeholders for the global image) and the same outputs
    (input_ids, attention_mask, pixel_values, pixel_attention_mask); used where ``AutoProcessor`` cannot build the
    full processor.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_len: int = 169,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """The chat template applied as every processor does (SmolVLM's own adds video-sampling defaults)."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


def checkpoint_chat_template(folder: str | Path) -> str | None:
    """The chat template saved with a checkpoint (the processor's, else the tokenizer's), or None."""
    processor_dict, _ = ProcessorMixin.get_processor_dict(str(folder))
    template = processor_dict.get("chat_template")
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return template
    return getattr(AutoTokenizer.from_pretrained(folder), "chat_template", None) or None


def load_processor(folder: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)`` where transformers can build it; otherwise (SmolVLM without
    ``num2words`` / torchvision) :class:`ImageOnlySmolVLMProcessor` from the saved image processor, tokenizer,
    ``image_seq_len`` and the checkpoint's own chat template."""
    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as err:
        reason = err
    template = checkpoint_chat_template(folder)
    if template is None:
        raise ValueError(
            f"cannot build the processor of {folder} ({type(reason).__name__}: {reason}), and the checkpoint has no "
            "chat template of its own for the image-only processor vlmzip builds instead; install num2words and "
            "torchvision so transformers can build SmolVLM's processor, or add the model's chat template"
        )
    processor_dict, _ = ProcessorMixin.get_processor_dict(str(folder))
    return ImageOnlySmolVLMProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                     tokenizer=AutoTokenizer.from_pretrained(folder),
                                     image_seq_len=int(processor_dict.get("image_seq_len", 169)),
                                     chat_template=template)


# -- the adapter -------------------------------------------------------------------------------------------------


class Idefics3Adapter(Adapter):
    """vlmzip's view of one ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` instance."""

    family = "idefics3"
    model_classes = (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vcfg = self.config.vision_config
        self.scale = int(self.config.scale_factor)
        side = int(vcfg.image_size) // int(vcfg.patch_size)  # the patch convolution drops a remainder
        if side % self.scale:
            raise ValueError(
                f"vlmzip cannot lay out this {type(model).__name__}: its patch grid (image_size {vcfg.image_size} / "
                f"patch_size {vcfg.patch_size} = {side} per side) must be a multiple of scale_factor {self.scale}, "
                "for the connector's pixel shuffle to turn each tile into whole tokens"
            )
        self.side = side // self.scale
        self.image_seq_len = self.side**2
        self.tower = Idefics3Tower(self.inner)
        self.layout = TokenLayout(num_prefix=0, grid=(self.side, self.side), send_prefix=True)

    # -- the images of a call ----------------------------------------------------------------------------------

    def items(self, call: dict[str, Any]) -> list[Item]:
        """Each image of ``call`` (rows in order) as its runs: one per tile, then the global image's, each of
        ``image_seq_len`` placeholders, read from ``input_ids`` (see the module docstring)."""
        ids = call.get("input_ids")
        if ids is None:
            raise ValueError("a compressed Idefics3 / SmolVLM model reads each image's tiles from input_ids; pass "
                             "the processor's input_ids with pixel_values")
        ids = ids.cpu()
        return [Item(self.image_token_id, (self.image_seq_len,) * runs)
                for row in ids for runs in row_images(row, self.image_token_id, self.image_seq_len)]

    def split(self, item: Item, keep: int, number: int, method: str) -> tuple[int, ...]:
        """``keep`` tokens of image ``number`` split evenly over its runs, units in the order global image, tiles
        (the remainder to the first); returned in the runs' order (tiles, then the global image)."""
        runs = len(item.segments)
        if keep < runs:
            tiles = f"{runs - 1} tiles + the global image" if runs > 1 else "the global image"
            raise ValueError(
                f"{method}: a budget of {keep} visual tokens for image {number} of this batch (vanilla count "
                f"{item.vanilla}: {tiles}, {self.image_seq_len} tokens each) cannot be split over its {runs} "
                f"placeholder runs; it needs at least {runs} tokens, one per run (use ratio=r for a share of each "
                "image's tokens, or ratio=1.0 to keep every token)"
            )
        shares = split_evenly(keep, runs)  # unit order: global image, then the tiles
        return (*shares[1:], shares[0])

    def unit_layout(self) -> TokenLayout:
        """One tile (or global image): its (g / s) x (g / s) pixel-shuffled tokens, no prefix."""
        return self.layout

    # -- the model's parts -------------------------------------------------------------------------------------

    def language_model(self) -> nn.Module:
        return self.inner.text_model

    def vision_module(self) -> nn.Module:
        return self.inner.vision_model

    # -- compression -------------------------------------------------------------------------------------------

    def install(self, state: Any) -> list[Any]:
        """Shadow ``model.model.get_image_features`` on this instance with the compressing version."""
        return [set_instance_attr(self.inner, "get_image_features", Idefics3ImageFeatures(self, state))]

    # -- loading and describing --------------------------------------------------------------------------------

    def load_processor(self, folder: Any) -> Any:
        return load_processor(folder)

    def view(self, inputs: dict[str, Any], image_processor: Any) -> ImageView:
        """The first image as the tower sees it: its global image (unit 0), then its tiles (units 1..) as a grid."""
        runs = row_images(inputs["input_ids"][0].cpu(), self.image_token_id, self.image_seq_len)[0]
        frames = inputs["pixel_values"][0][:runs]
        pictures = [pixels_to_image(frames[-1], image_processor)]
        pictures += [pixels_to_image(frame, image_processor) for frame in frames[:-1]]
        total = runs * self.image_seq_len
        token = f"one per {self.scale} x {self.scale} patches"
        if runs == 1:
            caption = (f"The image as the model sees it (one {pictures[0].width} px tile): all {total} visual tokens, "
                       f"{token}")
            return ImageView(inputs, total, pictures, [self.layout], caption=caption)
        rows, cols = tile_grid(frames[:-1], frames[-1])
        caption = (f"As the model sees it: the global image (the whole image downscaled) and {rows} x {cols} tiles; "
                   f"the vanilla model sends {total} visual tokens for them, {self.image_seq_len} per tile, {token}")
        return ImageView(inputs, total, pictures, [self.layout] * runs, grid=(rows, cols), caption=caption)


class Idefics3ImageFeatures:
    """``get_image_features`` of a compressed Idefics3 / SmolVLM: pooler_output is, per row, its images' kept
    tokens (K_row, D_lm), in placeholder order."""

    def __init__(self, adapter: Idefics3Adapter, state: Any) -> None:
        self.adapter, self.state = adapter, state

    def original(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None,
                 kwargs: dict[str, Any]) -> Any:
        """The model's own ``get_image_features`` (what a call whose images all keep every token sends)."""
        inner = self.adapter.inner
        return type(inner).get_image_features(inner, pixel_values, pixel_attention_mask, return_dict=True,
                                              **feature_kwargs(kwargs))

    def __call__(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> BaseModelOutputWithPooling:
        adapter, state = self.adapter, self.state
        if state.pre is None:
            return self.original(pixel_values, pixel_attention_mask, kwargs)
        rows = self.row_items(pixel_values.shape[0])
        numbered = [(number, item) for number, item in enumerate(i for row in rows for i in row)]
        kept = [state.item_keep(item, number) for number, item in numbered]
        if all(k == item.segments for k, (_, item) in zip(kept, numbered, strict=True)):
            return self.original(pixel_values, pixel_attention_mask, kwargs)  # every image keeps every token
        encoded = adapter.tower.run(pixel_values, pixel_attention_mask, state.needs(), **feature_kwargs(kwargs))
        output, n = encoded.output, adapter.image_seq_len
        projected = torch.cat(list(output.pooler_output), dim=0).view(-1, n, output.pooler_output[0].shape[-1])
        per_row = [int(f.shape[0]) // n for f in output.pooler_output]
        for b, (row, got) in enumerate(zip(rows, per_row, strict=True)):
            want = sum(len(item.segments) for item in row)
            if want != got:
                raise ValueError(
                    f"row {b} of the prompt has {want} tiles and global images ({len(row)} image(s)) but pixel_values "
                    f"holds {got} real frames for it; pass the processor's pixel_values with its input_ids"
                )
        # every frame (tile or global image) in pixel_values' order, with its unit number and its run's share
        units, keeps, compressed = [], [], []
        for (number, item), runs in zip(numbered, kept, strict=True):
            count = len(item.segments)
            units += [(number, j + 1 if j < count - 1 else 0) for j in range(count)]
            keeps += list(runs)
            compressed += [runs != item.segments] * count
        stage = state.pre.spec.stage
        hidden = projected if stage == "projector" else encoded.shuffled
        pixels = pixel_values.flatten(0, 1)[_real_frames(pixel_values)]
        tokens = VisionTokens(hidden=hidden, layout=adapter.layout, keys=encoded.keys,
                              received_attention=encoded.received, seeds=signals.content_seeds(pixels))
        chosen = state.select_rows(tokens, [k if c else None for k, c in zip(keeps, compressed, strict=True)],
                                   units)
        projection = adapter.tower.connector.modality_projection
        sent = {id(c[0]): c[0].features if stage == "projector" else projection(c[0].features)
                for c in chosen if c is not None}
        frames = [projected[f] if c is None else sent[id(c[0])][c[1]] for f, c in enumerate(chosen)]
        features, at = [], 0
        for count in per_row:
            part = frames[at : at + count]
            features.append(torch.cat(part, dim=0) if part else projected.new_zeros(0, projected.shape[-1]))
            at += count
        output.pooler_output = features
        return output

    def row_items(self, batch: int) -> list[list[Item]]:
        """The images of each of the ``batch`` rows, from the call in flight (its input_ids' layout)."""
        call = current_call(self.state)
        if call is None or call.items is None or call.rows is None:
            raise ValueError(
                "a compressed Idefics3 / SmolVLM model learns each image's tiles from the prompt: call the model or "
                "its generate with the processor's input_ids and pixel_values, not get_image_features alone"
            )
        items = call.items_for(batch)
        repeat = batch // max(len(call.rows), 1)
        rows, at = [], 0
        for count in (c for c in call.rows for _ in range(repeat)):
            rows.append(items[at : at + count])
            at += count
        return rows


def _real_frames(pixel_values: torch.Tensor) -> torch.Tensor:
    """(B * frames,) bool: the frames the model encodes (not all zero), HF's own rule."""
    flat = pixel_values.flatten(0, 1)
    return (flat != 0).flatten(1).any(dim=1)


register_adapter(Idefics3Adapter)
