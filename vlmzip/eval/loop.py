"""The evaluation loop: model + methods x budgets -> predictions, scores, results.json and the reports,
whatever the unit of work (a question, a two-turn conversation: a ``Task``).

Vanilla (the unmodified model) is evaluated once and reused as the reference for every method and budget.
Each run's answers are appended to ``OUT/predictions/<run>.jsonl`` batch by batch, so rerunning the same
command skips every item already answered (resumable). Methods and budgets may differ between runs into
one folder: each run adds its columns, and results.json and the reports cover every column evaluated
there. The folder's lock, identity and files: ``vlmzip.eval.outdir``.

Launched as several processes (``torchrun --nproc_per_node N -m vlmzip.cli eval ...`` or
``accelerate launch``; ``vlmzip.eval.distributed``), each answers its share of whole batches and appends to
its own ``OUT/predictions/<run>.rank<r>-of-<w>.jsonl``; once all have finished, rank 0 merges every run's
files into ``<run>.jsonl`` (in item order), scores, and writes the same results.json and reports as a
single process. Every process, whatever the number of processes, skips the items found in any of a run's
files, so an interrupted run resumes with the same or another number of processes. Rank 0 alone holds the
folder's lock, for the whole run: a second launch into the folder is refused on its rank 0, and every one
of its processes exits with that message.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch import nn
from tqdm import tqdm

from ..api import compressed
from ..io import load_model
from .data import data_folder, dataset_vocabulary
from .distributed import Processes
from .format import Record, load_folder
from .outdir import (
    Item,
    check_out_folder,
    check_resumable,
    identity,
    locked,
    merge_predictions,
    own_file,
    previous_runs,
    read_run,
    weights_sha256,
    write_atomically,
)
from .runs import VANILLA, EvalConfig, Run, budgets, check_config, merge_runs, plan_runs

T = TypeVar("T", bound=Item)


class Task(ABC, Generic[T]):
    """One kind of evaluation: its items, how a batch of them is answered, how a run's answers are scored,
    and the reports written from the results."""

    unit: str = "item"  # what an item is called in messages ("question")
    bar_unit: str = "it"  # the progress bar's unit ("q")
    label: str = "vlmzip eval"  # the progress bar's label
    count_key: str = "n_items"  # results.json: the number of items evaluated

    @abstractmethod
    def items(self, dataset: list[Record], data: str) -> list[T]:
        """The items of ``dataset`` (named ``data`` on the command line), in order, before ``--limit``."""

    @abstractmethod
    def answer(self, model: nn.Module, processor: Any, batch: list[T], max_new_tokens: int) -> list[dict[str, Any]]:
        """Per item of ``batch``, the fields of its predictions line (its id and run are added)."""

    @abstractmethod
    def score(self, rows: list[dict[str, Any]], match: str, vocabulary: Mapping[str, set[str]]) -> dict[str, Any]:
        """A run's scores from its predictions lines (in item order): the fields its results.json entry adds."""

    @abstractmethod
    def write_reports(self, results: dict[str, Any], out: Path) -> None:
        """Write the reports of ``results`` (table.md, ...) into ``out``."""

    def identity(self) -> dict[str, Any]:
        """What this task adds to the folder's identity (``vlmzip.eval.outdir.identity``)."""
        return {}

    def video_frames(self, items: Sequence[T]) -> int | None:
        """The frames sampled per video when every item asks about a video (the runs' token counts are then per
        video), else None."""
        return None

    def knobs(self, model: nn.Module, item: T, knobs: dict[str, Any]) -> dict[str, Any]:
        """The knobs a run's method is given for ``item`` (a run's ``knobs`` as they are, unless the task says
        otherwise: a video's budget split over its frames)."""
        return knobs

    def flags(self) -> dict[str, Any]:
        """What this task adds to results.json after "config" and "identity"."""
        return {}


def batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Consecutive chunks of ``size`` items."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def evaluate_task(cfg: EvalConfig, task: Task[Any], procs: Processes) -> dict[str, Any]:
    """Run the evaluation ``cfg`` of ``task`` as this process of ``procs``; write predictions, results.json
    and the task's reports (rank 0). Every process returns the results. ``cfg`` is left as it is: the
    budgets it resolves (``cfg.tokens`` None: the papers', scaled to the model) are recorded in
    results.json's "config"."""
    check_config(cfg)
    out = Path(cfg.out)
    folder = procs.on_main(lambda: _prepare(out, cfg.data))
    dataset = load_folder(folder)
    items = task.items(dataset, cfg.data)[: cfg.limit]
    vocabulary = dataset_vocabulary(cfg.data, dataset)  # the whole dataset's, not the --limit subset's
    with ExitStack() as held:
        procs.on_main(lambda: held.enter_context(locked(out)))  # before the first write, to the end
        model, processor = load_model(cfg.model, device=procs.device(cfg.device), dtype=cfg.dtype)
        frames = task.video_frames(items)
        tokens, per_frame = budgets(model, cfg.tokens, cfg.tokens_per_frame, videos=frames is not None)
        runs = plan_runs(model, cfg.methods, tokens, per_frame, video_frames=frames)
        ident = {**identity(cfg, folder, weights_sha256(model)), **task.identity()}
        if any(other != ident for other in procs.gather(ident)):
            raise ValueError("the processes of this launch load different models or data (their identities differ)")
        runs = procs.on_main(lambda: _claim(out, ident, runs))
        predictions = out / "predictions"
        if not predictions.is_dir():  # rank 0 made it: another node's disk
            raise ValueError(f"--out {out}: process {procs.rank} does not see the folder the first process made; "
                             "across nodes, --out must be on a filesystem every node shares")
        _answer_share(model, processor, task, runs, items, predictions, cfg, procs)
        procs.barrier()  # every process has answered its share
        header = {"config": {**asdict(cfg), "tokens": tokens, "tokens_per_frame": per_frame},
                  "identity": ident, **task.flags()}
        return procs.on_main(lambda: _report(task, runs, items, out, header, cfg.match, vocabulary))


