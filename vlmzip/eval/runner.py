"""The evaluation runner: model + methods x budgets -> raw predictions, scores, retention table, plot.

Vanilla (the unmodified model) is evaluated once and reused as the reference for every method and
budget. Predictions are appended to ``OUT/predictions/<run>.jsonl`` batch by batch, so rerunning the
same command skips every question already answered (resumable).

An output folder holds one evaluation, named by ``OUT/identity.json``: everything that can change an
answer or a score (model path and a hash of its weights, data and a hash of data.jsonl, --limit,
--batch-size, --max-new-tokens, --dtype, the device type, --match). A run whose identity differs is
refused, as is a folder with no identity.json that is not empty, so nothing of another evaluation (or of
the user) is ever overwritten. Methods and budgets may differ between runs into one folder: each run
adds its columns, and results.json / table.md / plot.png cover every column evaluated there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..api import PAPER_BUDGETS, compressed, paper_budget, plan
from ..io import generate_answers, load_model
from ..methods import get_method
from .data import LAB_DATASETS, Record, ensure_lab_dataset, load_folder, load_image
from .report import plot_accuracy, retention_table
from .scorers import answer_vocabulary, score_records

VANILLA = "vanilla"


@dataclass
class EvalConfig:
    """Everything that defines an evaluation (what ``vlmzip eval`` takes)."""

    data: str
    out: str
    model: str | None = None
    methods: list[str] = field(default_factory=lambda: [VANILLA, "visionzip"])
    tokens: list[int] | None = None  # None: the papers' 192/128/64 of 576, scaled to the model (paper_budget)
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 8
    match: str = "exact"
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class Run:
    """One column of results: a method at one budget (or vanilla)."""

    key: str
    method: str
    knobs: dict[str, Any]
    tokens: int  # visual tokens per image the LLM ends with
    layer_avg_tokens: float | None = None  # in-LLM methods: visual tokens per image averaged over decoder layers


def plan_runs(model: nn.Module, methods: list[str], tokens: list[int]) -> list[Run]:
    """Vanilla first, then every method at every budget; validates all of them before any work.

    A method that takes a budget is swept over ``tokens``; one without is run once with defaults. In-LLM
    methods also carry the layer-averaged visual token count, so budgets compare fairly with pre-LLM ones.
    """
    vanilla_tokens = plan(model, VANILLA).tokens
    runs = [Run(VANILLA, VANILLA, {}, vanilla_tokens)]
    for name in methods:
        if name == VANILLA:
            continue
        spec = get_method(name)
        sweep = [{"tokens": t} for t in tokens] if spec.takes_budget else [{}]
        for knobs in sweep:
            planned = plan(model, name, **knobs)
            key = f"{name}@{knobs['tokens']}" if knobs else name
            avg = planned.layer_avg_tokens if spec.stage == "llm" else None
            runs.append(Run(key, name, knobs, planned.final_tokens, avg))
    return runs


def data_folder(data: str) -> Path:
    """The folder behind ``data``: an existing folder, or a lab split name generated on first use."""
    if Path(data).is_dir():
        return Path(data)
    if data in LAB_DATASETS:
        return ensure_lab_dataset(data)
    known = ", ".join(sorted(LAB_DATASETS))
    raise ValueError(f"--data {data!r} is neither a dataset folder nor a lab dataset ({known})")


def read_predictions(path: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Predictions already written to a run's JSONL file, by question id.

    A line torn by an interruption is skipped; with ``repair`` the file is rewritten without it, so
    that appending can go on.
    """
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    text = path.read_text()
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            row = json.loads(line)
            done[row["id"]] = row
    if repair and (len(done) != len(text.splitlines()) or (text and not text.endswith("\n"))):
        path.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
    return done


def batches(records: list[Record], size: int) -> Iterator[list[Record]]:
    """Consecutive chunks of ``size`` records."""
    for i in range(0, len(records), size):
        yield records[i : i + size]


