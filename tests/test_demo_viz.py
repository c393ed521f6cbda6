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
    split_note,
    token_overlay,
    unit_selections,
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
    assert view.image.size == (112, 112) and view.total == 64 and len(view.pictures) == 1 and view.grid is None
    assert view.caption == "The image as the model sees it: all 64 visual tokens"
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
    from vlmzip.builders.llava_next import LlavaNextSpec, build_llava_next

    out = tmp_path_factory.mktemp("viz-next")
    build_llava_next(out, LlavaNextSpec(image_size=84, patch_size=14, vision_layers=2, text_layers=3))
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
    assert len(view.pictures) == 4 and view.grid == (1, 3) and len(view.layouts) == 4
    assert view.image.size == (84, 84)
    assert view.caption.startswith("As the model sees it: the base crop (the whole image) and 1 x 3")
    caption, drawn, keys = method_panel(model, view, "random", {"tokens": 12})
    assert caption == (f"Random, 12 of {view.total} visual tokens\nleft: the base crop, 3 of its 36 tokens; right: "
                       "the 1 x 3 high-resolution crops, 9 tokens")
    assert drawn.size == (panel, PANEL_SIZE) and keys == {"kept", "dropped"}
    caption, _, keys = method_panel(model, view, "visionzip", {"tokens": 24})  # 6 per crop: 5 + 1 contextual
    assert caption.endswith("base crop: 5 dominant (with CLS, not drawn) + 1 contextual") and "merged" in keys
    caption, _, keys = method_panel(model, view, "fastv", {"tokens": 12})
    assert caption == f"FastV, 12 of {view.total} visual tokens from LLM layer 2 on" and keys == set()


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2-vl", "qwen2.5-vl"])
def qwen_dir(request, tmp_path_factory):
    from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl

    out = tmp_path_factory.mktemp(f"viz-qwen{request.param}")
    build_qwen_vl(out, QwenVLSpec(text_layers=3), version=request.param)  # FastV's default layer 2 exists
    return out


def test_viz_of_qwen_vl_draws_the_merged_grid_over_the_image_as_resized(qwen_dir, tmp_path, capsys):
    from vlmzip.io import load_model

    image = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 150, 3), dtype=np.uint8)).save(image)
    model, processor = load_model(str(qwen_dir))
    view = view_of(model, processor, Image.open(image))
    t, h, w = view.inputs["image_grid_thw"][0].tolist()
    assert view.grid is None and len(view.pictures) == 1
    assert view.image.size == (w * 8, h * 8)  # patch 8: the image resized to whole patches, not square
    assert view.layouts[0].grid == (h // 2, w // 2) and view.total == h * w // 4
    seen = np.asarray(Image.open(image).convert("RGB").resize(view.image.size, Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(np.asarray(view.image).astype(int) - seen).mean() < 12  # the processor's own resize, read back
    caption, drawn, keys = method_panel(model, view, "random", {"tokens": 6})
    assert caption == f"Random, 6 of {view.total} visual tokens" and keys == {"kept", "dropped"}
    assert drawn.height == PANEL_SIZE and drawn.width == round(w * 8 * PANEL_SIZE / (h * 8))
    assert _red(drawn, (0, 0, drawn.width, drawn.height)) > 50 and _dark(drawn, (0, 0, drawn.width, drawn.height)) > 0
    out = tmp_path / "viz.png"
    assert main(["viz", "--model", str(qwen_dir), "--image", str(image), "--methods", "visionzip,fastv",
                 "--out", str(out)]) == 0
    default = max(1, round(64 * view.total / 576))  # the papers' 64 of 576 as a share of this image's tokens
    assert f"at {default} visual tokens per image" in capsys.readouterr().out and Image.open(out).height > PANEL_SIZE


def test_recorded_selections_say_which_unit_each_row_is():
    # 10 tokens over 4 crops: shares 3, 3, 2, 2 -> the method ran twice (3 per crop, then 2), in any order
    first = Selection(features=torch.zeros(2, 2, 1), indices=torch.tensor([[7, 8], [9, 10]]), units=((0, 2), (0, 3)))
    second = Selection(features=torch.zeros(3, 3, 1), indices=torch.tensor([[1, 2, 3], [4, 5, 6], [1, 1, 1]]),
                       units=((0, 0), (0, 1), (1, 0)))
    units = unit_selections([first, second])
    assert sorted(units) == [0, 1, 2, 3]
    assert [(units[u][0] is first, units[u][1]) for u in range(4)] == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert unit_selections([first, second], image=1) == {0: (second, 2)}


def test_viz_takes_knobs_in_brackets(llava_dir, tmp_path, capsys):
    out = tmp_path / "viz.png"
    assert viz(llava_dir, out, "--methods", "fastv[layer=1],random[seed=3]", "--tokens", "8") == 0
    assert "fastv[layer=1], random[seed=3] at 8 visual tokens" in capsys.readouterr().out
    assert viz(llava_dir, out, "--methods", "fastv[nope=1]", "--tokens", "8") == 2
    assert "has no knob 'nope'" in capsys.readouterr().err
