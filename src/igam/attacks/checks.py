"""Gradient-masking sanity checks (Athalye, Carlini & Wagner, ICML 2018; Carlini et al. 2019, "On evaluating
adversarial robustness", sec. 5; Croce & Hein 2020's AutoAttack flags).

A robust-accuracy number is only trustworthy when the attacks behave as attacks on a model with useful
gradients do. Each check compares accuracies measured on the same first-n test images with the same
BatchNorm mode, allowing binomial noise (`noise_margin`):

- steps_monotone: more PGD steps must not raise accuracy.
- converged: PGD must have converged: its steps can travel at least eps (it can reach the ball's
  boundary), and more steps (same eps, loss, restarts, schedule) must not lower accuracy by more than
  noise (the fewer-step attack under-attacks: its number is an overestimate). A failure here is the
  attack's, not the model's: it says to run more steps or a larger step, never "gradient masking".
- eps_monotone: a larger eps must not raise accuracy: PGD with the same steps, loss and restarts, and
  any attack against itself across eps (the points of an `--eps-sweep` curve, eval.json keys NAME@eps=...).
- large_eps_zero: at a large eps (0.5 MNIST, 64/255 colour) PGD and AutoAttack must reach about 0%
  (the PGD-50 of --checks, or an `--eps-sweep` that includes `large`).
- blackbox_vs_whitebox: Square (no gradients) must not beat white-box PGD.
- fgsm_vs_pgd: single-step FGSM must not beat iterative PGD.
- gradients: inputs whose loss gradient is exactly zero or not finite (also RobustBench's admission
  check "input gradients are non-zero and finite").
- deterministic, no_inference_optimisation: RobustBench's other admission checks (`admission.py`).

`run_checks(..., current=NAMES)` judges what one command ran: a failure that involves none of the
observations named in `current` (only older records of eval.json) is not counted; it is listed under
`older` in the check's verdict, named as such.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.attacks.admission import ADMISSION_CHECKS
from igam.attacks.base import margin
from igam.attacks.pgd import STRONG_PGD, path_length
from igam.utils import bn_mode

CHECKS = ("steps_monotone", "converged", "eps_monotone", "large_eps_zero", "blackbox_vs_whitebox",
          "fgsm_vs_pgd", "gradients", *ADMISSION_CHECKS)
LARGE_EPS_MAX_ACC = 0.02  # "about 0%": accuracy allowed at the large eps, before the noise margin
ZERO_GRAD_MAX_FRAC = 0.01  # share of inputs with an all-zero margin-loss gradient that still passes


def noise_margin(p: float, n: int, z: float = 3.0) -> float:
    """Slack for comparing two accuracies near p measured on n examples: z binomial standard errors plus
    one example."""
    p = min(max(p, 0.0), 1.0)
    return z * math.sqrt(p * (1 - p) / max(n, 1)) + 1.0 / max(n, 1)


@dataclass
class Observation:
    """One measured accuracy, with what is needed to compare it with others."""

    name: str
    kind: str  # fgsm | pgd | square | autoattack
    eps: float
    accuracy: float
    n: int
    bn: str = "eval"
    steps: int = 0
    restarts: int = 1
    loss: str = "ce"
    step_size: float = 0.0  # PGD's (first) step (0: unknown)
    schedule: str = "constant"  # PGD's step schedule (constant or cosine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _same_eps(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))


def base_name(name: str) -> str:
    """The attack of an observation's name: 'pgd20@eps=8/255@bn=train' -> 'pgd20' (checks keep 'check:')."""
    return name.split("@", 1)[0]