def _prepare(out: Path, data: str) -> Path:
    """Rank 0, first: the output folder check, and a lab split generated once, not per process."""
    check_out_folder(out)
    return data_folder(data)


def _claim(out: Path, ident: dict[str, Any], runs: list[Run]) -> list[Run]:
    """Rank 0: identity.json, and the columns evaluated there before."""
    check_resumable(out, ident)
    merged = merge_runs(previous_runs(out), runs)
    (out / "predictions").mkdir(exist_ok=True)
    return merged


def _answer_share(
    model: nn.Module, processor: Any, task: Task[Any], runs: list[Run], items: list[Any], folder: Path,
    cfg: EvalConfig, procs: Processes,
) -> None:
    """Every run's answers to this process's share of ``items``, with one progress bar (rank 0's)."""
    share = procs.share(items, cfg.batch_size)
    remaining = 0
    for run in runs:  # read each run's files once (per item it made resuming quadratic: minutes)
        done = read_run(folder, run.key)
        remaining += sum(item.id not in done for item in share)
    desc = f"{task.label} (process 1 of {procs.world})" if procs.parallel else task.label
    with tqdm(total=remaining, unit=task.bar_unit, desc=desc, dynamic_ncols=True, disable=not procs.main) as bar:
        for run in runs:
            answer_run(model, processor, task, run, items, folder, cfg, bar, procs)


def answer_run(
    model: nn.Module, processor: Any, task: Task[Any], run: Run, items: list[Any], folder: Path, cfg: EvalConfig,
    bar: tqdm, procs: Processes | None = None,
) -> dict[str, dict[str, Any]]:
    """Answer this process's share of ``items`` not yet in any of the run's files in ``folder``, appending to
    this process's own file as it goes; return the run's predictions by item id. Items whose method knobs
    differ (``task.knobs``: images and videos sent as frames) are answered in groups, one compression each."""
    procs = procs or Processes()
    own = own_file(folder, run.key, procs)
    done = read_run(folder, run.key, own)
    todo = [item for item in procs.share(items, cfg.batch_size) if item.id not in done]
    if not todo:
        return done
    groups: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    for item in todo:
        knobs = {} if run.method == VANILLA else task.knobs(model, item, run.knobs)
        groups.setdefault(json.dumps(knobs, sort_keys=True, default=str), (knobs, []))[1].append(item)
    bar.set_postfix_str(run.key)
    with own.open("a") as sink:
        for knobs, group in groups.values():
            context = nullcontext() if run.method == VANILLA else compressed(model, run.method, **knobs)
            with context:
                for chunk in batches(group, cfg.batch_size):
                    fields = task.answer(model, processor, chunk, cfg.max_new_tokens)
                    for item, answered in zip(chunk, fields, strict=True):
                        row = {"id": item.id, **answered, "run": run.key}
                        done[item.id] = row
                        sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    bar.update(len(chunk))
    return done


def _report(
    task: Task[Any], runs: list[Run], items: list[Any], out: Path, header: dict[str, Any], match: str,
    vocabulary: Mapping[str, set[str]],
) -> dict[str, Any]:
    """Rank 0: merge every run's files, score each run once, write results.json and the reports."""
    folder = out / "predictions"
    scores: dict[str, dict[str, Any]] = {}
    for run in runs:
        merge_predictions(folder, run.key, items)
        predictions = read_run(folder, run.key)
        missing = [item.id for item in items if item.id not in predictions]
        if missing:
            raise ValueError(f"{run.key}: {len(missing)} {task.unit}(s) have no answer (first: {missing[0]}); "
                             "a process stopped early? Rerun the same command to resume")
        scores[run.key] = task.score([predictions[item.id] for item in items], match, vocabulary)
    results = {
        **header,
        task.count_key: len(items),
        "vanilla_tokens": runs[0].tokens,
        "runs": [{**asdict(run), **scores[run.key]} for run in runs],
    }
    write_atomically(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    task.write_reports(results, out)
    return results
