"""The sweeps of an evaluation: the radii of `--eps-sweep` (`parse_eps_sweep`; `large` is `large_eps`, where
accuracy must reach about 0) and the robustness curves drawn from their eval.json records
(`robustness_curve`, what RUN/robustness_curve.json holds); and the extra attacks of `--checks`
(`check_attacks`: FGSM, a PGD step sweep, a PGD-20 eps sweep, PGD-50 at the large eps, Square), whose
results the masking checks compare. igam.evaluate runs them.

    from igam.sweeps import parse_eps_sweep
    parse_eps_sweep("1/255,8/255,large", (3, 32, 32))   # [('1/255', 0.0039), ('8/255', ...), ('64/255', ...)]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from igam.attacks import FGSM, PGD, Attack, Square, column_name, pgd_step
from igam.attacks.presets import default_eps, is_mnist_like
from igam.errors import IgamError
from igam.records import per_class_accuracy, result_key, unpack_correct
from igam.units import check_eps, eps_text

__all__ = ["CHECK_STEPS", "EPS_SWEEP", "MAX_SWEEP", "check_attacks", "large_eps", "parse_eps_sweep",
           "robustness_curve"]

CHECK_STEPS = (10, 20, 50)  # PGD step counts of the --checks step sweep
EPS_SWEEP = (0.25, 0.5, 1.0, 1.5)  # multiples of eps of the --checks eps sweep (PGD-20)
MAX_SWEEP = 64  # radii of one --eps-sweep


def large_eps(shape: tuple[int, ...], eps: float = 0.0) -> float:
    """The radius at which PGD must reach about 0%: 0.5 for MNIST-like inputs, 64/255 for colour, and at
    least 1.5 eps."""
    return max(0.5 if is_mnist_like(shape) else 64 / 255, min(1.0, 1.5 * eps))


def parse_eps_sweep(sweep: str | list[str | float] | tuple[str | float, ...], shape: tuple[int, ...],
                    nominal: float | None = None) -> list[tuple[str, float]]:
    """The radii of `--eps-sweep`: '1/255,2/255,8/255,large' -> [('1/255', 0.0039), ('2/255', ...), ...,
    ('64/255', 0.251)], sorted by radius (L-inf, pixel units in (0, 1]), duplicates dropped. `large` stands
    for `large_eps(shape, nominal)` (0.5 on MNIST-like inputs, 64/255 otherwise: where accuracy must reach
    about 0), written as the number it is. Texts are kept as typed: they name the eval.json keys.

    Raises:
        IgamError: for an empty sweep or an empty entry ('1/255,,2/255'), a value that is not a radius in
            (0, 1] (0 is the clean point, which every curve has), or a text that is not a number.
    """
    parts = sweep.split(",") if isinstance(sweep, str) else list(sweep)
    items = [str(t).strip() for t in parts]
    if not any(items):
        raise IgamError("--eps-sweep is empty; give radii, e.g. --eps-sweep 1/255,2/255,4/255,8/255,16/255 "
                        "(add `large` to check that accuracy reaches about 0).")
    if not all(items):
        raise IgamError(f"--eps-sweep {','.join(items)!r} has an empty entry (two commas in a row, or one at "
                        "an end); give one radius between each pair of commas, e.g. 1/255,2/255,4/255.")
    if len(items) > MAX_SWEEP:
        raise IgamError(f"--eps-sweep has {len(items)} radii; a curve takes up to {MAX_SWEEP} (each radius "
                        f"runs every attack again): give {MAX_SWEEP} or fewer, e.g. 1/255,2/255,4/255,8/255.")
    nominal = default_eps(shape)[0] if nominal is None else nominal
    out: dict[float, tuple[str, float]] = {}
    for t in items:
        if t.lower() == "large":
            v = large_eps(shape, nominal)
            t = eps_text(v)
        else:
            v = check_eps(t, "--eps-sweep")
        if v <= 0:
            raise IgamError(f"--eps-sweep value {t!r} is 0: the clean accuracy is the curve's first point "
                            "anyway; give radii above 0.")
        out.setdefault(round(v, 12), (t.replace(" ", ""), v))
    return [out[k] for k in sorted(out)]


def check_attacks(model: nn.Module, shape: tuple[int, ...], eps: float, *, queries: int = 1000,
                  bn: str = "eval", seed: int = 0) -> list[tuple[str, Attack]]:
    """The extra attacks of --checks: FGSM, a PGD step sweep, a PGD-20 eps sweep, PGD-50 at a large eps
    (step 2.5 eps / 50, Madry et al.) and Square, as (label, attack) pairs. PGD steps follow the default
    step rule (`pgd_step`, 'reach')."""

    def pgd(e: float, k: int) -> PGD:
        return PGD(model, e, pgd_step(e, k, shape), k, bn=bn, seed=seed, step_rule="reach")

    out: list[tuple[str, Attack]] = [("fgsm", FGSM(model, eps, bn=bn, seed=seed))]
    out += [(f"pgd{k}", pgd(eps, k)) for k in CHECK_STEPS]
    out += [(f"pgd20@eps={eps_text(min(1.0, f * eps))}", pgd(min(1.0, f * eps), 20)) for f in EPS_SWEEP
            if f != 1.0]
    big = large_eps(shape, eps)
    out.append((f"pgd50@eps={eps_text(big)}", pgd(big, 50)))
    out.append((f"square{queries}", Square(model, eps, queries, bn=bn, seed=seed)))
    return out


def robustness_curve(records: dict[str, dict[str, Any]], attacks: list[str], sweep: list[tuple[str, float]],
                     y: torch.Tensor, *, bn: str = "eval", num_classes: int | None = None,
                     class_names: list[str] | None = None) -> dict[str, Any]:
    """The robustness curves of an eps sweep from its eval.json `records` (keyed by `result_key`): one
    curve per attack of `attacks` ('clean' skipped), each with one point per radius, the clean accuracy
    as its point at eps 0, and, with two or more attacks, the per-image worst case over them ('worst case',
    from the records' `correct` bits and labels y (n,)). Accuracies in [0, 1]; eps in pixel units.

    Returns {"eps": [0, eps_1, ...], "eps_text": ["0", "1/255", ...], "n", "seed", "bn", "curves": [{"attack",
    "label", "points": [{"eps", "eps_text", "key", "accuracy", "mean_class", "worst_class",
    "worst_class_index"}, ...]}, ...]}.

    Raises:
        IgamError: when a record of the sweep is missing from `records`.
    """
    keys = {("clean", 0.0): result_key("clean", None, bn)}
    names = [a for a in attacks if a != "clean"]
    for a in names:
        for t, v in sweep:
            keys[(a, v)] = result_key(a, t, bn)
    missing = [k for k in keys.values() if k not in records]
    if missing:
        raise IgamError(f"robustness_curve: no record for {', '.join(missing)}; evaluate them first.")
    clean = records[keys[("clean", 0.0)]]

    def point(e: float, text: str, key: str, rec: dict[str, Any]) -> dict[str, Any]:
        pc = rec.get("per_class") or {}
        return {"eps": e, "eps_text": text, "key": key, "accuracy": rec["accuracy"],
                "mean_class": pc.get("mean"), "worst_class": pc.get("worst"),
                "worst_class_index": pc.get("worst_class")}

    curves = []
    for a in names:
        points = [point(0.0, "0", keys[("clean", 0.0)], clean)]
        points += [point(v, t, keys[(a, v)], records[keys[(a, v)]]) for t, v in sweep]
        curves.append({"attack": a, "label": column_name(a), "points": points})
    n = int(clean["n"])
    if len(names) > 1 and all(isinstance(records[k].get("correct"), str) for k in keys.values()):
        points = [point(0.0, "0", keys[("clean", 0.0)], clean)]
        for t, v in sweep:
            both = torch.ones(n, dtype=torch.bool)
            for a in names:
                both &= unpack_correct(records[keys[(a, v)]]["correct"], n)
            rec = {"accuracy": float(both.float().mean()) if n else 0.0,
                   "per_class": per_class_accuracy(both, y[:n], num_classes, class_names)}
            points.append(point(v, t, "+".join(keys[(a, v)] for a in names), rec))
        curves.append({"attack": "worst case", "label": f"worst case ({', '.join(map(column_name, names))})",
                       "points": points})
    return {"eps": [0.0, *[v for _, v in sweep]], "eps_text": ["0", *[t for t, _ in sweep]], "n": n,
            "seed": clean.get("seed"), "bn": bn, "curves": curves}
