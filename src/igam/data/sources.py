"""Datasets by name, read into uint8 arrays (N, C, H, W) and int64 labels.

A data root holds a named dataset as `<name>.npz` (arrays x_train, y_train, x_test, y_test, uint8 images,
as in ../shared/data) or in its standard download layout (torchvision's for MNIST, Fashion-MNIST,
CIFAR-10/100 and SVHN; `tiny-imagenet-200/` for Tiny-ImageNet). igam reads those layouts itself: idx files
plain or gzipped, CIFAR's pickles through an unpickler that admits only numpy arrays (a tampered file
cannot run code), SVHN's .mat files with scipy. torchvision is used only to download (download=true).
Any of them can be narrowed to some of its classes, `NAME:CLASSES` (cifar10:animals, cifar10:0,1,8,9;
data/subsets.py).
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import socket
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igam.data.subsets import select_classes, split_subset
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
        if self.class_names:
            return len(self.class_names)
        labels = torch.cat([self.y_train.reshape(-1), self.y_test.reshape(-1)])
        return int(labels.max()) + 1 if len(labels) else 0


def default_data_dir() -> Path:
    return Path(os.environ.get("IGAM_DATA") or "data")


def _to_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise IgamError(f"{where}: images must be uint8 (0-255), got {x.dtype}. Save them with "
                        "np.uint8 pixel values.")
    if x.ndim == 3:  # N, H, W -> grey
        x = x[:, None]
    elif x.ndim == 4:
        if channels_last(x.shape, where):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise IgamError(f"{where}: images must have shape (N,H,W), (N,H,W,C) or (N,C,H,W); got {x.shape}.")
    return torch.from_numpy(np.ascontiguousarray(x))


MAX_CHANNELS = 4  # an axis this short is a channel axis (grey, grey+alpha or 2-channel, RGB, RGBA)
MAX_CLASSES = 100_000  # labels beyond this are a damaged file, not a dataset


def channels_last(shape: tuple[int, ...], where: str) -> bool:
    """Whether 4-D images of this shape are (N, H, W, C) rather than (N, C, H, W): the channel axis is the
    short one (at most MAX_CHANNELS). Raises IgamError when both or neither end axis could be it."""
    c1, c4 = shape[1], shape[-1]
    if c4 <= MAX_CHANNELS < c1:
        return True
    if c1 <= MAX_CHANNELS < c4:
        return False
    if c1 <= MAX_CHANNELS and c4 <= MAX_CHANNELS:
        if (c1 in (1, 3)) == (c4 in (1, 3)):
            raise IgamError(f"{where}: images of shape {tuple(shape)} are ambiguous: axis 1 ({c1}) and "
                            f"axis 3 ({c4}) could both hold the channels. Save them as (N, C, H, W) with "
                            f"H, W > {MAX_CHANNELS}, or transpose them so that the layout is clear.")
        return c4 in (1, 3)
    if c1 > 64:
        raise IgamError(f"{where}: images of shape {tuple(shape)} have no channel axis of 1 to "
                        f"{MAX_CHANNELS} entries at either end; save them as (N, H, W, C) or (N, C, H, W).")
    return False


def check_labels(y_train: torch.Tensor, y_test: torch.Tensor, where: str, inferred: bool,
                 log=None) -> None:
    """Labels must be 0 .. MAX_CLASSES-1 and name at least two classes. When the classes are inferred from
    the labels (no class names), a gap in 0 .. max (e.g. one stray label 57 among 0..9) is warned about:
    it makes a model with max+1 outputs."""
    labels = torch.cat([y_train.reshape(-1), y_test.reshape(-1)])
    if not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= MAX_CLASSES:
        raise IgamError(f"{where}: labels run from {lo} to {hi}; class indices must lie in 0 .. "
                        f"{MAX_CLASSES - 1}. Fix the stray labels (or remap them to 0 .. K-1).")
    present = torch.unique(labels)
    if len(present) < 2:
        raise IgamError(f"{where}: every label is {lo}: a dataset needs at least two classes (a one-class "
                        "model is trivially 100% accurate). Check that the right label array was saved.")
    if inferred and len(present) < hi + 1:
        missing = sorted(set(range(hi + 1)) - set(present.tolist()))
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        say = log or (lambda m: print(m, file=sys.stderr))
        say(f"igam: WARNING: {where}: the number of classes is inferred from the labels as {hi + 1} "
            f"(0 .. {hi}), but {len(missing)} of them never occur ({shown}): a stray label makes a model "
            "with extra outputs. Remap the labels to 0 .. K-1, or save class_names in the npz to confirm.")


def check_test_labels(y_train: torch.Tensor, y_test: torch.Tensor, where: str) -> None:
    """Every test label must occur among the training labels: a class with test images but no training
    images is one no model can learn (it would count as an extra output and every test image of it as
    an error), so a stray or shifted test label is refused, not turned into a class.

    Raises:
        IgamError: naming the labels (and how many test images carry them) and the fix.
    """
    if not len(y_train) or not len(y_test):
        return
    stray = ~torch.isin(y_test, torch.unique(y_train))
    unseen = torch.unique(y_test[stray]).tolist()
    if unseen:
        shown = ", ".join(map(str, unseen[:8])) + (", ..." if len(unseen) > 8 else "")
        raise IgamError(f"{where}: {int(stray.sum())} test image(s) carry label(s) {shown}, which no "
                        "training image has: a class without training images cannot be learned, and every "
                        "test image of it would count as an error. Fix or remap those test labels (or add "
                        "training images of the class).")


def _labels(y: np.ndarray, where: Path) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise IgamError(f"'{where}': labels must be a 1-D array of integers, got {y.dtype} of shape "
                        f"{y.shape}.")
    if np.issubdtype(y.dtype, np.floating) and not np.array_equal(y, np.round(y)):
        raise IgamError(f"'{where}': labels must be whole numbers (class indices), not fractions.")
    return torch.from_numpy(y.astype(np.int64))


def _npz_arrays(d, path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    if not hasattr(d, "files"):
        raise IgamError(f"'{path}' is a single array, not an npz archive of x_train, y_train, x_test, "
                        "y_test.")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in d.files]
    if missing:
        raise IgamError(f"'{path}' lacks the arrays {missing}; an npz dataset holds x_train, y_train, "
                        "x_test, y_test (uint8 images, integer labels).")
    arrs = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    names = [str(s) for s in d["class_names"].reshape(-1)] if "class_names" in d.files else []
    return arrs, names


def load_npz(path: Path, name: str) -> Arrays:
    path = Path(path)
    if not path.is_file():
        raise IgamError(f"npz file '{path}' does not exist.")
    try:
        with np.load(path, allow_pickle=False) as d:
            arrs, names = _npz_arrays(d, path)
    except IgamError:
        raise
    except Exception as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise IgamError(f"Cannot read '{path}' as an npz dataset: it holds Python objects (object "
                            "arrays), which igam never unpickles. Save the "
                            "images as a uint8 array and the labels as an integer array (np.savez with plain "
                            "numeric arrays).") from None
        raise IgamError(f"Cannot read '{path}' as an npz dataset ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}).") from None
    out = Arrays(name, _to_nchw(arrs["x_train"], str(path)), _labels(arrs["y_train"], path),
                 _to_nchw(arrs["x_test"], str(path)), _labels(arrs["y_test"], path), names, f"npz {path}")
    if out.x_train.shape[1:] != out.x_test.shape[1:]:
        raise IgamError(f"'{path}': train images {tuple(out.x_train.shape[1:])} and test images "
                        f"{tuple(out.x_test.shape[1:])} differ in shape.")
    if len(out.x_train) != len(out.y_train) or len(out.x_test) != len(out.y_test):
        raise IgamError(f"'{path}': the number of images and labels differ.")
    if len(out.y_train) and len(out.y_test):  # empty splits: check_arrays names them
        check_labels(out.y_train, out.y_test, f"'{path}'", inferred=not out.class_names)
        check_test_labels(out.y_train, out.y_test, f"'{path}'")
    if not out.class_names:
        out.class_names = [str(i) for i in range(out.num_classes)]
    return out


# ---------------------------------------------------------------------------------------------
# the standard download layouts (torchvision's), read by igam itself: no md5 gate, no arbitrary unpickling
TV_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                     "batches.meta", "label_names", "labels"),
         "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels")}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _network_ok(host: str = "pypi.org", timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_idx(path: Path) -> np.ndarray:
    """An idx file of uint8 data (MNIST's format), plain or gzipped."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise IgamError(f"Cannot read '{path}' ({e}); the file is truncated or corrupted. Delete it and get "
                        "it again.") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 4:
        raise IgamError(f"'{path}' is not an idx file of uint8 data (bad header); the file is corrupted or "
                        "of another kind. Delete it and get it again.")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise IgamError(f"'{path}' holds {len(body)} bytes of data but its header announces {dims}; the file "
                        "is truncated or corrupted. Delete it and get it again.")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def _find_idx(name: str, root: Path) -> dict[str, Path] | None:
    for folder in (root / TV_FOLDER[name] / "raw", root / TV_FOLDER[name]):
        found = {}
        for split, files in IDX_FILES.items():
            for i, base in enumerate(files):
                path = next((folder / f for f in (base, base + ".gz") if (folder / f).is_file()), None)
                if path is not None:
                    found[f"{split}{i}"] = path
        if len(found) == 4:
            return found
        if found:
            missing = [f for split, files in IDX_FILES.items() for i, f in enumerate(files)
                       if f"{split}{i}" not in found]
            raise IgamError(f"'{folder}' holds only part of {name}: {', '.join(missing)} (or .gz) "
                            "are missing.")
    return None


