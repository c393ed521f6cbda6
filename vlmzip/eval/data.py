"""Datasets by name: a dataset folder, or one of the procedural lab splits, generated and cached.

``load_dataset`` takes any dataset folder (format: ``vlmzip.eval.format``), or one of the names in
``LAB_DATASETS`` (``lab-test``, ``lab-val``, ``lab-test-small``: scenes of ``vlmzip.lab.scenes``) or
``LAB_VIDEO_DATASETS`` (``lab-video``, ``lab-video-val``: clips of moving shapes, ``vlmzip.lab.clips``), which
are generated on first use into ``data/`` of vlmzip's cache folder (``vlmzip.paths.cache_dir``:
``$VLMZIP_CACHE``, else ``$XDG_CACHE_HOME/vlmzip`` or ``~/.cache/vlmzip``) and reused afterwards.

The dependency runs one way: this module uses the lab's generator, the lab uses the generic format
(``vlmzip.eval.format``), and the format knows nothing of either. Records, the loader and the writer
live in ``vlmzip.eval.format``.

Out-of-vocabulary answers (``vlmzip.eval.scorers.score_records``) are judged per question type against
``dataset_vocabulary``: for a lab split every answer the benchmark can have, for a dataset folder every gold
answer of its records.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..lab import clips, scenes
from ..paths import cache_dir
from ..video import DEFAULT_FRAMES
from .format import FOLDER_HINT, DatasetFormatError, Record, content_hash, load_folder
from .scorers import answer_vocabulary, normalize_answer

# name -> split of vlmzip.lab.scenes.SPLITS
LAB_DATASETS: dict[str, str] = {"lab-test": "test", "lab-val": "val", "lab-test-small": "test-small"}
# name -> split of vlmzip.lab.clips.SPLITS (questions about videos: folders of frames)
LAB_VIDEO_DATASETS: dict[str, str] = {"lab-video": "test", "lab-video-val": "val"}
LAB_NAMES = {**LAB_DATASETS, **LAB_VIDEO_DATASETS}


def video_frames(data: str, frames: int | None) -> int:
    """Frames sampled per video of the dataset ``data``: ``frames`` if given, else the lab video splits' 6 (what
    fits the lab model's context as images), else 8 (the papers' Video-LLaVA setting)."""
    if frames is not None:
        return frames
    return clips.DEFAULT_FRAMES if str(data) in LAB_VIDEO_DATASETS and not Path(data).is_dir() else DEFAULT_FRAMES


def load_dataset(path: str | os.PathLike[str]) -> list[Record]:
    """Records of a dataset folder, or of a lab split named ``lab-test`` / ``lab-val`` / ``lab-test-small``.

    Lab names are generated into the cache on first use (a few seconds to a minute) and reused after.
    An existing folder of that name takes precedence over the lab name.
    """
    if str(path) in LAB_NAMES and not Path(path).exists():
        return load_folder(ensure_lab_dataset(str(path)))
    if not Path(path).expanduser().is_dir():
        raise DatasetFormatError(
            f"{Path(path).expanduser().resolve()}: not a folder; {FOLDER_HINT}, "
            f"or one of the names {sorted(LAB_NAMES)}"
        )
    return load_folder(path)


def lab_split(data: str) -> str | None:
    """``data`` when it names a lab split (a key of ``LAB_DATASETS`` or ``LAB_VIDEO_DATASETS``) and no folder of
    that name exists (a folder takes precedence), else None."""
    return data if data in LAB_NAMES and not Path(data).is_dir() else None


def data_folder(data: str) -> Path:
    """The folder behind ``data``: an existing folder, or a lab split name generated on first use."""
    if lab_split(data):
        return ensure_lab_dataset(data)
    if Path(data).is_dir():
        return Path(data)
    known = ", ".join(sorted(LAB_NAMES))
    raise ValueError(f"--data {data!r} is neither a dataset folder nor a lab dataset ({known})")


def dataset_vocabulary(data: str, records: Iterable[Record]) -> dict[str, set[str]]:
    """Every valid answer of each question type of the dataset ``data`` (``records``), normalised
    (``normalize_answer``): for a lab split every answer the benchmark can give the type
    (``vlmzip.lab.scenes.answers_by_type``), whatever subset of it was generated or is evaluated; for a
    dataset folder every gold answer of its records of the type."""
    if lab_split(data):
        types = clips.answers_by_type() if data in LAB_VIDEO_DATASETS else scenes.answers_by_type()
        return {qtype: {normalize_answer(a) for a in answers} for qtype, answers in types.items()}
    return answer_vocabulary(records)


# ---------------------------------------------------------------------------------------------------------
# Cached lab splits


def _cached_ok(folder: Path, split: str, version: str, config: dict[str, Any]) -> bool:
    """Whether a cached lab folder is complete, current and matches its recorded hash."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("split") != split or meta.get("generator_version") != version:
            return False
        if json.loads(json.dumps(config)) != meta.get("config"):
            return False
        actual = content_hash(folder)
    except (OSError, ValueError, KeyError):
        return False
    if actual != meta.get("hash"):
        warnings.warn(f"{folder}: content hash mismatch (corrupt cache?); regenerating", stacklevel=3)
        return False
    return True


def ensure_lab_dataset(name: str, *, verify: bool = True) -> Path:
    """Folder of the lab dataset ``name`` (a key of ``LAB_DATASETS``), generating it on first use.

    With ``verify`` the cached folder's content hash is recomputed and compared with its ``meta.json``;
    a stale or corrupt folder is regenerated. Generation writes to a temporary folder, then renames it.
    """
    if name not in LAB_NAMES:
        raise ValueError(f"unknown lab dataset {name!r}; known: {sorted(LAB_NAMES)}")
    split = LAB_NAMES[name]
    video = name in LAB_VIDEO_DATASETS
    config = dict(clips.CONFIG) if video else asdict(scenes.SceneConfig())
    version = clips.GENERATOR_VERSION if video else scenes.GENERATOR_VERSION
    folder = cache_dir() / "data" / f"{name}-v{version}"
    if folder.is_dir():
        if not verify and (folder / "meta.json").is_file():
            return folder
        if _cached_ok(folder, split, version, config):
            return folder
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        digest = (clips.write_split if video else scenes.write_split)(split, tmp, overwrite=True)
        expected = None if video else scenes.EXPECTED_HASHES.get(split)
        if expected and digest != expected:
            warnings.warn(
                f"{name}: generated content hash {digest} differs from the reference {expected} "
                f"(generator v{scenes.GENERATOR_VERSION}); results are not comparable with runs on the reference "
                "data (different Pillow/FreeType rendering?)",
                stacklevel=2,
            )
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not _cached_ok(folder, split, version, config):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


__all__ = [
    "LAB_DATASETS", "LAB_NAMES", "LAB_VIDEO_DATASETS", "data_folder", "dataset_vocabulary", "ensure_lab_dataset",
    "lab_split", "load_dataset", "video_frames",
]  # fmt: skip
