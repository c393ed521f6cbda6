"""Reading videos: a video file (decoded with PyAV) or a folder of frame images, sampled uniformly.

Sampling rule (:func:`sample_indices`): ``F`` frames of a video of ``N`` frames are the centres of ``F`` equal
segments, frame ``floor((2i + 1) N / 2F)`` for ``i = 0 .. F-1`` (the rule of Video-LLaVA's and
LLaVA-NeXT-Video's uniform sampling up to rounding; never the very first and last frame unless ``F == N``).
The indices are unique, increasing and inside ``0 .. N-1`` whenever ``1 <= F <= N``; asking more frames than
the video has is an error, never a repeated frame.

A folder of frames: every image file in it (by extension, hidden files skipped) is one frame, in order of
name with the numbers in names compared by value (``frame2.png`` before ``frame10.png``); each sampled frame is
read with :func:`vlmzip.io.read_image`'s checks. A folder has no frame rate: its :class:`Video` has no
timestamps.

What the models do with the frames (a processor's ``videos=``, or one image per frame) and what a budget means
for a video: :mod:`vlmzip.io` (``batch_visual_inputs``) and :func:`frame_knobs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .images import read_image

DEFAULT_FRAMES = 8  # the papers' Video-LLaVA setting (VisionZip, SparseVLM): 8 frames x 256 tokens


@dataclass(frozen=True)
class Video:
    """Sampled frames of one video.

    - ``frames``: the sampled frames, RGB, in time order.
    - ``indices``: their frame numbers in the video (``sample_indices(total, len(frames))``).
    - ``total``: frames in the video (files in the folder).
    - ``fps``: the file's average frame rate, None for a folder of frames or a file that has none.
    - ``timestamps``: each sampled frame's presentation time in seconds (from the file), None without a rate.
    - ``source``: where it was read from.
    """

    frames: tuple[Image.Image, ...]
    indices: tuple[int, ...]
    total: int
    fps: float | None
    timestamps: tuple[float, ...] | None
    source: str

    def __len__(self) -> int:
        return len(self.frames)


def check_frames(frames: Any, what: str = "frames") -> int:
    """``frames`` as a validated count: an int (not bool) >= 1, else a clear ``ValueError``."""
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise ValueError(f"{what} must be a whole number of frames >= 1, got {frames!r}")
    if frames < 1:
        raise ValueError(f"{what} must be >= 1 (frames sampled per video), got {frames}")
    return frames


def sample_indices(total: int, frames: int) -> list[int]:
    """The frame numbers of ``frames`` frames sampled uniformly from ``total``: the centre of each of ``frames``
    equal segments, ``(2i + 1) * total // (2 * frames)``. Unique, increasing, in ``0 .. total-1``.

    A clear ``ValueError`` when ``frames < 1``, ``total < 1``, or ``frames > total``."""
    check_frames(frames)
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"the video has no frames (total={total!r}): nothing to sample")
    if frames > total:
        raise ValueError(f"asked for {frames} frames but the video has only {total}; pass --frames {total} or fewer")
    return [(2 * i + 1) * total // (2 * frames) for i in range(frames)]


def read_video(path: str | Path, frames: int = DEFAULT_FRAMES) -> Video:
    """``frames`` frames of the video file or frame folder ``path``, sampled by :func:`sample_indices`.

    A clear ``ValueError`` when the path is missing, the file is not a video PyAV can decode (or is corrupt),
    the video or folder has no frames, ``frames < 1``, or more frames are asked than it has."""
    check_frames(frames)
    p = Path(path)
    if p.is_dir():
        return _read_folder(p, frames)
    if not p.is_file():
        raise ValueError(f"video {p} does not exist; pass a video file (e.g. .mp4) or a folder of frame images")
    return _read_file(p, frames)


# -- frame folders ---------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    """Sort key comparing digit runs by value: ``frame2`` < ``frame10``."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder, in frame order (natural sort of names; hidden files skipped)."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files = [f for f in folder.iterdir()
             if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions]
    return sorted(files, key=lambda f: _natural_key(f.name))


def _read_folder(folder: Path, frames: int) -> Video:
    files = frame_files(folder)
    if not files:
        raise ValueError(f"video folder {folder} holds no frame images (PNG, JPEG, ...); put one image per frame "
                         "in it, named in frame order (e.g. 00001.png)")
    try:
        indices = sample_indices(len(files), frames)
    except ValueError as err:
        raise ValueError(f"video folder {folder}: {err}") from None
    images = tuple(read_image(files[i]) for i in indices)
    return Video(images, tuple(indices), len(files), None, None, str(folder))


# -- video files -------------------------------------------------------------------------------------------------


