"""Pictures of what a method kept: the tokens sent to the LLM drawn over the image the model saw."""

from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw

from .methods.base import Selection, TokenLayout


def model_view(image: Image.Image, size: int) -> Image.Image:
    """The image as a CLIP-style processor shows it: shortest edge resized to ``size``, centre crop."""
    w, h = image.size
    scale = size / min(w, h)
    resized = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                          Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.65, 1.0)) for i in range(n)]


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


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """Two images next to each other on a white background."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas

