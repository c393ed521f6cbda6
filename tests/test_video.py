"""Reading videos (PyAV files and frame folders), uniform frame sampling, and the per-frame budgets of a video
sent to a model as images. Videos are encoded on the fly with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vlmzip.video import Video, frame_files, frame_knobs, read_video, sample_indices

W, H = 64, 48


def level(i: int) -> int:
    """The grey level of frame ``i`` of the test videos: far apart, so that lossy codecs keep them apart."""
    return (i * 37) % 200 + 20


def write_video(path: Path, n: int, codec: str = "mpeg4", rate: int = 10) -> Path:
    """A video of ``n`` flat grey frames, frame ``i`` of level ``level(i)``."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = W, H
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        container.start_encoding()
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), level(i), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def grey(image: Image.Image) -> float:
    return float(np.asarray(image, dtype=np.float64).mean())


def which_frame(image: Image.Image, n: int) -> int:
    """The frame of a test video an image shows (its nearest grey level)."""
    return min(range(n), key=lambda i: abs(grey(image) - level(i)))


@given(total=st.integers(1, 5000), data=st.data())
def test_sampled_indices_are_unique_sorted_in_range_and_as_many_as_asked(total: int, data) -> None:
    frames = data.draw(st.integers(1, total))
    indices = sample_indices(total, frames)
    assert len(indices) == frames
    assert indices == sorted(set(indices))
    assert 0 <= indices[0] and indices[-1] < total
    # the frame (time [k, k + 1)) holding the centre of each of the equal segments of [0, total)
    for i, index in enumerate(indices):
        assert index <= (2 * i + 1) * total / (2 * frames) < index + 1


def test_sampling_rule_examples() -> None:
    assert sample_indices(10, 1) == [5]
    assert sample_indices(12, 4) == [1, 4, 7, 10]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(100, 8) == [6, 18, 31, 43, 56, 68, 81, 93]


@pytest.mark.parametrize("total, frames, message", [
    (10, 11, "asked for 11 frames but the video has only 10"),
    (10, 0, "must be >= 1"),
    (0, 1, "no frames"),
])
def test_sampling_refuses_impossible_counts(total: int, frames: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_indices(total, frames)


@pytest.mark.parametrize("codec, suffix", [("mpeg4", ".mp4"), ("libx264", ".mkv"), ("mjpeg", ".avi")])
def test_a_video_file_gives_the_sampled_frames_their_times_and_rate(tmp_path: Path, codec: str, suffix: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path = write_video(tmp_path / f"clip{suffix}", 12, codec, rate=10)
    video = read_video(path, 4)
    assert isinstance(video, Video) and len(video) == 4
    assert video.indices == (1, 4, 7, 10) and video.total == 12
    assert [which_frame(f, 12) for f in video.frames] == [1, 4, 7, 10]
    assert all(f.mode == "RGB" and f.size == (W, H) for f in video.frames)
    assert video.fps == pytest.approx(10.0)
    assert video.timestamps == pytest.approx((0.1, 0.4, 0.7, 1.0))


def test_every_frame_of_a_file_can_be_asked(tmp_path: Path) -> None:
    video = read_video(write_video(tmp_path / "clip.mp4", 5), 5)
    assert [which_frame(f, 5) for f in video.frames] == [0, 1, 2, 3, 4]


def test_a_folder_of_frames_is_read_in_name_order_numbers_by_value(tmp_path: Path) -> None:
    for i in range(12):  # frame2.png must come before frame10.png
        Image.new("RGB", (W, H), (level(i),) * 3).save(tmp_path / f"frame{i}.png")
    (tmp_path / ".hidden.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [f.name for f in frame_files(tmp_path)][:3] == ["frame0.png", "frame1.png", "frame2.png"]
    video = read_video(tmp_path, 4)
    assert video.indices == (1, 4, 7, 10) and video.total == 12
    assert [which_frame(f, 12) for f in video.frames] == [1, 4, 7, 10]
    assert video.fps is None and video.timestamps is None


def test_bad_videos_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_video(tmp_path / "missing.mp4", 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 50)
    with pytest.raises(ValueError, match="cannot read video"):
        read_video(garbage, 4)
    with pytest.raises(ValueError, match="no frames"):  # a stream with zero frames
        read_video(write_video(tmp_path / "empty.avi", 0, "mjpeg"), 1)
    whole = write_video(tmp_path / "clip.mp4", 12).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cut.mp4"):  # truncated: its index is lost
        read_video(tmp_path / "cut.mp4", 4)
    with pytest.raises(ValueError, match="asked for 13 frames but the video has only 12; pass --frames 12"):
        read_video(tmp_path / "clip.mp4", 13)
    for frames in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="frames"):
            read_video(tmp_path / "clip.mp4", frames)


def test_bad_frame_folders_get_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no frame images"):
        read_video(empty, 1)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (W, H)).save(frames / f"{i:03d}.png")
    with pytest.raises(ValueError, match="asked for 4 frames but the video has only 3"):
        read_video(frames, 4)
    (frames / "001.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot read image .*001.png"):
        read_video(frames, 3)


def test_a_video_budget_splits_evenly_over_its_frames_sent_as_images() -> None:
    assert frame_knobs({"tokens": 136}, 8) == {"tokens": 17}
    assert frame_knobs({"tokens": 2048, "layer": 2}, 64) == {"tokens": 32, "layer": 2}
    assert frame_knobs({"tokens": 100}, 8) == {"tokens": 12}  # the remainder, 4, is not spent
    assert frame_knobs({"tokens_per_frame": 7}, 24) == {"tokens": 7}
    assert frame_knobs({"ratio": 0.25}, 8) == {"ratio": 0.25}
    assert frame_knobs({}, 8) == {}
    with pytest.raises(ValueError, match="tokens=7 is a budget per video, split evenly over its 8 frames"):
        frame_knobs({"tokens": 7}, 8)
    with pytest.raises(ValueError, match="not both"):
        frame_knobs({"tokens": 64, "tokens_per_frame": 8}, 8)
    with pytest.raises(ValueError, match="dominant and contextual count tokens per image"):
        frame_knobs({"dominant": 54, "contextual": 10}, 8)
