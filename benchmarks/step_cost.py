"""Cost of one training step: standard, PGD-7 AT, IGAM (exact) and IGAM (finite-difference), side by side.

    .venv/bin/python benchmarks/step_cost.py --model resnet20 --batch 128 --steps 10 --threads 2
    .venv/bin/python benchmarks/step_cost.py --tiny          # seconds; what tests/test_benchmarks.py runs

The set-up of the paper's Table 1 (MNIST -> CIFAR-10): a 3x32x32 student with 10 classes, a frozen
madry-mnist teacher behind the gray+crop28 adapter, a 5-layer discriminator with 16 channels in its first
layer, on one fixed batch of CIFAR-like random images. Every method runs the same step as `igam train`
(objective.loss, the NaN/Inf check, zero_grad, backward, gradient norm, optimizer step, after_step) on
its own copy of the same student, and the methods are interleaved (the order rotates every repetition),
so a change of machine load hits all of them alike (--clock cpu: CPU time of this process instead of wall
time, for a loaded shared CPU). Reported per method: median seconds per step,
images/s, and the peak memory of a step (CUDA: torch.cuda.max_memory_allocated; CPU on Linux: the rise of
the process's peak resident set over one step, after returning freed memory to the OS; else skipped).

--teacher-cache adds each IGAM method with the teacher-gradient cache of issue 15 (teacher_cache=on) beside
the uncached one: the batch is given its training-set positions (0..B-1), the cache is filled by the first
warm-up repetition, so the timed steps are those of a second epoch (J_t served, not computed). Printed with
it: cached / standard against the targets of issue 15 (FD forward <= 2.2, exact <= 2.9) and cached /
uncached.

--torch-double-backward adds exact IGAM with PyTorch's own double backward through convolutions and
train-mode BatchNorm (double_backward=torch, "igam-exact-torchdb") beside igam's lean one, which every other
exact IGAM method here uses (igam.method.double_backward); printed with it: lean / torch.

--routes adds the other routes from a robust teacher (issue 22) on the same student, teacher and batch:
fast AT, RRM (cached and uncached teacher features), IGAM with the cosine matching term and no
discriminator, ARD and RSLAD at fast AT's price (one attack step), and fast AT with each teacher term
(feature, soft labels, input gradient); printed with them: each step / standard against the target of
issue 22 (RRM with cached teacher features <= 1.3) and every method's passes per image of the timed
step (what `igam train` records in meta.json for the same objective) with their total (a double backward
counted as two) against standard's.

--fd-accuracy prints, instead of timings, how close the finite-difference gradient is to the exact one.

Ratios printed: IGAM-FD / PGD-7, IGAM-FD / standard and IGAM-exact / PGD-7, with the targets of issue 7
(<= 0.30, <= 2.3, <= 0.45), and IGAM-exact / standard; next to the IGAM / PGD-7 ratios, the paper's 0.43
(IGAM against PGD-7 training time on a GPU) as the anchor. --json PATH writes everything, including the
1-minute load average before and after (measure on a quiet machine: a shared CPU makes every number noisy).

CUDA (--device cuda): every timed step is bracketed by torch.cuda.synchronize, the peak memory of a step is
torch.cuda.max_memory_allocated, and TF32 is set per method as `igam train` runs it (--tf32 auto): off for
the finite-difference methods (igam train turns it off for those runs), torch's default for the others.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from igam.method.adapted import AdaptedTeacher
from igam.method.adapters import build_adapter
from igam.method.discriminator import GradientDiscriminator
from igam.method.matching import InputGradientMatching
from igam.models import create_model
from igam.objectives.base import Objective
from igam.objectives.cheap_at import FastAT
from igam.objectives.distill import ARD, RSLAD
from igam.objectives.igam import IGAMObjective
from igam.objectives.pgd_at import PGDAT
from igam.objectives.rrm import RRM
from igam.objectives.terms import FeatureMatching, GradientMatching, SoftLabels
from igam.train import nonfinite_terms

TARGETS = {"igam-fd / pgd7": 0.30, "igam-fd / standard": 2.3, "igam-exact / pgd7": 0.45}
ROUTE_TARGETS = {"rrm+cache / standard": 1.3}  # issue 22
# issue 15: a cached IGAM step against a standard step (resnet20 / wrn-16-4, 1 thread, quiet machine)
CACHE_TARGETS = {"igam-fd-forward+cache / standard": 2.2, "igam-fd+cache / standard": 2.2,
                 "igam-exact+cache / standard": 2.9}
PAPER_IGAM_OVER_PGD7 = 0.43  # the paper's IGAM / PGD-7 training-time ratio on a GPU: an anchor, not a target
MODELS = ("small-cnn", "resnet20", "wrn-16-4")


@dataclass
class Method:
    """One training method: its own student copy, optimiser and objective, and the step timings."""

    name: str
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    step: int = 0
    times: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    tf32: bool | None = None  # CUDA: TF32 (convolutions, matmuls) in this method's steps; None: as is

    def run_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The body of igam.train's loop, without logging and checkpoints. An objective that needs the
        batch's training-set positions (the teacher cache) gets 0..B-1: the same images every step."""
        if self.tf32 is not None:
            set_tf32(self.tf32)
        self.model.train()
        extra = {"index": torch.arange(len(x))} if self.objective.needs_index else {}
        loss, metrics, aux = self.objective.loss(self.model, x, y, self.step, **extra)
        self.optimizer.zero_grad(set_to_none=True)
        if not nonfinite_terms(loss, metrics):
            loss.backward()
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if bool(torch.isfinite(gnorm)):
                self.optimizer.step()
                self.objective.after_step(self.model, x, y, self.step, aux)
        self.step += 1


