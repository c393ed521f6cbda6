"""A vlmzip dataset as a local lmms-eval task, read offline (no Hugging Face Hub).

    python -m vlmzip.lmms.task --data lab-test-small --out tasks/lab [--limit N] [--name vlmzip_lab]
    lmms-eval eval --model vlmzip --model_args method=visionzip,tokens=28 --include_path tasks/lab --tasks vlmzip_lab

writes into ``--out``: ``NAME.jsonl`` (the records, image paths made absolute), ``NAME.yaml`` (the task:
``dataset_path: json`` with that file as its test split, greedy generation of ``--max-new-tokens``) and
``utils.py`` (lmms-eval's hooks: the functions below). The score is vlmzip's: VQA-normalised exact match,
``accuracy`` = the mean over questions, the ``accuracy`` of ``vlmzip eval`` on the same questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..eval.data import load_dataset
from ..eval.scorers import exact_match

TASK_YAML = """\
# lmms-eval task written by `python -m vlmzip.lmms.task` from {source}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  temperature: 0
  num_beams: 1
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

UTILS_PY = '''"""lmms-eval hooks of this task: vlmzip's own (written by `python -m vlmzip.lmms.task`)."""

from vlmzip.lmms.task import doc_to_target, doc_to_text, doc_to_visual, process_results  # noqa: F401
'''


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image] | list[str]:
    """The question's one image (RGB), from the absolute path the task file holds; for a question about a video,
    its path (a file or a folder of frames), as lmms-eval's video tasks give it: the model reads and samples it."""
    if doc.get("video"):
        return [doc["video"]]
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any]) -> str:
    """The question as asked; the model adds its own chat prompt (as ``vlmzip eval`` does)."""
    return doc["question"]


def doc_to_target(doc: dict[str, Any]) -> str:
    """The first gold answer."""
    return doc["answers"][0]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``{"accuracy": 1.0 or 0.0}``: vlmzip's exact match of the answer against every gold answer."""
    return {"accuracy": exact_match(results[0], doc["answers"])}


def write_task(
    data: str, out: str | Path, *, name: str = "vlmzip_lab", limit: int | None = None, max_new_tokens: int = 8
) -> Path:
    """Write the task ``name`` for the first ``limit`` questions of ``data`` (a vlmzip dataset folder or lab
    split name) into ``out``; returns the YAML's path. Pass ``out`` to lmms-eval's ``--include_path``."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not name.isidentifier():
        raise ValueError(f"--name {name!r}: use letters, digits and underscores (it names the task and its files)")
    records = load_dataset(data)[:limit]
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{name}.jsonl"
    with jsonl.open("w") as f:
        for r in records:
            row = {"id": r.id, r.kind: str(r.image_path), "question": r.question, "answers": r.answers,
                   "type": r.type, "subtype": r.subtype}
            f.write(json.dumps(row) + "\n")
    (folder / "utils.py").write_text(UTILS_PY)
    yaml = folder / f"{name}.yaml"
    text = TASK_YAML.format(source=data, name=name, jsonl=json.dumps(str(jsonl)), max_new_tokens=max_new_tokens)
    yaml.write_text(text)
    return yaml


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmzip.lmms.task``: write a local lmms-eval task; errors are one line, exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m vlmzip.lmms.task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="lab-test-small",
                        help="dataset folder or lab split (default: lab-test-small)")
    parser.add_argument("--out", required=True, help="folder to write the task into (lmms-eval --include_path)")
    parser.add_argument("--name", default="vlmzip_lab", help="task name for --tasks (default: vlmzip_lab)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length cap (default: 8, as vlmzip eval)")
    args = parser.parse_args(argv)
    try:
        yaml = write_task(args.data, args.out, name=args.name, limit=args.limit, max_new_tokens=args.max_new_tokens)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {yaml}; run: lmms-eval eval --model vlmzip --include_path {yaml.parent} --tasks {args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
