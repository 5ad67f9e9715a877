"""torch.distributed set-up for torchrun (env://) and plain single-process runs, and every
collective the training and evaluation code uses.

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``; when they are
present the process group is initialised from them (NCCL on CUDA, gloo on CPU), otherwise the run
is a single process and every collective below is a no-op (or returns its input).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistEnv", "env_world_size", "init_distributed", "cleanup", "barrier", "all_reduce_sum",
           "all_ranks_sum", "gather_lists", "broadcast_buffers", "is_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among ``world_size`` processes, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def eval_batch(self, global_batch: int) -> int:
        """This process's evaluation batch for a global ``global_batch``: ``ceil(global_batch / world_size)``.
        Evaluation shards the images (each on exactly one process, :class:`n2uq.data.ShardSampler`) and
        sums over processes, so any batch size gives the same numbers; none needs to divide it."""
        return -(-global_batch // self.world_size)


def env_world_size() -> int:
    """The number of processes torchrun launched (1 without torchrun). Safe before any init."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def pick_device(name: str, local_rank: int) -> torch.device:
    """``auto`` → this process's GPU when CUDA is available, else CPU; ``cpu`` / ``cuda``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistEnv:
    """Initialise the process group when launched by torchrun; return this process's place."""
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        try:
            dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        except TypeError:  # torch without the device_id argument
            dist.init_process_group(backend=backend, init_method="env://")
    return DistEnv(rank, world_size, local_rank, local_world, dev)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over all processes (in place; returned for chaining)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_ranks_sum(values: Sequence[float], device: Optional[torch.device] = None) -> List[float]:
    """``values`` summed element-wise over all processes (as given in a single process).

    The way ranks agree on a per-step decision (skip a batch, stop with an error) so none of them
    is left waiting in a collective the others never enter.
    """
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device or torch.device("cpu"))
    return all_reduce_sum(t).tolist()


def gather_lists(items: List[Any]) -> List[Any]:
    """Concatenation of every process's ``items`` (rank order), on every process; call on all ranks."""
    if not is_distributed():
        return list(items)
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics), the state rank 0 saves."""
    if is_distributed():
        for buf in model.buffers():
            dist.broadcast(buf, src=src)
