"""Data: datasets by name (sources.py) and a device-resident batch loader with batched augmentation.

Inputs are floats in [0, 1]; normalisation lives inside the model, so attacks and gradients work in
pixel space. Data order and augmentation are a pure function of (seed, epoch, batch index), so a resumed
run sees exactly the batches an uninterrupted run would, and a DDP rank sees its slice of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from igam.data.sources import NAMED, Arrays, default_data_dir, load_arrays, make_synthetic, parse_synthetic
from igam.errors import IgamError

__all__ = ["NAMED", "Arrays", "BatchLoader", "DataSpec", "default_data_dir", "load_arrays", "load_data",
           "make_synthetic", "parse_synthetic", "spec_of", "resolve_augment"]


@dataclass
class DataSpec:
    """What a model needs to know about its data."""

    dataset: str
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mean: list[float]
    std: list[float]
    class_names: list[str]

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "shape": list(self.shape), "num_classes": self.num_classes,
                "mean": self.mean, "std": self.std, "class_names": self.class_names}


def spec_of(arrays: Arrays) -> DataSpec:
    x = arrays.x_train[:20000].float() / 255
    return DataSpec(arrays.name, arrays.shape, arrays.num_classes,
                    [round(float(v), 6) for v in x.mean((0, 2, 3))],
                    [round(float(v), 6) for v in x.std((0, 2, 3)).clamp_min(1e-3)],
                    list(arrays.class_names))


def load_data(name: str, data_dir: str | None = None, download: bool = False, train_subset: int = 0,
              test_subset: int = 0) -> Arrays:
    """Load a dataset and keep the first N train/test images when subsets are asked for."""
    a = load_arrays(name, data_dir or None, download)
    if train_subset:
        a.x_train, a.y_train = a.x_train[:train_subset], a.y_train[:train_subset]
    if test_subset:
        a.x_test, a.y_test = a.x_test[:test_subset], a.y_test[:test_subset]
    return a


def resolve_augment(augment: str, shape: tuple[int, int, int]) -> str:
    """'auto' means crop-flip for colour images (CIFAR-like) and none for grey ones (MNIST-like)."""
    if augment != "auto":
        return augment
    return "crop-flip" if shape[0] == 3 else "none"


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Batched random crop of zero-padded images: one gather per axis, no Python loop."""
    n, c, h, w = x.shape
    p = padding
    xp = F.pad(x, (p, p, p, p))
    oy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + oy[:, None])  # n, h
    cols = (torch.arange(w, device=x.device)[None] + ox[:, None])  # n, w
    xp = xp.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
    return xp.gather(3, cols[:, None, None, :].expand(n, c, h, w))


class BatchLoader:
    """Batches of (x in [0,1] float32, y) from uint8 tensors kept on the target device.

    `epoch(e, start)` yields the batches of epoch e from batch index `start` on; under DDP each rank
    gets rows [rank*B, (rank+1)*B) of every global batch of world*B images. With `with_index=True` it
    yields (x, y, index): index (B,) int64 on the CPU holds the training-set positions of the batch's
    images (x[i] is self.x[index[i]], augmented), e.g. the key of IGAM's teacher-gradient cache.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 augment: str = "none", crop_padding: int = 4, noise: float = 0.0, seed: int = 0,
                 drop_last: bool = True, device: str | torch.device = "cpu", rank: int = 0, world: int = 1):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.crop_padding, self.noise, self.seed = crop_padding, noise, seed
        self.drop_last, self.device, self.rank, self.world = drop_last, torch.device(device), rank, world
        gb = batch_size * world
        if batch_size < 1:
            raise IgamError(f"batch_size={batch_size} must be at least 1.")
        if drop_last and len(x) < gb:
            raise IgamError(f"{len(x)} training images cannot fill one batch of {gb}; lower batch_size "
                            "(or raise train_subset).")

    def __len__(self) -> int:
        gb = self.batch_size * self.world
        return len(self.x) // gb if self.drop_last else -(-len(self.x) // gb)

    def epoch(self, epoch: int = 0, start: int = 0, *,
              with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x (B, C, H, W) float in [0, 1], y (B,) int64) per batch of epoch `epoch` from batch `start`
        on, plus index (B,) int64 on the CPU with `with_index` (see the class docstring)."""
        n, gb = len(self.x), self.batch_size * self.world
        if self.shuffle:
            host_order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, epoch)))
        else:
            host_order = torch.arange(n)
        order = host_order.to(self.device)
        for i in range(start, len(self)):
            idx = order[i * gb:(i + 1) * gb]
            lo = min(self.rank * self.batch_size, len(idx))
            hi = min(lo + self.batch_size, len(idx))
            x, y = self._make(idx, lo, hi, _seed(self.seed, epoch, i))
            yield (x, y, host_order[i * gb:(i + 1) * gb][lo:hi]) if with_index else (x, y)

    def steps(self, first: int = 0, replays: int = 1) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x, y, index) of training steps first, first + 1, ... without end, epoch after epoch (index as
        with `epoch(with_index=True)`): each batch `replays` times in a row (free adversarial training), so
        step s trains on batch s // replays of the run, and a run resumed at any step continues exactly
        where it stopped."""
        i, r = divmod(first, replays)
        while True:
            epoch, start = divmod(i, len(self))
            for x, y, index in self.epoch(epoch, start, with_index=True):
                for _ in range(replays - r):
                    yield x, y, index
                r = 0
                i += 1

    def __iter__(self):
        return self.epoch(0)

    def _make(self, idx: torch.Tensor, lo: int, hi: int, seed: int):
        x = self.x[idx].float().div_(255)
        y = self.y[idx]
        if self.augment != "none" or self.noise > 0:
            g = torch.Generator().manual_seed(seed)  # same draws on every rank: slice after augmenting
            if "crop" in self.augment and self.crop_padding > 0:
                x = random_crop(x, self.crop_padding, g)
            if "flip" in self.augment:
                flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if self.noise > 0:
                x = (x + (torch.rand(x.shape, generator=g) * 2 - 1).to(x.device) * self.noise).clamp_(0, 1)
        return x[lo:hi], y[lo:hi]
