"""Datasets by name, read into uint8 arrays (N, C, H, W) and int64 labels.

A data root holds a named dataset as `<name>.npz` (arrays x_train, y_train, x_test, y_test, uint8 images,
as in ../shared/data) or in its standard download layout (torchvision's for MNIST, Fashion-MNIST,
CIFAR-10/100 and SVHN; `tiny-imagenet-200/` for Tiny-ImageNet).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igam.errors import IgamError, unknown

NAMED = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet")
PREFIXED = ("imagefolder:", "npz:", "synthetic")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Arrays:
    """A whole dataset in memory: uint8 images NCHW in 0..255, int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(max(self.y_train.max(), self.y_test.max())) + 1


def default_data_dir() -> Path:
    return Path(os.environ.get("IGAM_DATA") or "data")


def _to_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise IgamError(f"{where}: images must be uint8 (0-255), got {x.dtype}. Save them with "
                        "np.uint8 pixel values.")
    if x.ndim == 3:  # N, H, W -> grey
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # NHWC
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise IgamError(f"{where}: images must have shape (N,H,W), (N,H,W,C) or (N,C,H,W); got {x.shape}.")
    return torch.from_numpy(np.ascontiguousarray(x))


def load_npz(path: Path, name: str) -> Arrays:
    path = Path(path)
    if not path.is_file():
        raise IgamError(f"npz file '{path}' does not exist.")
    try:
        d = np.load(path, allow_pickle=False)
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in d.files]
        if missing:
            raise IgamError(f"'{path}' lacks the arrays {missing}; an npz dataset holds x_train, y_train, "
                            "x_test, y_test (uint8 images, integer labels).")
        arrs = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        names = [str(s) for s in d["class_names"]] if "class_names" in d.files else []
    except IgamError:
        raise
    except Exception as e:
        raise IgamError(f"Cannot read '{path}' as an npz dataset ({e}).") from None
    out = Arrays(name, _to_nchw(arrs["x_train"], str(path)), torch.from_numpy(arrs["y_train"].astype(np.int64)),
                 _to_nchw(arrs["x_test"], str(path)), torch.from_numpy(arrs["y_test"].astype(np.int64)),
                 names, f"npz {path}")
    if out.x_train.shape[1:] != out.x_test.shape[1:]:
        raise IgamError(f"'{path}': train images {tuple(out.x_train.shape[1:])} and test images "
                        f"{tuple(out.x_test.shape[1:])} differ in shape.")
    if len(out.x_train) != len(out.y_train) or len(out.x_test) != len(out.y_test):
        raise IgamError(f"'{path}': the number of images and labels differ.")
    if not out.class_names:
        out.class_names = [str(i) for i in range(out.num_classes)]
    return out


# ---------------------------------------------------------------------------------------------
# torchvision layouts
def _network_ok(host: str = "pypi.org", timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _torchvision(name: str, root: Path, download: bool) -> Arrays | None:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}[name]

    def make(train: bool, dl: bool):
        if name == "svhn":
            return cls(str(root), split="train" if train else "test", download=dl)
        return cls(str(root), train=train, download=dl)

    try:
        tr, te = make(True, False), make(False, False)
    except (RuntimeError, FileNotFoundError, ImportError, OSError):
        if not download:
            return None
        if not _network_ok():
            raise IgamError(f"Dataset '{name}' is not in '{root}' and the network is unreachable, so it "
                            f"cannot be downloaded. {expected_files(name, root)}") from None
        tr, te = make(True, True), make(False, True)

    def arrays(ds):
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        y = ds.targets if hasattr(ds, "targets") else ds.labels
        y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return _to_nchw(x.astype(np.uint8), name), torch.from_numpy(y.astype(np.int64))

    xtr, ytr = arrays(tr)
    xte, yte = arrays(te)
    names = list(getattr(tr, "classes", [])) or [str(i) for i in range(int(ytr.max()) + 1)]
    return Arrays(name, xtr, ytr, xte, yte, [str(c) for c in names], f"torchvision layout in {root}")