DEFAULT_TF32 = torch.backends.cudnn.allow_tf32  # torch's default at import (True: cuDNN convolutions in TF32)


def set_tf32(on: bool) -> None:
    """TF32 for cuDNN convolutions and CUDA matmuls (igam train turns both off for finite differences)."""
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def tf32_for(name: str, policy: str, device: torch.device) -> bool | None:
    """TF32 setting of a method's steps: None off CUDA; 'auto' is what igam train does (off for the
    finite-difference methods, torch's default for the others)."""
    if device.type != "cuda":
        return None
    if policy == "auto":
        return False if name.startswith("igam-fd") else DEFAULT_TF32
    return policy == "on"



def build_teacher(tiny: bool, device: torch.device) -> AdaptedTeacher:
    """A frozen madry-mnist (1x28x28) teacher behind gray+crop28, with a 10-class head (Table 1)."""
    body = create_model("madry-mnist", num_classes=10, in_chans=1, input_size=28, width=4 if tiny else 0)
    teacher = AdaptedTeacher(build_adapter("gray+crop28", (3, 32, 32), (1, 28, 28)), body, "eval")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).train()


def build_methods(args: argparse.Namespace, device: torch.device) -> list[Method]:
    """standard, pgd7, igam-exact and one igam-fd per finite-difference scheme, each on a copy of one
    student (same initial weights) with SGD as `igam train` uses it."""
    torch.manual_seed(0)
    width = 4 if args.tiny else 0
    student = create_model(args.model, num_classes=10, in_chans=3, input_size=32, width=width).to(device)
    teacher = build_teacher(args.tiny, device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    student, teacher = student.to(memory_format=fmt), teacher.to(memory_format=fmt)
    schemes = ("central", "forward") if args.fd_scheme == "both" else (args.fd_scheme,)
    methods: list[Method] = []

    def add(name: str, objective: Objective) -> None:
        model = copy.deepcopy(student)
        params = [*model.parameters(), *(q for m in objective.co_trained() for q in m.parameters())]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        methods.append(Method(name, model, objective.to(device), opt,
                              tf32=tf32_for(name, getattr(args, "tf32", "auto"), device)))

    add("standard", Objective())
    add("pgd7", PGDAT(8 / 255, 2 / 255, 7, random_start=True, attack_bn="eval", seed=0))
    variants = [("igam-exact", "exact", "central")]
    if getattr(args, "torch_double_backward", False):  # exact mode with PyTorch's own double backward
        variants.append(("igam-exact-torchdb", "exact", "central"))
    variants += [(f"igam-fd-{s}" if len(schemes) > 1 else "igam-fd", "finite-difference", s) for s in schemes]
    variants = [(n, m, s, False) for n, m, s in variants]
    if getattr(args, "teacher_cache", False):
        variants += [(f"{n}+cache", m, s, True) for n, m, s, _ in variants]
    for name, mode, scheme, cache in variants:
        torch.manual_seed(1)  # the same discriminator for every variant
        disc = GradientDiscriminator((3, 28, 28), layers=args.disc_layers, channels=4 if args.tiny else 16)
        disc = disc.to(memory_format=fmt)
        # the discriminator's optimiser as `igam transfer` builds it (SGD at the student's lr and schedule)
        disc_opt = torch.optim.SGD(disc.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        matching = InputGradientMatching(teacher, disc, lambda_adv=1.0, lambda_diff="auto", mode=mode,
                                         fd_step=args.fd_step, fd_scheme=scheme,
                                         disc_view=teacher.adapter.disc_view, disc_optimizer=disc_opt,
                                         disc_every=args.disc_every, disc_follow_lr=True,
                                         teacher_cache=cache,
                                         double_backward="torch" if "torchdb" in name else "lean")
        objective = IGAMObjective("igam", matching)
        objective.begin(10**6, 10**6)
        add(name, objective)
    if getattr(args, "routes", False):
        for name, objective in route_objectives(student, teacher, device):
            add(name, objective)
    return methods


def route_objectives(student: nn.Module, teacher: AdaptedTeacher,
                     device: torch.device) -> list[tuple[str, Objective]]:
    """The other routes as `igam train` builds them (the same classes and settings as the frontier files),
    their caches warm from the first (warm-up) repetition: begin(total, steps_per_epoch=1) makes every later
    step one of a second epoch, as in a cached run."""
    eps = 8 / 255
    out: list[tuple[str, Objective]] = []

    def feature(cache: bool) -> FeatureMatching:
        return FeatureMatching(teacher, student, (3, 32, 32), 1.0, cache=cache).to(device)

    def soft() -> SoftLabels:
        return SoftLabels(teacher, 1.0, 1.0, cache=True)

    matching = InputGradientMatching(teacher, None, lambda_adv=0.0, lambda_diff="auto", teacher_cache=True,
                                     include_ce=False)
    cosine = InputGradientMatching(teacher, None, lambda_adv=0.0, lambda_diff="auto", teacher_cache=True,
                                   diff_loss="cos")
    out += [("fast-at", FastAT(eps, 1.25 * eps)),
            ("rrm", RRM(feature(False))), ("rrm+cache", RRM(feature(True))),
            ("igam-cos+cache", IGAMObjective("igam", cosine)),
            ("ard-fgsm-rs+cache", ARD(SoftLabels(teacher, 1.0, 30.0, cache=True), 1.0, eps, 1.25 * eps, 1)),
            ("rslad-1step+cache", RSLAD(soft(), 5 / 6, eps, 1.25 * eps, 1)),
            ("fast-at+feature+cache", FastAT(eps, 1.25 * eps).with_term(feature(True))),
            ("fast-at+distill+cache", FastAT(eps, 1.25 * eps).with_term(soft())),
            ("fast-at+gradient+cache", FastAT(eps, 1.25 * eps).with_term(GradientMatching(matching)))]
    for _, objective in out:
        objective.begin(10**6, 1)
    return out


def step_passes(objective: Objective) -> dict[str, dict[str, float]]:
    """The passes per image of a step in the second epoch (what the timed, warm steps cost)."""
    return {net: dict(kinds) for net, kinds in objective.passes(10).items() if any(kinds.values())}


def total_passes(passes: dict[str, dict[str, float]]) -> float:
    """forward + backward + 2 x double backward, over every network (the frontier's cost)."""
    return sum(k.get("forward", 0) + k.get("backward", 0) + 2 * k.get("double_backward", 0)
               for k in passes.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Give freed heap memory back to the OS (glibc malloc_trim) and reset the process's peak RSS (Linux:
    /proc/self/clear_refs 5). False where either is unavailable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_kib("VmHWM") is not None


def peak_memory(method: Method, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float | None:
    """MiB a step needs beyond what is resident before it (None where it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        method.run_step(x, y)
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type != "cpu" or not _reset_peak_rss():
        return None
    base = _proc_kib("VmRSS")
    method.run_step(x, y)
    peak = _proc_kib("VmHWM")
    return None if base is None or peak is None else (peak - base) / 1024


def measure(methods: list[Method], x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
            device: torch.device, log: Callable[[str], None],
            clock: Callable[[], float] = time.perf_counter) -> None:
    """Interleaved timing: repetition r runs every method once, the order rotated by r. `clock` is wall
    time by default; time.process_time (--clock cpu) counts only this process's CPU time."""
    n = len(methods)
    for r in range(warmup + steps):
        for k in range(n):
            m = methods[(r + k) % n]
            _sync(device)
            t0 = clock()
            m.run_step(x, y)
            _sync(device)
            if r >= warmup:
                m.times.append(clock() - t0)
        if r >= warmup:
            log(f"  rep {r - warmup + 1}/{steps}: "
                + " ".join(f"{m.name}={m.times[-1]:.3f}s" for m in methods))


def ratios(results: dict[str, float]) -> dict[str, float]:
    """IGAM-FD / PGD-7, IGAM-FD / standard, IGAM-exact / PGD-7 (one pair per FD scheme measured)."""
    out = {"igam-exact / pgd7": results["igam-exact"] / results["pgd7"]}
    for name in (k for k in results if k.startswith("igam-fd")):
        out[f"{name} / pgd7"] = results[name] / results["pgd7"]
        out[f"{name} / standard"] = results[name] / results["standard"]
    return out


def extra_ratios(results: dict[str, float]) -> dict[str, float]:
    """IGAM-exact / standard and PGD-7 / standard (not in the issue-7 targets, but read beside them); with
    cached methods, each cached step against a standard step and against its uncached twin."""
    out = {"igam-exact / standard": results["igam-exact"] / results["standard"],
           "pgd7 / standard": results["pgd7"] / results["standard"]}
    for name in (k for k in results if "-torchdb" in k):  # the lean double backward's effect
        lean = name.replace("-torchdb", "")
        out[f"{lean} / {name}"] = results[lean] / results[name]
    for name in (k for k in results if k.endswith("+cache")):
        out[f"{name} / standard"] = results[name] / results["standard"]
        plain = name.removesuffix("+cache")
        if plain in results:
            out[f"{name} / {plain}"] = results[name] / results[plain]
    for name in ("fast-at", "rrm"):
        if name in results:
            out[f"{name} / standard"] = results[name] / results["standard"]
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def target_of(key: str) -> float | None:
    if key in ROUTE_TARGETS:
        return ROUTE_TARGETS[key]
    if "+cache" in key:
        return CACHE_TARGETS.get(key)
    for pattern, bound in TARGETS.items():
        a, b = pattern.split(" / ")
        if key.startswith(a) and key.endswith(" / " + b):
            return bound
    return None


def fd_accuracy(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """cos(finite-difference student gradient, exact student gradient) of one IGAM step, on the benchmark's
    set-up, for the model's default activation and softplus, both schemes and several fd_step values."""
    import torch.nn.functional as F

    teacher = build_teacher(args.tiny, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    out: dict[str, dict[str, float]] = {}
    for act in ("default", "softplus"):
        torch.manual_seed(0)
        student = create_model(args.model, num_classes=10, in_chans=3, input_size=32,
                               width=4 if args.tiny else 0, activation=act).to(device).train()
        torch.manual_seed(1)
        disc = GradientDiscriminator((3, 28, 28), layers=args.disc_layers, channels=4 if args.tiny else 16)
        disc = disc.to(device)

        def grad(student: nn.Module, disc: nn.Module, **kw: Any) -> torch.Tensor:
            igm = InputGradientMatching(teacher, disc, lambda_adv=1.0, lambda_diff="auto",
                                        disc_view=teacher.adapter.disc_view, **kw)
            student.zero_grad(set_to_none=True)
            igm(student, x, y)["loss"].backward()
            return torch.cat([p.grad.flatten() for p in student.parameters()])

        exact = grad(student, disc, mode="exact")
        row = {}
        for scheme, steps in (("central", (1e-2, 1e-3)), ("forward", (1e-2, 1e-3, 1e-4))):
            for step in steps:
                fd = grad(student, disc, mode="finite-difference", fd_scheme=scheme, fd_step=step)
                row[f"{scheme} {step:g}"] = float(F.cosine_similarity(exact, fd, dim=0))
        out[act] = row
        print(f"{args.model} ({act} activation): "
              + ", ".join(f"{k}: {v:.4f}" for k, v in row.items()), flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-cnn",
                   help="student: " + " | ".join(MODELS) + " (or any zoo name)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fd-scheme", default="both", choices=("central", "forward", "both"))
    p.add_argument("--fd-step", type=float, default=1e-2,
                   help="relative finite-difference step (no effect on speed)")
    p.add_argument("--disc-layers", type=int, default=5)
    p.add_argument("--disc-every", type=int, default=5)
    p.add_argument("--tf32", choices=("auto", "on", "off"), default="auto",
                   help="CUDA only: TF32 during the steps; auto = as igam train runs each method (off for "
                   "finite differences, torch's default otherwise)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for every network and the batch")
    p.add_argument("--memory", choices=("auto", "off"), default="auto", help="measure peak memory per step")
    p.add_argument("--fd-accuracy", action="store_true",
                   help="instead of timing: cos(finite-difference, exact) of the student's IGAM gradient "
                   "for both schemes and several fd_step values (use a small --batch, e.g. 16)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or the process's CPU time (CPU only: with --threads 1 it is far less "
                   "sensitive to other jobs on a shared machine than wall time)")
    p.add_argument("--teacher-cache", action="store_true",
                   help="also time each IGAM method with the teacher-gradient cache (warm: second epoch)")
    p.add_argument("--torch-double-backward", action="store_true",
                   help="also time exact IGAM with PyTorch's own double backward through convolutions and "
                        "BatchNorm (double_backward=torch; the other IGAM methods use igam's lean one)")
    p.add_argument("--routes", action="store_true",
                   help="also time the other routes from a robust teacher (fast AT, RRM, IGAM cos, ARD, "
                        "RSLAD, fast AT + each teacher term), warm caches, with each step's passes per image")
    p.add_argument("--tiny", action="store_true", help="width-4 networks, batch 8, 2 steps: a smoke test")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--quiet", action="store_true", help="no per-repetition lines")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.steps, args.warmup = min(args.batch, 8), min(args.steps, 2), min(args.warmup, 1)
    if args.teacher_cache or args.routes:
        args.warmup = max(args.warmup, 1)  # the first repetition fills the cache: time a second epoch
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("step_cost: --device cuda, but no CUDA device is available here; use --device cpu "
                         "or run on a GPU machine.")
    if args.fd_accuracy:
        cos = fd_accuracy(args, device)
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "batch": args.batch, "cosine": cos}))
        return {"cosine": cos}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    methods = build_methods(args, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=gen).to(device)  # CIFAR-like: uniform pixels in [0, 1]
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    log = (lambda s: None) if args.quiet else print
    machine = device_name(device)
    print(f"step_cost: {args.model}, batch {args.batch}, {args.steps} timed + {args.warmup} warm-up "
          f"repetitions, {args.clock} clock, device {device}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {machine}; "
          f"1-min load {load_before:.2f}")
    tf32_before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        if args.clock == "cpu" and device.type != "cpu":
            raise SystemExit("step_cost: --clock cpu times CPU work only; use --clock wall on CUDA.")
        measure(methods, x, y, args.steps, args.warmup, device, log,
                time.process_time if args.clock == "cpu" else time.perf_counter)
        if args.memory == "auto":
            for m in methods:
                m.peak_mib = peak_memory(m, x, y, device)
    finally:  # the per-method TF32 settings must not leak into the caller (tests call main in-process)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32_before
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    med = {m.name: statistics.median(m.times) for m in methods}
    mem_label = "CUDA max allocated" if device.type == "cuda" else "peak RSS rise"
    w = max(18, *(len(m.name) + 2 for m in methods))
    passes = {m.name: step_passes(m.objective) for m in methods}
    print(f"{'method':<{w}}{'s/step':>10}{'images/s':>11}{'x standard':>12}{'passes':>8}{'x std':>7}"
          f"  peak memory ({mem_label})")
    for m in methods:
        mem = f"{m.peak_mib:.0f} MiB" if m.peak_mib is not None else "not measured"
        tp = total_passes(passes[m.name])
        print(f"{m.name:<{w}}{med[m.name]:>10.4f}{args.batch / med[m.name]:>11.1f}"
              f"{med[m.name] / med['standard']:>12.2f}{tp:>8.3g}{tp / total_passes(passes['standard']):>7.2f}"
              f"  {mem}")
    r = ratios(med)
    extra = extra_ratios(med)
    for key, value in {**r, **extra}.items():
        bound = target_of(key)
        verdict = "" if bound is None else f"  (target <= {bound}: {'met' if value <= bound else 'MISSED'})"
        if key.endswith(" / pgd7") and key.startswith("igam"):
            verdict += f"  (paper, GPU: {PAPER_IGAM_OVER_PGD7})"
        print(f"{key:<{max(28, len(key))}} {value:.3f}{verdict}")
    print(f"1-min load average: {load_before:.2f} before, {load_after:.2f} after")
    out = {"model": args.model, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
           "threads": args.threads, "device": str(device),
           "channels_last": args.channels_last, "torch": torch.__version__, "machine": machine,
           "tiny": args.tiny, "teacher_cache": args.teacher_cache, "torch_double_backward":
           args.torch_double_backward,
           "clock": args.clock,
           "load_before": load_before, "load_after": load_after,
           "seconds_per_step": med, "images_per_s": {k: args.batch / v for k, v in med.items()},
           "all_times": {m.name: m.times for m in methods},
           "peak_memory_mib": {m.name: m.peak_mib for m in methods}, "ratios": r, "extra_ratios": extra,
           "passes_per_image": passes, "routes": args.routes,
           "paper_igam_over_pgd7": PAPER_IGAM_OVER_PGD7, "tf32": {m.name: m.tf32 for m in methods},
           "cuda": torch.version.cuda if device.type == "cuda" else None,
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
