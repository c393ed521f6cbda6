"""Bad inputs a new user tries: each ends in a clear error (exit 2, one line on stderr, no traceback) or in the
right answer, never in a traceback or a silently wrong result."""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

import vlmzip.io
from vlmzip import cli
from vlmzip.cli import as_flags, main
from vlmzip.io import batch_inputs, chat_prompt, generate_answers, load_model, read_image

ROOT = Path(__file__).resolve().parents[1]


def error_of(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """stderr of ``vlmzip ARGV``, which must exit 2 with an error line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"vlmzip {argv[0]}: error: " in err and "Traceback" not in err
    return err


def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load fail the test: the error must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(vlmzip.io, "load_model", refuse)


# -- output piped into a reader that stops early -------------------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline",
    [
        "python -m vlmzip.cli list | head -1",
        "python -m vlmzip.cli list | true",  # the reader is gone before the first write
        "python -m vlmzip.cli --help | true",
        "python -m vlmzip.cli run --help | head -c 10",
    ],
)
def test_output_into_a_reader_that_stops_early_exits_quietly(pipeline):
    command = "set -o pipefail; " + pipeline.replace("python", shlex.quote(sys.executable), 1) + " >/dev/null"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


# -- a broken checkpoint -------------------------------------------------------------------------------------------


def broken_copy(llava_dir: Path, tmp_path: Path, config_text: str) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(llava_dir, folder)
    (folder / "config.json").write_text(config_text)
    return folder


def test_truncated_config_json_is_named(llava_dir, tmp_path, capsys):
    text = (llava_dir / "config.json").read_text()
    folder = broken_copy(llava_dir, tmp_path, text[: len(text) // 2])
    err = error_of(capsys, ["run", "--model", str(folder), "--repeats", "1"])
    assert f"{folder / 'config.json'} is not valid JSON" in err
    assert "the checkpoint in" in err and "is broken or incomplete" in err


def test_config_json_that_is_no_object(llava_dir, tmp_path):
    folder = broken_copy(llava_dir, tmp_path, "[1, 2]")
    with pytest.raises(ValueError, match=r"config.json is not a model config \(a JSON object\)"):
        load_model(folder)


def test_missing_weights_are_a_clear_error(llava_dir, tmp_path):
    folder = broken_copy(llava_dir, tmp_path, (llava_dir / "config.json").read_text())
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="cannot load the checkpoint in"):
        load_model(folder)


# -- a prompt that is not UTF-8 ------------------------------------------------------------------------------------


def test_prompt_with_invalid_utf8_bytes_from_a_shell(llava_dir):
    # what `vlmzip run --prompt $'\xff\xfe'` passes: bytes that decode to no character
    done = subprocess.run([sys.executable, "-m", "vlmzip.cli", "run", "--model", str(llava_dir), "--prompt",
                           b"\xff\xfe what ?"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "vlmzip run: error: --prompt is not valid UTF-8 text (0xff, 0xfe at character 1)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["run", "bench"])
def test_invalid_utf8_prompt_fails_before_the_model_loads(llava_dir, capsys, monkeypatch, command):
    no_model_load(monkeypatch)
    err = error_of(capsys, [command, "--model", str(llava_dir), "--prompt", "red \udcff"])
    assert "--prompt is not valid UTF-8 text (0xff at character 5)" in err


def test_library_refuses_a_prompt_that_is_not_utf8(processor):
    with pytest.raises(ValueError, match="the prompt is not valid UTF-8 text"):
        chat_prompt(processor, "what \udcfe ?")


# -- images --------------------------------------------------------------------------------------------------------


def test_decompression_bomb_is_a_clear_error(tmp_path, capsys, monkeypatch, llava_dir):
    path = tmp_path / "bomb.png"
    random_image(0, (30, 30)).save(path)  # 900 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice this
    with pytest.raises(ValueError, match=r"too large to decode safely \(900 pixels, over PIL's limit of 200"):
        read_image(path)
    no_model_load(monkeypatch)
    err = error_of(capsys, ["run", "--model", str(llava_dir), "--image", str(path), "--prompt", "what ?"])
    assert f"image {path} is too large to decode safely (900 pixels" in err


def test_16_bit_greyscale_png_keeps_its_grey_levels(tmp_path):
    values = np.array([[0, 16384, 32768, 65535]] * 4, dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # what PIL makes of a 16-bit PNG
    image = read_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (64, 64, 64), (128, 128, 128), (255, 255, 255)]


def test_32_bit_and_float_greyscale_keep_their_grey_levels(tmp_path):
    mid16 = tmp_path / "mid16.tif"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.int32)).save(mid16)  # mode I, 16-bit values
    assert Image.open(mid16).mode == "I"
    assert read_image(mid16).getpixel((0, 0)) == (128, 128, 128)
    unit = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(unit)  # mode F, values in [0, 1]
    assert read_image(unit).getpixel((0, 0)) == (128, 128, 128)


def test_8_bit_images_are_unchanged(tmp_path):
    image = random_image(5)
    for mode in ("RGB", "L", "P"):
        path = tmp_path / f"img-{mode}.png"
        image.convert(mode).save(path)
        assert np.array_equal(np.asarray(read_image(path)), np.asarray(image.convert(mode).convert("RGB")))


# -- output paths --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["viz", "demo"])
def test_out_in_a_missing_folder_fails_before_the_model_loads(llava_dir, capsys, monkeypatch, command):
    no_model_load(monkeypatch)
    err = error_of(capsys, [command, "--model", str(llava_dir), "--out", "/nonexistent/dir/v.png"])
    assert "--out /nonexistent/dir/v.png: the folder /nonexistent/dir does not exist" in err


def test_out_that_is_a_folder_or_no_image_format(llava_dir, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    err = error_of(capsys, ["viz", "--model", str(llava_dir), "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a folder" in err
    err = error_of(capsys, ["demo", "--model", str(llava_dir), "--out", str(tmp_path / "picture.txt")])
    assert ".txt names no image format" in err


# -- knobs: in brackets like eval, and messages in the command line's words ----------------------------------------


def test_run_takes_bracketed_knobs_and_reports_the_real_error(llava_dir, capsys):
    err = error_of(capsys, ["run", "--model", str(llava_dir), "--method", "fastv[layer=100]", "--repeats", "1"])
    assert "unknown method" not in err
    assert "fastv: --layer 100 is outside this LLM's decoder layers 1..1" in err


def test_run_with_bracketed_knobs_runs(llava_dir, capsys):
    code = main(["run", "--model", str(llava_dir), "--method", "fastv[layer=1]", "--layer", "1", "--tokens", "8",
                 "--repeats", "1", "--max-new-tokens", "1"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "method:  fastv {" in out and "'layer': 1" in out
    assert "visual tokens per image: 64 -> 8" in out


def test_a_knob_given_two_ways_must_agree(llava_dir, capsys, monkeypatch):
    no_model_load(monkeypatch)
    err = error_of(capsys, ["demo", "--model", str(llava_dir), "--method", "fastv[layer=1]", "--layer", "2"])
    assert "layer is given twice with different values: --method 'fastv[layer=1]' and --layer 2" in err
    err = error_of(capsys, ["run", "--model", str(llava_dir), "--tokens", "8", "--knob", "tokens=9"])
    assert "tokens is given twice with different values: --tokens 8 and --knob tokens=9" in err
    err = error_of(capsys, ["run", "--model", str(llava_dir), "--method", "visionzip[tokens"])
    assert "cannot read the knobs of 'visionzip[tokens'" in err


def test_visionzip_over_budget_is_one_correct_sentence(llava_dir, capsys):
    err = error_of(capsys, ["run", "--model", str(llava_dir), "--dominant", "300", "--contextual", "10",
                            "--repeats", "1"])
    assert "--dominant 300 + --contextual 10 = 310 is larger than the 64 visual tokens" in err
    assert not re.search(r"(?<!--)dominant \+ --contextual", err)  # the garbled spelling


@pytest.mark.parametrize(
    "library",
    [
        "visionzip: dominant + contextual=310 is larger than the 64 visual tokens an image has; choose "
        "dominant + contextual <= 64 (or ratio=r for a share of each image's tokens)",
        "visionzip: dominant + contextual = 310 is larger than the 64 visual tokens an image has; ask for at most "
        "64 tokens (or ratio=r for a share of each image's tokens)",
    ],
)
def test_as_flags_spells_visionzip_budgets(library):
    said = as_flags(library, {"dominant": 300, "contextual": 10})
    assert said.startswith("visionzip: --dominant 300 + --contextual 10 = 310 is larger than the 64 visual tokens")
    assert not re.search(r"(?<!--)dominant \+ --contextual", said) and "--ratio r" in said
    assert "choose --dominant + --contextual <= 64" in said or "ask for at most 64 tokens" in said
    assert as_flags(library).startswith("visionzip: --dominant + --contextual = 310 is larger")


def test_as_flags_leaves_bracketed_knobs_alone():
    said = as_flags("--method 'fastv[layer=1,tokens=8]' and tokens=9")
    assert said == "--method 'fastv[layer=1,tokens=8]' and --tokens 9"


@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_layer_below_1_is_no_token_budget(capsys, value):
    err = error_of(capsys, ["run", "--method", "fastv", "--layer", value])
    assert "argument --layer: must be a decoder layer of the LLM: >= 1" in err and f"got {value}" in err
    assert "budget" not in err


@pytest.mark.parametrize("method", ["fastv[layer=-1]", "fastv[layer=0]"])
def test_a_bracketed_layer_below_1_is_no_token_budget(llava_dir, capsys, monkeypatch, method):
    no_model_load(monkeypatch)
    err = error_of(capsys, ["run", "--model", str(llava_dir), "--method", method])
    assert "a layer must be a decoder layer of the LLM: >= 1" in err and "budget" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "0"], "argument --ratio: must be in (0, 1]"),
        (["--ratio", "1.5"], "argument --ratio: must be in (0, 1]"),
        (["--dominant", "0"], "argument --dominant: must be >= 1, got 0"),
        (["--contextual", "-1"], "argument --contextual: must be >= 0, got -1"),
        (["--tokens", "x"], "argument --tokens: expected an integer, got 'x'"),
    ],
)
def test_budget_flags_are_checked_while_parsing(capsys, args, message):
    assert message in error_of(capsys, ["run", *args])


# -- prompts longer than the model's context -----------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_an_error(llava_dir, capsys):
    err = error_of(capsys, ["run", "--model", str(llava_dir), "--prompt", "red " * 3000, "--repeats", "1"])
    assert "the prompt takes" in err
    assert "leaves no room for an answer in the model's context of 2048 tokens (max_position_embeddings)" in err


def test_batch_inputs_names_the_question_too_long(model, processor):
    images = [random_image(0), random_image(1)]
    with pytest.raises(ValueError, match="question 2 of the batch takes .* context of 2048 tokens"):
        batch_inputs(processor, images, ["red ?", "red " * 3000], model)


def test_answer_running_past_the_context_is_an_error(model, processor):
    with pytest.raises(ValueError, match=r"the answer up to 5000 more, over the model's context of 2048 tokens "
                                         r"\(max_position_embeddings\); allow at most \d+ new tokens"):
        generate_answers(model, processor, [random_image(0)], ["what color ?"], 5000)


def test_lmms_eval_model_refuses_what_exceeds_the_context(llava_dir):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from vlmzip.lmms.model import VlmzipLMM

    lmm = VlmzipLMM(pretrained=str(llava_dir), device="cpu")
    image = random_image(0)
    with pytest.raises(ValueError, match=r"the prompt and up to 5000 new tokens \(max_new_tokens\) take \d+ tokens"):
        lmm._answer([image], ["what color ?"], {"max_new_tokens": 5000})
    lmm.task_dict = {"t": {"test": [{"question": "red " * 3000}]}}
    request = Instance(request_type="loglikelihood", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                       arguments=("red " * 3000, " yes", lambda doc: [image], 0, "t", "test"))
    with pytest.raises(ValueError, match=r"task 't' document 0: the context and continuation take \d+ tokens .* "
                                         r"context of 2048 tokens"):
        lmm.loglikelihood([request])


# -- the default budget of run / demo on models whose images differ in token count ---------------------------------


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmzip.builders.llava_next import LlavaNextSpec, build_llava_next

    out = tmp_path_factory.mktemp("tiny-next")
    build_llava_next(out, LlavaNextSpec(image_size=84, patch_size=14, vision_layers=2, text_layers=3))
    return out


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmzip.builders.qwen_vl import build_qwen_vl

    out = tmp_path_factory.mktemp("tiny-qwen")
    build_qwen_vl(out)
    return out


@pytest.mark.parametrize(
    ("which", "counts", "split"),
    [
        ("next", "192 -> 21", "dominant 16 + contextual 5"),  # the lab scene: 5 crops of 36 + newlines; 4 + 4 x 3
        ("qwen", "64 -> 7", "dominant 6 + contextual 1"),  # 8 x 8 merged patches
    ],
)
def test_default_budget_is_the_papers_share_of_each_images_tokens(next_dir, qwen_dir, capsys, which, counts, split):
    folder = {"next": next_dir, "qwen": qwen_dir}[which]
    code = main(["run", "--model", str(folder), "--repeats", "1", "--max-new-tokens", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "budget:  ratio 0.1111 = the papers' 64 of 576, as the same share of each image's own visual tokens" in out
    assert f"visual tokens per image: {counts}" in out and f"'split': '{split}'" in out


def test_default_budget_of_demo_on_llava_next(next_dir, tmp_path, capsys):
    out_png = tmp_path / "demo.png"
    code = main(["demo", "--model", str(next_dir), "--repeats", "1", "--max-new-tokens", "1", "--out", str(out_png)])
    assert code == 0, capsys.readouterr().err
    assert "budget:  ratio 0.1111" in capsys.readouterr().out and out_png.exists()


# -- structure -----------------------------------------------------------------------------------------------------


def imported(path: Path) -> set[str]:
    """Every module (and ``module.name``) a source file imports, relative imports made absolute."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_no_library_module_imports_the_command_line():
    library = [p for p in sorted((ROOT / "vlmzip").rglob("*.py")) if p != ROOT / "vlmzip" / "cli.py"]
    assert "vlmzip.cli.resolve_device" not in imported(ROOT / "vlmzip" / "devices.py")  # the helper sees imports
    assert "vlmzip.devices.resolve_device" in imported(ROOT / "vlmzip" / "lmms" / "model.py")
    offenders = [str(p.relative_to(ROOT)) for p in library if any(n == "vlmzip.cli" or n.startswith("vlmzip.cli.")
                                                                   for n in imported(p))]
    assert not offenders, f"library modules importing vlmzip.cli: {offenders}"


def test_device_and_bench_image_live_in_the_library():
    from vlmzip.bench import memory
    from vlmzip.devices import resolve_device
    from vlmzip.lab import default_image

    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")
    assert default_image().size == (336, 336)
    source = inspect.getsource(memory._run)
    assert "default_image" in source and re.search(r"\bcli\b", source) is None  # no use of the command line module


def test_build_parser_is_one_small_function_per_command():
    lines = inspect.getsource(cli.build_parser).splitlines()
    assert len(lines) <= 15, f"build_parser is {len(lines)} lines: one add_*_parser function per command"
    for name in ("list", "run", "demo", "viz", "lab", "eval", "bench", "tune"):
        assert callable(getattr(cli, f"add_{name}_parser")), name


def test_help_texts_carry_no_history_and_cite_papers_by_name(capsys):
    banned = ("seed 0", "session", "issue", "this machine")
    for argv in ([], ["list"], ["run"], ["demo"], ["viz"], ["eval"], ["bench"], ["tune"]):
        assert main([*argv, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for word in banned:
            assert word not in text.lower(), f"`vlmzip {' '.join(argv)} --help` says {word!r}"
    main(["tune", "--help"])
    assert "VisionZip-tuned (VisionZip, arXiv 2412.04467)" in " ".join(capsys.readouterr().out.split())
