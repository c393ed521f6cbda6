"""`vlmzip demo` end to end and the kept-token overlay."""

from __future__ import annotations

import torch
from PIL import Image

from vlmzip.cli import main
from vlmzip.methods.base import Selection, TokenLayout
from vlmzip.viz import GAP, MARGIN, PANEL_SIZE, model_view, token_overlay


def test_demo_prints_answers_and_writes_the_overlay(llava_dir, tmp_path, capsys):
    out = tmp_path / "demo.png"
    code = main(["demo", "--model", str(llava_dir), "--tokens", "16", "--repeats", "1", "--max-new-tokens", "2",
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "correct answer" in text and "visual tokens per image: 64 -> 16" in text and "speedup" in text
    picture = Image.open(out)
    # two panels (the image as the model sees it, the selection), each drawn at PANEL_SIZE, titled, with a legend
    assert picture.width == 2 * MARGIN + 2 * PANEL_SIZE + GAP
    assert picture.height > PANEL_SIZE + 100
    assert "kept tokens drawn over the image" in text


def test_demo_default_budget_is_64_of_576_scaled_to_the_model(llava_dir, tmp_path, capsys):
    # the test model has 64 patches, so the papers' 64 of 576 becomes 7 (the same share of the image)
    code = main(["demo", "--model", str(llava_dir), "--repeats", "1", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "demo.png")])
    assert code == 0
    text = capsys.readouterr().out
    assert "budget:  7 tokens = the papers' 64 of 576" in text and "visual tokens per image: 64 -> 7" in text


def test_overlay_darkens_dropped_patches_and_frames_kept_ones():
    layout = TokenLayout(num_prefix=1, grid=(2, 2), send_prefix=False)
    image = Image.new("RGB", (40, 40), (200, 200, 200))
    # keep CLS and patch 0 (token 1); patch 3 (token 4) dropped
    selection = Selection(features=torch.zeros(1, 2, 1), indices=torch.tensor([[0, 1]]),
                          merged_from=torch.tensor([[0, 1, -1, -1, -1]]))
    out = token_overlay(image, layout, selection, num_dominant=2)
    assert out.getpixel((30, 30))[0] < 120, "dropped patch darkened"
    assert out.getpixel((10, 10)) == (200, 200, 200), "inside of a kept patch untouched"
    assert out.getpixel((0, 0))[0] > 200 and out.getpixel((0, 0))[1] < 60, "kept patch framed in red"


def test_model_view_matches_a_center_crop():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 150, 100))
    view = model_view(image, 50)
    assert view.size == (50, 50) and view.getpixel((25, 25)) == (255, 255, 255)
