"""The dataset folder format: records, validation, loader, writer and content hash.

A dataset is a folder holding ``data.jsonl`` and the images it names (by convention under ``images/``)::

    my_data/
      data.jsonl     one JSON object per line:
                     {"id": str, "image": "images/0001.png", "question": str,
                      "answers": [str, ...], "type": str, ...any extra fields}
      images/0001.png
      meta.json      optional: written by ``write_dataset`` (counts per type, content hash, ...)

A question about a video has ``"video"`` instead of ``"image"`` (one or the other): a video file (``.mp4``, ...)
or a folder of frame images, sampled when the question is answered (``vlmzip.video``; ``vlmzip eval --frames``).

Image and video paths are relative to the folder and stay inside it: no absolute path, no ``..``, and no
symbolic link (of the file or of a folder on its path) that leads outside the folder once followed.

``load_folder`` reads any such folder; ``write_dataset`` writes one. This module knows nothing of the
lab: ``vlmzip.lab.scenes`` writes its splits with ``write_dataset``, and ``vlmzip.eval.data`` adds the
named lab datasets on top.

Content hash: sha256 over, for every image in order of first reference in ``data.jsonl``, its relative
path, its size and its decoded RGB pixels, then the bytes of ``data.jsonl``. Hashing pixels rather than
PNG bytes makes the hash independent of the PNG encoder (zlib version, compression level). A video folder
counts as its frame images in frame order; a video file as its path and its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image

from ..video import Video, frame_files, read_video

REQUIRED_FIELDS: dict[str, str] = {
    "id": "a string",
    "image": "a string (image path relative to the dataset folder)",
    "question": "a string",
    "answers": "a non-empty list of strings",
    "type": "a string (question type, e.g. 'count')",
}
FORMAT_HINT = (
    'each line of data.jsonl must be one JSON object with "id", "image" (path relative to the folder; or '
    '"video": a video file or a folder of frames), "question", "answers" (a non-empty list of strings) and '
    '"type", e.g. {"id": "q1", "image": "images/0001.png", "question": "How many circles are there?", '
    '"answers": ["2"], "type": "count"}'
)
VISUALS = ("image", "video")  # a record names one of them
FOLDER_HINT = "a dataset is a folder with data.jsonl and images"
HASH_METHOD = "sha256(for each image in first-reference order: path, WxH, RGB pixels; then data.jsonl bytes)"


class DatasetFormatError(ValueError):
    """A dataset folder or record that does not follow the format (the message says how to fix it)."""


@dataclass
class Record:
    """One question. ``image_path`` is absolute: the image, or with ``kind == "video"`` the video file or frame
    folder; ``extra`` holds every other field of the JSONL record."""

    id: str
    image_path: Path
    question: str
    answers: list[str]
    type: str
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # line number in data.jsonl (1-based), for error messages
    kind: str = "image"  # "image" or "video"

    @property
    def is_video(self) -> bool:
        """True for a question about a video."""
        return self.kind == "video"

    @property
    def subtype(self) -> str | None:
        """The optional ``subtype`` field (e.g. POPE negative kind for presence questions)."""
        return self.extra.get("subtype")


# ---------------------------------------------------------------------------------------------------------
# Validation


def validate_record(obj: Any, where: str) -> None:
    """Raise DatasetFormatError (prefixed by ``where``) unless ``obj`` is a valid record dict."""
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}; {FORMAT_HINT}")
    given = [name for name in VISUALS if name in obj]
    if len(given) > 1:
        raise DatasetFormatError(f'{where}: a record has "image" or "video", not both; {FORMAT_HINT}')
    visual = given[0] if given else "image"
    for name, kind in REQUIRED_FIELDS.items():
        if name == "image":
            name, kind = visual, kind.replace("image path", f"{visual} path")
        if name not in obj:
            raise DatasetFormatError(f"{where}: missing field {name!r} ({kind}); {FORMAT_HINT}")
        value = obj[name]
        if name == "answers":
            ok = isinstance(value, list) and value and all(isinstance(a, str) for a in value)
        else:
            ok = isinstance(value, str) and (name == "question" or value != "")
        if not ok:
            raise DatasetFormatError(f"{where}: field {name!r} must be {kind}, got {value!r}; {FORMAT_HINT}")
    check_image_path(obj[visual], where, visual)


def record_visual(obj: dict[str, Any]) -> tuple[str, str]:
    """(``"image"`` or ``"video"``, its relative path) of a valid record."""
    kind = "video" if "video" in obj else "image"
    return kind, obj[kind]


def check_image_path(rel: str, where: str, kind: str = "image") -> None:
    """Raise DatasetFormatError unless ``rel`` is a relative path that stays inside the dataset folder: no
    absolute path (``/x.png``, ``C:\\x.png``) and no ``..`` component, so that a dataset can neither read
    nor (``write_dataset``) write files outside its folder."""
    why = None
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        why = "is an absolute path"
    elif ".." in re.split(r"[\\/]", rel):
        why = "leaves the dataset folder ('..')"
    if why:
        raise DatasetFormatError(
            f"{where}: {kind} {rel!r} {why}; {kind} paths must be relative to the dataset folder and stay inside "
            'it, e.g. "images/0001.png"'
        )


def resolve_inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` with every symbolic link followed; DatasetFormatError when that is outside ``root``
    (itself resolved by the caller): a link in the folder (``images/x.png -> /elsewhere/x.png``, or the
    folder ``images -> /elsewhere``) may not take a dataset out of its folder. Links that stay inside are
    followed."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DatasetFormatError(
            f"{where}: image {rel!r} is a symbolic link, or lies in a linked folder, that leads outside the dataset "
            f"folder {root} (to {path}); image paths must stay inside the dataset folder once links are followed: "
            "copy the image (or its folder) into the dataset folder, or link to a file inside it"
        )
    return path


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line, validated."""
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); {FORMAT_HINT}"
                ) from None
            validate_record(obj, f"{path}, line {lineno}")
            rows.append((lineno, obj))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_folder(folder: str | os.PathLike[str]) -> list[Record]:
    """Load a dataset folder; check every record and that every image file exists."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: not a folder; {FOLDER_HINT}")
    jsonl = root / "data.jsonl"
    if not jsonl.is_file():
        raise DatasetFormatError(f"{root}: no data.jsonl; add one, {FORMAT_HINT}")
    records: list[Record] = []
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(jsonl):
        where = f"{jsonl}, line {lineno}"
        if obj["id"] in seen:
            raise DatasetFormatError(
                f"{where}: duplicate id {obj['id']!r} (first on line {seen[obj['id']]}); ids must be unique"
            )
        seen[obj["id"]] = lineno
        kind, rel = record_visual(obj)
        image_path = resolve_inside(root, rel, where)
        if not (image_path.is_file() or (kind == "video" and image_path.is_dir())):
            what = "file or folder of frames" if kind == "video" else "file"
            raise DatasetFormatError(
                f"{where}: {kind} {rel!r} not found (looked for {image_path}); "
                f"the {kind} path must be relative to the dataset folder and the {what} must exist"
            )
        extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS and k not in VISUALS}
        records.append(Record(obj["id"], image_path, obj["question"], list(obj["answers"]), obj["type"], extra, lineno,
                              kind))
    if not records:
        raise DatasetFormatError(f"{jsonl}: no records; {FORMAT_HINT}")
    return records


def load_video(record: Record, frames: int) -> Video:
    """``frames`` frames of the record's video (``vlmzip.video.read_video``); DatasetFormatError if it cannot be
    read or has fewer frames."""
    where = f"record {record.id!r} (data.jsonl line {record.line})"
    try:
        return read_video(record.image_path, frames)
    except ValueError as e:
        raise DatasetFormatError(f"{where}: {e}") from None


def load_visual(record: Record, frames: int) -> Image.Image | Video:
    """The record's image, or ``frames`` frames of its video."""
    return load_video(record, frames) if record.is_video else load_image(record)


