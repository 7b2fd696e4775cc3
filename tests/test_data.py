"""Datasets by every name, from real-format fixtures written on the fly, and the batch loader."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from igam.data import (
    BatchLoader,
    load_arrays,
    load_data,
    make_synthetic,
    parse_synthetic,
    resolve_augment,
    spec_of,
)
from igam.data.__init__ import random_crop
from igam.errors import IgamError

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# fixture writers: the exact on-disk formats of the standard downloads
def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    head = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_layout(root: Path, folder: str, n_train: int = 12, n_test: int = 6, gz: bool = False) -> dict:
    arrays = {"xtr": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "ytr": RNG.integers(0, 10, n_train).astype(np.uint8),
              "xte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "yte": RNG.integers(0, 10, n_test).astype(np.uint8)}
    raw = root / folder / "raw"
    for key, name in (("xtr", "train-images-idx3-ubyte"), ("ytr", "train-labels-idx1-ubyte"),
                      ("xte", "t10k-images-idx3-ubyte"), ("yte", "t10k-labels-idx1-ubyte")):
        write_idx(raw / name, arrays[key], gz=gz)
    return arrays


def make_cifar_layout(root: Path, hundred: bool = False, per_batch: int = 4, protocol: int = 2) -> dict:
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or cifar-100-python/{train,test,meta}.
    (pickle is used here only to write the fixture, exactly as the CIFAR python version is distributed.)"""
    k = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    n_train = per_batch * (5 if hundred else 1)
    labels_key = "fine_labels" if hundred else "labels"
    xs, ys = [], []
    test_file = "test" if hundred else "test_batch"
    for fname, n in [(f, n_train) for f in train_files] + [(test_file, per_batch)]:
        x = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in RNG.integers(0, k, n)]
        d = {"batch_label": fname, labels_key: y, "data": x, "filenames": [f"{i}.png" for i in range(n)]}
        if hundred:
            d["coarse_labels"] = [v // 5 for v in y]
        with open(folder / fname, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
        xs.append(x)
        ys.append(y)
    names = [f"name{i}" for i in range(k)]
    meta = {"fine_label_names": names, "coarse_label_names": ["c"] * 20} if hundred else \
        {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return {"xtr": np.concatenate(xs[:-1]), "ytr": sum(ys[:-1], []), "xte": xs[-1], "yte": ys[-1],
            "names": names}


def make_svhn_layout(root: Path, n: int = 5) -> dict:
    sio = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy (pip install scipy)")
    out = {}
    for split in ("train", "test"):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)
        root.mkdir(parents=True, exist_ok=True)
        sio.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return out


def save_image(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.squeeze()).save(path, format=fmt)


def make_tiny_imagenet_layout(root: Path, wnids: tuple[str, ...] = ("n02", "n01", "n03"),
                              per_class: int = 2) -> None:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}, other name\n" for w in wnids) + "n99\tunused\n")
    ann = []
    for w in wnids:
        for i in range(per_class):
            img = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            if i == 1:  # real Tiny-ImageNet has some greyscale JPEGs
                img = img[..., 0]
            save_image(base / "train" / w / "images" / f"{w}_{i}.JPEG", img, "JPEG")
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        name = f"val_{len(ann)}.JPEG"
        save_image(base / "val" / "images" / name, RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
        ann.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    (base / "test" / "images").mkdir(parents=True)  # unlabelled: ignored


def make_imagefolder(root: Path, grey: bool = False, size: int = 8) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                img = RNG.integers(0, 256, (size, size), dtype=np.uint8)
                img = np.repeat(img[..., None], 3, axis=2) if grey else \
                    RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
                save_image(root / split / c / f"{i}.png", img)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_datasets(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    ref = make_idx_layout(tmp_path, folder, gz=gz)
    a = load_arrays(name, tmp_path)
    assert a.x_train.shape == (12, 1, 28, 28) and a.x_test.shape == (6, 1, 28, 28)
    assert a.x_train.dtype == torch.uint8 and a.y_train.dtype == torch.int64
    assert np.array_equal(a.x_train[:, 0].numpy(), ref["xtr"])
    assert np.array_equal(a.y_test.numpy(), ref["yte"])
    assert a.num_classes == 10 and len(a.class_names) == 10
    if name == "fashion-mnist":
        assert a.class_names[9] == "Ankle boot"


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_python_layout(tmp_path: Path, protocol: int) -> None:
    ref = make_cifar_layout(tmp_path, protocol=protocol)
    a = load_arrays("cifar10", tmp_path)
    assert a.x_train.shape == (20, 3, 32, 32) and a.x_test.shape == (4, 3, 32, 32)
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, each row-major
    assert np.array_equal(a.x_train.reshape(20, -1).numpy(), ref["xtr"])
    assert a.x_train[0, 1, 0, 1] == ref["xtr"][0, 1024 + 1]
    assert a.y_train.tolist() == ref["ytr"] and a.y_test.tolist() == ref["yte"]
    assert a.class_names == ref["names"] and a.num_classes == 10


def test_cifar100_python_layout(tmp_path: Path) -> None:
    ref = make_cifar_layout(tmp_path, hundred=True)
    a = load_arrays("cifar100", tmp_path)
    assert a.x_train.shape == (20, 3, 32, 32) and a.num_classes == 100
    assert a.y_train.tolist() == ref["ytr"] and a.class_names[5] == "name5"


def test_cifar_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    make_cifar_layout(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": Payload()}, f)
    with pytest.raises(IgamError, match=r"data_batch_3.*not allowed in a data file"):
        load_arrays("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_truncated_batch(tmp_path: Path) -> None:
    make_cifar_layout(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "test_batch"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(IgamError, match="test_batch.*truncated, corrupted"):
        load_arrays("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    with pytest.raises(IgamError, match="data_batch_2' is missing"):
        load_arrays("cifar10", tmp_path)


def test_svhn_mat_files(tmp_path: Path) -> None:
    ref = make_svhn_layout(tmp_path)
    a = load_arrays("svhn", tmp_path)
    x, y = ref["train"]
    assert a.x_train.shape == (5, 3, 32, 32)
    assert np.array_equal(a.x_train[2].numpy(), x[:, :, :, 2].transpose(2, 0, 1))
    assert a.y_train.tolist() == [0, 1, 2, 0, 9]  # label 10 is the digit 0
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 junk")
    with pytest.raises(IgamError, match="test_32x32.mat.*SVHN .mat"):
        load_arrays("svhn", tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(IgamError, match="SVHN is incomplete"):
        load_arrays("svhn", tmp_path)


def test_tiny_imagenet_standard_layout(tmp_path: Path) -> None:
    make_tiny_imagenet_layout(tmp_path)
    a = load_arrays("tiny-imagenet", tmp_path)
    assert a.x_train.shape == (6, 3, 64, 64) and a.x_test.shape == (3, 3, 64, 64)
    assert a.y_train.tolist() == [0, 0, 1, 1, 2, 2]  # classes in sorted wnid order
    assert a.y_test.tolist() == [1, 0, 2]  # val_0 is n02 (index 1), val_1 n01, val_2 n03
    assert a.class_names == ["thing n01", "thing n02", "thing n03"]
    grey = a.x_train[1]  # the greyscale JPEG became three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_tiny_imagenet_broken_layouts(tmp_path: Path) -> None:
    make_tiny_imagenet_layout(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    (base / "val" / "images" / "val_1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(IgamError, match="Cannot read image .*val_1.JPEG"):
        load_arrays("tiny-imagenet", tmp_path)
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(IgamError, match="val_annotations.txt' is missing"):
        load_arrays("tiny-imagenet", tmp_path)
    for f in (base / "train" / "n03" / "images").iterdir():
        f.unlink()
    with pytest.raises(IgamError, match="n03/images' holds no images"):
        load_arrays("tiny-imagenet", tmp_path)


@pytest.mark.parametrize("grey", [False, True])
def test_imagefolder(tmp_path: Path, grey: bool) -> None:
    make_imagefolder(tmp_path, grey=grey)
    a = load_arrays(f"imagefolder:{tmp_path}")
    assert a.x_train.shape == (6, 1 if grey else 3, 8, 8) and a.x_test.shape[0] == 4
    assert a.class_names == ["cat", "dog"] and a.y_train.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(IgamError, match="does not exist"):
        load_arrays(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "train").mkdir()
    with pytest.raises(IgamError, match="must contain train/<class>/ and test/<class>/"):
        load_arrays(f"imagefolder:{tmp_path}")
    (tmp_path / "test").mkdir()
    with pytest.raises(IgamError, match="has no class folders"):
        load_arrays(f"imagefolder:{tmp_path}")
    make_imagefolder(tmp_path)
    save_image(tmp_path / "test" / "bird" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(IgamError, match="bird' has no counterpart"):
        load_arrays(f"imagefolder:{tmp_path}")
    (tmp_path / "test" / "bird" / "0.png").unlink()
    (tmp_path / "test" / "bird").rmdir()
    save_image(tmp_path / "train" / "cat" / "big.png", np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(IgamError, match="different sizes"):
        load_arrays(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "cat" / "big.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(IgamError, match="Cannot read image .*big.png"):
        load_arrays(f"imagefolder:{tmp_path}")


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_layouts(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)  # NHWC, as in ../shared/data/cifar10.npz
    y = np.arange(10) % 3
    p = _npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4],
             class_names=np.array(["a", "b", "c"]))
    a = load_arrays(f"npz:{p}")
    assert a.x_train.shape == (10, 3, 6, 6) and a.class_names == ["a", "b", "c"]
    assert np.array_equal(a.x_train.permute(0, 2, 3, 1).numpy(), x)
    p = _npz(tmp_path / "grey.npz", x_train=x[..., 0], y_train=y.astype(np.uint8), x_test=x[:2, ..., 0],
             y_test=y[:2])
    a = load_arrays(f"npz:{p}")
    assert a.x_train.shape == (10, 1, 6, 6) and a.num_classes == 3 and a.y_train.dtype == torch.int64
    # a named dataset found as <data_dir>/<name>.npz
    _npz(tmp_path / "mnist.npz", x_train=x[..., 0], y_train=y, x_test=x[:2, ..., 0], y_test=y[:2])
    assert load_arrays("mnist", tmp_path).x_train.shape == (10, 1, 6, 6)


@pytest.mark.parametrize("arrays,msg", [
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.zeros(2)}, "lacks the arrays"),
    ({"x_train": np.zeros((2, 4, 4), np.float32), "y_train": np.zeros(2, int),
      "x_test": np.zeros((2, 4, 4), np.float32), "y_test": np.zeros(2, int)}, "must be uint8"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array([0, -1]),
      "x_test": np.zeros((1, 4, 4), np.uint8), "y_test": np.zeros(1, int)}, "labels run from -1"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array([0, 1, 1]),
      "x_test": np.zeros((1, 4, 4), np.uint8), "y_test": np.zeros(1, int)}, "number of images and labels"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array([0, 1]),
      "x_test": np.zeros((1, 5, 5), np.uint8), "y_test": np.zeros(1, int)}, "differ in shape"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array([0.5, 1]),
      "x_test": np.zeros((1, 4, 4), np.uint8), "y_test": np.zeros(1, int)}, "whole numbers"),
    ({"x_train": np.zeros((0, 4, 4), np.uint8), "y_train": np.zeros(0, int),
      "x_test": np.zeros((1, 4, 4), np.uint8), "y_test": np.zeros(1, int)}, "no train images"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array([0, 2]),
      "x_test": np.zeros((1, 4, 4), np.uint8), "y_test": np.zeros(1, int),
      "class_names": np.array(["a", "b"])}, "there are 2 classes"),
])
def test_npz_errors(tmp_path: Path, arrays: dict, msg: str) -> None:
    p = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(IgamError, match=msg):
        load_arrays(f"npz:{p}")


def test_npz_unreadable(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(IgamError, match="Cannot read .*junk.npz' as an npz dataset"):
        load_arrays(f"npz:{tmp_path / 'junk.npz'}")
    obj = np.empty(2, dtype=object)
    _npz(tmp_path / "obj.npz", x_train=obj, y_train=obj, x_test=obj, y_test=obj)
    with pytest.raises(IgamError, match="Cannot read"):  # object arrays would need pickle: refused
        load_arrays(f"npz:{tmp_path / 'obj.npz'}")
    with pytest.raises(IgamError, match="does not exist"):
        load_arrays(f"npz:{tmp_path / 'missing.npz'}")


def test_named_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(IgamError, match="Unknown dataset 'mnsit'. Did you mean 'mnist'"):
        load_arrays("mnsit", tmp_path)
    with pytest.raises(IgamError, match=r"data root '.*nope' does not exist.*MNIST/raw"):
        load_arrays("mnist", tmp_path / "nope")
    with pytest.raises(IgamError, match=r"does not hold it.*cifar-10-batches-py"):
        load_arrays("cifar10", tmp_path)
    with pytest.raises(IgamError, match="tiny-imagenet-200"):
        load_arrays("tiny-imagenet", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(IgamError, match="is a file, not a directory"):
        load_arrays("mnist", tmp_path / "file")


def test_corrupt_idx_files(tmp_path: Path) -> None:
    make_idx_layout(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    img = raw / "t10k-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-10])
    with pytest.raises(IgamError, match="t10k-images-idx3-ubyte' holds .* truncated or corrupted"):
        load_arrays("mnist", tmp_path)
    img.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(IgamError, match="bad header"):
        load_arrays("mnist", tmp_path)
    img.unlink()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08 not gzip data")
    with pytest.raises(IgamError, match="truncated or corrupted"):
        load_arrays("mnist", tmp_path)
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(IgamError, match="holds only part of mnist: t10k-images-idx3-ubyte"):
        load_arrays("mnist", tmp_path)


def test_real_mnist_npz(real_data_dir: Path) -> None:
    a = load_arrays("mnist", real_data_dir)
    assert a.x_train.shape == (60000, 1, 28, 28) and a.x_test.shape == (10000, 1, 28, 28)
    assert a.y_train.bincount().tolist()[:3] == [5923, 6742, 5958]
    spec = spec_of(load_data("mnist", str(real_data_dir), train_subset=20000))
    assert spec.mean[0] == pytest.approx(0.1307, abs=0.003) and spec.num_classes == 10


def test_real_cifar10_npz(real_cifar_dir: Path) -> None:
    a = load_data("cifar10", str(real_cifar_dir), test_subset=100)
    assert a.x_train.shape == (50000, 3, 32, 32) and a.x_test.shape == (100, 3, 32, 32)
    assert a.class_names[0] == "airplane" and a.y_train.bincount().tolist() == [5000] * 10
    assert spec_of(a).mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.01)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape,k", [("synthetic", (3, 32, 32), 10),
                                          ("synthetic:28x28x1:10", (1, 28, 28), 10),
                                          ("synthetic:64x64x3:5", (3, 64, 64), 5),
                                          ("synthetic:8x12x2:2", (2, 8, 12), 2),
                                          ("synthetic::4", (3, 32, 32), 4)])
def test_synthetic_shapes(name: str, shape: tuple, k: int) -> None:
    a = make_synthetic(name, n_train=64, n_test=16)
    assert a.shape == shape and a.num_classes == k and a.x_train.dtype == torch.uint8
    assert set(a.y_train.tolist()) <= set(range(k))
    b = make_synthetic(name, n_train=64, n_test=16)  # made on the fly, but always the same
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


@pytest.mark.parametrize("name", ["synthetic:abc", "synthetic:32x32:10", "synthetic:32x32x3:1",
                                  "synthetic:0x4x1",
                                  "synthetic:4096x4096x3:10", "synthetic:8x8x1:10:extra"])
def test_synthetic_bad_specs(name: str) -> None:
    with pytest.raises(IgamError, match="synthetic:HxWxC:K"):
        parse_synthetic(name)


def test_synthetic_task_is_learnable_and_improves_with_epochs() -> None:
    """A linear softmax classifier on the synthetic task: better than chance after 1 epoch, better still
    after 4 (the real networks are trained on it in test_train.py)."""
    a = make_synthetic("synthetic:16x16x3:10", n_train=2000, n_test=500)
    x, y = a.x_train.float().flatten(1) / 255, a.y_train
    xt = a.x_test.float().flatten(1) / 255
    mu, sd = x.mean(0), x.std(0) + 1e-3
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.05, momentum=0.9)
    accs = []
    for _ in range(4):
        for i in range(0, len(x), 100):
            loss = torch.nn.functional.cross_entropy(((x[i:i + 100] - mu) / sd) @ w, y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accs.append(float((((xt - mu) / sd) @ w).argmax(1).eq(a.y_test).float().mean()))
    assert accs[0] > 0.3 and accs[-1] > accs[0] and accs[-1] > 0.5, accs


# ---------------------------------------------------------------------------------------------
def _loader(augment: str = "none", noise: float = 0.0, **kw) -> BatchLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(40)
    return BatchLoader(x, y, kw.pop("batch_size", 8), augment=augment, noise=noise, seed=kw.pop("seed", 0),
                       crop_padding=2, **kw)


def test_loader_order_is_a_pure_function_of_seed_epoch_and_index() -> None:
    L = _loader("crop-flip", noise=0.1)
    assert len(L) == 5
    e0 = list(L.epoch(0))
    again = list(_loader("crop-flip", noise=0.1).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))
    tail = list(L.epoch(0, start=3))  # what a resumed run sees
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(tail, e0[3:]))
    e1 = list(L.epoch(1))
    assert not torch.equal(torch.cat([b[1] for b in e0]), torch.cat([b[1] for b in e1]))
    assert sorted(torch.cat([b[1] for b in e1]).tolist()) == list(range(40))  # a permutation
    other = list(_loader("crop-flip", noise=0.1, seed=1).epoch(0))
    assert not torch.equal(torch.cat([b[1] for b in e0]), torch.cat([b[1] for b in other]))


def test_loader_ranks_split_the_global_batch() -> None:
    whole = list(_loader("crop-flip", batch_size=8).epoch(2))
    r0 = list(_loader("crop-flip", batch_size=4, rank=0, world=2).epoch(2))
    r1 = list(_loader("crop-flip", batch_size=4, rank=1, world=2).epoch(2))
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), xw) and torch.equal(torch.cat([y0, y1]), yw)


