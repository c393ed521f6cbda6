"""Pictures of what a method kept: the tokens sent to the LLM drawn over the image the model saw."""

from __future__ import annotations

import colorsys
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .methods.base import Selection, TokenLayout
from .views import ImageView


def _palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(0.1 + 0.8 * i / max(n, 1), 0.65, 1.0)) for i in range(n)]


def token_overlay(
    image: Image.Image,
    layout: TokenLayout,
    selection: Selection,
    row: int = 0,
    num_dominant: int | None = None,
) -> Image.Image:
    """Draw one image's selection over ``image`` (already the model's view, square).

    Dropped patches are darkened; kept patches (for VisionZip: the dominant ones) get a red frame;
    with ``merged_from`` (VisionZip), every patch merged into a contextual token is tinted with that
    token's colour and the token's target gets a frame of the same colour.
    """
    gh, gw = layout.grid
    cell_w, cell_h = image.width / gw, image.height / gh
    base = image.convert("RGBA")
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    indices = selection.indices[row].tolist()
    kept = set(indices)
    merged = selection.merged_from[row] if selection.merged_from is not None else None
    n_dom = len(indices) if num_dominant is None else num_dominant
    colors = _palette(len(indices) - n_dom)

    def box(patch: int) -> tuple[float, float, float, float]:
        y, x = divmod(patch, gw)
        return (x * cell_w, y * cell_h, (x + 1) * cell_w - 1, (y + 1) * cell_h - 1)

    for patch in range(layout.num_patches):
        token = layout.num_prefix + patch
        slot = int(merged[token]) if merged is not None else (indices.index(token) if token in kept else -1)
        if slot < 0:
            draw.rectangle(box(patch), fill=(0, 0, 0, 150))
        elif slot >= n_dom:
            draw.rectangle(box(patch), fill=(*colors[slot - n_dom], 70))
    out = Image.alpha_composite(base, shade)
    frames = ImageDraw.Draw(out)
    for slot, token in enumerate(indices):
        if token < layout.num_prefix:
            continue  # the CLS token has no place on the grid
        color = (230, 20, 20, 255) if slot < n_dom else (*colors[slot - n_dom], 255)
        frames.rectangle(box(token - layout.num_prefix), outline=color, width=2 if slot < n_dom else 3)
    return out.convert("RGB")


# -- figures: titled panels and a legend -------------------------------------------------------------

PANEL_SIZE = 336  # every panel is drawn at this size (pixels), whatever the model's input size
MARGIN, GAP = 12, 12
CROP_GAP = 2  # between LLaVA-NeXT's high-resolution crops
TITLE_FONT, PANEL_FONT, LEGEND_FONT = 18, 14, 13
METHOD_NAMES = {"visionzip": "VisionZip", "random": "Random", "spatial": "Spatial", "fastv": "FastV",
                "vanilla": "Vanilla", "pool": "Pooling", "tome": "ToMe", "divprune": "DivPrune",
                "cluster_aggregate": "Cluster & Aggregate", "cluster_saliency": "Cluster & Saliency",
                "saliency": "Saliency", "cluster_saliency_llm": "Cluster & Saliency (LLM)"}
KEPT_RED = (230, 20, 20)
SWATCH_GRAY = (175, 175, 175)

# What each mark means, in words a newcomer reads without the code (the legend under every figure).
LEGEND = {
    "kept": "kept: this patch's token is sent to the LLM as it is (VisionZip: a dominant token)",
    "merged": "merged (VisionZip's contextual tokens; pooled, ToMe or cluster tokens): one token per colour, "
              "sent at its framed patch; it is the average of the patches tinted in its colour",
    "dropped": "dropped: darkened patches send nothing to the LLM",
}


def method_label(method: str) -> str:
    """A method's name as the papers write it (``visionzip`` -> ``VisionZip``)."""
    return METHOD_NAMES.get(method, method)


def budget_title(method: str, kept: int, total: int) -> str:
    """The headline of a method's picture: ``"VisionZip, 28 of 256 visual tokens"`` (per image)."""
    return f"{method_label(method)}, {kept} of {total} visual tokens"


def kept_outputs(selection: Selection, row: int = 0) -> int | None:
    """How many leading outputs to draw as kept tokens (the rest as merged groups, one colour each).

    VisionZip's dominant count; 0 for a merging method that marks no split (pooling, ToMe, clusters) when
    some output averages several tokens; None (all kept) for a pure selection.
    """
    if selection.dominant is not None or selection.merged_from is None:
        return selection.dominant
    slots = selection.merged_from[row]
    counts = slots[slots >= 0].bincount(minlength=selection.indices.shape[1])
    return 0 if bool((counts > 1).any()) else None


