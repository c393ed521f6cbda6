"""How much a lab model's CLS attention (what VisionZip and Cluster & Saliency rank patches by) looks at
objects: the share of the top-k CLS-attended patches that show an object or the text, over the first N
lab-test images, next to the share of all patches that do (the chance level). One line per model folder.

    OMP_NUM_THREADS=1 python tools/cls_focus.py --images 100 vlmzip/lab/checkpoint runs/cont/model
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmzip.adapters import adapter_for
from vlmzip.lab import scenes
from vlmzip.lab.train_data import patch_owners, pixel_values, to_uint8


def foreground_shares(folder: str, images: int, ks: tuple[int, ...]) -> tuple[float, dict[int, float]]:
    """(share of all patches on an object or the text, {k: share of the k most CLS-attended patches that
    are}), averaged over the first ``images`` lab-test images; the CLS row of the feature layer, heads
    averaged, as the adapter captures it for VisionZip."""
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    adapter = adapter_for(model)
    grid = adapter.layout.grid[0]
    size = processor.image_processor.crop_size["height"]
    split = scenes.SPLITS["test"]
    chance, top = [], {k: [] for k in ks}
    for index in range(images):
        image, scene, _ = scenes.sample(split.seed, index)
        on_object = patch_owners(image, scene, grid, 0.1) >= 0  # (grid * grid,)
        pixels = torch.from_numpy(to_uint8(image, size)).unsqueeze(0)
        with torch.no_grad():
            tokens = adapter.tower.run(pixel_values(pixels, processor), adapter.layout, frozenset({"cls_attention"}))
        attention = tokens.cls_attention[0, 1:]  # (n_patches,)
        chance.append(on_object.mean())
        for k in ks:
            top[k].append(on_object[attention.topk(k).indices.numpy()].mean())
    return float(np.mean(chance)), {k: float(np.mean(v)) for k, v in top.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="lab model folders")
    parser.add_argument("--images", type=int, default=100, help="lab-test images (default: 100)")
    parser.add_argument("--top", default="54,27", help="the k values, comma-separated (default: 54,27)")
    args = parser.parse_args()
    ks = tuple(int(k) for k in args.top.split(","))
    for folder in args.models:
        chance, shares = foreground_shares(folder, args.images, ks)
        tops = ", ".join(f"top-{k} {share:.1%}" for k, share in shares.items())
        print(f"{folder}: on objects/text: all patches {chance:.1%}, {tops}")


if __name__ == "__main__":
    main()
