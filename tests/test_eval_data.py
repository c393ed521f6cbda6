"""Tests of the dataset folder format, loader, writer (vlmzip.eval.format) and lab cache (vlmzip.eval.data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmzip.cli import main
from vlmzip.eval import data
from vlmzip.eval.data import load_dataset
from vlmzip.eval.format import DatasetFormatError, content_hash, load_image, write_dataset
from vlmzip.eval.scorers import answer_vocabulary, normalize_answer
from vlmzip.lab import scenes
from vlmzip.lab.scenes import SplitSpec, write_split
from vlmzip.paths import cache_dir

N_IMAGES = 7


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("val")
    return folder, write_split("val", folder, n_images=N_IMAGES)


def test_round_trip(val_folder: tuple[Path, str]) -> None:
    folder, digest = val_folder
    records = load_dataset(folder)
    assert len(records) == 3 * N_IMAGES
    assert len({r.id for r in records}) == len(records)
    assert {r.type for r in records} == set(scenes.QUESTION_TYPES)
    first = records[0]
    assert first.id == "val-00000-0" and first.line == 1
    assert first.image_path.is_absolute() and first.image_path == (folder / "images/00000.png").resolve()
    assert isinstance(first.answers, list) and len(first.answers) == 1
    assert first.subtype is not None and "scene" in first.extra
    image = load_image(first)
    assert image.mode == "RGB" and image.size == (336, 336)
    # The stored scene graph answers the question and renders the stored image.
    scene = scenes.Scene.from_dict(first.extra["scene"])
    assert scenes.solve(scene, first.question) == first.answers[0]
    assert scenes.render(scene).tobytes() == image.tobytes()
    # Same content as sample() at that index.
    _, scene0, qas0 = scenes.sample(scenes.SPLITS["val"].seed, 0)
    assert scene == scene0 and first.question == qas0[0].question


def test_hash_and_meta(val_folder: tuple[Path, str], tmp_path: Path) -> None:
    folder, digest = val_folder
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["hash"] == digest == content_hash(folder)
    assert meta["split"] == "val" and meta["seed"] == scenes.SPLITS["val"].seed
    assert meta["generator_version"] == scenes.GENERATOR_VERSION
    assert meta["n_images"] == N_IMAGES and meta["n_questions"] == 3 * N_IMAGES
    assert meta["counts_by_type"] == {t: 3 for t in sorted(scenes.QUESTION_TYPES)}
    # Deterministic: a second write gives the same hash and byte-identical files.
    assert write_split("val", tmp_path, n_images=N_IMAGES) == digest
    assert (tmp_path / "data.jsonl").read_bytes() == (folder / "data.jsonl").read_bytes()
    assert (tmp_path / "images/00003.png").read_bytes() == (folder / "images/00003.png").read_bytes()
    # Any change of content changes the hash.
    assert write_split("val", tmp_path, n_images=N_IMAGES - 1, overwrite=True) != digest


def test_refuses_to_overwrite(val_folder: tuple[Path, str]) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        write_split("val", val_folder[0], n_images=1)
    with pytest.raises(ValueError, match="unknown split"):
        write_split("nope", val_folder[0])
    with pytest.raises(ValueError, match="n_images"):
        write_split("train", val_folder[0])


def test_answers_by_type_cover_every_gold_answer_of_the_generated_splits() -> None:
    vocabulary = {t: {normalize_answer(a) for a in answers} for t, answers in scenes.answers_by_type().items()}
    assert set(vocabulary) == set(scenes.QUESTION_TYPES)
    seen: dict[str, set[str]] = {t: set() for t in scenes.QUESTION_TYPES}
    streams = [(spec.seed, spec.n_images) for name, spec in scenes.SPLITS.items() if name != "train"]
    for seed, n_images in [*streams, (scenes.TRAIN_SEED, 700)]:  # test-small is a prefix of test
        for index in range(n_images):
            for qa in scenes.sample_scene(seed, index)[1]:
                seen[qa.type].add(normalize_answer(qa.answer))
    for qtype, answers in seen.items():
        assert answers <= vocabulary[qtype], f"{qtype}: {sorted(answers - vocabulary[qtype])} missing"
    assert seen["count"] == vocabulary["count"] == {str(n) for n in range(9)}  # 0 to 8, every one generated
    assert seen["color"] == vocabulary["color"] and seen["shape"] == vocabulary["shape"]
    assert vocabulary["presence"] == vocabulary["spatial"] == {"yes", "no"}
    assert vocabulary["detail"] == vocabulary["color"] | vocabulary["shape"]
    assert len(vocabulary["text"]) == len(scenes.WORDS) + 100 and "yes" not in vocabulary["text"]
    assert scenes.answers_by_type(scenes.SceneConfig(max_objects=5))["count"] == ("0", "1", "2", "3", "4", "5")


def test_dataset_vocabulary_of_a_lab_split_and_of_a_folder(val_folder: tuple[Path, str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = val_folder
    records = load_dataset(folder)
    own = data.dataset_vocabulary(str(folder), records)
    assert own == answer_vocabulary(records)  # a folder: the gold answers of its records
    full = data.dataset_vocabulary("lab-val", records[:3])  # a lab split: every answer, whatever subset
    for qtype, answers in scenes.answers_by_type().items():
        assert full[qtype] == {normalize_answer(a) for a in answers}
        assert own[qtype] <= full[qtype]
    assert own["text"] < full["text"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab-val").mkdir()  # a folder of that name takes precedence over the lab name, as for --data
    assert data.dataset_vocabulary("lab-val", records) == own
    assert data.data_folder("lab-val") == Path("lab-val")


def test_test_small_is_a_prefix_of_test() -> None:
    spec_small, spec_test = scenes.SPLITS["test-small"], scenes.SPLITS["test"]
    assert spec_small.seed == spec_test.seed and spec_small.n_images < spec_test.n_images
    assert spec_test.n_images * 3 >= 3000 and spec_test.n_images >= 1000
    assert len({s.seed for name, s in scenes.SPLITS.items() if name != "test-small"}) == 3


# --- a hand-made folder in the format, and every way it can be wrong ----------------------------------------


def make_folder(root: Path, lines: list[str], images: tuple[str, ...] = ("images/a.png",)) -> Path:
    for rel in images:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(root / rel)
    (root / "data.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


def good(**changes: object) -> str:
    record = {"id": "q1", "image": "images/a.png", "question": "Is it red?", "answers": ["yes"], "type": "color"}
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not None})


def test_any_folder_in_the_format_loads(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [good(), "", good(id="q2", answers=["yes", "red"], source="mine")])
    records = load_dataset(str(folder))
    assert [r.id for r in records] == ["q1", "q2"]
    assert records[1].line == 3 and records[1].extra == {"source": "mine"}
    assert records[1].answers == ["yes", "red"] and records[1].subtype is None
    assert load_image(records[0]).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([good(), "{not json"], ["line 2", "not valid JSON", '"answers"']),
        ([good(), good(id="q2"), good(id="q3", answers=None)], ["line 3", "missing field 'answers'"]),
        ([good(question=None)], ["line 1", "missing field 'question'"]),
        ([good(answers="yes")], ["line 1", "'answers' must be a non-empty list of strings"]),
        ([good(answers=[])], ["line 1", "'answers'"]),
        ([good(answers=[2])], ["line 1", "'answers'"]),
        ([good(id=3)], ["line 1", "'id' must be a string"]),
        ([good(type="")], ["line 1", "'type'"]),
        (["[1, 2]"], ["line 1", "expected a JSON object"]),
        ([good(), good(image="images/missing.png", id="q2")], ["line 2", "images/missing.png", "not found"]),
        ([good(), good()], ["line 2", "duplicate id 'q1'", "line 1"]),
        ([], ["no records"]),
    ],
)
def test_format_errors_name_the_line_and_field(tmp_path: Path, lines: list[str], expected: list[str]) -> None:
    folder = make_folder(tmp_path, lines)
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(folder)
    for fragment in expected:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("image", "why"),
    [
        ("../outside.png", "leaves the dataset folder"),
        ("images/../../outside.png", "leaves the dataset folder"),
        ("..\\outside.png", "leaves the dataset folder"),
        ("ABSOLUTE", "is an absolute path"),
        ("C:\\data\\outside.png", "is an absolute path"),
        ("C:outside.png", "is an absolute path"),
    ],
)
def test_image_paths_must_stay_inside_the_folder(tmp_path: Path, capsys, image: str, why: str) -> None:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)  # the file exists: the path is refused for where it points
    image = str(outside) if image == "ABSOLUTE" else image
    folder = make_folder(tmp_path / "data", [good(), good(id="q2", image=image)])
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(folder)
    assert f"line 2: image {image!r} {why}" in str(info.value) and "relative to the dataset folder" in str(info.value)

    out = tmp_path / "out"
    assert main(["eval", "--data", str(folder), "--out", str(out)]) == 2
    assert f"vlmzip eval: error: {folder / 'data.jsonl'}, line 2: image {image!r} {why}" in capsys.readouterr().err
    assert not out.exists(), "refused before anything is written"


def test_image_paths_inside_the_folder_may_go_through_a_symlink(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_folder(folder / "store", [])  # the images kept in a subfolder, linked as images/ and as one file
    (folder / "images").symlink_to(folder / "store" / "images")
    (folder / "store" / "b.png").symlink_to(folder / "store" / "images" / "a.png")
    make_folder(folder, [good(image="./images/a.png"), good(id="q2", image="store/b.png")], images=())
    first, second = load_dataset(folder)
    assert load_image(first).size == (8, 8) and load_image(second).size == (8, 8)
    assert first.image_path == second.image_path == (folder / "store" / "images" / "a.png").resolve()


@pytest.mark.parametrize("link", ["file", "folder"])
def test_a_symlink_may_not_lead_out_of_the_folder(tmp_path: Path, capsys, link: str) -> None:
    elsewhere = make_folder(tmp_path / "elsewhere", [], images=("images/ok.png",))  # a valid image, outside
    folder = make_folder(tmp_path / "data", [], images=("own/a.png",))
    if link == "file":  # images/link.png -> /elsewhere/images/ok.png
        (folder / "images").mkdir()
        (folder / "images" / "link.png").symlink_to(elsewhere / "images" / "ok.png")
        image = "images/link.png"
    else:  # images -> /elsewhere/images
        (folder / "images").symlink_to(elsewhere / "images")
        image = "images/ok.png"
    make_folder(folder, [good(image="own/a.png"), good(id="q2", image=image)], images=())
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(folder)
    message = str(info.value)
    assert f"line 2: image {image!r} is a symbolic link, or lies in a linked folder, that leads outside" in message
    assert str((elsewhere / "images" / "ok.png").resolve()) in message and "copy the image" in message

    out = tmp_path / "out"
    assert main(["eval", "--data", str(folder), "--out", str(out)]) == 2
    assert "leads outside the dataset folder" in capsys.readouterr().err
    assert not out.exists(), "refused before anything is written"


def test_write_dataset_refuses_a_linked_folder_that_leads_out(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(tmp_path / "elsewhere")
    record = {"id": "a", "image": "images/x.png", "question": "q", "answers": ["a"], "type": "count"}
    with pytest.raises(DatasetFormatError, match="leads outside the dataset folder"):
        write_dataset(tmp_path / "data", [("images/x.png", Image.new("RGB", (4, 4)), [record])])
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_write_dataset_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 4))
    record = {"id": "a", "image": "../x.png", "question": "q", "answers": ["a"], "type": "count"}
    with pytest.raises(DatasetFormatError, match="leaves the dataset folder"):
        write_dataset(tmp_path / "data", [("../x.png", image, [record])])
    assert not (tmp_path / "x.png").exists()


def test_missing_folder_or_jsonl(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="not a folder"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetFormatError, match="no data.jsonl"):
        load_dataset(tmp_path)
    assert issubclass(DatasetFormatError, ValueError)


def test_undecodable_image_fails_at_load_image(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [good()])
    (folder / "images/a.png").write_bytes(b"not a png at all")
    (record,) = load_dataset(folder)  # loading the records only checks that the file exists
    with pytest.raises(DatasetFormatError, match=r"record 'q1' \(data.jsonl line 1\): cannot decode image"):
        load_image(record)
    (folder / "images/a.png").unlink()
    with pytest.raises(DatasetFormatError, match="no longer exists"):
        load_image(record)


def test_write_dataset_validates_records(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 4))
    with pytest.raises(DatasetFormatError, match="missing field 'type'"):
        write_dataset(tmp_path, [("images/x.png", image, [{"id": "a", "image": "images/x.png", "question": "q",
                                                            "answers": ["a"]}])])  # fmt: skip


# --- lab names and the cache --------------------------------------------------------------------------------


def test_lab_name_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path))
    monkeypatch.setitem(scenes.SPLITS, "test-small", SplitSpec(seed=2002, n_images=7, id_prefix="test"))
    monkeypatch.delitem(scenes.EXPECTED_HASHES, "test-small")
    records = load_dataset("lab-test-small")
    assert len(records) == 21 and records[0].id == "test-00000-0"
    folder = tmp_path / "data" / f"lab-test-small-v{scenes.GENERATOR_VERSION}"
    assert records[0].image_path.is_relative_to(folder.resolve())
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the temporary folder is gone

    def fail(*args: object, **kwargs: object) -> str:
        raise AssertionError("regenerated a valid cache")

    monkeypatch.setattr(scenes, "write_split", fail)
    assert [r.id for r in load_dataset("lab-test-small")] == [r.id for r in records]
    monkeypatch.undo()

    # A corrupted image no longer matches meta.json's hash: warn and regenerate.
    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path))
    monkeypatch.setitem(scenes.SPLITS, "test-small", SplitSpec(seed=2002, n_images=7, id_prefix="test"))
    monkeypatch.delitem(scenes.EXPECTED_HASHES, "test-small")
    Image.new("RGB", (336, 336)).save(folder / "images/00002.png")
    with pytest.warns(UserWarning, match="hash mismatch"):
        again = load_dataset("lab-test-small")
    assert len(again) == 21
    assert load_image(again[6]).tobytes() == scenes.sample(2002, 2)[0].tobytes()


def test_reference_hash_of_test_small(tmp_path: Path) -> None:
    """The generator's output is pinned: changing it must bump GENERATOR_VERSION and EXPECTED_HASHES."""
    assert write_split("test-small", tmp_path) == scenes.EXPECTED_HASHES["test-small"]


def test_reference_hash_mismatch_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path))
    monkeypatch.setitem(scenes.SPLITS, "test-small", SplitSpec(seed=2002, n_images=1, id_prefix="test"))
    with pytest.warns(UserWarning, match="differs from the reference"):
        assert len(load_dataset("lab-test-small")) == 3


def test_unknown_lab_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    with pytest.raises(ValueError, match="unknown lab dataset"):
        data.ensure_lab_dataset("lab-nope")
    with pytest.raises(DatasetFormatError, match="lab-test"):
        load_dataset("lab-nope")
