"""The frozen teacher's input gradients J_t (eqs. 9, 17), computed once per training image; the same store
keeps any other per-image output of a frozen teacher (its features for rrm, its logits for ard / rslad).

J_t of a training image does not change between epochs when (a) the student's input is the same image
every epoch (no augmentation, no input noise), (b) the teacher is frozen and deterministic (eval-mode
BatchNorm, no random adapter step such as random-pad) and (c) each example's gradient does not depend
on the rest of its batch (J_t differentiates a per-example *sum*; eval-mode BatchNorm couples nothing).
Then the gradient computed in epoch 0 is, up to float rounding, the one any later epoch would compute,
and `TeacherGradientCache` keeps it, keyed by the image's position in the training set.

Storage: one float32 tensor (capacity, C, H, W), exactly as computed, on the training device while it
fits under a size limit (a fraction of the free CUDA memory), else in pinned host memory (plain memory
on a CPU run). Nothing is saved with a run: after a resume the cache refills lazily.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

from igam.method.adapters import RandomPad

DEVICE_FRACTION = 0.25  # at most this fraction of the free CUDA memory holds the cache on the GPU


def teacher_cache_blockers(teacher: nn.Module | None) -> list[str]:
    """Why the teacher itself makes cached gradients wrong: train-mode BatchNorm (batch statistics couple
    the examples of a batch) or a random adapter step (a new placement every batch). [] when neither.
    A teacher that is not an AdaptedTeacher is taken as deterministic."""
    reasons = []
    if getattr(teacher, "body_bn", "eval") == "train":
        reasons.append("teacher_bn=train runs the teacher with batch statistics, so a teacher gradient "
                       "depends on the other images of its batch")
    adapter = getattr(teacher, "adapter", None)
    if adapter is not None and any(isinstance(m, RandomPad) for m in adapter.modules()):
        reasons.append(f"the adapter '{getattr(adapter, 'spec', adapter)}' pads at a random placement "
                       "every batch (random-pad)")
    return reasons


class TeacherGradientCache:
    """J_t per training-set index, filled lazily.

    `lookup(index, x, y, compute)` returns J_t (B, C, H, W) of the batch x (B, C, H, W) with labels y (B,)
    whose rows are the training images `index` (B,) int64 (or whatever per-image tensor (B, ...) compute
    returns: the store takes its shape from the first batch). When any of them is not cached yet (every batch
    of epoch 0, batches holding images that epoch 0 dropped, batches after a resume), compute(x, y) -> J_t
    runs on the whole batch as it would without the cache, its result is returned and its new rows are
    stored bit for bit; a batch of cached images only is served from the store. With a fixed batch size
    every stored row was computed in a batch of that size, so cached and uncached training agree bit for
    bit wherever the kernels do not depend on the other images of the batch (CPU: measured).

    Args:
        device_limit_bytes: the largest store kept on a CUDA device; None: DEVICE_FRACTION of the free
            memory when the store is (re)allocated. Above it the store lives in pinned host memory.
    """

    def __init__(self, device_limit_bytes: int | None = None):
        self.device_limit_bytes = device_limit_bytes
        self.store: torch.Tensor | None = None  # (capacity, C, H, W) float32
        self.filled = torch.zeros(0, dtype=torch.bool)  # (capacity,) on the CPU: no device sync to test it
        self.computed = 0  # images whose J_t was computed (not served from the store)
        self.served = 0  # images served from the store

    def __len__(self) -> int:
        return int(self.filled.sum())

    @property
    def where(self) -> str:
        """'device' | 'pinned host' | 'host' | 'empty': where the store lives."""
        if self.store is None:
            return "empty"
        if self.store.device.type != "cpu":
            return "device"
        return "pinned host" if self.store.is_pinned() else "host"

    def _place(self, nbytes: int, device: torch.device) -> tuple[torch.device, bool]:
        """(storage device, pinned) for a store of nbytes for a run on `device`."""
        if device.type != "cuda":
            return device, False
        limit = self.device_limit_bytes
        if limit is None:
            limit = int(DEVICE_FRACTION * torch.cuda.mem_get_info(device)[0])
        return (device, False) if nbytes <= limit else (torch.device("cpu"), True)

    def _reserve(self, capacity: int, like: torch.Tensor) -> None:
        """Grow the store to hold `capacity` images shaped like like[0] (doubling; contents kept)."""
        old = 0 if self.store is None else len(self.store)
        if capacity <= old:
            return
        capacity = max(capacity, 2 * old)
        shape = (capacity, *like.shape[1:])
        nbytes = like[:1].numel() * like.element_size() * capacity
        where, pinned = self._place(nbytes, like.device)
        store = torch.empty(shape, dtype=like.dtype, device=where)
        if pinned:
            with contextlib.suppress(RuntimeError):  # no pinnable memory: plain host memory still works
                store = store.pin_memory()
        if self.store is not None:
            store[:old].copy_(self.store)
        self.store = store
        filled = torch.zeros(capacity, dtype=torch.bool)
        filled[:old] = self.filled
        self.filled = filled

    def lookup(self, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """J_t (B, C, H, W) on x's device for the training images `index` (B,) int64 (any device).

        Raises:
            ValueError: index and x disagree in length.
        """
        if len(index) != len(x):
            raise ValueError(f"index has {len(index)} entries for a batch of {len(x)} images")
        idx = index.detach().to("cpu", torch.long)
        if self.store is None:  # the first batch: the store takes the shape of what compute returns
            fresh = compute(x, y)
            self._reserve(int(idx.max()) + 1, fresh.detach()[:1].contiguous())
            assert self.store is not None
            self.computed += len(idx)
            self.store[idx.to(self.store.device)] = fresh.detach().to(self.store.device)
            self.filled[idx] = True
            return fresh
        if int(idx.max()) >= len(self.store):
            self._reserve(int(idx.max()) + 1, self.store[:1])
        miss = ~self.filled[idx]
        n_miss = int(miss.sum())
        self.computed += n_miss
        self.served += len(idx) - n_miss
        if n_miss:
            # Any image not cached yet: the whole batch is computed, exactly as without the cache, and the
            # new rows are stored. (A sub-batch of the missing rows alone would be cheaper, but kernels
            # round differently at other batch sizes, e.g. oneDNN below 5 images: measured 3e-7 relative,
            # which a GAN-like training amplifies. Every stored row thus comes from a full batch.)
            fresh = compute(x, y)
            new, rows = idx[miss], fresh.detach()[miss.to(fresh.device)]
            self.store[new.to(self.store.device)] = rows.to(self.store.device)
            self.filled[new] = True
            return fresh
        if self.store.device == x.device:
            return self.store[idx.to(x.device)]
        staged = torch.empty((len(idx), *self.store.shape[1:]), dtype=self.store.dtype,
                             pin_memory=self.store.is_pinned())
        torch.index_select(self.store, 0, idx, out=staged)
        return staged.to(x.device, non_blocking=self.store.is_pinned())
