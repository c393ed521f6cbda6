"""``vlmzip tune``: only the projector learns, the saved folder loads as a plain model and runs compressed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlmzip
from vlmzip.builders.llava import build_llava
from vlmzip.cli import main
from vlmzip.io import load_model
from vlmzip.lab import scenes
from vlmzip.lab.train import export
from vlmzip.lab.train_config import TrainConfig, model_config
from vlmzip.lab.tune import TuneConfig, tune

# a random lab-format model (lab words, 112 px / patch 14 -> 64 patches): small enough for a few updates
TINY = TrainConfig(
    image_size=112, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
    text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1, text_intermediate=64, attn_weight=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    model, processor = build_llava(None, model_config(TINY))
    return export(model, processor, tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("method", ["visionzip", "cluster_aggregate"])
def test_tune_changes_only_the_projector_and_saves_a_plain_model(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    before, _ = load_model(tiny_dir)
    out = tune(tiny_dir, tmp_path / "tuned", TuneConfig(method=method, tokens=16, steps=3, batch_size=2, lr=1e-3))
    after, processor = load_model(out)
    assert not vlmzip.is_compressed(after)
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert {k for k in old if "multi_modal_projector" in k} == changed  # every projector tensor learned
    image, _, qas = scenes.sample(scenes.SPLITS["val"].seed, 0)
    with vlmzip.compressed(after, method, tokens=16):
        answers = vlmzip.io.generate_answers(after, processor, [image], [qas[0].question], 3)
    assert len(answers) == 1 and (out / "tune.json").is_file() and (out / "log.jsonl").read_text()


def test_tune_refuses_in_llm_and_vanilla_methods(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside the LLM"):
        tune(tiny_dir, tmp_path / "x", TuneConfig(method="fastv", tokens=16, steps=1))
    with pytest.raises(ValueError, match="compressing method"):
        tune(tiny_dir, tmp_path / "x", TuneConfig(method="vanilla", tokens=16, steps=1))
    assert main(["tune", "--model", str(tiny_dir), "--method", "fastv", "--tokens", "16", "--out",
                 str(tmp_path / "y"), "--device", "cpu"]) == 2


def test_tune_cli_writes_the_model(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["tune", "--model", str(tiny_dir), "--method", "random", "--tokens", "8", "--steps", "1",
                 "--batch-size", "1", "--out", str(tmp_path / "t"), "--device", "cpu"]) == 0
    assert "tuned model:" in capsys.readouterr().out and (tmp_path / "t" / "config.json").is_file()
