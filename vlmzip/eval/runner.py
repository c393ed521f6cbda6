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

Launched as several processes (``torchrun --nproc_per_node N -m vlmzip.cli eval ...`` or
``accelerate launch``; ``vlmzip.eval.distributed``), each answers its share of whole batches and appends to
its own ``OUT/predictions/<run>.rank<r>-of-<w>.jsonl``; once all have finished, rank 0 merges every
run's files into ``<run>.jsonl`` (in question order), scores, and writes the same results.json / table.md /
plot.png as a single process. Every process, whatever the number of processes, skips the questions found
in any of a run's files, so an interrupted run resumes with the same or another number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..api import PAPER_BUDGETS, compressed, paper_budget, plan
from ..compose import fixed_budget, is_composition, last_stage
from ..compose import parse as parse_composition
from ..io import generate_answers, load_model
from ..knobs import split_knobs
from ..methods import get_method
from .data import LAB_DATASETS, Record, ensure_lab_dataset, load_folder, load_image
from .distributed import Processes, launched
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
    multi_turn: bool = False  # two-turn conversations on one KV cache (vlmzip.eval.multiturn)
    turn2_from_scratch: bool = False  # multi-turn control: turn 2 recomputed from its full prompt and the image


@dataclass
class Run:
    """One column of results: a method (or a composition such as ``visionzip@128+fastv``) at one budget.

    ``budget`` is the nominal budget (the ``tokens`` the run was given; None for a method without one),
    ``sent_tokens`` what the LLM receives per image, ``tokens`` what it ends with, ``layer_avg_tokens`` the
    mean over its decoder layers (for in-LLM stages the three differ; ``vlmzip.plan`` computes them).
    """

    key: str
    method: str
    knobs: dict[str, Any]
    tokens: int  # visual tokens per image the LLM ends with
    layer_avg_tokens: float | None = None  # in-LLM methods: visual tokens per image averaged over decoder layers
    budget: int | None = None
    sent_tokens: int | None = None


def has_llm_stage(method: str) -> bool:
    """True for a method, or a composition, with a stage inside the LLM (tokens change across its layers)."""
    names = [name for name, _ in parse_composition(method)] if is_composition(method) else [method]
    return any(get_method(name).stage == "llm" for name in names)


def plan_runs(model: nn.Module, methods: list[str], tokens: list[int]) -> list[Run]:
    """Vanilla first, then every method at every budget; validates all of them before any work.

    A method that takes a budget is swept over ``tokens`` (a composition: its last stage, unless that
    fixed its own with ``@N``); one without is run once with defaults. Each run carries the visual tokens
    the LLM receives, ends with and averages over its layers, so budgets compare fairly.
    """
    vanilla_tokens = plan(model, VANILLA).tokens
    runs = [Run(VANILLA, VANILLA, {}, vanilla_tokens, budget=vanilla_tokens, sent_tokens=vanilla_tokens)]
    for entry in methods:
        name, extra = split_knobs(entry)  # "cluster_saliency[variant=2]": knobs of every run of this entry
        if name == VANILLA:
            if extra:
                raise ValueError(f"{entry!r}: vanilla takes no knobs")
            continue
        spec = get_method(last_stage(name))
        swept = spec.takes_budget and not fixed_budget(name) and not {"tokens", "ratio"} & set(extra)
        sweep = [{"tokens": t} for t in tokens] if swept else [{}]
        reach = _sent_before_last(model, name)
        for budget in sweep:
            if reach is not None and budget.get("tokens", 0) > reach:
                warnings.warn(f"{entry}: skipping budget {budget['tokens']}, more than the {reach} visual tokens "
                              "its earlier stage sends", stacklevel=2)
                continue
            knobs = {**extra, **budget}
            planned = plan(model, name, **knobs)
            key = f"{entry}@{budget['tokens']}" if budget else entry
            avg = planned.layer_avg_tokens if has_llm_stage(name) else None
            nominal = knobs.get("tokens", planned.final_tokens)
            runs.append(Run(key, name, knobs, planned.final_tokens, avg, nominal, planned.tokens))
    return runs


def _sent_before_last(model: nn.Module, method: str) -> int | None:
    """For a composition whose last stage takes the run's budget: the visual tokens its earlier stages
    leave per image (budgets above it are skipped); None otherwise."""
    if not is_composition(method) or fixed_budget(method):
        return None
    earlier = method.rsplit("+", 1)[0]
    return plan(model, earlier).final_tokens if "+" in method else None


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


def prediction_files(folder: Path, key: str) -> list[Path]:
    """Every predictions file of run ``key`` in ``folder``: ``<key>.jsonl`` (a single process's, or the merge)
    and the per-process ``<key>.rank<r>-of-<w>.jsonl`` of parallel runs not merged yet."""
    shard = re.compile(re.escape(key) + r"\.rank\d+-of-\d+\.jsonl")
    shards = sorted(p for p in folder.glob("*.jsonl") if shard.fullmatch(p.name)) if folder.is_dir() else []
    return [folder / f"{key}.jsonl", *shards]


def own_file(folder: Path, key: str, procs: Processes) -> Path:
    """The file this process appends run ``key``'s answers to."""
    return folder / (f"{key}.rank{procs.rank}-of-{procs.world}.jsonl" if procs.parallel else f"{key}.jsonl")


