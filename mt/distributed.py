"""PyTorch's own distributed engine, set up from torchrun's environment (never a home-made one).

    torchrun --nproc_per_node=2 -m mt.pipeline recipe=multi30k_en_de      # 2 processes, gloo on CPU
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 -m mt.pipeline ...  # nccl

Without torchrun (no WORLD_SIZE), everything here degrades to a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_name: str) -> Context:
    """Join the process group torchrun describes (idempotent); returns this process's context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, device)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: Context, values: List[float]) -> List[float]:
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(ctx: Context, obj: Any) -> Any:
    """rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: Context, obj: Any) -> List[Any]:
    """Every rank's `obj`, on every rank (small objects only, e.g. RNG states)."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
