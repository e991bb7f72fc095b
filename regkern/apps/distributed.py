"""torchrun support of the apps: this process's rank, its device, and the process group of the run.

torchrun (``python -m torch.distributed.run``) sets WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and the
rendezvous address in the environment of each process; ``join`` reads them, picks ``cuda:LOCAL_RANK`` (NCCL) or the
CPU (gloo) and initialises the default process group. Without torchrun (or with one process) it is one rank on the
device ``--device`` names, and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .demo import resolve_device

__all__ = ["RankContext", "join", "default_workers"]


@dataclass
class RankContext:
    """Where this process stands in the run: ``rank`` of ``world_size`` (``local_rank`` of ``local_world_size`` on
    its node), its ``device``, and the process-group ``backend`` ("nccl", "gloo"; None for one process)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """Destroy the process group if ``join`` created it (idempotent)."""
        if self.owns_group:
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}: expected an integer (as torchrun sets it), got {value!r}"
        ) from None


def join(device: Optional[str]) -> RankContext:
    """This process's place in a torchrun launch (or a one-process run), its process group initialised.

    ``device`` is the ``--device`` argument: None (cuda when available), "cpu" or "cuda"; under torchrun with more
    than one process every rank takes ``cuda:LOCAL_RANK``, so an explicit "cuda:N" is refused there."""
    if dist.is_available() and dist.is_initialized():  # a caller's own distributed program: its group, its ranks
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        owns = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        owns = world > 1
    resolved = resolve_device(device)
    if world <= 1:
        return RankContext(resolved)
    if not dist.is_available():
        raise ValueError("torchrun: this torch build has no torch.distributed (torch.distributed.is_available())")
    if resolved.type == "cuda":
        if device is not None and ":" in device:
            raise ValueError(
                f"--device: under torchrun every rank uses cuda:LOCAL_RANK; pass --device cuda, got {device!r}"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"--device: local rank {local_rank} needs cuda:{local_rank}, but torch sees {count} CUDA GPU(s) "
                f"(--nproc_per_node must not exceed the GPUs of a node)"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if owns:
        dist.init_process_group(backend)
    else:
        backend = dist.get_backend()
        if backend == "nccl" and resolved.type != "cuda":
            raise ValueError(f"--device: the process group is NCCL, which needs CUDA tensors; got {resolved}")
    return RankContext(resolved, rank, world, local_rank, local_world, backend, owns)


def default_workers(local_world_size: int = 1) -> int:
    """DataLoader workers per rank when ``--workers`` is not given: 4, or fewer when the node's CPUs are shared by
    fewer than 5 per local rank (one stays for the rank itself)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus // max(local_world_size, 1) - 1))