def read_run(folder: Path, key: str, own: Path | None = None) -> dict[str, dict[str, Any]]:
    """Run ``key``'s predictions in all its files, by question id; ``own`` (the file this process appends
    to, and only it: others may be another process's, being written) is repaired if torn."""
    done: dict[str, dict[str, Any]] = {}
    for path in prediction_files(folder, key):
        done.update(read_predictions(path, repair=path == own))
    return done


def merge_predictions(folder: Path, key: str, records: list[Record]) -> None:
    """Fold the per-process files of run ``key`` into ``<key>.jsonl`` (question order), then remove them.

    The merged file is written whole and renamed into place before any per-process file goes, so an
    interruption loses nothing. Nothing happens when there is no per-process file (a single process's run).
    """
    files = prediction_files(folder, key)
    if len(files) == 1:
        return
    done = read_run(folder, key)
    ids = [r.id for r in records]
    asked = set(ids)
    order = [i for i in ids if i in done] + [i for i in done if i not in asked]
    text = "".join(json.dumps(done[i]) + "\n" for i in order)
    _write_atomically(files[0], lambda p: p.write_text(text))
    for path in files[1:]:
        path.unlink()


def run_predictions(
    model: nn.Module, processor: Any, run: Run, records: list[Record], folder: Path, cfg: EvalConfig, bar: tqdm,
    procs: Processes | None = None,
) -> dict[str, dict[str, Any]]:
    """Answer this process's share of ``records`` not yet in any of the run's files in ``folder``, appending
    to this process's own file as it goes; return the run's predictions by id."""
    procs = procs or Processes()
    own = own_file(folder, run.key, procs)
    done = read_run(folder, run.key, own)
    todo = [r for r in procs.share(records, cfg.batch_size) if r.id not in done]
    if not todo:
        return done
    context = contextlib.nullcontext() if run.method == VANILLA else compressed(model, run.method, **run.knobs)
    bar.set_postfix_str(run.key)
    with context, own.open("a") as sink:
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
            Run(r["key"], r["method"], dict(r["knobs"]), int(r["tokens"]), r.get("layer_avg_tokens"),
                r.get("budget"), r.get("sent_tokens"))
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
    """Run the evaluation described by ``cfg``; write predictions, results.json, table.md and plot.png.

    Started by ``torchrun`` / ``accelerate launch`` (``RANK`` / ``WORLD_SIZE`` in the environment), each
    process answers its share and rank 0 writes the results (the module docstring); every process returns
    them.
    """
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.multi_turn:
        from .multiturn import evaluate_multi_turn

        return evaluate_multi_turn(cfg)
    with launched() as procs:
        return _evaluate(cfg, procs)


def _evaluate(cfg: EvalConfig, procs: Processes) -> dict[str, Any]:
    out = Path(cfg.out)

    def prepare() -> Path:  # rank 0 first: the folder check, and a lab split generated once, not per process
        check_out_folder(out)
        return data_folder(cfg.data)

    folder = procs.on_main(prepare)
    dataset = load_folder(folder)
    records = dataset[: cfg.limit]
    vocabulary = answer_vocabulary(dataset)  # off-vocabulary is judged against the whole dataset, not the subset
    model, processor = load_model(cfg.model, device=procs.device(cfg.device), dtype=cfg.dtype)
    if cfg.tokens is None:
        cfg.tokens = [paper_budget(model, t) for t in PAPER_BUDGETS]
    runs = plan_runs(model, cfg.methods, cfg.tokens)
    ident = identity(cfg, folder, weights_sha256(model))
    if any(other != ident for other in procs.gather(ident)):
        raise ValueError("the processes of this launch load different models or data (their identities differ)")

    def claim() -> list[Run]:  # rank 0: identity.json, and the columns evaluated there before
        check_resumable(out, ident)
        merged = merge_runs(previous_runs(out), runs)
        (out / "predictions").mkdir(exist_ok=True)
        return merged

    runs = procs.on_main(claim)
    predictions_dir = out / "predictions"
    if not predictions_dir.is_dir():  # rank 0 made it: another node's disk
        raise ValueError(f"--out {out}: process {procs.rank} does not see the folder the first process made; "
                         "across nodes, --out must be on a filesystem every node shares")

    share = procs.share(records, cfg.batch_size)
    remaining = 0
    for run in runs:  # read each run's files once (per record it made resuming quadratic: minutes)
        done = read_run(predictions_dir, run.key)
        remaining += sum(r.id not in done for r in share)
    desc = f"vlmzip eval (process 1 of {procs.world})" if procs.parallel else "vlmzip eval"
    with tqdm(total=remaining, unit="q", desc=desc, dynamic_ncols=True, disable=not procs.main) as bar:
        for run in runs:
            run_predictions(model, processor, run, records, predictions_dir, cfg, bar, procs)
    procs.barrier()  # every process has answered its share

    def report() -> dict[str, Any]:  # rank 0: merge, score once, write
        scores: dict[str, dict[str, Any]] = {}
        for run in runs:
            merge_predictions(predictions_dir, run.key, records)
            predictions = read_run(predictions_dir, run.key)
            missing = [r.id for r in records if r.id not in predictions]
            if missing:
                raise ValueError(f"{run.key}: {len(missing)} question(s) have no answer (first: {missing[0]}); "
                                 "a process stopped early? Rerun the same command to resume")
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

    return procs.on_main(report)
