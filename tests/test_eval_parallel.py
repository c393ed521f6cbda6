"""`vlmzip eval` sharded over processes (torchrun, gloo, CPU): the same results as one process; resuming."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmzip.cli import main
from vlmzip.eval.distributed import Processes, from_env
from vlmzip.lab.scenes import write_split

ROOT = Path(__file__).resolve().parents[1]
# 6 questions in batches of 2: rank 0 of 2 answers batches 0 and 2, rank 1 batch 1 (an uneven share)
ARGS = ["--methods", "vanilla,visionzip,random", "--tokens", "16", "--limit", "6", "--batch-size", "2",
        "--max-new-tokens", "3", "--device", "cpu"]
KEYS = ["vanilla", "visionzip@16", "random@16"]
# 5 two-turn conversations in batches of 2: rank 0 of 2 answers batches 0 and 2 (3 conversations), rank 1 batch 1
MULTI_TURN_ARGS = ["--multi-turn", "--methods", "vanilla,visionzip", "--tokens", "16", "--limit", "5",
                   "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu"]
MULTI_TURN_KEYS = ["vanilla", "visionzip@16"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "val3"
    write_split("val", out, n_images=3)
    return out


def eval_args(llava_dir: Path, data_dir: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(llava_dir), "--data", str(data_dir), "--out", str(out), *ARGS]


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "vlmzip.cli", *argv]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def results(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    data["config"].pop("out")
    return data


def predictions(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "predictions").iterdir())}


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def single(llava_dir, data_dir, tmp_path_factory) -> Path:
    """The reference: the same evaluation in one process."""
    out = tmp_path_factory.mktemp("single") / "ev"
    assert main(eval_args(llava_dir, data_dir, out)) == 0
    return out


def test_share_is_whole_batches_round_robin():
    items = list(range(7))
    assert Processes(0, 2).share(items, 2) == [0, 1, 4, 5]
    assert Processes(1, 2).share(items, 2) == [2, 3, 6]
    assert Processes(2, 3).share(items, 2) == [4, 5]
    assert Processes().share(items, 3) == items
    shares = [Processes(r, 3).share(items, 2) for r in range(3)]
    assert sorted(i for s in shares for i in s) == items


def test_from_env():
    assert from_env({}) == Processes(0, 1, 0)
    assert from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Processes(1, 2, 1)
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        from_env({"WORLD_SIZE": "two"})


def test_two_processes_give_the_single_process_results_and_resume(llava_dir, data_dir, single, tmp_path):
    # fresh, 2 processes
    out = tmp_path / "ddp"
    run = torchrun(2, eval_args(llava_dir, data_dir, out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("| vanilla |") == 1, "only rank 0 prints the table"
    assert "vlmzip eval (process 1 of 2)" in run.stderr and "12/12" in run.stderr, "rank 0 answers its share: 4 x 3"
    assert results(out) == results(single), "same scores and columns"
    assert predictions(out) == predictions(single), "same per-question predictions, merged, per-rank files gone"
    assert (out / "table.md").read_text() == (single / "table.md").read_text()
    assert (out / "plot.png").read_bytes() == (single / "plot.png").read_bytes()

    # an interrupted 2-process run (per-rank files, one torn line) next to a 1-process one (merged file):
    # resumed with 2 processes, then the folder is the single-process one again
    partial = tmp_path / "partial"
    (partial / "predictions").mkdir(parents=True)
    shutil.copy(single / "identity.json", partial / "identity.json")
    reference = {key: rows((single / "predictions" / f"{key}.jsonl").read_text()) for key in KEYS}
    folder = partial / "predictions"
    (folder / "vanilla.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference["vanilla"][:3]))
    (folder / "visionzip@16.rank0-of-2.jsonl").write_text(json.dumps(reference["visionzip@16"][0]) + '\n{"id": "to')
    (folder / "visionzip@16.rank1-of-2.jsonl").write_text(json.dumps(reference["visionzip@16"][2]) + "\n")
    run = torchrun(2, eval_args(llava_dir, data_dir, partial))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert results(partial) == results(single)
    merged = predictions(partial)
    assert sorted(merged) == sorted(f"{key}.jsonl" for key in KEYS)
    for key in KEYS:
        assert rows(merged[f"{key}.jsonl"]) == reference[key], key


def test_one_process_resumes_a_parallel_run(llava_dir, data_dir, single, tmp_path, monkeypatch):
    """Per-rank files of another launch (here: 3 processes, interrupted) are merged by a later single process,
    which answers only what is missing."""
    from vlmzip.eval import runner

    out = tmp_path / "ev"
    (out / "predictions").mkdir(parents=True)
    shutil.copy(single / "identity.json", out / "identity.json")
    answered = 0
    for key in KEYS:
        ref = rows((single / "predictions" / f"{key}.jsonl").read_text())
        for rank in range(3):
            mine = Processes(rank, 3).share(ref, 2)[:1]  # each rank answered one question of its share
            answered += len(mine)
            path = out / "predictions" / f"{key}.rank{rank}-of-3.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in mine))
    asked = []
    real = runner.answer_batch

    def counting(model, processor, records, max_new_tokens):
        asked.extend(r.id for r in records)
        return real(model, processor, records, max_new_tokens)

    monkeypatch.setattr(runner, "answer_batch", counting)
    assert main(eval_args(llava_dir, data_dir, out)) == 0
    assert len(asked) == 3 * 6 - answered, "only the missing questions are answered"
    assert results(out) == results(single)
    assert predictions(out) == predictions(single)


def test_world_size_without_a_launcher_is_a_clear_error(llava_dir, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(eval_args(llava_dir, data_dir, tmp_path / "ev")) == 2
    assert "torchrun --nproc_per_node N or accelerate launch" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images for 5 two-turn conversations."""
    out = tmp_path_factory.mktemp("data") / "val10"
    write_split("val", out, n_images=10)
    return out


