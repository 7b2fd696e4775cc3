"""Small shared helpers: devices, seeds, model modes, distributed state."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from igam.errors import IgamError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IgamError(f"device={name} was asked for, but CUDA is not available here; use device=cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise IgamError(f"device={name!r} is not a device; write auto, cpu, cuda or cuda:N.") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers (what gets saved)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
                "DistributedDataParallel", "DataParallel"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Run `model` in eval mode, or with train-mode BatchNorm (batch statistics, as the official IGAM
    code does everywhere) without touching its running statistics. Restores the previous mode."""
    was_training = {m: m.training for m in model.modules()}
    momenta = {}
    try:
        model.eval()
        if mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    momenta[m] = m.momentum
                    m.momentum = 0.0  # use batch statistics, leave the running averages as they are
                    m.train()
        yield model
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in was_training.items():
            m.training = t


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
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); no-op without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device