def load_idx_dataset(name: str, root: Path) -> Arrays | None:
    """MNIST / Fashion-MNIST from ROOT/MNIST/raw/*-ubyte(.gz) (torchvision's layout)."""
    files = _find_idx(name, root)
    if files is None:
        return None
    xtr, ytr, xte, yte = (read_idx(files[k]) for k in ("train0", "train1", "test0", "test1"))
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise IgamError(f"{name} in '{files['train0'].parent}': the {split} images {x.shape} and labels "
                            f"{y.shape} do not match.")
    classes = {"mnist": [str(i) for i in range(10)],
               "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                 "Sneaker", "Bag", "Ankle boot"]}[name]
    return Arrays(name, _to_nchw(xtr, name), torch.from_numpy(ytr.astype(np.int64)), _to_nchw(xte, name),
                  torch.from_numpy(yte.astype(np.int64)), classes, f"idx files in {files['train0'].parent}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only: any other global (a code payload) is refused."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        mod = module.replace("numpy.core.", "numpy._core.", 1) if module.startswith("numpy.core.") else module
        if (mod, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a data file")
        for candidate in (mod, mod.replace("numpy._core", "numpy.core")):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot find '{module}.{name}'")


def read_cifar_pickle(path: Path) -> dict[str, object]:
    """One file of the CIFAR python version, without running code that a tampered file might carry."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise IgamError(f"'{path}' is missing; the CIFAR python layout needs all its batch files.") from None
    except Exception as e:
        raise IgamError(f"Cannot read '{path}' as a CIFAR batch ({type(e).__name__}: {e}). The file is "
                        "truncated, corrupted or not a CIFAR file; delete it and get it again.") from None
    if not isinstance(obj, dict):
        raise IgamError(f"'{path}' does not hold a CIFAR batch (a dict), but a {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def load_cifar(name: str, root: Path) -> Arrays | None:
    """CIFAR-10 / CIFAR-100 from ROOT/cifar-10-batches-py or ROOT/cifar-100-python (the python version)."""
    folder, train_files, test_files, meta_file, names_key, labels_key = CIFAR[name]
    base = root / folder
    if not base.is_dir():
        return None

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for fname in files:
            d = read_cifar_pickle(base / fname)
            if "data" not in d or labels_key not in d:
                raise IgamError(f"'{base / fname}' lacks the entries 'data' and '{labels_key}' of a {name} "
                                "batch.")
            x, y = np.asarray(d["data"]), np.asarray(d[labels_key])
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise IgamError(f"'{base / fname}': data {x.shape} {x.dtype} and labels {y.shape} are not a "
                                f"{name} batch (uint8 rows of 3072 pixels, one label each).")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y.astype(np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    xtr, ytr = read(train_files)
    xte, yte = read(test_files)
    k = 10 if name == "cifar10" else 100
    classes = [str(i) for i in range(k)]
    if (base / meta_file).is_file():
        names = read_cifar_pickle(base / meta_file).get(names_key)
        if isinstance(names, list) and len(names) == k:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Arrays(name, xtr, ytr, xte, yte, classes, f"{folder} in {root}")


def load_svhn(root: Path) -> Arrays | None:
    """SVHN from ROOT/train_32x32.mat and ROOT/test_32x32.mat (label 10 means digit 0)."""
    paths = {split: root / f for split, f in SVHN_FILES.items()}
    present = [p for p in paths.values() if p.is_file()]
    if not present:
        return None
    if len(present) < 2:
        missing = [str(p) for p in paths.values() if not p.is_file()]
        raise IgamError(f"SVHN is incomplete: {', '.join(missing)} is missing.")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise IgamError("Reading SVHN's .mat files needs scipy: pip install scipy (or pip install "
                        "'igam[svhn]').") from None
    out = []
    for path in paths.values():
        try:
            m = loadmat(str(path))
            x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
        except Exception as e:
            raise IgamError(f"Cannot read '{path}' as an SVHN .mat file ({type(e).__name__}: {e}); it is "
                            "truncated or corrupted. Delete it and get it again.") from None
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != len(y):
            raise IgamError(f"'{path}': X {x.shape} {x.dtype} and y ({len(y)},) are not SVHN arrays "
                            "(uint8 X of shape 32x32x3xN, N labels).")
        y[y == 10] = 0
        out += [torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)]
    return Arrays("svhn", *out, [str(i) for i in range(10)], f"SVHN .mat files in {root}")


def _download(name: str, root: Path) -> None:
    """Fetch a named dataset into root in torchvision's layout (only with download=true)."""
    import torchvision.datasets as tvd

    if not _network_ok():
        raise IgamError(f"Dataset '{name}' is not in '{root}' and the network is unreachable, so it cannot "
                        f"be downloaded. {expected_files(name, root)}")
    try:
        if name == "svhn":
            for split in ("train", "test"):
                tvd.SVHN(str(root), split=split, download=True)
        else:
            cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
                   "cifar100": tvd.CIFAR100}[name]
            for train in (True, False):
                cls(str(root), train=train, download=True)
    except Exception as e:
        raise IgamError(f"Downloading '{name}' into '{root}' failed ({type(e).__name__}: {e}). "
                        f"{expected_files(name, root)}") from None


def load_standard(name: str, root: Path) -> Arrays | None:
    """A named dataset in its standard layout under root, or None when its files are not there."""
    if name in TV_FOLDER:
        return load_idx_dataset(name, root)
    if name in CIFAR:
        return load_cifar(name, root)
    if name == "svhn":
        return load_svhn(root)
    return load_tiny_imagenet(root)


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
    return (f"Expected either {npz} or {layout}. Point data_dir=... (or --data-dir, or $IGAM_DATA) at a "
            f"folder that has it, or {how}.")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise IgamError(f"Image '{path}' is missing.") from None
    except Exception as e:
        raise IgamError(f"Cannot read image '{path}' ({type(e).__name__}: {e}); the file is truncated, "
                        "corrupted or not an image. Delete or replace it.") from None


def _stack(images: list[np.ndarray], where: Path) -> np.ndarray:
    shapes = sorted({x.shape for x in images})
    if len(shapes) > 1:
        raise IgamError(f"Images in '{where}' have different sizes {shapes[:3]}; resize them to one size "
                        "first.")
    return np.stack(images)


def load_tiny_imagenet(root: Path) -> Arrays | None:
    """ROOT/tiny-imagenet-200/: wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and
    val/val_annotations.txt (the labelled validation set serves as the test set)."""
    base = root / "tiny-imagenet-200"
    if not (base / "wnids.txt").exists():
        return None
    wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()})
    if not wnids:
        raise IgamError(f"'{base / 'wnids.txt'}' lists no classes (one WordNet id like n01443537 per line).")
    index = {w: i for i, w in enumerate(wnids)}
    xs, ys = [], []
    for w in wnids:
        folder = base / "train" / w / "images"
        files = sorted(f for f in folder.glob("*") if f.suffix.lower() in IMAGE_EXTS) \
            if folder.is_dir() else []
        if not files:
            raise IgamError(f"'{folder}' holds no images; the Tiny-ImageNet layout has "
                            "train/<wnid>/images/*.JPEG for every class of wnids.txt.")
        xs += [_read_image(f) for f in files]
        ys += [index[w]] * len(files)
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
    if not vx:
        raise IgamError(f"'{ann}' names no image of a class in wnids.txt; check the Tiny-ImageNet layout.")
    words = {}
    if (base / "words.txt").exists():
        for line in (base / "words.txt").read_text().splitlines():
            k, _, v = line.partition("\t")
            words[k] = v.split(",")[0].strip()
    return Arrays("tiny-imagenet", _to_nchw(_stack(xs, base / "train"), str(base)),
                  torch.tensor(ys, dtype=torch.int64), _to_nchw(_stack(vx, base / "val"), str(base)),
                  torch.tensor(vy, dtype=torch.int64), [words.get(w) or w for w in wnids],
                  f"tiny-imagenet-200 in {root}")


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
            raise IgamError(f"'{split}' holds no images ({', '.join(sorted(IMAGE_EXTS))}) in class folders.")
        x = _stack(xs, split)
        if all(np.array_equal(x[..., 0], x[..., c]) for c in (1, 2)):
            x = x[..., :1]  # grey images stored as RGB
        return _to_nchw(x, str(split)), torch.tensor(ys, dtype=torch.int64)

    xtr, ytr = read(path / "train")
    xte, yte = read(test_dir)
    check_test_labels(ytr, yte, f"ImageFolder '{path}'")
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
        if len(parts) > 3 or min(h, w, c, k) < 1 or k < 2 or max(h, w) > 512 or c > 16 or k > 1000:
            raise ValueError
    except ValueError:
        raise IgamError(f"Cannot read synthetic dataset spec '{name}'; write synthetic:HxWxC:K with sides "
                        "up to 512, up to 16 channels and 2 to 1000 classes, e.g. synthetic:32x32x3:10."
                        ) from None
    return h, w, c, k


