"""vlmzip's one cache folder (vlmzip.paths.cache_dir) and the places that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmzip import io
from vlmzip.eval import data
from vlmzip.lab import scenes
from vlmzip.lab.scenes import SplitSpec
from vlmzip.paths import cache_dir


def test_cache_dir_is_vlmzip_cache_else_xdg_else_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"  # the folder itself, no "vlmzip" appended
    monkeypatch.setenv("VLMZIP_CACHE", "~/c")
    assert cache_dir() == tmp_path / "home" / "c"
    monkeypatch.setenv("VLMZIP_CACHE", "")  # empty counts as unset
    assert cache_dir() == tmp_path / "xdg" / "vlmzip"
    monkeypatch.delenv("VLMZIP_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "vlmzip"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says to ignore it
    assert cache_dir() == tmp_path / "home" / ".cache" / "vlmzip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "vlmzip"


def test_lab_datasets_go_to_the_one_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path))
    monkeypatch.setitem(scenes.SPLITS, "test-small", SplitSpec(seed=2002, n_images=1, id_prefix="test"))
    monkeypatch.delitem(scenes.EXPECTED_HASHES, "test-small")
    dataset = data.ensure_lab_dataset("lab-test-small")
    assert dataset == tmp_path / "data" / f"lab-test-small-v{scenes.GENERATOR_VERSION}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_install_without_the_lab_model_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model is the lab model shipped in the package; nothing is built in its place."""
    monkeypatch.setattr(io, "checkpoint_dir", lambda: None)
    with pytest.raises(ValueError, match="has no lab checkpoint .*pass --model DIR"):
        io.default_model_dir()
