"""The output folder of an evaluation: its lock, its identity, and the predictions files of its runs.

An output folder holds one evaluation, named by ``OUT/identity.json``: everything that can change an
answer or a score (model path and a hash of its weights, data and a hash of data.jsonl, --limit,
--batch-size, --max-new-tokens, --dtype, the device type, --match, and for two-turn conversations
--multi-turn and --turn2-from-scratch). A run whose identity differs is refused, as is a folder with no
identity.json that holds anything but the lock file, so nothing of another evaluation (or of the user) is
ever overwritten.

One evaluation at a time writes to a folder: it holds an exclusive ``flock`` on ``OUT/.lock`` from before
its first write to its end, and a second one is refused at once. The operating system releases the lock
when the process ends, however it ends, so a crashed evaluation never leaves the folder locked. The lock
file itself stays (it is part of an evaluation folder).

Predictions: each run (a column, ``vlmzip.eval.runs.Run``) appends one JSON line per answered item to
``OUT/predictions/<run>.jsonl``; a process of a data-parallel launch to its own
``<run>.rank<r>-of-<w>.jsonl``, merged into ``<run>.jsonl`` at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .distributed import Processes
from .runs import EvalConfig, Run

LOCK_NAME = ".lock"


class Item(Protocol):
    """A unit of work with an id unique in its dataset (a question, a two-turn conversation)."""

    @property
    def id(self) -> str: ...


# ---------------------------------------------------------------------------------------------------------
# The folder: lock, checks, identity


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the folder's lock for the block (the folder is created if need be); ValueError at once when
    another evaluation holds it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"--out {out}: another vlmzip eval is writing to this folder (it holds {out / LOCK_NAME}); wait "
                "until it has finished and rerun this command to add to its results, or pass another --out folder"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def check_out_folder(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty folder that holds no evaluation (no identity.json;
    the lock file alone is one not started yet): its files are not vlmzip's to overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder (new, empty, or of this evaluation)")
    if not out.is_dir() or (out / "identity.json").is_file():
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(
            f"--out {out} is not empty and holds no vlmzip evaluation ({shown}); pass a new or empty folder"
        )


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
    (the module docstring says why each is there). ``folder``: the dataset's; ``weights``: ``weights_sha256``
    of the loaded model."""
    digest = hashlib.sha256((folder / "data.jsonl").read_bytes()).hexdigest()
    return {"model": cfg.model or "default", "weights_sha256": weights, "data": str(cfg.data),
            "data_sha256": digest, "limit": cfg.limit, "batch_size": cfg.batch_size,
            "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.dtype, "device": torch.device(cfg.device).type,
            "match": cfg.match}


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
            Run(r["key"], r["method"], dict(r["knobs"]), None if r["tokens"] is None else int(r["tokens"]),
                r.get("layer_avg_tokens"),
                r.get("budget"), r.get("sent_tokens"), list(r.get("notes", [])))
            for r in rows
        ]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); move it away to rebuild it from the predictions") from None


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp_path)``, then rename over ``path``: an interruption never leaves half a file."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    write(tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# Predictions files


def read_predictions(path: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Predictions already written to a run's JSONL file, by item id.

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
    """Run ``key``'s predictions in all its files, by item id; ``own`` (the file this process appends to, and
    only it: others may be another process's, being written) is repaired if torn."""
    done: dict[str, dict[str, Any]] = {}
    for path in prediction_files(folder, key):
        done.update(read_predictions(path, repair=path == own))
    return done


def merge_predictions(folder: Path, key: str, items: Sequence[Item]) -> None:
    """Fold the per-process files of run ``key`` into ``<key>.jsonl`` (in the order of ``items``), then
    remove them.

    The merged file is written whole and renamed into place before any per-process file goes, so an
    interruption loses nothing. Nothing happens when there is no per-process file (a single process's run).
    """
    files = prediction_files(folder, key)
    if len(files) == 1:
        return
    done = read_run(folder, key)
    ids = [item.id for item in items]
    asked = set(ids)
    order = [i for i in ids if i in done] + [i for i in done if i not in asked]
    text = "".join(json.dumps(done[i]) + "\n" for i in order)
    write_atomically(files[0], lambda p: p.write_text(text))
    for path in files[1:]:
        path.unlink()
