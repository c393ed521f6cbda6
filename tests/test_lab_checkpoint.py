"""The trained lab mini-VLM that ships inside the package: format, size, default-model wiring, and that its
weights really read the image (it beats every answer prior on fixed validation questions)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import LlamaModel, LlavaForConditionalGeneration

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.budgets import split_budget
from vlmzip.cli import main
from vlmzip.eval.scorers import score_records
from vlmzip.io import default_model_dir, generate_answers
from vlmzip.lab import CHECKPOINT_DIR, checkpoint_dir, load, scenes

N_VAL_IMAGES = 40  # 120 questions of the validation split (the test split stays unseen by tests too)


@pytest.fixture(scope="module")
def shipped():
    return load()


def test_checkpoint_ships_in_the_llava_format_within_30_mb(shipped):
    assert checkpoint_dir() == CHECKPOINT_DIR and default_model_dir() == CHECKPOINT_DIR
    size = sum(f.stat().st_size for f in Path(CHECKPOINT_DIR).iterdir())
    assert size <= 30 * 2**20, f"shipped checkpoint is {size / 2**20:.1f} MB"
    model, processor = shipped
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    layout = adapter_for(model).layout
    assert (layout.num_prefix, layout.grid, layout.vanilla) == (1, (16, 16), 256)  # 336 px / patch 21 + CLS
    assert isinstance(model.model.language_model, LlamaModel) and processor.chat_template
    projector = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "gelu" and projector.linear_1 and projector.linear_2


def test_default_model_of_the_cli_is_the_shipped_one(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "visual tokens per image: 256 -> 28" in text and "budget:  28 tokens" in text
    assert out.is_file()


def test_shipped_model_reads_the_image(shipped):
    """Vanilla accuracy on fixed val questions beats the best blind guess per type (its most frequent answer)
    by 10 points: measured 44.2 % vs 32.5 % with the session-10 checkpoint (45.8 % with the session-5 one, 48.3 %
    with the session-3 one; 120 questions, so a few answers either way)."""
    model, processor = shipped
    qas = [(image, qa) for i in range(N_VAL_IMAGES) for image, _, qs in [scenes.sample(scenes.SPLITS["val"].seed, i)]
           for qa in qs]
    answers: list[str] = []
    with torch.no_grad():
        for start in range(0, len(qas), 20):
            chunk = qas[start : start + 20]
            answers += generate_answers(model, processor, [im for im, _ in chunk], [qa.question for _, qa in chunk], 4)
    accuracy = score_records(
        [{"prediction": a, "answers": [qa.answer], "type": qa.type} for a, (_, qa) in zip(answers, qas, strict=True)]
    )["accuracy"]
    prior = sum(Counter(qa.answer for _, qa in qas if qa.type == t).most_common(1)[0][1]
                for t in {qa.type for _, qa in qas}) / len(qas)
    assert accuracy >= prior + 0.10, f"shipped model {accuracy:.1%} vs best per-type prior {prior:.1%}"


def test_shipped_model_compresses_to_the_paper_budgets(shipped):
    model, _ = shipped
    assert [vlmzip.paper_budget(model, t) for t in vlmzip.PAPER_BUDGETS] == [85, 57, 28]
    planned = vlmzip.plan(model, "visionzip", tokens=28)
    assert (planned.vanilla_tokens, planned.tokens, planned.final_tokens) == (256, 28, 28)
    assert split_budget(planned.tokens) == (24, 4)


def test_sparsevlm_on_the_lab_models_four_layers_runs_the_scaled_layers_and_says_so(shipped):
    model, _ = shipped
    planned = vlmzip.plan(model, "sparsevlm", tokens=28)
    assert len(planned.notes) == 1
    assert "4 decoder layers, too few for the authors' pruning layers (2, 6, 15)" in planned.notes[0]
    assert "pruning after layers (0, 1, 2)" in planned.notes[0]