SYNTHETIC_MAX_BYTES = 4 << 30  # the memory a synthetic dataset may take while it is made
SYNTHETIC_CHUNK = 256  # images transformed at a time (the noise is drawn at once, as it always was)


def synthetic_bytes(h: int, w: int, c: int, n_train: int = 4000, n_test: int = 1000) -> int:
    """Peak bytes `make_synthetic` needs: while a split is made, its float32 noise (4 bytes a value) and its
    uint8 images (1 byte), beside the uint8 images of the training split once the test split is made."""
    d = h * w * c
    return max(5 * n_train * d, n_train * d + 5 * n_test * d)


def check_synthetic_size(name: str, n_train: int = 4000, n_test: int = 1000) -> None:
    """Refuse a synthetic dataset too large to make (e.g. synthetic:512x512x16:10, 21 GB), before anything
    is allocated, naming the size asked for and the largest square images that fit.

    Raises:
        IgamError: over SYNTHETIC_MAX_BYTES.
    """
    h, w, c, k = parse_synthetic(name)
    need = synthetic_bytes(h, w, c, n_train, n_test)
    if need <= SYNTHETIC_MAX_BYTES:
        return
    side = int((SYNTHETIC_MAX_BYTES / synthetic_bytes(1, 1, c, n_train, n_test)) ** 0.5)
    while synthetic_bytes(side, side, c, n_train, n_test) > SYNTHETIC_MAX_BYTES:
        side -= 1
    raise IgamError(f"Dataset '{name}' would take {need / 1e9:.1f} GB to make: all {n_train} training and "
                    f"{n_test} test images of {h}x{w}x{c} are made before train_subset / test_subset pick "
                    "from them, and igam makes synthetic datasets of up to "
                    f"{SYNTHETIC_MAX_BYTES / 1e9:.1f} GB. "
                    f"With {c} channel(s) the largest square images that fit are {side}x{side} "
                    f"(synthetic:{side}x{side}x{c}:{k}); or use fewer channels.")