def expected_files(name: str, root: Path) -> str:
    npz = f"{root}/{name}.npz (arrays x_train, y_train, x_test, y_test)"
    layout = {
        "mnist": f"{root}/MNIST/raw/*-ubyte(.gz)",
        "fashion-mnist": f"{root}/FashionMNIST/raw/*-ubyte(.gz)",
        "cifar10": f"{root}/cifar-10-batches-py/",
        "cifar100": f"{root}/cifar-100-python/",
        "svhn": f"{root}/train_32x32.mat and test_32x32.mat (needs scipy)",
        "tiny-imagenet": f"{root}/tiny-imagenet-200/ (wnids.txt, train/<wnid>/images/, val/images/, "
                         "val/val_annotations.txt) from http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    }[name]
    how = "pass download=true on a machine with internet" if name != "tiny-imagenet" else "unzip it there"
    return (f"Expected either {npz} or {layout}. Get it with --data-dir pointing at a folder that has it, "
            f"or {how}.")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_tiny_imagenet(root: Path) -> Arrays | None:
    base = root / "tiny-imagenet-200"
    if not (base / "wnids.txt").exists():
        return None
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(sorted(wnids))}
    xs, ys = [], []
    for w in sorted(wnids):
        files = sorted((base / "train" / w / "images").glob("*"))
        xs += [_read_image(f) for f in files if f.suffix.lower() in IMAGE_EXTS]
        ys += [index[w]] * sum(f.suffix.lower() in IMAGE_EXTS for f in files)
    ann = base / "val" / "val_annotations.txt"
    if not ann.exists():
        raise IgamError(f"'{ann}' is missing; the standard Tiny-ImageNet layout has val/val_annotations.txt "
                        "mapping each val image to its class.")
    vx, vy = [], []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            vx.append(_read_image(base / "val" / "images" / parts[0]))
            vy.append(index[parts[1]])
    if not xs or not vx:
        raise IgamError(f"'{base}' holds no readable images; check the Tiny-ImageNet layout.")
    words = {}
    if (base / "words.txt").exists():
        for line in (base / "words.txt").read_text().splitlines():
            k, _, v = line.partition("\t")
            words[k] = v.split(",")[0]
    return Arrays("tiny-imagenet", _to_nchw(np.stack(xs), str(base)), torch.tensor(ys),
                  _to_nchw(np.stack(vx), str(base)), torch.tensor(vy),
                  [words.get(w, w) for w in sorted(wnids)], f"tiny-imagenet-200 in {root}")