def test_no_augmentation_is_exact() -> None:
    L = _loader("none")
    x, y = next(iter(L.epoch(0)))
    assert x.dtype == torch.float32 and torch.equal(x, L.x[y].float() / 255)


def test_flip_and_noise() -> None:
    L = _loader("flip", noise=0.05)
    plain = _loader("none")
    flipped = 0
    for (x, _), (xp, _) in zip(L.epoch(0), plain.epoch(0)):
        for xi, pi in zip(x, xp):
            is_flip = (xi - pi.flip(2)).abs().max() <= 0.05 + 1e-6
            is_same = (xi - pi).abs().max() <= 0.05 + 1e-6
            assert is_flip or is_same
            flipped += int(is_flip and not is_same)
        assert x.min() >= 0 and x.max() <= 1
        assert (x - xp).abs().max() > 0  # noise was added
    assert 5 < flipped < 35  # about half of 40


def test_random_crop_matches_a_reference() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 2, 5, 7)
    out = random_crop(x, 2, g)
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 5, (16,), generator=g)
    ox = torch.randint(0, 5, (16,), generator=g)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    ref = torch.stack([xp[i, :, oy[i]:oy[i] + 5, ox[i]:ox[i] + 7] for i in range(16)])
    assert torch.equal(out, ref)
    assert (oy != 2).any() and (ox != 2).any()  # the crops do move


