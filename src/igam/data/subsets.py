"""Class subsets of a dataset, named in the dataset's name: `NAME:CLASSES`.

CLASSES is a named subset (`cifar10:animals`, `cifar10:vehicles`) or a comma-separated list of class
indices or class names of the whole dataset (`cifar10:0,1,8,9`, `cifar10:cat,dog`, `mnist:3,5`). The
images of those classes are kept, in train and test split alike, and their labels are renumbered 0 .. K-1
*in the order given* (`cifar10:9,0` makes truck class 0 and airplane class 1); class names follow their
classes. The subset is part of the dataset's name, so a run records it (meta.json `data.dataset`) and
everything that reloads a run's data (evaluation, teachers, reports) gets the same subset back.

Where the subset goes in each kind of name:
- a named dataset: `cifar10:animals`, `fashion-mnist:0,9`;
- synthetic data: the fourth field, `synthetic:32x32x3:10:2,3,4`;
- files: after the path, `npz:PATH:0,1` and `imagefolder:PATH:cat,dog` (the last `:` field, when it holds
  no path separator and the whole of PATH:FIELD is not itself an existing path).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from igam.errors import IgamError, suggest

# Named subsets by dataset: class indices of the whole dataset, in the order of the new labels.
NAMED_SUBSETS: dict[str, dict[str, tuple[int, ...]]] = {
    # airplane 0, automobile 1, bird 2, cat 3, deer 4, dog 5, frog 6, horse 7, ship 8, truck 9
    "cifar10": {"animals": (2, 3, 4, 5, 6, 7), "vehicles": (0, 1, 8, 9)},
}
SYNTAX = ("a named subset (cifar10:animals, cifar10:vehicles) or a comma-separated list of class indices or "
          "class names, e.g. cifar10:0,1,8,9 or cifar10:cat,dog")


def split_subset(name: str) -> tuple[str, str | None]:
    """(the whole dataset's name, the subset text), the subset None when the name has none:
    'cifar10:animals' -> ('cifar10', 'animals'); 'synthetic:8x8x3:4:0,1' -> ('synthetic:8x8x3:4', '0,1');
    'npz:/d/x.npz:0,1' -> ('npz:/d/x.npz', '0,1'); 'cifar10' -> ('cifar10', None)."""
    name = str(name).strip()
    if name.startswith("synthetic"):
        parts = name.split(":")
        return (":".join(parts[:3]), parts[3]) if len(parts) == 4 else (name, None)
    if name.startswith(("npz:", "imagefolder:")):
        prefix, _, rest = name.partition(":")
        path, sep, tail = rest.rpartition(":")
        if sep and path and "/" not in tail and "\\" not in tail and not Path(rest).exists():
            return f"{prefix}:{path}", tail
        return name, None
    base, sep, tail = name.partition(":")
    return (base, tail) if sep else (name, None)


def _tokens(subset: str, name: str) -> list[str]:
    tokens = [t.strip() for t in subset.split(",")]
    if not subset.strip():
        raise IgamError(f"Dataset '{name}' names no classes after its ':'; write {SYNTAX}.")
    if any(not t for t in tokens):
        raise IgamError(f"Dataset '{name}': the class list '{subset}' has an empty entry; write {SYNTAX}.")
    return tokens


def static_classes(base: str, subset: str) -> list[int] | None:
    """The subset's class indices when they follow from the name alone (a named subset, or indices), else
    None (class names need the data). Used where no data is loaded: cost estimates, miniatures."""
    named = NAMED_SUBSETS.get(base, {})
    if subset in named:
        return list(named[subset])
    tokens = [t.strip() for t in subset.split(",")]
    return [int(t) for t in tokens] if tokens and all(re.fullmatch(r"\d+", t) for t in tokens) else None


def subset_size(base: str, subset: str) -> int:
    """How many classes the subset names (without loading any data)."""
    classes = static_classes(base, subset)
    return len(classes) if classes is not None else len([t for t in subset.split(",") if t.strip()])


def resolve_classes(base: str, subset: str, class_names: list[str], num_classes: int,
                    name: str = "") -> list[int]:
    """The subset's class indices in the whole dataset, in the order of the new labels.

    Raises:
        IgamError: an unknown subset name or class name, an index out of range, a class named twice, or
            fewer than two classes.
    """
    name = name or f"{base}:{subset}"
    named = NAMED_SUBSETS.get(base, {})
    if subset.strip().lower() in named:  # named subsets, like class names, in any case
        classes = list(named[subset.strip().lower()])
    else:
        tokens = _tokens(subset, name)
        lower = {n.lower(): i for i, n in reversed(list(enumerate(class_names)))}
        classes = []
        for t in tokens:
            if re.fullmatch(r"[+-]?\d+", t):  # a negative index is out of range below, not a name
                classes.append(int(t))
            elif t in class_names:
                classes.append(class_names.index(t))
            elif t.lower() in lower:
                classes.append(lower[t.lower()])
            elif len(tokens) == 1:
                everywhere = ", ".join(f"{b}:{s}" for b, d in NAMED_SUBSETS.items() for s in d)
                known = (f"{base}'s named subsets: {', '.join(named)}" if named
                         else f"{base} has no named subsets ({everywhere} are named)")
                raise IgamError(f"Dataset '{name}': unknown class subset '{t}'.{suggest(t, list(named))} "
                                f"{known}; otherwise list class indices or names, e.g. {base}:0,1.")
            else:
                shown = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
                raise IgamError(f"Dataset '{name}': no class is named '{t}'.{suggest(t, class_names)} "
                                f"{base}'s classes: {shown} (or give indices 0 .. {num_classes - 1}).")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise IgamError(f"Dataset '{name}': class {bad[0]} is out of range; {base} has {num_classes} "
                        f"classes, 0 .. {num_classes - 1}.")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        what = ", ".join(f"{c} ({class_names[c]})" if c < len(class_names) else str(c) for c in twice)
        raise IgamError(f"Dataset '{name}': class {what} is named twice; list each class once.")
    if len(classes) < 2:
        raise IgamError(f"Dataset '{name}': a subset needs at least two classes (a one-class model is "
                        "trivially 100% accurate).")
    return classes


def select_classes(arrays: Any, subset: str, name: str) -> Any:
    """The images of the subset's classes (an `Arrays`), labels renumbered 0 .. K-1 in the subset's
    order, class names carried along, named `name` (the full name with its subset)."""
    base = arrays.name
    classes = resolve_classes(base, subset, list(arrays.class_names), arrays.num_classes, name)
    top = max(arrays.num_classes, int(arrays.y_train.max()) + 1, int(arrays.y_test.max()) + 1)
    lut = torch.full((top,), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))

    def pick(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = lut[y]
        keep = new >= 0
        return x[keep], new[keep]

    x_train, y_train = pick(arrays.x_train, arrays.y_train)
    x_test, y_test = pick(arrays.x_test, arrays.y_test)
    names = [arrays.class_names[c] if c < len(arrays.class_names) else str(c) for c in classes]
    return dataclasses.replace(arrays, name=name, x_train=x_train, y_train=y_train, x_test=x_test,
                               y_test=y_test, class_names=names,
                               source=f"{arrays.source}; classes {','.join(map(str, classes))} as 0 .. "
                                      f"{len(classes) - 1}")
