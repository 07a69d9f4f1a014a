"""The ranks of a tensor-parallel run: checking N, starting or joining the process group, and
spawning follower ranks when no launcher (torchrun) started them.

A rank's `TensorParallel` holds two groups over the same ranks: ``group`` for the tensors of a
forward (NCCL on CUDA, gloo on a CPU) and ``control``, always gloo, for the host's messages (the
driver's operations, `kad.parallel.runtime`). Rank r runs on ``cuda:r`` (its local rank under
torchrun) or on the CPU.
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kad.errors import KadError
from kad.eval.data_parallel import free_port, keep_multicast_off
from kad.parallel.shard import check_sizes

# Followers wait on the driver between requests: an idle server must not time them out
# (KAD_TP_TIMEOUT, in seconds, shortens it: tests, batch jobs).
IDLE_TIMEOUT = datetime.timedelta(days=365)


def check_size(tensor_parallel: Any, device: torch.device) -> int:
    """``tensor_parallel`` as an int N ≥ 1 (None: 1); on CUDA at most the GPUs present."""
    n = 1 if tensor_parallel is None else tensor_parallel
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KadError(f"tensor_parallel must be an integer >= 1, got {tensor_parallel!r}")
    if n > 1 and device.type == "cuda" and n > torch.cuda.device_count():
        raise KadError(
            f"tensor_parallel={n} needs {n} GPUs, and {torch.cuda.device_count()} are present"
        )
    if n > 1 and device.type not in ("cuda", "cpu"):
        raise KadError(f"tensor parallelism runs on CUDA GPUs or the CPU, not {device.type}")
    return n


def check_shardable(config: Any, n: int, name: str = "the base") -> None:
    """`KadError` unless each of N ranks gets at least one of the KV heads and of the MLP
    columns of ``config`` (a transformers config; `kad.parallel.shard.check_sizes`), read
    before any weights load."""
    text = getattr(config, "text_config", None) or config
    kv_heads = getattr(text, "num_key_value_heads", None) or getattr(
        text, "num_attention_heads", None
    )
    check_sizes(kv_heads, getattr(text, "intermediate_size", None), n, name)


def check_model_shardable(spec: str | os.PathLike, n: int) -> None:
    """`check_shardable` on a model directory or Hub id's config.json (GGUF files are checked
    once loaded)."""
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(str(spec)).expanduser()
    if path.is_file():
        return
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else str(spec))
    except (OSError, ValueError):
        return  # the loader reports a missing or unreadable model in its own words
    check_shardable(config, n, str(spec))


@dataclass
class TensorParallel:
    """This process's place among the N ranks (module doc)."""

    rank: int
    world: int
    device: torch.device
    group: dist.ProcessGroup
    control: dist.ProcessGroup
    followers: list[Any] = field(default_factory=list)  # processes this rank spawned

    @property
    def driver(self) -> bool:
        """Rank 0 decides; the others follow."""
        return self.rank == 0

    def broadcast(self, message: Any = None) -> Any:
        """Rank 0's ``message`` on every rank (pickled, over the control group)."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        """Leave the process group; the driver waits for the followers it spawned."""
        if dist.is_initialized():
            dist.destroy_process_group()
        for process in self.followers:
            process.join(timeout=60)
        self.followers = []


def join(n: int, device: torch.device, rank: int, init_method: str) -> TensorParallel:
    """Join the N ranks as ``rank`` (``init_method``: "env://" under torchrun, or a tcp://
    address); the device is rank's own GPU (its local rank under torchrun) or the CPU."""
    keep_multicast_off()  # NVLink multicast off: the README's "Tensor parallelism"
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = IDLE_TIMEOUT
    if os.environ.get("KAD_TP_TIMEOUT"):
        timeout = datetime.timedelta(seconds=float(os.environ["KAD_TP_TIMEOUT"]))
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=n, timeout=timeout
    )
    group = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else group
    return TensorParallel(rank, n, device, group, control)


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()


def launch(n: int, device: torch.device, build: Callable[[TensorParallel], Any]) -> Any:
    """Start the N ranks and ``build`` each rank's aligner (or any object with ``follow()``
    and ``close()``: the bench's) with its `TensorParallel`; rank 0's is returned. Under
    torchrun this process is the rank torchrun made it: a follower rank runs ``built.follow()``
    (it follows the driver) and exits when it returns. Otherwise this process is rank 0 and
    spawns ranks 1..N−1 (``build`` must then be picklable: a module-level function or a
    partial of one). The driver's ``close`` runs at exit if not before."""
    if launched():
        world = int(os.environ["WORLD_SIZE"])
        if world != n:
            raise KadError(f"tensor_parallel={n}, but torchrun started {world} ranks")
        tp = join(n, device, int(os.environ["RANK"]), "env://")
        built = build(tp)
        if not tp.driver:
            built.follow()
            tp.close()
            raise SystemExit(0)
        if hasattr(built, "close"):
            atexit.register(built.close)
        return built
    import torch.multiprocessing as mp

    init = f"tcp://127.0.0.1:{free_port()}"
    context = mp.get_context("spawn")
    followers = [
        context.Process(target=_follow, args=(rank, n, device, init, build), daemon=True)
        for rank in range(1, n)
    ]
    for process in followers:
        process.start()
    tp = join(n, device, 0, init)
    tp.followers = followers
    built = build(tp)
    if hasattr(built, "close"):
        atexit.register(built.close)
    return built


def _follow(
    rank: int, n: int, device: torch.device, init: str, build: Callable[[TensorParallel], Any]
) -> None:
    """A spawned follower rank: build, follow the driver until it stops, leave. It ignores
    SIGINT: a terminal's Ctrl-C reaches the whole process group, and the driver, shutting down
    on it, stops its followers itself (were a follower gone first, the driver's stop fails)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tp = join(n, device, rank, init)
    with torch.inference_mode():
        build(tp).follow()
    tp.close()