def test_crop_augmentation_shifts_content() -> None:
    L, plain = _loader("crop"), _loader("none")
    moved = 0
    for (x, _), (xp, _) in zip(L.epoch(0), plain.epoch(0)):
        for xi, pi in zip(x, xp):
            shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                      if torch.equal(xi, _shift(pi, dy, dx))]
            assert shifts, "every crop is a shift of the image with zero fill"
            moved += int((0, 0) not in shifts)
    assert moved > 20


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return xp[:, 2 + dy:2 + dy + x.shape[1], 2 + dx:2 + dx + x.shape[2]]


def test_loader_errors_and_augment_auto() -> None:
    with pytest.raises(IgamError, match="cannot fill one batch of 64"):
        _loader(batch_size=64)
    assert resolve_augment("auto", (3, 32, 32)) == "crop-flip"
    assert resolve_augment("auto", (1, 28, 28)) == "none"
    assert resolve_augment("flip", (1, 28, 28)) == "flip"


def test_subsets_and_spec() -> None:
    a = load_data("synthetic:8x8x1:3", train_subset=100, test_subset=10)
    assert len(a.x_train) == 100 and len(a.y_test) == 10
    spec = spec_of(a)
    assert spec.shape == (1, 8, 8) and spec.num_classes == 3 and len(spec.mean) == 1
    assert spec.to_dict()["class_names"] == ["class0", "class1", "class2"]


def test_unreadable_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_layout(tmp_path, "MNIST")

    def denied(*_: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "MNIST" / "raw"))

    monkeypatch.setattr("igam.data.sources.load_standard", denied)
    with pytest.raises(IgamError, match=r"Cannot read dataset 'mnist': Permission denied '.*raw'\. Check"):
        load_arrays("mnist", tmp_path)
