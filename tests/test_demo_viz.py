"""`vlmzip demo` end to end and the kept-token overlay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmzip.cli import main
from vlmzip.methods.base import Selection, TokenLayout
from vlmzip.viz import (
    CROP_GAP,
    GAP,
    LEGEND,
    MARGIN,
    PANEL_SIZE,
    budget_title,
    crop_sizes,
    figure,
    legend_order,
    method_label,
    method_panel,
    model_view,
    split_note,
    token_overlay,
    units_of,
    view_caption,
    view_of,
)


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


# -- titles, legend and the figure ------------------------------------------------------------------


def _red(picture: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Pixels of the kept-token red (frames and the legend swatch) inside ``box``."""
    a = np.asarray(picture.crop(box).convert("RGB")).astype(int)
    return int(((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())


def _dark(picture: Image.Image, box: tuple[int, int, int, int]) -> int:
    a = np.asarray(picture.crop(box).convert("RGB")).astype(int)
    return int((a.max(axis=-1) < 120).sum())


def test_titles_name_the_method_and_budget():
    assert budget_title("visionzip", 28, 256) == "VisionZip, 28 of 256 visual tokens"
    assert budget_title("random", 7, 64) == "Random, 7 of 64 visual tokens"
    assert method_label("my-method") == "my-method"
    layout = TokenLayout(num_prefix=1, grid=(2, 2), send_prefix=False)
    split = Selection(features=torch.zeros(1, 3, 1), indices=torch.tensor([[0, 2, 4]]), dominant=2)
    assert split_note(split, layout) == "2 dominant (with CLS, not drawn) + 1 contextual"
    assert split_note(Selection(features=torch.zeros(1, 1, 1), indices=torch.tensor([[1]])), layout) is None


def test_figure_draws_title_panels_and_legend():
    panels = [("first", Image.new("RGB", (50, 50), (0, 0, 255))), ("second", Image.new("RGB", (50, 50), (0, 255, 0)))]
    one = figure(panels, "A title", ["kept"])
    three = figure(panels, "A title", list(LEGEND))
    untitled = figure(panels, "", ["kept"])
    assert one.width == three.width == 2 * MARGIN + 2 * PANEL_SIZE + GAP
    assert three.height > one.height, "every legend entry gets its line"
    title_band = (MARGIN, MARGIN, one.width - MARGIN, MARGIN + 14)
    assert _dark(one, title_band) > 20 and _dark(untitled, title_band) == 0, "the title is written"
    legend_band = (0, one.height - 45, one.width, one.height)
    assert _red(one, legend_band) > 20, "the kept swatch (red frame) is in the legend"
    assert _dark(one, (MARGIN + 40, one.height - 40, one.width, one.height)) > 20, "legend text is written"
    # each panel is pasted at its column, resized to PANEL_SIZE
    middle = one.height // 2
    assert one.getpixel((MARGIN + PANEL_SIZE // 2, middle)) == (0, 0, 255)
    assert one.getpixel((MARGIN + PANEL_SIZE + GAP + PANEL_SIZE // 2, middle)) == (0, 255, 0)
    assert legend_order({"dropped", "kept"}) == ["kept", "dropped"]


def test_the_picture_is_what_the_processor_gives_the_tower(model, processor):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    view = view_of(model, processor, image)
    assert view.image.size == (112, 112) and view.total == 64 and view.crops == 1
    assert view_caption(view) == "The image as the model sees it: all 64 visual tokens"
    diff = np.abs(np.asarray(view.image).astype(int) - np.asarray(image).astype(int))
    assert diff.max() <= 2


def test_panel_captions(model, processor):
    view = view_of(model, processor, Image.new("RGB", (112, 112), (120, 80, 40)))
    caption, _, keys = method_panel(model, view, "visionzip", {"tokens": 8})
    assert caption.startswith("VisionZip, 8 of 64 visual tokens\n") and "dominant" in caption
    assert keys >= {"kept", "merged"}
    caption, _, keys = method_panel(model, view, "random", {"tokens": 8})
    assert caption == "Random, 8 of 64 visual tokens" and keys == {"kept", "dropped"}
    caption, _, keys = method_panel(model, view, "fastv", {"tokens": 8, "layer": 1})
    assert caption == "FastV, 8 of 64 visual tokens from LLM layer 1 on" and keys == set()
    caption, _, keys = method_panel(model, view, "vanilla", {})
    assert caption == "Vanilla, all 64 visual tokens" and keys == set()


# -- vlmzip viz end to end --------------------------------------------------------------------------


def viz(llava_dir, out, *args):
    return main(["viz", "--model", str(llava_dir), "--out", str(out), *args])


def test_viz_draws_one_panel_per_method(llava_dir, tmp_path, capsys):
    two, three = tmp_path / "two.png", tmp_path / "three.png"
    assert viz(llava_dir, two, "--methods", "visionzip,random", "--tokens", "8") == 0
    assert "visionzip, random at 8 visual tokens per image drawn side by side" in capsys.readouterr().out
    assert viz(llava_dir, three, "--methods", "visionzip,random,spatial", "--tokens", "8") == 0
    two, three = Image.open(two), Image.open(three)
    assert two.width == 2 * MARGIN + 2 * PANEL_SIZE + GAP
    assert three.width == two.width + PANEL_SIZE + GAP
    for p in range(3):  # every panel has kept-token frames; random and spatial darken what they drop
        left = MARGIN + p * (PANEL_SIZE + GAP)
        body = (left, 60, left + PANEL_SIZE, three.height - 80)
        assert _red(three, body) > 50, f"panel {p} has no kept-token frames"
        if p:
            assert _dark(three, body) > PANEL_SIZE * PANEL_SIZE // 2, f"panel {p} darkens dropped patches"


def test_viz_defaults_the_budget_and_the_image(llava_dir, tmp_path, capsys):
    out = tmp_path / "viz.png"
    assert viz(llava_dir, out, "--methods", "spatial,vanilla") == 0
    text = capsys.readouterr().out
    assert "image:   lab test scene 3" in text and "at 7 visual tokens per image" in text  # 64 of 576 -> 7 of 64
    assert Image.open(out).width == 2 * MARGIN + 2 * PANEL_SIZE + GAP


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "visionzip,nope"], "unknown method 'nope'"),
        (["--image", "DIR"], "is a directory"),
        (["--image", "DIR/missing.png"], "does not exist"),
        (["--image", "DIR/broken.png"], "cannot read image"),
        (["--tokens", "65"], "larger than the 64 visual tokens"),
        (["--tokens", "0"], "must be >= 1"),
    ],
)
def test_viz_errors_are_clear(llava_dir, tmp_path, capsys, args, message):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "viz.png"
    assert viz(llava_dir, out, *[a.replace("DIR", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from vlmzip.tiny_next import TinyLlavaNextConfig, build_llava_next

    out = tmp_path_factory.mktemp("viz-next")
    build_llava_next(out, TinyLlavaNextConfig(image_size=84, patch_size=14, vision_layers=2, text_layers=3))
    return out


def test_viz_of_llava_next_draws_every_crop_and_explains_in_llm_methods(next_dir, tmp_path):
    from vlmzip.io import load_model

    image = tmp_path / "wide.png"
    Image.new("RGB", (200, 60), (30, 140, 200)).save(image)  # the base crop + 1 x 3 high-resolution crops
    out = tmp_path / "viz.png"
    assert main(["viz", "--model", str(next_dir), "--image", str(image), "--methods", "visionzip,random,fastv",
                 "--tokens", "12", "--out", str(out)]) == 0
    base, cell = crop_sizes((1, 3))
    panel = base + GAP + 3 * (cell + CROP_GAP) - CROP_GAP  # base crop, gap, the three crops in a row
    picture = Image.open(out)
    assert picture.width == 2 * MARGIN + 3 * panel + 2 * GAP
    random_crops = MARGIN + panel + GAP + base + GAP  # where the random panel's high-resolution crops start
    assert _red(picture, (random_crops, 60, random_crops + 3 * cell, picture.height - 80)) > 20

    model, processor = load_model(str(next_dir))
    view = view_of(model, processor, Image.open(image))
    assert view.crops == 4 and view.grid == (1, 3) and len(view.crop_images) == 4
    assert view.image.size == (84, 84)
    assert view_caption(view).startswith("As the model sees it: the base crop (the whole image) and 1 x 3")
    caption, drawn, keys = method_panel(model, view, "random", {"tokens": 12})
    assert caption == (f"Random, 12 of {view.total} visual tokens\nleft: the base crop, 3 of its 36 tokens; right: "
                       "the 1 x 3 high-resolution crops, 9 tokens")
    assert drawn.size == (panel, PANEL_SIZE) and keys == {"kept", "dropped"}
    caption, _, keys = method_panel(model, view, "visionzip", {"tokens": 24})  # 6 per crop: 5 + 1 contextual
    assert caption.endswith("base crop: 5 dominant (with CLS, not drawn) + 1 contextual") and "merged" in keys
    caption, _, keys = method_panel(model, view, "fastv", {"tokens": 12})
    assert caption == f"FastV, 12 of {view.total} visual tokens from LLM layer 2 on" and keys == set()


def test_crop_selections_are_found_by_share():
    # 10 tokens over 4 crops: shares 3, 3, 2, 2 -> the adapter runs the method twice (3 per crop, then 2)
    first = Selection(features=torch.zeros(2, 3, 1), indices=torch.tensor([[1, 2, 3], [4, 5, 6]]))
    second = Selection(features=torch.zeros(2, 2, 1), indices=torch.tensor([[7, 8], [9, 10]]))
    units = units_of([first, second], [3, 3, 2, 2])
    assert [(sel is first, row) for sel, row in units] == [(True, 0), (True, 1), (False, 0), (False, 1)]
    with pytest.raises(RuntimeError, match="expected 2 recorded crop batches"):
        units_of([first], [3, 3, 2, 2])