def test_multi_turn_in_two_processes_gives_the_single_process_results_and_resumes(llava_dir, pairs_dir, tmp_path):
    def argv(out: Path) -> list[str]:
        return ["eval", "--model", str(llava_dir), "--data", str(pairs_dir), "--out", str(out), *MULTI_TURN_ARGS]

    single = tmp_path / "single"
    assert main(argv(single)) == 0
    assert results(single)["n_conversations"] == 5
    out = tmp_path / "ddp"
    run = torchrun(2, argv(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("| vanilla |") == 1, "only rank 0 prints the table"
    assert "vlmzip eval --multi-turn (process 1 of 2)" in run.stderr and "6/6" in run.stderr, "rank 0: 3 x 2"
    assert results(out) == results(single)
    assert predictions(out) == predictions(single), "same conversations and answers, merged, per-rank files gone"
    assert (out / "table.md").read_text() == (single / "table.md").read_text()

    # an interrupted 2-process run (per-rank files, a torn line), resumed by 2 processes
    partial = tmp_path / "partial"
    (partial / "predictions").mkdir(parents=True)
    shutil.copy(single / "identity.json", partial / "identity.json")
    reference = {key: rows((single / "predictions" / f"{key}.jsonl").read_text()) for key in MULTI_TURN_KEYS}
    folder = partial / "predictions"
    (folder / "vanilla.rank0-of-2.jsonl").write_text(json.dumps(reference["vanilla"][0]) + '\n{"id": "to')
    (folder / "vanilla.rank1-of-2.jsonl").write_text(json.dumps(reference["vanilla"][3]) + "\n")
    (folder / "visionzip@16.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference["visionzip@16"][:4]))
    run = torchrun(2, argv(partial))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "3/3" in run.stderr, "rank 0 answers only what its share (conversations 0, 1, 4) misses: 2 + 1"
    assert results(partial) == results(single)
    assert predictions(partial) == predictions(single)


def test_a_parallel_launch_into_a_folder_being_written_is_refused_by_every_process(llava_dir, data_dir, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    with (out / ".lock").open("w") as first:  # an eval that is writing to the folder holds its lock
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = torchrun(2, eval_args(llava_dir, data_dir, out))
    assert run.returncode != 0
    assert run.stderr.count("another vlmzip eval is writing to this folder") == 1, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"], "the refused launch wrote nothing"