def _open(path: Path) -> Any:
    import av

    try:
        container = av.open(str(path))
    except av.error.EOFError:
        raise ValueError(f"video {path} has no frames (a zero-length or truncated file); pass a video with "
                         "frames, or a folder of frame images") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read video {path}: {err}; pass a video file PyAV (FFmpeg) can decode, "
                         "e.g. an .mp4, or a folder of frame images") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"video {path} has no video stream (an audio file, or an empty, truncated or corrupt "
                         "video?); pass a video file with frames, or a folder of frame images")
    return container


def _count_frames(path: Path) -> int:
    """Frames of the file's first video stream: the container's count, or its packets counted."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot read video {path}: {err} (a corrupt file?)") from None


def _decode(path: Path, wanted: list[int]) -> tuple[dict[int, Image.Image], dict[int, float], int, float | None]:
    """The frames numbered ``wanted`` as RGB images, their times (s), the frames decoded in all, the rate."""
    import av

    keep = set(wanted)
    images: dict[int, Image.Image] = {}
    times: dict[int, float] = {}
    count = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else None
        try:
            for frame in container.decode(stream):
                if count in keep:
                    images[count] = frame.to_image().convert("RGB")
                    seconds = frame.time
                    times[count] = float(seconds) if seconds is not None else (count / rate if rate else 0.0)
                count += 1
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot decode video {path} past frame {count}: {err} (a corrupt or truncated "
                             "file?); re-encode it or pass a folder of frames") from None
    return images, times, count, rate


def _sampled(path: Path, total: int, frames: int, note: str) -> list[int]:
    """:func:`sample_indices` of a file's ``total`` frames, its error naming the file (and ``note``)."""
    try:
        return sample_indices(total, frames)
    except ValueError as err:
        raise ValueError(f"video {path}: {err}{note}") from None


def _read_file(path: Path, frames: int) -> Video:
    counted = _count_frames(path)
    if counted < 1:
        raise ValueError(f"video {path} has no frames (zero-length video); pass a video with at least {frames}")
    wanted = _sampled(path, counted, frames, "")
    images, times, decoded, rate = _decode(path, wanted)
    if decoded != counted:  # the container's count was off: sample again from the frames that decode
        if decoded < 1:
            raise ValueError(f"video {path}: no frame decodes (a corrupt file?); re-encode it or pass a folder")
        wanted = _sampled(path, decoded, frames, " (frames that decode)")
        images, times, decoded, rate = _decode(path, wanted)
    return Video(tuple(images[i] for i in wanted), tuple(wanted), decoded, rate,
                 tuple(times[i] for i in wanted) if rate else None, str(path))


# -- budgets of a video sent as images ---------------------------------------------------------------------------

PER_IMAGE_ONLY = ("dominant", "contextual")


def frame_knobs(knobs: dict[str, Any], frames: int) -> dict[str, Any]:
    """The knobs that give each of a video's ``frames`` frames, sent to the model as ``frames`` images, its
    share of the video's budget: ``tokens=N`` (per video) becomes ``tokens=N // frames`` per frame-image (the
    even split; the remainder ``N % frames`` is not spent, as every image of a call keeps one count),
    ``tokens_per_frame=M`` becomes ``tokens=M``, ``ratio`` stays a share of each frame. Other knobs are kept.

    A clear ``ValueError`` when ``tokens < frames`` (a frame would get no token), when both ``tokens`` and
    ``tokens_per_frame`` are given, and for VisionZip's ``dominant`` / ``contextual``, which count tokens per
    image (pass ``tokens`` per video or ``tokens_per_frame`` instead)."""
    check_frames(frames)
    out = dict(knobs)
    given = [k for k in PER_IMAGE_ONLY if k in out]
    if given:
        raise ValueError(f"{' and '.join(given)} count tokens per image; for a video sent as {frames} frame images "
                         "pass tokens=N (per video, split evenly over its frames) or tokens_per_frame=M")
    per_frame = out.pop("tokens_per_frame", None)
    if per_frame is not None:
        if "tokens" in out:
            raise ValueError(f"pass tokens=N (per video) or tokens_per_frame=M, not both (got tokens={out['tokens']}, "
                             f"tokens_per_frame={per_frame})")
        out["tokens"] = per_frame
    elif "tokens" in out:
        tokens = out["tokens"]
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens < frames:
            raise ValueError(f"tokens={tokens} is a budget per video, split evenly over its {frames} frames: fewer "
                             f"tokens than frames leaves a frame without any; pass tokens={frames} or more, fewer "
                             "frames, or tokens_per_frame=M")
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            out["tokens"] = tokens // frames
    return out


__all__ = ["DEFAULT_FRAMES", "Video", "check_frames", "frame_files", "frame_knobs", "read_video", "sample_indices"]
