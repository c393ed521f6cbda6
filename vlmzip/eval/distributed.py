"""Data-parallel evaluation: the processes that ``torchrun`` / ``accelerate launch`` start, and their share.

A launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``) in each
process's environment; without them ``vlmzip eval`` is one process, as always. With ``WORLD_SIZE > 1`` the
processes form a ``torch.distributed`` group with the gloo backend (CPU tensors only, whatever device the
model runs on: the group only synchronises and passes small Python objects, never activations).

The share of a process is a set of whole batches: the questions are cut into consecutive batches of
``--batch-size`` exactly as a single process cuts them, and process ``r`` of ``w`` answers batches
``r, r + w, r + 2w, ...``. Every batch therefore holds the same questions, padded the same way, as in a
single-process run, so the answers are the same (not merely the same up to batch effects), whatever the
number of processes.

Rank 0 does everything that touches the folder's shared files (checks, the folder's lock, identity.json,
the merge, scores, results.json and the reports); a ``ValueError`` it raises there is relayed to every
process, which exit with the same message (printed once, by rank 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

# How long a process waits for the others (at the end, for the slowest rank to finish its share; at the
# start, for rank 0 to generate a lab split): long, since a resumed run may leave one rank far more to do.
# A process that dies makes the launcher stop the others long before.
WAIT_TIMEOUT = timedelta(hours=24)


class RelayedError(ValueError):
    """An error raised on rank 0 and re-raised on the other ranks; rank 0 reports it, they stay quiet."""

    relayed = True


@dataclass(frozen=True)
class Processes:
    """This process's place among the evaluation's processes (rank 0 of 1 when not launched in parallel)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its result sent to every rank; its ``ValueError`` raised on every rank."""
        if not self.parallel:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as err:  # every rank must leave, not wait for rank 0 forever
                failure = err
                kind = "value" if isinstance(err, ValueError) else "crash"
                box[0] = (kind, f"{type(err).__name__}: {err}" if kind == "crash" else str(err))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if failure is not None:
            raise failure
        if status == "value":
            raise RelayedError(value)
        if status == "crash":
            raise RuntimeError(f"rank 0 failed ({value})")
        return value

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.parallel:
            return [obj]
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, obj)
        return everyone

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()

    def share(self, items: list[T], batch_size: int) -> list[T]:
        """This rank's items: the whole batches ``rank, rank + world, ...`` of ``items`` cut into consecutive
        batches of ``batch_size`` (in order; a single process gets every item)."""
        return [
            item
            for start in range(self.rank * batch_size, len(items), self.world * batch_size)
            for item in items[start : start + batch_size]
        ]

    def device(self, device: str) -> str:
        """The device this rank runs on: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` when launched in parallel
        (one GPU per process); anything else (``cpu``, an explicit ``cuda:N``) is used as given."""
        if not self.parallel or device != "cuda":
            return device
        import torch

        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(
                f"process {self.rank} has LOCAL_RANK {self.local_rank} but this machine has {count} CUDA device(s): "
                "start at most one process per GPU (torchrun --nproc_per_node N with N <= the GPUs)"
            )
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def from_env(env: dict[str, str] | None = None) -> Processes:
    """The processes a launcher describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process without)."""
    env = dict(os.environ) if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a group")
    return Processes(rank=rank, world=world, local_rank=local_rank)


@contextmanager
def launched(env: dict[str, str] | None = None) -> Iterator[Processes]:
    """The processes of this launch, joined in a gloo process group for the block when there are several.

    A group initialised by the caller is used as it is (and left open); one initialised here is destroyed
    on leaving.
    """
    procs = from_env(env)
    if not procs.parallel:
        yield procs
        return
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        env = dict(os.environ) if env is None else env
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={procs.world} is set but {' and '.join(missing)} not: start parallel evaluations "
                "with torchrun --nproc_per_node N or accelerate launch"
            )
        dist.init_process_group("gloo", rank=procs.rank, world_size=procs.world, timeout=WAIT_TIMEOUT)
        created = True
    elif dist.get_world_size() != procs.world or dist.get_rank() != procs.rank:
        raise ValueError(
            f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not the one "
            f"RANK={procs.rank} / WORLD_SIZE={procs.world} describe"
        )
    try:
        yield procs
    finally:
        if created:
            dist.destroy_process_group()
