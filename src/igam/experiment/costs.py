"""Rough training-time estimates of a stage for `igam run --dry-run` (images per second measured on a
2-core CPU and one GPU; docs/PERFORMANCE.md has the measurements)."""

from __future__ import annotations

import igam.registry as registry
from igam.attacks.presets import parse_preset
from igam.config import Config
from igam.data.subsets import split_subset, subset_size
from igam.errors import IgamError

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
DATASET_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10,
                   "tiny-imagenet": 200}


def train_images(dataset: str, train_subset: int = 0) -> int:
    """Training images of a dataset name, a class subset counted as its share of the classes (balanced
    datasets; rough for SVHN), capped by train_subset."""
    base, subset = split_subset(dataset)
    if base not in DATASET_SIZES:  # size unknown without loading it
        return train_subset or 10000
    n = DATASET_SIZES[base]
    if subset is not None:
        n = n * min(subset_size(base, subset), DATASET_CLASSES[base]) // DATASET_CLASSES[base]
    return min(n, train_subset) if train_subset else n


def images_per_s(model: str, width: int = 0, gpu: bool = False) -> float:
    """Training throughput of a zoo model (standard training). small-cnn's figure is for its default width
    32 and scales as width^-1.5 (width 16 measured at about 2700 images/s on the quiet 2-core CPU, 5 epochs
    of 12k CIFAR-10 images in 22 s, docs/RESULTS.md)."""
    table = GPU_IMAGES_PER_S if gpu else CPU_IMAGES_PER_S
    ips = table.get(model, 300 * (40 if gpu else 1))
    if model == "small-cnn" and width:
        ips = ips * (32 / max(width, 4)) ** 1.5
    return ips


def estimate_seconds(cfg: Config, gpu: bool = False) -> float:
    """A rough estimate of a stage's training time on a 2-core CPU (or one GPU), for --dry-run: the
    model's standard-training throughput times the method's declared step cost
    (igam.registry.MethodInfo.cost). A network that is a teacher's (adapted:BODY, model=teacher) runs at
    its body's speed."""
    table = GPU_IMAGES_PER_S if gpu else CPU_IMAGES_PER_S
    n = train_images(cfg.dataset, cfg.train_subset)
    ips = images_per_s(cfg.model, cfg.width, gpu)
    info = registry.METHODS.get(cfg.method)
    factor = info.step_cost(cfg) if info is not None else 1.0
    body = (cfg.model.removeprefix("adapted:") if cfg.model.startswith("adapted:")
            else cfg.teacher_model if cfg.method == "finetune" or cfg.model == "teacher" else "")
    if body or cfg.method == "finetune" or cfg.model == "teacher":
        ips = table.get(body or "madry-mnist", table["madry-mnist"])
    return cfg.epochs * n * factor / ips


def dataset_classes(dataset: str) -> int:
    """Classes of a dataset name without loading it (a subset's own count; 10 when unknown)."""
    base, subset = split_subset(dataset)
    if subset is not None:
        return subset_size(base, subset)
    if base.startswith("synthetic"):
        try:
            return int(base.split(":")[2]) if len(base.split(":")) > 2 else 10
        except ValueError:
            return 10
    return DATASET_CLASSES.get(base, 10)


# AutoAttack (standard version): APGD-CE 100 steps on the correctly classified images (CLEAN_SHARE), then
# APGD-T and FAB-T (100 steps per target class, a FAB step about two PGD steps) and Square (5000
# forward-only queries) on the images still robust (ROBUST_SHARE); a forward alone counts as a third of a
# forward + backward. Measured: 150 s on 500 images for a width-16 small-cnn at 31% clean / 15% robust on a
# quiet 2-core CPU (docs/RESULTS.md), where this model says about 160 s.
CLEAN_SHARE, ROBUST_SHARE = 0.5, 0.2


def attack_steps(attack: str, num_classes: int = 10) -> float:
    """Rough forward + backward passes per test image of an evaluation attack ('clean', 'pgd100x3',
    'autoattack', 'pgd10@eps=4/255', ...), for --dry-run estimates."""
    base = attack.partition("@eps=")[0].strip().lower()
    if base == "clean":
        return 1 / 3
    try:
        spec = parse_preset(base)
    except IgamError:
        return 1.0
    if spec.kind == "fgsm":
        return 1 + 1 / 3
    if spec.kind == "pgd":  # (mix: the restarts run once with each of its two losses)
        return spec.steps * spec.restarts * (2 if spec.loss == "mix" else 1) + 1 / 3
    if spec.kind == "square":
        return ROBUST_SHARE * spec.queries / 3
    targets = max(1, min(9, num_classes - 1))
    if spec.name in ("autoattack", "autoattack-plus", "autoattack-rand"):
        return CLEAN_SHARE * 100 + ROBUST_SHARE * (100 * targets + 2 * 100 * targets + 5000 / 3)
    if spec.name == "aa-square":
        return CLEAN_SHARE * 5000 / 3
    return CLEAN_SHARE * 100.0 * (targets if spec.name in ("apgd-t", "fab-t") else 1) * (
        2 if "fab" in spec.name else 1)


def estimate_eval_seconds(cfg: Config, attacks: list[str], n: int, gpu: bool = False) -> float:
    """A rough estimate of evaluating a stage's model under these attacks on n test images."""
    finetune = cfg.method == "finetune"  # evaluates the teacher's body (a madry-mnist-sized network, say)
    ips = images_per_s("madry-mnist" if finetune else cfg.model, 0 if finetune else cfg.width, gpu)
    k = dataset_classes(cfg.dataset)
    return n * sum(attack_steps(a, k) for a in attacks) / ips


def hms(sec: float) -> str:
    """Seconds as 1h02m or 3m05s."""
    sec = int(sec)
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"
