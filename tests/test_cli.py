"""End-to-end runs of the ``vlmzip`` command line on a small saved LLaVA."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
import torch
from conftest import random_image

from vlmzip.cli import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmzip.cli", *args], capture_output=True, text=True, timeout=300)


def test_run_prints_answers_tokens_and_ttft(llava_dir, tmp_path):
    image = tmp_path / "img.png"
    random_image(7).save(image)
    result = run_cli("run", "--model", str(llava_dir), "--image", str(image), "--prompt", "what color ?",
                     "--method", "visionzip", "--tokens", "16", "--repeats", "2", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "visual tokens per image: 64 -> 16" in out
    assert "answer (vanilla):" in out and "answer (visionzip):" in out
    assert re.search(r"median of 2 interleaved runs: vanilla [\d.]+ ms, visionzip [\d.]+ ms -> speedup [\d.]+x", out)
    assert "'split': 'dominant 14 + contextual 2'" in out


def test_list_shows_methods(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "visionzip" in out and "--dominant" in out and "random" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "CORRUPT"], "cannot read image"),
        (["--image", "/nonexistent.png"], "does not exist"),
        (["--image", "GOOD"], "--prompt is required with --image"),
        (["--tokens", "65"], "larger than the 64"),
        (["--tokens", "0"], "must be >= 1"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--knob", "bogus=1"], "no knob 'bogus'"),
    ],
)
def test_bad_input_exits_2_with_a_message(llava_dir, tmp_path, capsys, args, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = tmp_path / "good.png"
    random_image(3).save(good)
    args = [{"CORRUPT": str(corrupt), "GOOD": str(good)}.get(a, a) for a in args]
    code = main(["run", "--model", str(llava_dir), "--repeats", "1", "--max-new-tokens", "1", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_model_folder_must_exist(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path), "--repeats", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_run_without_image_asks_a_lab_test_scene_its_own_question(llava_dir, capsys):
    from vlmzip.lab import scenes

    question = scenes.sample(scenes.SPLITS["test"].seed, 0)[2][0].question
    assert main(["run", "--model", str(llava_dir), "--repeats", "1", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "image:   lab test scene 0" in out and f"prompt:  {question}" in out
    assert "visual tokens per image: 64 -> 7" in out  # 64 of 576 at the same share of 64 patches


def test_help_imports_neither_torch_nor_transformers():
    # `vlmzip --help` and every command's --help must answer at once: importing torch + transformers takes
    # seconds, so the parser (the lab train flags included) must build without them.
    code = (
        "import sys\n"
        "from vlmzip.cli import build_parser, main\n"
        "for argv in ([], ['list'], ['run'], ['demo'], ['viz'], ['eval'], ['bench'], ['lab'], ['lab', 'train']):\n"
        "    assert main([*argv, '--help']) == 0, argv\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vlmzip.api') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _commands(parser, prefix=()):
    """(command words, parser) for the top-level parser and every sub-command, recursively."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*prefix, name))


def test_every_option_says_its_default_and_help_has_no_markup(capsys):
    parser = build_parser()
    commands = list(_commands(parser))
    names = {" ".join(words) for words, _ in commands}
    assert names >= {"", "run", "demo", "viz", "eval", "bench", "list", "lab train"}
    for words, command in commands:
        assert main([*words, "--help"]) == 0
        text = capsys.readouterr().out
        assert "``" not in text, f"reStructuredText markup in `vlmzip {' '.join(words)} --help`"
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            where = f"vlmzip {' '.join(words)} {action.option_strings[0]}"
            assert action.help, f"{where} has no help text"
            if isinstance(action, argparse._StoreTrueAction) or action.required:
                continue
            shown = formatter._expand_help(action)
            assert "default" in shown, f"{where}: help does not show its default: {shown!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--model", "MODEL", "--repeats", "1"],
        ["demo", "--model", "MODEL", "--repeats", "1", "--out", "OUT/demo.png"],
        ["viz", "--model", "MODEL", "--out", "OUT/viz.png"],
        ["eval", "--model", "MODEL", "--out", "OUT/eval", "--limit", "1"],
        ["bench", "--model", "MODEL", "--repeats", "1"],
        ["lab", "train", "--out", "OUT/lab", "--steps", "1"],
    ],
)
def test_device_cuda_without_cuda_is_a_clear_error(llava_dir, tmp_path, capsys, argv):
    argv = [a.replace("MODEL", str(llava_dir)).replace("OUT", str(tmp_path)) for a in argv]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert f"vlmzip {argv[0]}: error: --device cuda: CUDA is not available on this machine" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing is written before the device is checked"


