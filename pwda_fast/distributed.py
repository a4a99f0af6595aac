"""torchrun detection and the few collectives the loop needs (no-ops in one process)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> Dist:
    """Join the process group when torchrun set RANK (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ["WORLD_SIZE"]))
    if info.world > 1 and not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return info


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world
    return values


def all_true(flag: bool, device, info: Dist) -> bool:
    """True only if `flag` is true on every rank (so all ranks skip a step together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0.0


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()
