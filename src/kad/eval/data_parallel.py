"""Data-parallel evaluation on torch.distributed: the examples of a task shared among N ranks.

``torchrun --nproc-per-node N -m kad eval ...`` starts the ranks itself; ``kad eval
--data-parallel N`` spawns them (`spawn`), each with the environment torchrun would give it.
Every rank loads the models on its own device (``cuda:LOCAL_RANK`` on GPUs, with NCCL; the CPU,
with gloo) and joins the process group (`joined_ranks`). Which examples a rank takes and where
its records go is `kad.eval.runner`'s business (`Ranks.owns`). NVLink multicast stays off
wherever ranks start (`MULTICAST_OFF`).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from kad.errors import KadError

T = TypeVar("T")
# Set (unless already set) wherever ranks start: NVLink SHARP / multicast off.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# How long a rank waits at a barrier for the others: a shard can take much longer than another.
BARRIER_TIMEOUT = timedelta(hours=12)
INTERRUPTED = 130  # the exit code of a rank stopped by Ctrl-C (128 + SIGINT), as a shell's


def keep_multicast_off() -> None:
    """`MULTICAST_OFF` into the environment, leaving values the user set."""
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: rank ``rank`` of ``world``, on GPU ``local_rank`` (if
    any). ``Ranks()`` is a single process, whose collectives do nothing."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that merges, summarizes and reports."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether example number ``index`` (of the task's examples) is this rank's."""
        return index % self.world == self.rank

    def label(self, name: str) -> str:
        """``gsm8k (rank 0 of 2)``, or just ``gsm8k`` in a single process."""
        return name if self.world == 1 else f"{name} (rank {self.rank} of {self.world})"

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` (picklable), on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_world() -> int | None:
    """The number of ranks a launcher (torchrun, `spawn`) started this process among, from
    ``WORLD_SIZE``; None when no launcher started it."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def check_data_parallel(requested: int | None, device: str | None) -> int:
    """The number of ranks a run takes: ``requested`` (``--data-parallel``), else the
    launcher's, else 1. A `KadError`, raised before any weights load, for fewer than 1 rank,
    more ranks than GPUs on CUDA, a ``--data-parallel`` other than torchrun's number of ranks,
    or one GPU index for several ranks."""
    launched = launched_world()
    if requested is not None and requested < 1:
        raise KadError(f"--data-parallel takes a number of ranks >= 1, got {requested}")
    if requested is not None and launched is not None and requested != launched:
        raise KadError(
            f"--data-parallel {requested} under a launcher that started {launched} ranks: "
            "leave --data-parallel out under torchrun"
        )
    world = requested or launched or 1
    if world == 1:
        return world
    import torch

    on_cuda = device.startswith("cuda") if device is not None else torch.cuda.is_available()
    if on_cuda and device not in (None, "cuda"):
        raise KadError(
            f"--device {device} names one GPU, but each of the {world} ranks takes its own "
            "(cuda:LOCAL_RANK): give --device cuda"
        )
    gpus = torch.cuda.device_count()
    if on_cuda and world > gpus:
        raise KadError(f"{world} data-parallel ranks on CUDA, but {gpus} GPU(s) are present")
    return world


def rank_device(device: str | None, ranks: Ranks) -> str | None:
    """The device this rank loads the models on: ``cuda:LOCAL_RANK`` when a run of several
    ranks is on CUDA, else ``device`` as given (None: auto)."""
    if ranks.world == 1:
        return device
    import torch

    on_cuda = device.startswith("cuda") if device is not None else torch.cuda.is_available()
    return f"cuda:{ranks.local_rank}" if on_cuda else device


@contextmanager
def joined_ranks(device: str | None) -> Iterator[Ranks]:
    """This process's `Ranks`, inside the process group of the ranks its launcher started
    (NCCL on CUDA, gloo otherwise), left on exit; a single process outside a launcher."""
    world = launched_world()
    if world is None or world == 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    keep_multicast_off()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it; ranks spawned here share cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    on_cuda = (rank_device(device, ranks) or "").startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(
        "nccl" if on_cuda else "gloo",
        timeout=BARRIER_TIMEOUT,
        device_id=torch.device("cuda", ranks.local_rank) if on_cuda else None,
    )
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for the ranks' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, target: Callable[[Any], None], arg: Any) -> None:
    """One spawned rank: torchrun's environment, then ``target(arg)``; a `KadError` is its
    message on stderr and exit code 2, Ctrl-C exit code 130 (the parent says what is saved)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        target(arg)
    except KadError as err:
        print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)


def spawn(world: int, target: Callable[[T], None], arg: T) -> None:
    """Run ``target(arg)`` in ``world`` fresh processes, ranks 0..world-1 of one host (start
    method spawn), and wait for them all. When one fails the others are stopped and a
    `KadError` says which one and how; what the ranks wrote stays. A rank stopped by Ctrl-C
    raises KeyboardInterrupt here."""
    import torch.multiprocessing as mp

    keep_multicast_off()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        mp.start_processes(
            _rank_main,
            args=(world, free_port(), target, arg),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessExitedException as failed:
        if failed.exit_code == INTERRUPTED or failed.signal_name == "SIGINT":
            raise KeyboardInterrupt from None
        how = (
            f"was killed by {failed.signal_name}"
            if failed.signal_name
            else f"exited with code {failed.exit_code}"
        )
        raise KadError(
            f"rank {failed.error_index} of {world} {how}; the records written so far are kept: "
            "run the same command again to resume"
        ) from None
    except mp.ProcessRaisedException as failed:
        print(failed, file=sys.stderr, flush=True)  # the rank's traceback
        raise KadError(f"rank {failed.error_index} of {world} failed (traceback above)") from None