def test_device_that_is_no_device(llava_dir, capsys):
    assert main(["run", "--model", str(llava_dir), "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "0"], "argument --batch-sizes: must be >= 1, got 0"),
        (["--batch-sizes", "1,-8"], "argument --batch-sizes: must be >= 1, got -8"),
        (["--batch-sizes", ","], "argument --batch-sizes: expected a comma-separated list"),
        (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (["--repeats", "-3"], "argument --repeats: must be >= 1, got -3"),
        (["--ratios", "0.5,0"], "argument --ratios: must be in (0, 1] (1.0 keeps every token), got 0"),
        (["--ratios", "1.5"], "argument --ratios: must be in (0, 1] (1.0 keeps every token), got 1.5"),
        (["--ratios", "half"], "argument --ratios: expected a number in (0, 1], got 'half'"),
    ],
)
def test_bench_rejects_non_positive_sizes_and_repeats(capsys, args, message):
    assert main(["bench", *args]) == 2  # rejected while parsing: no model is loaded
    err = capsys.readouterr().err
    assert "vlmzip bench: error: " + message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "demo"])
def test_run_and_demo_reject_zero_repeats(capsys, command):
    assert main([command, "--repeats", "0"]) == 2
    assert f"vlmzip {command}: error: argument --repeats: must be >= 1, got 0" in capsys.readouterr().err


def test_image_path_that_is_a_directory(llava_dir, tmp_path, capsys):
    code = main(["run", "--model", str(llava_dir), "--image", str(tmp_path), "--prompt", "what ?", "--repeats", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"vlmzip run: error: image path {tmp_path} is a directory" in err and "does not exist" not in err


def test_budget_errors_speak_in_flags(llava_dir, capsys):
    from vlmzip.cli import main

    assert main(["run", "--model", str(llava_dir), "--tokens", "100000", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "--tokens 100000 is larger than the 64 visual tokens" in err and "choose --tokens <= 64" in err
    assert main(["run", "--model", str(llava_dir), "--method", "fastv", "--layer", "5", "--repeats", "1"]) == 2
    assert "--layer 5 is outside this LLM's decoder layers" in capsys.readouterr().err


def test_list_archs_names_every_speed_model_and_its_depth(capsys):
    """`vlmzip list --archs` lists each registered arch:NAME with its family and LLM depth (what --layers cuts)."""
    assert main(["list", "--archs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(names) and len(names) == len(set(names))
    for name in ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "llava-onevision-7b", "qwen3-vl-8b",
                 "gemma-3-12b", "internvl3-8b", "smolvlm-2b"):
        assert f"arch:{name}" in names
    assert "[gemma3, 48 decoder layers]" in lines[names.index("arch:gemma-3-12b")]
    assert "[qwen-vl, 36 decoder layers]" in lines[names.index("arch:qwen3-vl-8b")]


def test_list_reads_the_catalog_which_matches_the_registry():
    """`vlmzip list` answers from catalog.json (no torch import); it must equal the live registry."""
    import subprocess
    import sys

    from vlmzip import catalog
    from vlmzip.api import list_methods

    assert catalog.read() == list_methods(), "catalog.json is stale: run python -m vlmzip.catalog"
    code = ("import sys, io, contextlib, vlmzip.cli as c; buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): c.main(['list'])\n"
            "assert 'torch' not in sys.modules, 'vlmzip list imported torch'\n"
            "assert 'sparsevlm' in buf.getvalue() and '--keep_positions' in buf.getvalue()")
    subprocess.run([sys.executable, "-c", code], check=True)