def answer_batch(model: nn.Module, processor: Any, records: list[Record], max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of questions (one image each), decoded without special tokens."""
    images = [load_image(r) for r in records]
    return generate_answers(model, processor, images, [r.question for r in records], max_new_tokens)


def run_predictions(
    model: nn.Module, processor: Any, run: Run, records: list[Record], path: Path, cfg: EvalConfig, bar: tqdm
) -> dict[str, dict[str, Any]]:
    """Answer every record not yet in ``path`` (appending as it goes); return all predictions by id."""
    done = read_predictions(path, repair=True)
    todo = [r for r in records if r.id not in done]
    if not todo:
        return done
    context = contextlib.nullcontext() if run.method == VANILLA else compressed(model, run.method, **run.knobs)
    bar.set_postfix_str(run.key)
    with context, path.open("a") as sink:
        for chunk in batches(todo, cfg.batch_size):
            answers = answer_batch(model, processor, chunk, cfg.max_new_tokens)
            for record, prediction in zip(chunk, answers, strict=True):
                row = {"id": record.id, "prediction": prediction, "answers": record.answers,
                       "type": record.type, "subtype": record.subtype, "run": run.key}
                done[record.id] = row
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            bar.update(len(chunk))
    return done


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict: each tensor's name, dtype, shape and raw bytes, in order.

    Any change of a weight (a new checkpoint in the same folder) changes it; so does the dtype the model
    was loaded in.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def identity(cfg: EvalConfig, folder: Path, weights: str) -> dict[str, Any]:
    """What must match for an output folder to be resumed: everything that can change an answer or a score
    (the module docstring says why each is there). ``weights``: ``weights_sha256`` of the loaded model."""
    digest = hashlib.sha256((folder / "data.jsonl").read_bytes()).hexdigest()
    return {"model": cfg.model or "default", "weights_sha256": weights, "data": str(cfg.data),
            "data_sha256": digest, "limit": cfg.limit, "batch_size": cfg.batch_size,
            "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.dtype, "device": torch.device(cfg.device).type,
            "match": cfg.match}


def check_out_folder(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty folder that holds no evaluation (no identity.json):
    its files are not vlmzip's to overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder (new, empty, or of this evaluation)")
    if not out.is_dir() or (out / "identity.json").is_file():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(
            f"--out {out} is not empty and holds no vlmzip evaluation ({shown}); pass a new or empty folder"
        )


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "..."
    return "none" if value is None else str(value)


def check_resumable(out: Path, ident: dict[str, Any]) -> None:
    """Write ``OUT/identity.json``, or refuse to mix results of a different evaluation into ``OUT``."""
    path = out / "identity.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != ident:
            keys = [*ident, *(k for k in previous if k not in ident)]
            diff = "; ".join(
                f"{k}: {_show(previous.get(k))} there, {_show(ident.get(k))} now"
                for k in keys
                if previous.get(k) != ident.get(k)
            )
            raise ValueError(
                f"{out} holds results of a different evaluation ({diff}); rerun with its settings to resume "
                "it, or pass a new --out folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ident, indent=2) + "\n")


def previous_runs(out: Path) -> list[Run]:
    """The columns of the folder's last results.json (evaluated earlier, possibly by other --methods or
    --tokens); none if there is none yet."""
    path = out / "results.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["runs"]
        return [
            Run(r["key"], r["method"], dict(r["knobs"]), int(r["tokens"]), r.get("layer_avg_tokens"))
            for r in rows
        ]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); move it away to rebuild it from the predictions") from None


def merge_runs(previous: list[Run], current: list[Run]) -> list[Run]:
    """Vanilla first, then the earlier columns in their order, then the new ones."""
    now = {run.key: run for run in current}
    merged = {current[0].key: current[0]}  # vanilla
    for run in [*previous, *current[1:]]:
        merged.setdefault(run.key, now.get(run.key, run))
    return list(merged.values())


def _write_atomically(path: Path, write: Any) -> None:
    """``write(tmp_path)``, then rename over ``path``: an interruption never leaves half a file."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    write(tmp)
    tmp.replace(path)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg``; write predictions, results.json, table.md and plot.png."""
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
    out = Path(cfg.out)
    check_out_folder(out)
    folder = data_folder(cfg.data)
    dataset = load_folder(folder)
    records = dataset[: cfg.limit]
    vocabulary = answer_vocabulary(dataset)  # off-vocabulary is judged against the whole dataset, not the subset
    model, processor = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if cfg.tokens is None:
        cfg.tokens = [paper_budget(model, t) for t in PAPER_BUDGETS]
    runs = plan_runs(model, cfg.methods, cfg.tokens)
    ident = identity(cfg, folder, weights_sha256(model))
    check_resumable(out, ident)
    runs = merge_runs(previous_runs(out), runs)
    (out / "predictions").mkdir(exist_ok=True)

    paths = {run.key: out / "predictions" / f"{run.key}.jsonl" for run in runs}
    remaining = 0
    for run in runs:  # read each predictions file once (per record it made resuming quadratic: minutes)
        done = read_predictions(paths[run.key])
        remaining += sum(r.id not in done for r in records)
    scores: dict[str, dict[str, Any]] = {}
    with tqdm(total=remaining, unit="q", desc="vlmzip eval", dynamic_ncols=True) as bar:
        for run in runs:
            predictions = run_predictions(model, processor, run, records, paths[run.key], cfg, bar)
            rows = [predictions[r.id] for r in records]
            scores[run.key] = score_records(rows, match=cfg.match, vocabulary=vocabulary)

    results = {
        "config": asdict(cfg),
        "identity": ident,
        "n_questions": len(records),
        "vanilla_tokens": runs[0].tokens,
        "runs": [{**asdict(run), "scores": scores[run.key]} for run in runs],
    }
    _write_atomically(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    _write_atomically(out / "table.md", lambda p: p.write_text(retention_table(results)))
    _write_atomically(out / "plot.png", lambda p: plot_accuracy(results, p))
    return results