def make_synthetic(name: str = "synthetic", n_train: int = 4000, n_test: int = 1000,
                   seed: int = 1234) -> Arrays:
    """A learnable image task made on the fly: each class is a smooth random colour pattern; samples are
    shifted, contrast-jittered, noisy copies of their class pattern plus a distractor from another class.
    The same name always gives the same images (the random draws are made in one fixed order; the images
    are put together SYNTHETIC_CHUNK at a time, which changes no value).

    Raises:
        IgamError: for a malformed name, or one too large to make (`check_synthetic_size`).
    """
    check_synthetic_size(name, n_train, n_test)
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
        mix = torch.rand(n, 1, 1, 1, generator=g)
        shifts = torch.randint(-max(1, h // 8), max(1, h // 8) + 1, (n, 2), generator=g)
        noise = torch.randn((n, c, h, w), generator=g)
        out = torch.empty((n, c, h, w), dtype=torch.uint8)
        for i in range(0, n, SYNTHETIC_CHUNK):
            j = slice(i, i + SYNTHETIC_CHUNK)
            x = contrast[j] * templates[y[j]] + 0.35 * templates[other[j]] * mix[j]
            x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2))
                             for xi, s in zip(x, shifts[j])])
            out[j] = ((x / 1.35 + 0.12 * noise[j]).clamp(0, 1) * 255).round().to(torch.uint8)
        return out, y

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    return Arrays(name, xtr, ytr, xte, yte, [f"class{i}" for i in range(k)], "synthetic (made on the fly)")