def split_note(selection: Selection, layout: TokenLayout, row: int = 0) -> str | None:
    """How a VisionZip selection splits, e.g. ``"24 dominant (with CLS) + 4 contextual"``; None without a split."""
    if selection.dominant is None:
        return None
    indices = selection.indices[row].tolist()
    kept = len(indices)
    cls = " (with CLS, not drawn)" if any(i < layout.num_prefix for i in indices[: selection.dominant]) else ""
    return f"{selection.dominant} dominant{cls} + {kept - selection.dominant} contextual"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` (newlines kept) broken into lines no wider than ``width`` pixels."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and measure.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _line_height(font: ImageFont.ImageFont) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return bottom - top + 5


def _swatch(kind: str, size: int = 22) -> Image.Image:
    cell = Image.new("RGB", (size, size), SWATCH_GRAY)
    draw = ImageDraw.Draw(cell)
    if kind == "kept":
        draw.rectangle((0, 0, size - 1, size - 1), outline=KEPT_RED, width=2)
    elif kind == "merged":
        color = _palette(3)[1]
        tint = Image.new("RGB", (size, size), color)
        cell = Image.blend(cell, tint, 70 / 255)
        ImageDraw.Draw(cell).rectangle((0, 0, size - 1, size - 1), outline=color, width=3)
    elif kind == "dropped":
        cell = Image.blend(cell, Image.new("RGB", (size, size), (0, 0, 0)), 150 / 255)
    return cell


def figure(panels: list[tuple[str, Image.Image]], title: str, legend: list[str] | tuple[str, ...] = ("kept", "dropped"),
           panel_size: int = PANEL_SIZE) -> Image.Image:
    """One picture: ``title`` on top, the ``(caption, image)`` panels side by side (each resized to
    ``panel_size`` pixels high, keeping its aspect ratio), and the legend entries (keys of ``LEGEND``) below,
    on a white background.

    Width: ``2 * MARGIN + n * panel_size + (n - 1) * GAP`` for n square panels.
    """
    sizes = [(max(1, round(image.width * panel_size / image.height)), panel_size) for _, image in panels]
    width = 2 * MARGIN + sum(w for w, _ in sizes) + (len(panels) - 1) * GAP
    title_font, panel_font, legend_font = _font(TITLE_FONT), _font(PANEL_FONT), _font(LEGEND_FONT)
    title_lines = _wrap(title, title_font, width - 2 * MARGIN)
    captions = [_wrap(caption, panel_font, w) for (caption, _), (w, _) in zip(panels, sizes, strict=True)]
    caption_lines = max((len(c) for c in captions), default=0)
    swatch = 22
    legend_lines = [_wrap(LEGEND[key], legend_font, width - 2 * MARGIN - swatch - 8) for key in legend]
    th, ph, lh = _line_height(title_font), _line_height(panel_font), _line_height(legend_font)
    panels_top = MARGIN + len(title_lines) * th + 8
    images_top = panels_top + caption_lines * ph + 4
    legend_top = images_top + panel_size + 10
    height = legend_top + sum(max(len(lines) * lh, swatch) + 6 for lines in legend_lines) + MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + i * th), line, fill="black", font=title_font)
    left = MARGIN
    for (_, image), lines, size in zip(panels, captions, sizes, strict=True):
        for i, line in enumerate(lines):
            draw.text((left, panels_top + i * ph), line, fill="black", font=panel_font)
        image = image.convert("RGB")
        canvas.paste(image if image.size == size else image.resize(size, Image.Resampling.BICUBIC), (left, images_top))
        left += size[0] + GAP
    y = legend_top
    for key, lines in zip(legend, legend_lines, strict=True):
        canvas.paste(_swatch(key, swatch), (MARGIN, y))
        for i, line in enumerate(lines):
            draw.text((MARGIN + swatch + 8, y + i * lh + 2), line, fill="black", font=legend_font)
        y += max(len(lines) * lh, swatch) + 6
    return canvas


def notice(image: Image.Image, text: str) -> Image.Image:
    """``image`` greyed, with ``text`` written across it (a panel with nothing to draw)."""
    base = Image.blend(image.convert("RGB"), Image.new("RGB", image.size, (255, 255, 255)), 0.7)
    font = _font(PANEL_FONT)
    lines = _wrap(text, font, min(base.width, PANEL_SIZE) - 24)
    lh = _line_height(font)
    draw = ImageDraw.Draw(base)
    top = (base.height - len(lines) * lh) // 2
    for i, line in enumerate(lines):
        draw.text((12, top + i * lh), line, fill="black", font=font)
    return base


# -- a model's selections as panels -----------------------------------------------------------------

VIEW_PROMPT = "What is in the image?"


def view_of(model: Any, processor: Any, image: Image.Image, prompt: str = VIEW_PROMPT) -> ImageView:
    """Run the processor on ``image`` and read back what the vision tower gets of it (every unit), as the
    model's adapter lays it out."""
    from .adapters import adapter_for
    from .io import batch_inputs

    inputs = batch_inputs(processor, [image], [prompt], model)
    return adapter_for(model).view(inputs, processor.image_processor)


def crops_picture(pictures: list[Image.Image], grid: tuple[int, int], height: int = PANEL_SIZE) -> Image.Image:
    """A base unit and a grid of units side by side, ``height`` pixels high (LLaVA-NeXT: the base crop, a gap,
    then the high-resolution crops in their grid, vertically centred; each picture already at its display
    size, see ``crop_sizes``)."""
    rows, cols = grid
    cell = pictures[1].width if len(pictures) > 1 else height
    step = cell + CROP_GAP  # a thin white line between crops
    canvas = Image.new("RGB", (height + GAP + cols * step - CROP_GAP, height), "white")
    canvas.paste(pictures[0].resize((height, height), Image.Resampling.BICUBIC), (0, 0))
    top = (height - rows * step + CROP_GAP) // 2
    for j, picture in enumerate(pictures[1:]):
        row, col = divmod(j, cols)
        canvas.paste(picture, (height + GAP + col * step, top + row * step))
    return canvas


def crop_sizes(grid: tuple[int, int], height: int = PANEL_SIZE) -> tuple[int, int]:
    """Display sizes (base crop, each high-resolution crop) of a ``crops_picture`` ``height`` pixels high;
    the crop grid is at most ``height`` high and ``2 * height`` wide."""
    rows, cols = grid
    return height, min((height + CROP_GAP) // rows, (2 * height + CROP_GAP) // cols) - CROP_GAP


def unit_selections(selections: list[Selection], image: int = 0) -> dict[int, tuple[Selection, int]]:
    """Unit number -> (selection, row) of image ``image``'s units, from what ``vlmzip.recorded`` collected
    (each recorded selection names the (image, unit) of its rows)."""
    found: dict[int, tuple[Selection, int]] = {}
    for selection in selections:
        for row, (number, unit) in enumerate(selection.units or ()):
            if number == image:
                found[unit] = (selection, row)
    return found


def legend_keys(selection: Selection | None, layout: TokenLayout, row: int = 0) -> set[str]:
    """The legend entries a drawn selection needs."""
    if selection is None:
        return set()
    keys = {"kept"}
    merged = selection.merged_from
    split = kept_outputs(selection, row)
    if split is not None and selection.indices.shape[1] > split:
        keys.add("merged")
    if merged is None:
        if selection.indices.shape[1] < layout.num_patches:
            keys.add("dropped")
    elif bool((merged[row, layout.num_prefix:] < 0).any()):
        keys.add("dropped")
    return keys


def method_panel(model: Any, view: ImageView, method: str, knobs: dict[str, Any]) -> tuple[str, Image.Image, set[str]]:
    """(caption, picture, legend keys) of what ``method`` with ``knobs`` sends to the LLM for ``view``'s image.

    Pre-LLM methods: one forward pass of the compressed model records the selection of every unit, drawn
    over that unit's picture. In-LLM methods choose per question inside the LLM, so their panel says that
    instead of drawing a selection.
    """
    import torch

    from .api import compressed, plan, recorded

    planned = plan(model, method, **knobs).for_image(view.total)
    picture = plain_picture(view)
    if not planned.stages:
        return f"{method_label(method)}, all {view.total} visual tokens", picture, set()
    stage = planned.stages[0]
    if stage.spec.stage == "llm":
        layers = ", ".join(str(s.layer) for s in planned.steps)
        caption = budget_title(method, planned.final_tokens, view.total)
        text = (f"{method_label(method)} drops visual tokens inside the LLM, before decoder layer(s) {layers}, by "
                "the attention of the question's tokens: which ones depends on the question, so there is no "
                "selection before the LLM to draw.")
        return f"{caption} from LLM layer {planned.steps[0].layer} on", notice(picture, text), set()
    kept = stage.keep(view.total)
    caption = budget_title(method, kept, view.total)
    with torch.no_grad(), compressed(model, method, **knobs), recorded(model) as selections:
        model(**view.inputs)
    units = unit_selections(selections)
    if not units:  # a keep-all budget of a multi-crop image sends the vanilla tokens unchanged
        return caption + " (all kept)", picture, set()
    if view.grid is not None:
        return multi_unit_panel(view, units, caption)
    selection, row = units[0]
    note = split_note(selection, view.layouts[0], row)
    if note:
        caption += f"\n{note}"
    overlay = token_overlay(picture, view.layouts[0], selection, row=row, num_dominant=kept_outputs(selection, row))
    return caption, overlay, legend_keys(selection, view.layouts[0], row)


def plain_picture(view: ImageView) -> Image.Image:
    """What the model sees, at display size: the image (``PANEL_SIZE`` high, its aspect kept), or a base unit
    and the grid of the others side by side."""
    if view.grid is None:
        image = view.image.convert("RGB")
        width = max(1, round(image.width * PANEL_SIZE / image.height))
        return image.resize((width, PANEL_SIZE), Image.Resampling.BICUBIC)
    base, cell = crop_sizes(view.grid)
    pictures = [view.pictures[0]] + [p.resize((cell, cell), Image.Resampling.BICUBIC) for p in view.pictures[1:]]
    return crops_picture(pictures, view.grid)


def multi_unit_panel(view: ImageView, units: dict[int, tuple[Selection, int]],
                     caption: str) -> tuple[str, Image.Image, set[str]]:
    """A multi-crop image's panel: each unit's selection drawn on that unit (the base crop, then the grid)."""
    assert view.grid is not None
    base, cell = crop_sizes(view.grid)
    pictures, keys = [], set()
    for unit, layout in enumerate(view.layouts):
        selection, row = units[unit]
        size = base if unit == 0 else cell
        picture = view.pictures[unit].convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        split = kept_outputs(selection, row)
        pictures.append(token_overlay(picture, layout, selection, row=row, num_dominant=split))
        keys |= legend_keys(selection, layout, row)
    rows, cols = view.grid
    first = int(units[0][0].indices.shape[1])
    rest = sum(int(units[u][0].indices.shape[1]) for u in range(1, len(view.layouts)))
    caption += (f"\nleft: the base crop, {first} of its {view.layouts[0].vanilla} tokens; right: the {rows} x {cols} "
                f"high-resolution crops, {rest} tokens")
    note = split_note(units[0][0], view.layouts[0], units[0][1])
    if note:
        caption += f"\nbase crop: {note}"
    return caption, crops_picture(pictures, view.grid), keys


def legend_order(keys: set[str]) -> list[str]:
    """The legend entries among ``keys``, in a fixed order (kept, merged, dropped)."""
    return [k for k in LEGEND if k in keys]


def methods_figure(model: Any, processor: Any, image: Image.Image, methods: list[str], tokens: int | None,
                   source: str) -> tuple[Image.Image, int]:
    """``vlmzip viz``: one panel per method (its ``tokens``-per-image selection), titled, with the legend; and
    the budget drawn. ``tokens`` None: the papers' 64 of LLaVA-1.5's 576, as the same share of this image's own
    visual tokens (so that it fits every model: a multi-crop or dynamic-resolution image has its own count)."""
    from .budgets import scale_paper_budget
    from .knobs import split_knobs
    from .methods import get_method

    view = view_of(model, processor, image)
    tokens = tokens or scale_paper_budget(64, view.total)
    panels, keys = [], set()
    for entry in methods:  # a method, optionally with knobs in brackets: "fastv[layer=3]"
        method, knobs = split_knobs(entry)
        knobs = {**knobs, "tokens": tokens} if get_method(method).takes_budget else knobs
        caption, picture, used = method_panel(model, view, method, knobs)
        panels.append((caption, picture))
        keys |= used
    size = f"{view.image.width} x {view.image.height} px"
    crops = f"; base crop + {view.grid[0]} x {view.grid[1]} crops" if view.grid is not None else ""
    title = (f"What each method sends to the LLM: {tokens} of {view.total} visual tokens per image\n"
             f"{source}, as the model sees it ({size}{crops})")
    return figure(panels, title, legend_order(keys)), tokens
