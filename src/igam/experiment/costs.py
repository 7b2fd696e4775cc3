"""Rough training-time estimates of a stage for `igam run --dry-run` (images per second measured on a
2-core CPU and one GPU; docs/PERFORMANCE.md has the measurements)."""

from __future__ import annotations

import re

from igam.config import Config

CPU_IMAGES_PER_S = {
    "madry-mnist": 1500,
    "small-cnn": 1000,
    "small-cnn-bn": 800,
    "resnet20": 550,
    "preact-resnet18": 60,
    "wrn-16-4": 95,
    "wrn-32-10": 4,
}
# ... and on one A100-class GPU (fp32/TF32), equally rough.
GPU_IMAGES_PER_S = {
    "madry-mnist": 40000,
    "small-cnn": 40000,
    "small-cnn-bn": 30000,
    "resnet20": 20000,
    "preact-resnet18": 8000,
    "wrn-16-4": 8000,
    "wrn-32-10": 1200,
}
DATASET_SIZES = {
    "mnist": 60000,
    "fashion-mnist": 60000,
    "cifar10": 50000,
    "cifar100": 50000,
    "svhn": 73257,
    "tiny-imagenet": 100000,
}


def estimate_seconds(cfg: Config, gpu: bool = False) -> float:
    """A rough estimate of a stage's training time on a 2-core CPU (or one GPU), for --dry-run."""
    table = GPU_IMAGES_PER_S if gpu else CPU_IMAGES_PER_S
    base = cfg.dataset.split(":")[0]
    n = cfg.train_subset or DATASET_SIZES.get(base, 10000)
    model = cfg.model
    ips = table.get(model, 300 * (40 if gpu else 1))
    if model == "small-cnn" and cfg.width:
        ips = ips * (16 / max(cfg.width, 16)) ** 1.5
    factor = {
        "standard": 1.0,
        "finetune": 0.6,
        "pgd-at": cfg.steps + 1.0,
        "trades": cfg.steps + 2.0,
        "fast-at": 2.0,
        "n-fgsm": 2.0,
        "free-at": 1.0,
        "kd-noise": 2.5,
        "igam": 3.5,
        "igr": 3.0,
    }.get(cfg.method, 1.0)
    if cfg.method == "finetune":
        # the teacher's body (cfg.model is adapted:BODY once the experiment knows the teacher)
        body = cfg.model.removeprefix("adapted:") if cfg.model.startswith("adapted:") else cfg.teacher_model
        ips = table.get(body or "madry-mnist", table["madry-mnist"])
    if cfg.method in ("igam", "igr"):
        start = cfg.igam_start.strip()
        frac = float(start) if re.fullmatch(r"0?\.\d+", start) else 0.0
        factor = frac + (1 - frac) * factor
    return cfg.epochs * n * factor / ips


def hms(sec: float) -> str:
    """Seconds as 1h02m or 3m05s."""
    sec = int(sec)
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"