def check_arrays(a: Arrays) -> Arrays:
    """Catch what would otherwise fail deep inside training: no images, labels out of range."""
    for split, x, y in (("train", a.x_train, a.y_train), ("test", a.x_test, a.y_test)):
        if len(x) == 0:
            raise IgamError(f"Dataset '{a.name}' has no {split} images ({a.source}).")
        if len(x) != len(y):
            raise IgamError(f"Dataset '{a.name}': {len(x)} {split} images but {len(y)} labels ({a.source}).")
        if split == "train":
            check_labels(a.y_train, a.y_test, f"Dataset '{a.name}'", inferred=False)
        k = a.num_classes
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise IgamError(f"Dataset '{a.name}': {split} labels run from {int(y.min())} to {int(y.max())}, "
                            f"but there are {k} classes (labels must be 0..{k - 1}) ({a.source}).")
    return a


def load_arrays(name: str, data_dir: str | Path | None = None, download: bool = False) -> Arrays:
    """Load a dataset by name; see the module docstring for where files are looked for."""
    try:
        return _load_arrays(str(name).strip(), data_dir, download)
    except OSError as e:  # unreadable folders or files (permissions, I/O errors) anywhere in a layout
        where = f" '{e.filename}'" if e.filename else ""
        raise IgamError(f"Cannot read dataset '{name}': {e.strerror or e}{where}. Check that the data files "
                        "and folders exist and are readable by this user.") from None


