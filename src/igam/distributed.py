"""torchrun / DistributedDataParallel plumbing of the training loop (docs/DISTRIBUTED.md).

Without torchrun (WORLD_SIZE unset or 1) every helper is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from igam.utils import resolve_device


@dataclass
class Dist:
    """torchrun's environment: rank, world size, local rank (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); no-op without torchrun.

    Raises:
        IgamError: for a device name that is no device (see igam.utils.resolve_device).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as tdist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def world_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def _collective_device(device: torch.device | None = None) -> str | torch.device:
    import torch.distributed as tdist

    if device is not None:
        return device if device.type == "cuda" else "cpu"
    return "cuda" if tdist.get_backend() == "nccl" else "cpu"


def all_ranks(flag: bool, dist: Dist) -> bool:
    """flag on every rank (under DDP all ranks must skip a step together, or they deadlock)."""
    if not dist.enabled:
        return flag
    import torch.distributed as tdist

    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, torch.Tensor], dist: Dist,
                    device: torch.device | None = None) -> dict[str, float]:
    """Each scalar tensor averaged over ranks, as floats (one all-reduce for all of them). The values may
    live on different devices (a metric made on the CPU beside ones on the GPU): they are gathered on
    `device` (default: the collective's device under torchrun, else the first value's)."""
    if not values:
        return {}
    keys = sorted(values)
    if device is None:
        first = torch.as_tensor(values[keys[0]]).device
        device = torch.device(_collective_device()) if dist.enabled else first
    t = torch.stack([torch.as_tensor(values[k]).float().to(device) for k in keys])
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(t)
        t /= dist.world
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP with the defaults that are correct here. Not static_graph=True: with the input-gradient
    backward it silently stops averaging gradients (ranks drift apart without an error)."""
    return nn.parallel.DistributedDataParallel(module,
                                               device_ids=[device.index] if device.type == "cuda" else None)


def shard(n: int, dist: Dist) -> slice:
    """This rank's contiguous share of n evaluation images."""
    per = -(-n // dist.world)
    return slice(min(n, dist.rank * per), min(n, (dist.rank + 1) * per))


def combine(value: float, count: int, dist: Dist, device: torch.device) -> float:
    """The mean over all ranks of a per-rank mean `value` over `count` items."""
    if not dist.enabled:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value * count, float(count)], dtype=torch.float64, device=_collective_device(device))
    tdist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def ranks_in_sync(params: list[torch.Tensor], device: torch.device) -> bool:
    """True when every rank holds bit-identical `params` (compares a float64 checksum across ranks)."""
    import torch.distributed as tdist

    with torch.no_grad():
        sums = [q for p in params for q in (p.detach().double().sum(), p.detach().double().pow(2).sum())]
        t = torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64)
        t = torch.cat([t, -t]).to(_collective_device(device))
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)  # max of v and of -v: every rank equal iff max == -min
    n = len(t) // 2
    return bool(torch.equal(t[:n], -t[n:]))


def broadcast_state(state: dict[str, Any] | None, dist: Dist, device: torch.device) -> dict[str, Any] | None:
    """Rank 0's resume state on every rank (ranks on other nodes need not see rank 0's disk)."""
    if not dist.enabled:
        return state
    import torch.distributed as tdist

    box = [state]
    tdist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]
