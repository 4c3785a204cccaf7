"""``torch.distributed`` set-up from ``torchrun``'s environment, and the few collectives training needs.

``torchrun --nproc-per-node N -m nestvit train RECIPE`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them training runs as one process.
The backend is NCCL on CUDA and gloo on the CPU. Rank 0 alone prints and writes files; metrics are
summed over ranks with ``all_reduce``.

``spawn_local`` starts ``world_size`` CPU processes on 127.0.0.1 (what the tests use, and a way to
try DDP on one machine without torchrun).
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError


class DeviceError(UserError, RuntimeError):
    """The device asked for is not there (``--device cuda`` without a visible GPU)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``"cpu"``, ``"cuda"`` (this process's local GPU) or None (CUDA when available)."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", local_rank if name == "cuda" else torch.device(name).index)
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; choose cpu or cuda")
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's variables (or return a single-process ``DistInfo``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown(info: DistInfo) -> None:
    """Leave the process group. Callers drop their models and optimizers first: gloo can abort at
    interpreter exit when DDP objects outlive the group, so collect garbage before destroying it."""
    gc.collect()
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# local multi-process launch (CPU, gloo)
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, threads: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    fn(*args)


def spawn_local(world_size: int, fn: Callable[..., Any], *args: Any, threads: int = 1) -> None:
    """Run ``fn(*args)`` in ``world_size`` fresh processes that form a gloo group on 127.0.0.1.

    ``fn`` must be importable (a module-level function). Raises if any process fails.
    """
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)