def _load_arrays(name: str, data_dir: str | Path | None, download: bool) -> Arrays:
    base, subset = split_subset(name)
    if subset is None:
        return _load_whole(name, data_dir, download)
    return check_arrays(select_classes(_load_whole(base, data_dir, download), subset, name))


def _load_whole(name: str, data_dir: str | Path | None, download: bool) -> Arrays:
    if name.startswith("synthetic"):
        return make_synthetic(name)
    if name.startswith("npz:"):
        return check_arrays(load_npz(Path(name[4:]), name))
    if name.startswith("imagefolder:"):
        return check_arrays(load_imagefolder(Path(name[len("imagefolder:"):])))
    if name not in NAMED:
        raise unknown("dataset", name, list(NAMED) + ["imagefolder:PATH", "npz:PATH", "synthetic"])
    root = Path(data_dir) if data_dir else default_data_dir()
    if root.exists() and not root.is_dir():
        raise IgamError(f"Data root '{root}' is a file, not a directory; data_dir (--data-dir) names a "
                        "folder.")
    if (root / f"{name}.npz").is_file():
        return check_arrays(load_npz(root / f"{name}.npz", name))
    out = load_standard(name, root) if root.is_dir() else None
    if out is None and download and name != "tiny-imagenet":
        _download(name, root)
        out = load_standard(name, root)
    if out is None:
        where = "does not exist" if not root.exists() else "does not hold it"
        raise IgamError(f"Dataset '{name}' not found: data root '{root}' {where}. "
                        f"{expected_files(name, root)}")
    return check_arrays(out)
