"""Reading image files as 8-bit RGB, with clear errors (``vlmzip.io`` and ``vlmzip.video`` use it)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB; a clear ``ValueError`` if it is missing, cannot be decoded, or is too
    large to decode safely (PIL's decompression-bomb guard: over twice ``Image.MAX_IMAGE_PIXELS``).

    16-bit and 32-bit greyscale (modes ``I;16``, ``I``) are scaled to 8 bits by their bit depth (16 bits, or
    32 for values beyond 65535) and float images (``F``) with values in [0, 1] by 255, where a plain
    ``convert("RGB")`` would clip them to white or black. 16-bit colour PNGs PIL already reads as 8-bit.
    """
    import re

    import numpy as np

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"image path {p} is a directory; pass an image file (PNG or JPEG)")
    if not p.is_file():
        raise ValueError(f"image file {p} does not exist")
    try:
        with Image.open(p) as img:
            if not (img.mode.startswith("I") or img.mode == "F"):
                return img.convert("RGB")
            values = np.nan_to_num(np.asarray(img, dtype=np.float64))
            if img.mode == "F":
                top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
            else:
                top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2.0**31 - 1
            grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found[1]):,} pixels" if found else str(err)
        raise ValueError(f"image {p} is too large to decode safely ({size}, over PIL's limit of "
                         f"{2 * Image.MAX_IMAGE_PIXELS:,} against decompression bombs); pass a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {p}: {err}; pass a valid PNG or JPEG file") from None