def run_checks(obs: list[Observation], eps: float, large_eps: float,
               grads: dict[str, Any] | None = None,
               admission: dict[str, dict[str, Any]] | None = None,
               current: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Pass/fail (or None: not enough measurements) and a one-line reason for every check of `CHECKS`.
    `grads` are `gradient_stats`; `admission` the verdicts of `admission.admission_checks` (not run when
    None). `current`: the names of the observations the calling command made (None: all); a failure among
    other observations only is listed under the verdict's `older`, not counted."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[int, str], list[Observation]] = {}
    for o in obs:
        groups.setdefault((o.n, o.bn), []).append(o)

    def now(*names: Observation) -> bool:
        return current is None or any(o.name in current for o in names)

    def verdict(name: str, fails: list[tuple[str, bool]], compared: int, what: str,
                how: str = "use --checks") -> None:
        mine, older = [f for f, cur in fails if cur], [f for f, cur in fails if not cur]
        if compared == 0:
            out[name] = {"passed": None, "detail": f"not run: needs {what} ({how})"}
        elif mine:
            out[name] = {"passed": False, "detail": "; ".join(mine)}
        else:
            out[name] = {"passed": True, "detail": f"{compared} comparison(s) within noise"
                         + (f" ({len(older)} older record(s) fail: see older)" if older else "")}
        if older:
            out[name]["older"] = older

    # more steps -> not higher accuracy; larger eps -> not higher accuracy
    fails_s, fails_e, fails_c, n_s, n_e, n_c = [], [], [], 0, 0, 0
    drops: list[str] = []
    for o in (o for o in obs if o.kind == "pgd" and o.step_size > 0 and o.steps > 0):
        n_c += 1
        path = path_length(o.step_size, o.steps, o.schedule)
        if path < o.eps * (1 - 1e-6):
            how = (f"{o.steps} steps of {o.step_size:.4g}" if o.schedule == "constant" else
                   f"{o.steps} {o.schedule}-decaying steps from {o.step_size:.4g}")
            fails_c.append((f"{o.name}: {how} move at most {path:.4g} < eps {o.eps:.4g}, so it cannot "
                            "reach the ball's boundary (use the default step rule, or more steps)", now(o)))
    for (n, _), g in groups.items():
        pgd = [o for o in g if o.kind == "pgd"]
        for a in pgd:
            for b in pgd:
                m = noise_margin((a.accuracy + b.accuracy) / 2, n)
                same_kind = a.loss == b.loss and a.restarts == b.restarts and a.schedule == b.schedule
                if _same_eps(a.eps, b.eps) and same_kind and a.steps < b.steps:
                    n_s += 1
                    n_c += 1
                    if b.accuracy > a.accuracy + m:
                        fails_s.append((f"{b.name} {_pct(b.accuracy)} > {a.name} {_pct(a.accuracy)} "
                                        f"(+{_pct(m)} noise) at eps {a.eps:.4g}, n={n}", now(a, b)))
                    if b.accuracy < a.accuracy - m:
                        drops.append(f"{a.name} {_pct(a.accuracy)} -> {b.name} {_pct(b.accuracy)}")
                        fails_c.append((f"{a.name} has not converged: {b.name} gives {_pct(b.accuracy)}, "
                                        f"{_pct(a.accuracy - b.accuracy)} lower (noise {_pct(m)}) at eps "
                                        f"{a.eps:.4g}, n={n}; report the stronger attack", now(a, b)))
                if same_kind and a.steps == b.steps and a.eps < b.eps - 1e-9:
                    n_e += 1
                    if b.accuracy > a.accuracy + m:
                        fails_e.append((f"eps {b.eps:.4g}: {_pct(b.accuracy)} > eps {a.eps:.4g}: "
                                        f"{_pct(a.accuracy)} (+{_pct(m)} noise), {a.steps} steps, n={n}",
                                        now(a, b)))
        others = [o for o in g if o.kind != "pgd"]  # one attack across eps: the points of a sweep
        for a in others:
            for b in others:
                if base_name(a.name) == base_name(b.name) and a.kind == b.kind and a.eps < b.eps - 1e-9:
                    m = noise_margin((a.accuracy + b.accuracy) / 2, n)
                    n_e += 1
                    if b.accuracy > a.accuracy + m:
                        fails_e.append((f"{base_name(a.name)} at eps {b.eps:.4g}: {_pct(b.accuracy)} > at "
                                        f"eps {a.eps:.4g}: {_pct(a.accuracy)} (+{_pct(m)} noise), n={n}",
                                        now(a, b)))
    verdict("steps_monotone", fails_s, n_s, "PGD with two step counts")
    if out["steps_monotone"]["passed"] and drops:
        out["steps_monotone"]["detail"] = (f"{n_s} comparison(s): more steps never raised accuracy, but "
                                           f"lowered it beyond noise ({'; '.join(drops)}): see converged")
    verdict("converged", fails_c, n_c, "PGD with a known step size, or with two step counts")
    verdict("eps_monotone", fails_e, n_e, "PGD at two eps", "use --checks or --eps-sweep")

    # large eps -> about 0%
    big = [o for g in groups.values() for o in g
           if o.kind in ("pgd", "autoattack") and o.eps >= large_eps - 1e-9]
    fails = [(f"{o.name} at eps {o.eps:.4g}: {_pct(o.accuracy)} > {_pct(LARGE_EPS_MAX_ACC)}, n={o.n}", now(o))
             for o in big if o.accuracy > LARGE_EPS_MAX_ACC + noise_margin(LARGE_EPS_MAX_ACC, o.n)]
    verdict("large_eps_zero", fails, len(big), f"PGD or AutoAttack at eps >= {large_eps:.4g}",
            "use --checks, or add `large` to --eps-sweep")

    # black-box and single-step must not beat the best white-box PGD at the same eps
    for name, kinds, what in (("blackbox_vs_whitebox", ("square",), "Square and PGD at the same eps"),
                              ("fgsm_vs_pgd", ("fgsm",), "FGSM and PGD at the same eps")):
        fails: list[tuple[str, bool]] = []
        compared = 0
        for (n, _), g in groups.items():
            for weak in (o for o in g if o.kind in kinds):
                pgd = [o for o in g if o.kind == "pgd" and _same_eps(o.eps, weak.eps)]
                if not pgd:
                    continue
                best = min(pgd, key=lambda o: o.accuracy)
                compared += 1
                m = noise_margin((weak.accuracy + best.accuracy) / 2, n)
                if weak.accuracy < best.accuracy - m:
                    fails.append((f"{weak.name} {_pct(weak.accuracy)} < {best.name} {_pct(best.accuracy)} "
                                  f"(-{_pct(m)} noise) at eps {weak.eps:.4g}, n={n}", now(weak, best)))
        verdict(name, fails, compared, what)

    if grads is not None:
        bad = grads["zero_margin"] > ZERO_GRAD_MAX_FRAC or grads["nonfinite"] > 0
        out["gradients"] = {"passed": not bad, "detail": (
            f"{_pct(grads['zero_margin'])} of {grads['n']} inputs have an all-zero margin-loss gradient "
            f"(limit {_pct(ZERO_GRAD_MAX_FRAC)}), {_pct(grads['nonfinite'])} a non-finite one; "
            f"cross-entropy gradient all-zero for {_pct(grads['zero_ce'])}"), **grads}
    else:
        out["gradients"] = {"passed": None, "detail": "not run"}
    for name in ADMISSION_CHECKS:
        out[name] = dict((admission or {}).get(name) or {"passed": None, "detail": "not run"})
    return out


def summary(checks: dict[str, dict[str, Any]]) -> str:
    """One line for tables and logs: 'pass (3 of 7 ran)', 'FAIL: converged (5 of 7 ran)', 'not run'.
    Never a bare 'pass' when some checks did not run."""
    ran = [k for k, v in checks.items() if isinstance(v, dict) and v.get("passed") is not None]
    failed = [k for k in ran if checks[k].get("passed") is False]
    if not ran:
        return "not run"
    count = f"{len(ran)} of {len(checks)} ran"
    return f"FAIL: {', '.join(failed)} ({count})" if failed else f"pass ({count})"


def gradient_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
                   bn: str = "eval") -> dict[str, Any]:
    """Share of inputs (float, [0,1]) whose input gradient of the CE loss / of the logit margin is all zero,
    and share with a non-finite gradient (ART's loss_gradient_check). The margin loss works on logits, so
    a zero there is masking, not softmax saturation of a confident model."""
    zero_ce = zero_margin = nonfinite = 0
    device = next(model.parameters()).device
    with bn_mode(model, bn), torch.enable_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device).clone().requires_grad_(True)
            yb = y[i:i + batch_size].to(device)
            logits = model(xb)
            # allow_unused: a model that detaches its input has no gradient at all (None): count it as zero
            g_ce, = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xb, retain_graph=True,
                                        allow_unused=True)
            g_m, = torch.autograd.grad(margin(logits, yb).sum(), xb, allow_unused=True)
            g_ce = torch.zeros_like(xb) if g_ce is None else g_ce
            g_m = torch.zeros_like(xb) if g_m is None else g_m
            zero_ce += int((g_ce.flatten(1) == 0).all(1).sum())
            zero_margin += int((g_m.flatten(1) == 0).all(1).sum())
            finite = torch.isfinite(g_ce.flatten(1)).all(1) & torch.isfinite(g_m.flatten(1)).all(1)
            nonfinite += int((~finite).sum())
    n = max(len(x), 1)
    return {"n": len(x), "zero_ce": zero_ce / n, "zero_margin": zero_margin / n, "nonfinite": nonfinite / n}