def load_imagefolder(path: Path) -> Arrays:
    """PATH/train/<class>/*.png and PATH/test/<class>/* (or val/); all images must share one size."""
    path = Path(path)
    if not path.is_dir():
        raise IgamError(f"ImageFolder root '{path}' does not exist.")
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if not (path / "train").is_dir() or test_dir is None:
        raise IgamError(f"ImageFolder root '{path}' must contain train/<class>/ and test/<class>/ "
                        "(or val/<class>/) folders of images.")
    classes = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    if not classes:
        raise IgamError(f"'{path / 'train'}' has no class folders; put images in train/<class>/.")
    index = {c: i for i, c in enumerate(classes)}

    def read(split: Path):
        xs, ys = [], []
        for c in sorted(d.name for d in split.iterdir() if d.is_dir()):
            if c not in index:
                raise IgamError(f"Class folder '{split / c}' has no counterpart in '{path / 'train'}'.")
            for f in sorted((split / c).iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    xs.append(_read_image(f))
                    ys.append(index[c])
        if not xs:
            raise IgamError(f"'{split}' holds no images ({', '.join(sorted(IMAGE_EXTS))}).")
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise IgamError(f"Images in '{split}' have different sizes {sorted(shapes)[:3]}; resize them to "
                            "one size first.")
        x = np.stack(xs)
        if all(np.array_equal(x[..., 0], x[..., c]) for c in (1, 2)):
            x = x[..., :1]  # grey images stored as RGB
        return _to_nchw(x, str(split)), torch.tensor(ys, dtype=torch.int64)

    xtr, ytr = read(path / "train")
    xte, yte = read(test_dir)
    if xtr.shape[1:] != xte.shape[1:]:
        raise IgamError(f"Train images {tuple(xtr.shape[1:])} and test images {tuple(xte.shape[1:])} in "
                        f"'{path}' differ in shape.")
    return Arrays(f"imagefolder:{path}", xtr, ytr, xte, yte, classes, f"ImageFolder {path}")


# ---------------------------------------------------------------------------------------------
def parse_synthetic(name: str) -> tuple[int, int, int, int]:
    """'synthetic' -> 32x32x3, 10 classes; 'synthetic:28x28x1:10' -> (H, W, C, K)."""
    parts = name.split(":")
    h, w, c, k = 32, 32, 3, 10
    try:
        if len(parts) >= 2 and parts[1]:
            h, w, c = (int(v) for v in parts[1].lower().split("x"))
        if len(parts) >= 3 and parts[2]:
            k = int(parts[2])
        if len(parts) > 3 or min(h, w, c, k) < 1 or k < 2:
            raise ValueError
    except ValueError:
        raise IgamError(f"Cannot read synthetic dataset spec '{name}'; write synthetic:HxWxC:K, e.g. "
                        "synthetic:32x32x3:10.") from None
    return h, w, c, k


def make_synthetic(name: str = "synthetic", n_train: int = 4000, n_test: int = 1000, seed: int = 1234) -> Arrays:
    """A learnable image task made on the fly: each class is a smooth random colour pattern; samples are
    shifted, contrast-jittered, noisy copies of their class pattern plus a distractor from another class."""
    h, w, c, k = parse_synthetic(name)
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(k, c, max(2, h // 8), max(2, w // 8), generator=g)
    templates = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    templates = (templates - templates.amin((1, 2, 3), keepdim=True)) / (
        templates.amax((1, 2, 3), keepdim=True) - templates.amin((1, 2, 3), keepdim=True) + 1e-8)

    def sample(n: int):
        y = torch.randint(0, k, (n,), generator=g)
        other = torch.randint(0, k, (n,), generator=g)
        contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
        x = contrast * templates[y] + 0.35 * templates[other] * torch.rand(n, 1, 1, 1, generator=g)
        shifts = torch.randint(-max(1, h // 8), max(1, h // 8) + 1, (n, 2), generator=g)
        x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
        x = x / 1.35 + 0.12 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    return Arrays(name, xtr, ytr, xte, yte, [f"class{i}" for i in range(k)], "synthetic (made on the fly)")


def load_arrays(name: str, data_dir: str | Path | None = None, download: bool = False) -> Arrays:
    """Load a dataset by name; see the module docstring for where files are looked for."""
    name = str(name).strip()
    if name.startswith("synthetic"):
        return make_synthetic(name)
    if name.startswith("npz:"):
        return load_npz(Path(name[4:]), name)
    if name.startswith("imagefolder:"):
        return load_imagefolder(Path(name[len("imagefolder:"):]))
    if name not in NAMED:
        raise unknown("dataset", name, list(NAMED) + ["imagefolder:PATH", "npz:PATH", "synthetic"])
    root = Path(data_dir) if data_dir else default_data_dir()
    if root.exists() and not root.is_dir():
        raise IgamError(f"Data root '{root}' is a file, not a directory; --data-dir names a folder.")
    if (root / f"{name}.npz").is_file():
        return load_npz(root / f"{name}.npz", name)
    if name == "tiny-imagenet":
        out = load_tiny_imagenet(root)
    else:
        out = _torchvision(name, root, download) if root.is_dir() or download else None
    if out is None:
        where = "does not exist" if not root.exists() else "does not hold it"
        raise IgamError(f"Dataset '{name}' not found: data root '{root}' {where}. {expected_files(name, root)}")
    return out
