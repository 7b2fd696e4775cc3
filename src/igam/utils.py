"""Small shared helpers: devices, seeds, pixel conversion, wrapper unwrapping, BatchNorm modes."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from igam.errors import IgamError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N' as a torch.device.

    Raises:
        IgamError: for a name that is no device, or CUDA asked for where it is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IgamError(f"device={name} was asked for, but CUDA is not available here; use device=cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise IgamError(f"device={name!r} is not a device; write auto, cpu, cuda or cuda:N.") from None


THREADS_PER_CPU = 4  # threads=N beyond this multiple of the machine's CPUs is refused


def check_threads(threads: int) -> None:
    """Refuse a torch thread count far beyond this machine's CPUs (threads=100000 makes OpenMP allocate
    per-thread stacks until it runs out of memory or crashes in libgomp), before anything is allocated.

    Raises:
        IgamError: naming the value asked, the machine's CPUs and the largest count that fits.
    """
    cpus = os.cpu_count() or 1
    if threads > THREADS_PER_CPU * cpus:
        raise IgamError(f"threads={threads} is more than {THREADS_PER_CPU} x the {cpus} CPU(s) of this "
                        "machine; each thread would only wait for a CPU, and very many crash OpenMP. Use "
                        f"threads={cpus} (one per CPU), at most {THREADS_PER_CPU * cpus}, or 0 for torch's "
                        "default.")


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (all devices) and NumPy's global generators with `seed`."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict[str, Any]:
    """torch, CUDA, Python and NumPy generators as tensors and primitives (loadable with weights_only)."""
    import numpy as np

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, words, gauss = state["python"]
        random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def mix_seed(seed: int, index: int, *, stride: int, offset: int, rank: int = 0) -> int:
    """A per-(seed, index, rank) seed in [0, 2**62): the one formula behind every derived random stream
    (training attacks' random starts per step: stride 8191, offset 17; evaluation batches: stride 7919,
    offset 1). Distinct streams differ in stride/offset, so they never share draws."""
    return (int(seed) * 1_000_003 + int(index) * stride + int(rank) * 131 + offset) % (2**62)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 (0..255) is divided by 255, floats are cast to float32.
    Shape is kept (N, C, H, W)."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel and torch.compile wrappers (what gets saved)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif (compiled := _compiled_module_type()) is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def _compiled_module_type() -> type | None:
    """torch.compile's wrapper class, if torch.compile was ever used in this process (importing
    torch._dynamo only to find out would cost seconds)."""
    return getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)


def without_ddp(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel wrappers; a torch.compile wrapper is kept."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def bn_batch_stats(model: nn.Module) -> Iterator[list[nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers (in whatever mode they are) keep their running averages: momentum 0 inside the
    block, restored on exit, and every buffer (running mean / var, num_batches_tracked) put back
    bit-identical. Yields the BatchNorm layers (an empty list: the model has none)."""
    bns = batchnorms(model)
    saved = [m.momentum for m in bns]
    # num_batches_tracked counts every train-mode forward whatever the momentum: put it back on exit, so
    # the block leaves every buffer bit-identical (the running averages stay put through momentum 0; they
    # are not copied back, as autograd may still hold them for a backward pass after the block)
    buffers = [(m.num_batches_tracked, m.num_batches_tracked.detach().clone()) for m in bns
               if m.num_batches_tracked is not None]
    for m in bns:
        m.momentum = 0.0
    try:
        yield bns
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        with torch.no_grad():
            for b, copy in buffers:
                b.copy_(copy)


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Run `model` in eval mode, or (mode='train') with train-mode BatchNorm, i.e. batch statistics as the
    official IGAM code uses everywhere, without touching the running statistics. Every module's mode is
    restored on exit."""
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with bn_batch_stats(model) if mode == "train" else contextlib.nullcontext() as bns:
            for m in bns or ():
                m.train()
            yield model
    finally:
        for m, t in was_training.items():
            m.training = t


@contextlib.contextmanager
def torch_threads(n: int = 0) -> Iterator[None]:
    """torch's CPU threads set to n for the block (0: left as they are), restored after."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