ATTACK_CHECKS = ("converged",)  # failures of the attack itself (too few or too small steps), not the model's


def warning_block(run: str, checks: dict[str, dict[str, Any]]) -> str:
    """The loud text printed when a check fails ('' when none does), each failure explained by its own
    cause: an attack that did not converge (run more or larger steps), gradient masking (the model's
    gradients mislead the attacks), or a RobustBench admission rule (a random model, or one that optimises
    at inference)."""
    failed = {k: v for k, v in checks.items() if v.get("passed") is False}
    if not failed:
        return ""
    bar = "=" * 100
    admission = [k for k in failed if k in ADMISSION_CHECKS]
    attack = [k for k in failed if k in ATTACK_CHECKS]
    masking = [k for k in failed if k not in ADMISSION_CHECKS and k not in ATTACK_CHECKS]
    parts = [f"{len(attack)} attack convergence"] if attack else []
    parts += [f"{len(masking)} gradient-masking", f"{len(admission)} RobustBench admission"]
    lines = [bar, f"WARNING: {run}: {len(failed)} check(s) FAILED ({', '.join(parts)})."]
    if attack:
        lines += ["An attack did not converge (its steps cannot reach the eps-ball's boundary, or more steps "
                  "still lower the accuracy): its number is an overestimate because of the attack, not the "
                  "model.",
                  "Run more steps or a larger step (the default step rule; igam's strongest PGD is "
                  f"{STRONG_PGD}) and report the stronger attack's number."]
    if masking:
        lines += ["Its robust accuracies are probably overestimates: the gradients mislead the attacks "
                  "(Athalye et al. 2018).",
                  "Trust black-box (square) and AutoAttack numbers more, and report these failures with the "
                  "results."]
    if admission:
        lines += ["The model is random or optimises at inference: fixed-model attacks do not evaluate it, "
                  "and RobustBench would not admit it.",
                  "Evaluate it adaptively (autoattack-rand for randomness, attacks through its inference "
                  "loop) and report these failures with the results."]
    lines += [f"  FAIL {k}: {v['detail']}" for k, v in failed.items()]
    lines.append(bar)
    return "\n".join(lines)


def older_notes(checks: dict[str, dict[str, Any]]) -> list[str]:
    """Failures found only among older records of eval.json (not made by the command that judged them),
    one line each, named as such: they do not count against the command's verdict."""
    return [f"{k}: an older record, not from this command, fails: {line}" for k, v in checks.items()
            if isinstance(v, dict) for line in v.get("older") or []]