def load_image(record: Record) -> Image.Image:
    """The record's image as RGB; DatasetFormatError if missing or not decodable."""
    where = f"record {record.id!r} (data.jsonl line {record.line})"
    if record.is_video:
        raise DatasetFormatError(f"{where}: is a question about a video, not an image")
    try:
        with Image.open(record.image_path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DatasetFormatError(f"{where}: image {record.image_path} no longer exists") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(
            f"{where}: cannot decode image {record.image_path} ({e}); replace it with a valid PNG/JPEG file"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Writing and hashing


def _image_digest_update(h: Any, rel_path: str, image: Image.Image) -> None:
    rgb = image.convert("RGB")
    h.update(rel_path.encode("utf-8") + b"\0")
    h.update(f"{rgb.width}x{rgb.height}\0".encode())
    h.update(rgb.tobytes())


def content_hash(folder: str | os.PathLike[str]) -> str:
    """Content hash of a dataset folder (see module docstring); decodes every image."""
    root = Path(folder).resolve()
    jsonl_bytes = (root / "data.jsonl").read_bytes()
    h = hashlib.sha256()
    seen: set[str] = set()
    for line in jsonl_bytes.decode("utf-8").splitlines():
        if not line.strip():
            continue
        kind, rel = record_visual(json.loads(line))
        if rel not in seen:
            seen.add(rel)
            path = resolve_inside(root, rel, f"{root / 'data.jsonl'}")
            if kind == "video" and path.is_dir():
                for frame in frame_files(path):
                    with Image.open(frame) as image:
                        _image_digest_update(h, f"{rel}/{frame.name}", image)
            elif kind == "video":
                h.update(rel.encode("utf-8") + b"\0")
                whole = hashlib.sha256()
                with path.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        whole.update(block)
                h.update(whole.digest())
            else:
                with Image.open(path) as image:
                    _image_digest_update(h, rel, image)
    h.update(jsonl_bytes)
    return h.hexdigest()


def write_dataset(
    out_dir: str | os.PathLike[str],
    samples: Iterable[tuple[str, Image.Image | Sequence[Image.Image], list[dict[str, Any]]]],
    meta: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write ``(relative image path, image, records)`` items as a dataset folder; return the content hash.

    Images are saved as PNG; an item whose image is a list of images is a video, saved as a folder of frames
    (``PATH/00000.png``, ...) that its records name as ``"video"``. Records go to ``data.jsonl`` in order
    (compact JSON, one per line); ``meta.json`` gets ``meta`` plus counts per type, the hash and the hash method.
    """
    root = Path(out_dir)
    if (root / "data.jsonl").exists() and not overwrite:
        raise FileExistsError(f"{root / 'data.jsonl'} exists; pass overwrite=True or choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    real_root = root.resolve()
    h = hashlib.sha256()
    lines: list[str] = []
    written: set[str] = set()
    for rel, image, records in samples:
        check_image_path(rel, f"image {len(written)}")
        if rel in written:
            raise ValueError(f"image {rel!r} written twice")
        written.add(rel)
        path = resolve_inside(real_root, rel, f"image {len(written) - 1}")
        if isinstance(image, (list, tuple)):  # a video: a folder of frames
            path.mkdir(parents=True, exist_ok=True)
            for number, frame in enumerate(image):
                name = f"{number:05d}.png"
                frame.save(path / name, format="PNG")
                _image_digest_update(h, f"{rel}/{name}", frame)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG")
            _image_digest_update(h, rel, image)
        for record in records:
            validate_record(record, f"record {len(lines)}")
            if record_visual(record)[1] != rel:
                raise ValueError(f"record {record['id']!r} names {record_visual(record)}, expected {rel!r}")
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    jsonl_bytes = "".join(line + "\n" for line in lines).encode("utf-8")
    (root / "data.jsonl").write_bytes(jsonl_bytes)
    h.update(jsonl_bytes)
    digest = h.hexdigest()
    records = [json.loads(line) for line in lines]
    full_meta = dict(meta or {})
    full_meta.update(
        n_images=len(written),
        n_questions=len(records),
        counts_by_type=dict(sorted(Counter(r["type"] for r in records).items())),
        counts_by_subtype=dict(sorted(Counter(f"{r['type']}/{r.get('subtype', '')}" for r in records).items())),
        hash=digest,
        hash_method=HASH_METHOD,
        pillow_version=Image.__version__,
    )
    (root / "meta.json").write_text(json.dumps(full_meta, indent=2) + "\n", encoding="utf-8")
    return digest


__all__ = [
    "DatasetFormatError", "FOLDER_HINT", "FORMAT_HINT", "HASH_METHOD", "REQUIRED_FIELDS", "Record",
    "VISUALS", "check_image_path", "content_hash", "load_folder", "load_image", "load_video", "load_visual",
    "record_visual", "resolve_inside", "validate_record", "write_dataset",
]  # fmt: skip
