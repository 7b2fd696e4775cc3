"""scripts/gpu-check: one prepared check of igam's CUDA paths on one GPU, well inside 8 minutes.

Three modes:

  scripts/gpu-check --pack [--data-root $IGAM_DATA]
      On the CPU machine, beforehand: writes .gpu-data/mnist.npz (all of MNIST) and .gpu-data/cifar10.npz
      (the first 10000 training and 2000 test images, uint8, the same arrays as the source) and adds
      /.gpu-data/ to the repository's .git/info/exclude. The folder is then carried to the GPU machine with
      the working tree (it is ignored by git, so it must be named in the carry list).

  PYTHONPATH=src python3 scripts/gpu-check OUTDIR [--data .gpu-data] [--budget-s 420]
      On the GPU machine. Four steps, each timed, each passed/failed/skipped on its own (a failure never
      stops the later steps; a step that would overrun --budget-s is recorded as "skipped: budget"):
        tests     python3 -m pytest -q -m cuda tests/ (tests/test_cuda.py: bf16 vs fp32 input gradients,
                  finite differences with TF32 off, torch.compile, channels_last, CUDA memory figures)
        bench     benchmarks/step_cost.py on resnet20 and preact-resnet18, batch 256, device cuda:
                  images/s and IGAM exact / FD-forward / FD-central against standard and PGD-7, each
                  IGAM step also with the teacher-gradient cache, exact also with PyTorch's own double
                  backward (--teacher-cache --torch-double-backward)
        transfer  igam run experiments/gpu/check-transfer.yaml on the packed data: MNIST teacher, its
                  fine-tuning, preact-resnet18 students (standard, PGD-7, IGAM, IGAM-FD) for 2 epochs,
                  clean + PGD-20 on 1000 test images: GPU seconds per epoch side by side
        ddp       torchrun with one process: benchmarks/ddp_smoke.py (IGAM steps under DDP with NCCL) and
                  `-m igam transfer` (the CLI under torchrun) with the teacher of the transfer step
      Writes OUTDIR/gpu-check.json (everything), OUTDIR/gpu-check.md (the tables for docs/PERFORMANCE.md)
      and OUTDIR/gpu-check.log (the output of every command). Exit status 1 if any step failed.

  scripts/gpu-check --cpu-smoke OUTDIR
      The same code path on the CPU with tiny sizes (a tiny pack of the real data when it is found, else
      synthetic arrays of the same layout; width-4 networks; a few steps), for CI. The tests step only
      checks that the CUDA tests are collected and skip cleanly.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEPS = ("tests", "bench", "transfer", "ddp")
TITLES = {"tests": "CUDA tests (pytest -m cuda)", "bench": "step cost (benchmarks/step_cost.py)",
          "transfer": "short real transfer (igam run)", "ddp": "DDP under torchrun (1 process, NCCL)"}
EXPERIMENT = REPO / "experiments" / "gpu" / "check-transfer.yaml"
BENCH_MODELS = ("resnet20", "preact-resnet18")
STUDENTS = ("standard", "pgd7", "igam", "igam_fd")  # stages of the experiment compared per epoch
PAPER_IGAM_OVER_PGD7 = 0.43  # the paper's IGAM / PGD-7 training-time ratio: an anchor, not a measurement
TARGET_IGAM_EPOCH_OVER_PGD7 = 0.35  # issue 15's target for an IGAM epoch against a PGD-7 epoch on a GPU
# seconds: (cap of the step, least time left to start it); the budget bounds every command as well
LIMITS = {"tests": (200, 45), "bench": (150, 40), "transfer": (220, 70), "ddp": (120, 30)}
PACK_LIMIT_MIB = 50
DEFAULT_DATA = ".gpu-data"


# ---------------------------------------------------------------------------------------------
# packing the data for the GPU machine
def read_npz_prefix(path: Path, key: str, n: int) -> np.ndarray:
    """The first n rows of array `key` of an npz file, decompressing only those rows (n <= 0: all)."""
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: {key} is not a plain C-order array")
        rows = shape[0] if n <= 0 else min(n, shape[0])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        buf = f.read(rows * row_bytes)
    return np.frombuffer(buf, dtype=dtype).reshape((rows, *shape[1:])).copy()


def pack_dataset(src: Path, dst: Path, n_train: int, n_test: int) -> dict[str, Any]:
    """dst: the first n_train / n_test images of src (0: all of them; then the file is copied as is)."""
    if not src.is_file():
        raise SystemExit(f"gpu-check --pack: {src} does not exist; give --data-root the folder with "
                         "mnist.npz and cifar10.npz (e.g. $IGAM_DATA).")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with np.load(src, allow_pickle=False) as d:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in d.files]
        if missing:
            raise SystemExit(f"gpu-check --pack: {src} lacks {missing}; igam reads x_train, y_train, x_test, "
                             "y_test (uint8 images, integer labels).")
        names = d["class_names"] if "class_names" in d.files else None
    if n_train <= 0 and n_test <= 0:
        shutil.copyfile(src, dst)
    else:
        arrays = {"x_train": read_npz_prefix(src, "x_train", n_train),
                  "y_train": read_npz_prefix(src, "y_train", n_train),
                  "x_test": read_npz_prefix(src, "x_test", n_test),
                  "y_test": read_npz_prefix(src, "y_test", n_test)}
        if names is not None:
            arrays["class_names"] = names
        if arrays["x_train"].dtype != np.uint8:
            raise SystemExit(f"gpu-check --pack: {src} holds {arrays['x_train'].dtype} images, not uint8.")
        tmp = dst.with_name(dst.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(dst)
    with np.load(dst, allow_pickle=False) as d:
        info = {k: [list(d[k].shape), str(d[k].dtype)] for k in ("x_train", "y_train", "x_test", "y_test")}
    return {"file": str(dst), "bytes": dst.stat().st_size, "arrays": info}


def git_exclude(folder: Path, say: Callable[[str], None] = print) -> str:
    """Add /<folder relative to the work tree>/ to the repository's info/exclude (resolved through git, so
    a worktree writes to its common git directory). Returns what was done."""
    where = folder.resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        exclude = subprocess.run(["git", "-C", top, "rev-parse", "--git-path", "info/exclude"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        msg = f"{folder} is not inside a git work tree: nothing to exclude"
        say(f"gpu-check --pack: {msg}")
        return msg
    exclude_path = Path(exclude) if Path(exclude).is_absolute() else Path(top) / exclude
    pattern = "/" + folder.resolve().relative_to(Path(top).resolve()).as_posix() + "/"
    lines = exclude_path.read_text().splitlines() if exclude_path.is_file() else []
    if pattern in lines:
        msg = f"{pattern} already in {exclude_path}"
    else:
        exclude_path.parent.mkdir(parents=True, exist_ok=True)
        with exclude_path.open("a") as f:
            if lines and lines[-1] != "":
                f.write("\n")
            f.write(f"# data packed for the GPU machine by scripts/gpu-check --pack\n{pattern}\n")
        msg = f"added {pattern} to {exclude_path}"
    say(f"gpu-check --pack: {msg}")
    return msg


def find_data_root(given: str | None) -> Path | None:
    """--data-root, else $IGAM_DATA, else ../shared/data beside the repository, if it holds both files."""
    candidates = [given, os.environ.get("IGAM_DATA"), str(REPO.parent / "shared" / "data")]
    for cand in candidates:
        if cand and (Path(cand) / "mnist.npz").is_file() and (Path(cand) / "cifar10.npz").is_file():
            return Path(cand)
    return None


def pack(data_root: str | None, out: Path, cifar_train: int, cifar_test: int, mnist_train: int = 0,
         mnist_test: int = 0, exclude: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    root = find_data_root(data_root)
    if root is None:
        raise SystemExit("gpu-check --pack: no folder with mnist.npz and cifar10.npz found (tried "
                         f"--data-root, $IGAM_DATA and {REPO.parent / 'shared' / 'data'}); give --data-root.")
    t0 = time.time()
    files = [pack_dataset(root / "mnist.npz", out / "mnist.npz", mnist_train, mnist_test),
             pack_dataset(root / "cifar10.npz", out / "cifar10.npz", cifar_train, cifar_test)]
    total = sum(f["bytes"] for f in files)
    for f in files:
        shapes = ", ".join(f"{k} {'x'.join(map(str, s))} {t}" for k, (s, t) in f["arrays"].items())
        say(f"gpu-check --pack: {f['file']}: {f['bytes'] / 2**20:.1f} MiB ({shapes})")
    say(f"gpu-check --pack: {total / 2**20:.1f} MiB in all from {root} in {time.time() - t0:.1f} s")
    if total > PACK_LIMIT_MIB * 2**20:
        raise SystemExit(f"gpu-check --pack: {total / 2**20:.1f} MiB is more than {PACK_LIMIT_MIB} MiB; the "
                         "working tree and the carried folders travel within 64 MiB. Pack fewer images.")
    done = git_exclude(out, say) if exclude else "not excluded"
    return {"root": str(root), "files": files, "bytes": total, "exclude": done}


def synthetic_pack(out: Path, n_train: int, n_test: int) -> None:
    """mnist.npz / cifar10.npz of random uint8 images with the real layout (no real data at hand)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, shape in (("mnist", (28, 28)), ("cifar10", (32, 32, 3))):
        arrays = {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
                  "y_train": rng.integers(0, 10, n_train).astype(np.int64),
                  "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
                  "y_test": rng.integers(0, 10, n_test).astype(np.int64),
                  "class_names": np.array([str(i) for i in range(10)])}
        np.savez_compressed(out / f"{name}.npz", **arrays)


# ---------------------------------------------------------------------------------------------
# running commands
@dataclass
class Command:
    cmd: list[str]
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    tail: list[str] = field(default_factory=list)


@dataclass
class Step:
    name: str
    title: str
    status: str = "not run"
    seconds: float = 0.0
    commands: list[Command] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


class StepFailed(Exception):
    """A check of a step did not hold (the message says which)."""


class Runner:
    """Runs the commands of the steps with the remaining budget as their timeout, their output appended to
    one log file; progress lines go to stdout and the log."""

    def __init__(self, out_dir: Path, work: Path, budget_s: float, smoke: bool, data: Path):
        self.out_dir, self.work, self.budget_s, self.smoke, self.data = out_dir, work, budget_s, smoke, data
        self.t0 = time.monotonic()
        self.log_path = out_dir / "gpu-check.log"
        self.log_file = self.log_path.open("a", buffering=1)
        self.python = sys.executable
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env["IGAM_DATA"] = str(data)
        if smoke:
            env["OMP_NUM_THREADS"] = "1"
            env["MKL_NUM_THREADS"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke is the CPU path, even on a machine with a GPU
        self.env = env

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def say(self, text: str) -> None:
        line = f"[gpu-check {self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def run(self, step: Step, cmd: list[str], timeout: float, ok_codes: tuple[int, ...] = (0,)) -> Command:
        """Run cmd in the repository root; its output goes to the log. Raises StepFailed on a bad exit
        status or a timeout (the process group is killed)."""
        timeout = max(1.0, min(timeout, self.remaining()))
        c = Command([str(a) for a in cmd])
        step.commands.append(c)
        shown = " ".join(c.cmd).replace(str(REPO) + "/", "").replace(self.python, "python3")
        self.say(f"{step.name}: $ {shown}  (timeout {timeout:.0f} s)")
        self.log_file.flush()
        start = self.log_path.stat().st_size
        t0 = time.monotonic()
        proc = subprocess.Popen(c.cmd, cwd=REPO, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            c.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            c.timed_out = True
            _kill_group(proc)
            c.rc = proc.wait()
        c.seconds = round(time.monotonic() - t0, 2)
        self.log_file.flush()
        with self.log_path.open("rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
        c.tail = [ln for ln in text.splitlines() if ln.strip()][-25:]
        if c.timed_out:
            raise StepFailed(f"timed out after {c.seconds:.0f} s: {shown}")
        if c.rc not in ok_codes:
            raise StepFailed(f"exit status {c.rc}: {shown}")
        return c

    def close(self) -> None:
        self.log_file.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a command that ran out of time, with the processes it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# the steps
def step_tests(r: Runner, step: Step) -> None:
    cap = LIMITS["tests"][0]
    cmd = [r.python, "-m", "pytest", "-q", "-m", "cuda", "tests/", "-p", "no:cacheprovider"]
    if not r.smoke and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "3"]  # the compile tests are CPU-bound (inductor); run them beside the others
    c = r.run(step, cmd, cap, ok_codes=(0, 1))
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "error", "deselected")}
    for line in reversed(c.tail):  # pytest ends with e.g. "== 9 passed, 1 skipped, 3 deselected in 61.2s =="
        found = re.findall(r"(\d+) (passed|failed|skipped|errors|error|deselected)", line)
        if found and re.match(r"^=*\s*\d+ \w+", line) and " in " in line:
            for n, k in found:
                counts[k] = int(n)
            break
    counts["errors"] += counts.pop("error")
    step.figures = counts
    if c.rc != 0 or counts["failed"] or counts["errors"]:
        raise StepFailed(f"pytest: {counts['failed']} failed, {counts['errors']} errors (exit status {c.rc})")
    if r.smoke:  # no GPU: every CUDA test must be collected and skipped, none run
        if counts["skipped"] < 1 or counts["passed"]:
            raise StepFailed(f"expected the CUDA tests to be collected and skipped, got {counts}")
    elif counts["passed"] < 1:
        raise StepFailed(f"no CUDA test passed: {counts}")


def step_bench(r: Runner, step: Step) -> None:
    results, problems = {}, []
    for model in BENCH_MODELS:  # a failure on one student still leaves the other measured
        out = r.work / f"bench-{model}.json"
        # beside each IGAM step: the teacher-gradient cache (kept on the device) and exact mode with
        # PyTorch's own double backward instead of igam's lean one (issue 15)
        cmd = [r.python, "benchmarks/step_cost.py", "--model", model, "--json", out, "--teacher-cache",
               "--torch-double-backward"]
        if r.smoke:
            cmd += ["--tiny", "--device", "cpu", "--threads", "1", "--memory", "off"]
        else:
            cmd += ["--batch", "256", "--device", "cuda", "--steps", "10", "--warmup", "3", "--threads", "4"]
        try:
            r.run(step, cmd, LIMITS["bench"][0] / len(BENCH_MODELS) + 15)
        except StepFailed as e:
            problems.append(str(e))
            continue
        res = json.loads(out.read_text())
        med = res["seconds_per_step"]
        rows = {}
        for name, sec in med.items():
            rows[name] = {"s_per_step": sec, "images_per_s": res["batch"] / sec,
                          "x_standard": sec / med["standard"], "x_pgd7": sec / med["pgd7"],
                          "peak_mib": res["peak_memory_mib"].get(name),
                          "tf32": (res.get("tf32") or {}).get(name)}
        results[model] = {"batch": res["batch"], "steps": res["steps"], "device": res["device"],
                          "machine": res["machine"], "methods": rows}
        step.figures = {"models": results, "paper_igam_over_pgd7": PAPER_IGAM_OVER_PGD7}
        r.say(f"bench: {model}: " + ", ".join(f"{k} {v['images_per_s']:.0f} img/s (x{v['x_standard']:.2f}, "
                                              f"{v['x_pgd7']:.2f} of PGD-7)" for k, v in rows.items()))
        if not r.smoke:
            bad = [k for k, v in rows.items() if not (v["peak_mib"] or 0) > 0]
            if bad:
                problems.append(f"{model}: no positive CUDA memory figure for {bad}")
    if problems:
        raise StepFailed("; ".join(problems))


def smoke_experiment(src: Path, dst: Path) -> Path:
    """The transfer experiment at smoke size: the same stages, width-4 networks, 128 images, a few steps."""
    import yaml

    raw = yaml.safe_load(src.read_text())
    for st in raw["stages"]:
        cfg = st["config"]
        cfg.update(train_subset=128, epochs=1, batch_size=32, width=4, eval_n=32, log_every=1)
        if "steps" in cfg:
            cfg["steps"] = min(int(cfg["steps"]), 2)
        if cfg.get("method") == "igam":
            cfg.update(disc_layers=3, disc_channels=4)
    for ev in raw.get("evaluation") or []:
        ev["n"] = 32
    raw["description"] = "scripts/gpu-check --cpu-smoke: " + str(raw.get("description", ""))
    dst.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dst


def _steady_images_per_s(run_dir: Path) -> float | None:
    """Median images/s of the logged intervals after the first (start-up excluded), from log.csv."""
    path = run_dir / "log.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        vals = [float(row["images_per_s"]) for row in csv.DictReader(f) if row.get("images_per_s")]
    vals = vals[1:] if len(vals) > 1 else vals
    return float(np.median(vals)) if vals else None


def collect_stages(out: Path) -> dict[str, dict[str, Any]]:
    """Per stage of the experiment in `out` (those that got as far as a meta.json): status, device, epochs,
    train_time_s and seconds per epoch (meta.json), steady images/s (log.csv), accuracies in % (eval.json)."""
    order = ["teacher", "teacher_ft", *STUDENTS]
    dirs = sorted((p.parent for p in out.glob("*/meta.json")),
                  key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
    stages = {}
    for d in dirs:
        meta = json.loads((d / "meta.json").read_text())
        ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
        acc = {k: round(100 * v["accuracy"], 2) for k, v in ev.items()
               if isinstance(v, dict) and "accuracy" in v}
        epochs, secs = meta.get("epochs"), meta.get("train_time_s")
        stages[d.name] = {
            "method": meta.get("method"), "model": (meta.get("model") or {}).get("name"),
            "status": meta.get("status"), "device": meta.get("device"), "epochs": epochs,
            "train_time_s": secs,
            "s_per_epoch": secs / epochs if secs and epochs else None,
            "images_per_s": _steady_images_per_s(d), "clean": acc.get("clean"), "pgd20": acc.get("pgd20")}
    return stages


def step_transfer(r: Runner, step: Step) -> None:
    _need_data(r)
    src = EXPERIMENT
    if r.smoke:
        src = smoke_experiment(EXPERIMENT, r.work / "check-transfer-smoke.yaml")
    out = r.work / "transfer"
    cmd = [r.python, "-m", "igam", "run", src, "--out-dir", out, f"data_dir={r.data}",
           f"device={'cpu' if r.smoke else 'cuda'}"]
    if r.smoke:
        cmd.append("threads=1")
    failure = None
    try:
        r.run(step, cmd, LIMITS["transfer"][0])
    except StepFailed as e:  # keep the figures of the stages that finished before it failed
        failure = e
    stages = collect_stages(out)
    step.figures = {"stages": stages, "paper_igam_over_pgd7": PAPER_IGAM_OVER_PGD7,
                    "target_igam_epoch_over_pgd7": TARGET_IGAM_EPOCH_OVER_PGD7,
                    "teacher_ft": str(out / "teacher_ft")}
    spe = {k: (stages.get(k) or {}).get("s_per_epoch") for k in STUDENTS}
    ips = {k: (stages.get(k) or {}).get("images_per_s") for k in STUDENTS}
    ratios, steady = {}, {}
    for a, b in (("igam", "pgd7"), ("igam_fd", "pgd7"), ("igam", "standard"), ("pgd7", "standard")):
        if spe.get(a) and spe.get(b):
            ratios[f"{a} / {b}"] = spe[a] / spe[b]
        if ips.get(a) and ips.get(b):  # time ratio from the steady throughputs (start-up excluded)
            steady[f"{a} / {b}"] = ips[b] / ips[a]
    step.figures["epoch_ratios"] = ratios
    step.figures["steady_time_ratios"] = steady
    for name in STUDENTS:
        s = stages.get(name, {})
        r.say(f"transfer: {name}: {_fmt(s.get('s_per_epoch'), '.2f')} s/epoch, "
              f"{_fmt(s.get('images_per_s'), '.0f')} img/s steady, clean {_fmt(s.get('clean'), '.1f')}%, "
              f"PGD-20 {_fmt(s.get('pgd20'), '.1f')}%")
    r.say("transfer: epoch-time ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
          + "; from steady images/s: " + ", ".join(f"{k} {v:.3f}" for k, v in steady.items()))
    if failure is not None:
        raise failure
    missing = [k for k in ("teacher", "teacher_ft", *STUDENTS)
               if (stages.get(k) or {}).get("status") != "finished"]
    unevaluated = [k for k in STUDENTS if (stages.get(k) or {}).get("pgd20") is None]
    if missing or unevaluated:
        raise StepFailed(f"stages not finished: {missing}; without a PGD-20 result: {unevaluated}")
    wrong = [k for k, s in stages.items() if not str(s["device"]).startswith("cpu" if r.smoke else "cuda")]
    if wrong:
        raise StepFailed(f"stages trained on the wrong device: {wrong}")


def step_ddp(r: Runner, step: Step) -> None:
    dev = "cpu" if r.smoke else "cuda"
    torchrun = [r.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    problems = []
    # 1. IGAM steps under DDP (a process group of one: real NCCL calls), checked against plain steps
    out = r.work / "ddp_smoke.json"
    cmd = [*torchrun, "benchmarks/ddp_smoke.py", "--device", dev, "--data", r.data, "--json", out]
    cmd += ["--tiny", "--batch", "16", "--steps", "2"] if r.smoke else ["--batch", "128", "--steps", "3"]
    try:
        r.run(step, cmd, 75)
    except StepFailed as e:
        problems.append(str(e))
    if out.is_file():
        res = json.loads(out.read_text())
        step.figures["ddp_smoke"] = {k: res.get(k) for k in ("backend", "nccl", "world_size", "model", "ok")}
        step.figures["ddp_smoke"]["modes"] = {
            k: {"ok": v["ok"], "cos_update_vs_plain": v.get("cos_update_vs_plain"), "seconds": v["seconds"]}
            for k, v in res["modes"].items()}
    # 2. the CLI under torchrun (WORLD_SIZE=1: igam starts no process group), with the transfer's teacher
    teacher = r.work / "transfer" / "teacher_ft"
    target = "cifar10" if _have_data(r) else "synthetic:32x32x3:10"
    try:
        if not _finished(teacher):
            teacher = _make_teacher(r, step, dev)
        run_dir = r.work / "ddp" / "cli"
        size = ["train_subset=64", "batch_size=16", "width=4", "eval_n=32"] if r.smoke else \
            ["train_subset=2048", "batch_size=128", "eval_n=256"]
        cmd = [*torchrun, "-m", "igam", "transfer", f"teacher={teacher}", f"dataset={target}",
               f"data_dir={r.data}", "model=preact-resnet18", "epochs=1", f"device={dev}",
               f"out_dir={run_dir.parent}", f"name={run_dir.name}", "progress=false", "tensorboard=false",
               "eval_every=0", "log_every=1", "grad_clip=5", *size]
        r.run(step, cmd, 75)
        meta = json.loads((run_dir / "meta.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        step.figures["cli"] = {"teacher": str(teacher), "status": meta.get("status"),
                               "world_size": meta.get("world_size"), "device": meta.get("device"),
                               "steps": metrics.get("steps"), "skipped_steps": metrics.get("skipped_steps"),
                               "train_time_s": meta.get("train_time_s")}
        if meta.get("status") != "finished" or metrics.get("skipped_steps"):
            problems.append(f"torchrun igam transfer: status {meta.get('status')}, "
                            f"{metrics.get('skipped_steps')} skipped steps")
    except StepFailed as e:
        problems.append(str(e))
    if not (step.figures.get("ddp_smoke") or {}).get("ok"):
        problems.append("ddp_smoke.py did not pass")
    if problems:
        raise StepFailed("; ".join(dict.fromkeys(problems)))


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "meta.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _make_teacher(r: Runner, step: Step, dev: str) -> Path:
    """A fine-tuned teacher for the torchrun step when the transfer step left none: a short standard
    madry-mnist run on the packed MNIST (synthetic digits without it) and its fine-tuned head."""
    src, tgt = ("mnist", "cifar10") if _have_data(r) else ("synthetic:28x28x1:10", "synthetic:32x32x3:10")
    base = r.work / "ddp"
    common = [f"data_dir={r.data}", "train_subset=512", "epochs=1", "batch_size=64", f"device={dev}",
              f"out_dir={base}", "progress=false", "tensorboard=false", "eval_n=64", "eval_every=0"]
    if r.smoke:
        common.append("width=4")
    r.say(f"ddp: no finished teacher from the transfer step; making one on {src} -> {tgt}")
    r.run(step, [r.python, "-m", "igam", "train", "method=standard", f"dataset={src}", "model=madry-mnist",
                 "name=teacher", *common], 60)
    r.run(step, [r.python, "-m", "igam", "finetune", f"teacher={base / 'teacher'}", f"dataset={tgt}",
                 "adapter=gray+crop28", "name=teacher_ft", *common], 60)
    return base / "teacher_ft"


def _have_data(r: Runner) -> bool:
    return (r.data / "mnist.npz").is_file() and (r.data / "cifar10.npz").is_file()


def _need_data(r: Runner) -> None:
    missing = [n for n in ("mnist.npz", "cifar10.npz") if not (r.data / n).is_file()]
    if missing:
        raise StepFailed(f"no packed data: {', '.join(missing)} missing in {r.data}. Run `scripts/gpu-check "
                         "--pack` on the CPU machine and carry .gpu-data with the working tree.")


STEP_FUNCS: dict[str, Callable[[Runner, Step], None]] = {
    "tests": step_tests, "bench": step_bench, "transfer": step_transfer, "ddp": step_ddp}


# ---------------------------------------------------------------------------------------------
# summary
def device_info(smoke: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": platform.python_version(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "commit": _git_commit()}
    if smoke:
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores): smoke"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(name=torch.cuda.get_device_name(0),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                cudnn=torch.backends.cudnn.version())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def _git_commit() -> str:
    """The tree's commit (+ '-dirty' with local changes), or 'unknown' where .git did not travel."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def markdown(summary: dict[str, Any]) -> str:
    dev = summary["device"]
    if summary["passed"]:
        verdict = "all steps passed"
    else:
        verdict = "; ".join(filter(None, [
            f"FAILED: {', '.join(summary['failed_steps'])}" if summary["failed_steps"] else "",
            f"skipped: {', '.join(summary['skipped_steps'])}" if summary["skipped_steps"] else ""]))
    head = (f"GPU check (`scripts/gpu-check`) on {dev['name']}, torch {dev['torch']}, CUDA {dev.get('cuda')}"
            f", {summary['date']}: {verdict}, {summary['total_s']:.0f} s in all.")
    lines = [head, "", "| step | status | seconds |", "|---|---|---|"]
    steps = {s["name"]: s for s in summary["steps"]}
    for s in summary["steps"]:
        status = s["status"]
        if s["name"] == "tests" and s["figures"]:
            f = s["figures"]
            status += f" ({f['passed']} passed, {f['skipped']} skipped, {f['failed']} failed)"
        lines.append(f"| {TITLES[s['name']]} | {status} | {s['seconds']:.1f} |")
    bench = (steps.get("bench") or {}).get("figures", {}).get("models")
    if bench:
        lines += ["", "Step cost (`benchmarks/step_cost.py`, median s/step, TF32 off for the FD methods as "
                  "in `igam train`; peak memory: `torch.cuda.max_memory_allocated` over one step):", "",
                  "| student | batch | method | s/step | images/s | x standard | x PGD-7 | peak memory |",
                  "|---|---|---|---|---|---|---|---|"]
        for model, res in bench.items():
            for i, (name, m) in enumerate(res["methods"].items()):
                first = f"{model} | {res['batch']}" if i == 0 else " | "
                mem = f"{m['peak_mib']:.0f} MiB" if m["peak_mib"] is not None else "-"
                lines.append(f"| {first} | {name} | {m['s_per_step']:.4f} | {m['images_per_s']:.0f} | "
                             f"{m['x_standard']:.2f} | {m['x_pgd7']:.2f} | {mem} |")
        lines += ["", f"IGAM / PGD-7 per step (the paper reports {PAPER_IGAM_OVER_PGD7} for training time on "
                  "a GPU): " + "; ".join(
                      f"{model}: " + ", ".join(f"{k} {v['x_pgd7']:.2f}" for k, v in res["methods"].items()
                                               if k.startswith("igam"))
                      for model, res in bench.items())]
    tr = (steps.get("transfer") or {}).get("figures", {})
    if tr.get("stages"):
        lines += ["", "Transfer (`igam run experiments/gpu/check-transfer.yaml`: s/epoch = meta.json "
                  "train_time_s / epochs, with start-up, final evaluation and checkpoints; images/s = median "
                  "of log.csv intervals after the first):", "",
                  "| stage | method | model | epochs | s/epoch | images/s | clean % | PGD-20 % |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in tr["stages"].items():
            lines.append(f"| {name} | {s['method']} | {s['model']} | {_fmt(s['epochs'], 'g')} | "
                         f"{_fmt(s['s_per_epoch'], '.2f')} | {_fmt(s['images_per_s'], '.0f')} | "
                         f"{_fmt(s['clean'], '.1f')} | {_fmt(s['pgd20'], '.1f')} |")
        if tr.get("epoch_ratios"):
            ratios = ", ".join(f"{k} {v:.3f}" for k, v in tr["epoch_ratios"].items())
            steady = ", ".join(f"{k} {v:.3f}" for k, v in (tr.get("steady_time_ratios") or {}).items())
            lines += ["", f"Epoch-time ratios: {ratios}; from the steady images/s: {steady or '-'}"
                      + f" (paper: IGAM / PGD-7 {PAPER_IGAM_OVER_PGD7}; issue 15 target: IGAM / PGD-7 <= "
                      f"{TARGET_IGAM_EPOCH_OVER_PGD7})."]
    ddp = (steps.get("ddp") or {}).get("figures", {})
    if ddp:
        sm, cli = ddp.get("ddp_smoke") or {}, ddp.get("cli") or {}
        modes = ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in (sm.get("modes") or {}).items())
        lines += ["", f"DDP: `benchmarks/ddp_smoke.py` under torchrun, backend {sm.get('backend', '-')}"
                  + (f" (NCCL {sm['nccl']})" if sm.get("nccl") else "")
                  + f", {sm.get('world_size', '-')} process: {modes or '-'}; `torchrun -m igam transfer`: "
                  f"{cli.get('status', '-')}, world size {cli.get('world_size', '-')}, "
                  f"{cli.get('steps', '-')} steps."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", nargs="?", help="where gpu-check.json, gpu-check.md and gpu-check.log go")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pack", action="store_true", help="pack the data for the GPU machine (run it here)")
    mode.add_argument("--cpu-smoke", action="store_true",
                      help="the whole check on the CPU at tiny sizes (CI)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the packed data folder (default: .gpu-data)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all steps (default 420; --cpu-smoke: 300); a step that cannot start "
                   "with enough time left is recorded as 'skipped: budget'")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--work-dir", default="", help="folder for runs and intermediate files (default: a "
                   "temporary folder, removed at the end; a given folder is kept)")
    g = p.add_argument_group("--pack")
    g.add_argument("--data-root", default=None, help="folder with mnist.npz and cifar10.npz (default: "
                   "$IGAM_DATA, else ../shared/data)")
    g.add_argument("--out", default=None, help="pack into this folder (default: .gpu-data in the repository)")
    g.add_argument("--cifar-train", type=int, default=10000, help="CIFAR-10 training images packed")
    g.add_argument("--cifar-test", type=int, default=2000, help="CIFAR-10 test images packed")
    g.add_argument("--mnist-train", type=int, default=0, help="MNIST training images packed (0: all)")
    g.add_argument("--mnist-test", type=int, default=0, help="MNIST test images packed (0: all)")
    args = p.parse_args(argv)
    if not args.pack and not args.outdir:
        p.error("give OUTDIR (the check), --cpu-smoke OUTDIR, or --pack")
    if args.pack and args.outdir:
        p.error("--pack takes no OUTDIR (use --out to pack elsewhere)")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        p.error(f"--steps: unknown {unknown}; choose from {', '.join(STEPS)}")
    args.steps = steps
    if args.budget_s is None:
        args.budget_s = 300.0 if args.cpu_smoke else 420.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pack:
        out = Path(args.out) if args.out else REPO / DEFAULT_DATA
        pack(args.data_root, out, args.cifar_train, args.cifar_test, args.mnist_train, args.mnist_test)
        print(f"gpu-check --pack: carry '{out.name}' with the working tree to the GPU machine (it is ignored "
              "by git, so name it in the carry list), then run `PYTHONPATH=src python3 scripts/gpu-check "
              "OUTDIR` there.")
        return 0
    smoke = args.cpu_smoke
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device: run with --cpu-smoke or on a GPU machine.", file=sys.stderr)
            return 2
    out_dir = Path(args.outdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-check.log").unlink(missing_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="igam-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    data = (data if data.is_absolute() or data.exists() else REPO / data).resolve()
    if smoke:  # a tiny pack of the real data (the --pack code), else synthetic arrays of the same layout
        tiny = work / "data"
        if find_data_root(None) is not None:
            pack(None, tiny, 256, 128, 512, 128, exclude=False, say=lambda s: None)
        else:
            synthetic_pack(tiny, 512, 128)
        data = tiny
    r = Runner(out_dir, work, args.budget_s, smoke, data)
    dev = device_info(smoke)
    r.say(f"{'CPU smoke' if smoke else 'GPU check'} on {dev['name']}; torch {dev['torch']}, "
          f"CUDA {dev['cuda']}; data {data}; work {work}; budget {args.budget_s:.0f} s; "
          f"steps {', '.join(args.steps)}")
    steps = []
    for name in args.steps:
        step = Step(name, TITLES[name])
        steps.append(step)
        left = r.remaining()
        if left < LIMITS[name][1]:
            step.status = "skipped: budget"
            r.say(f"{name}: skipped: {left:.0f} s left of the budget, {LIMITS[name][1]} s needed to start")
            continue
        r.say(f"{name}: {TITLES[name]} ...")
        t0 = time.monotonic()
        try:
            STEP_FUNCS[name](r, step)
            step.status = "passed"
        except StepFailed as e:
            step.status, step.error = "failed", str(e)
        except Exception as e:  # a bug in a step must not stop the others
            step.status, step.error = "failed", f"{type(e).__name__}: {e}"
            r.log_file.write(traceback.format_exc())
        step.seconds = round(time.monotonic() - t0, 1)
        r.say(f"{name}: {step.status} in {step.seconds:.1f} s" + (f": {step.error}" if step.error else ""))
        if step.failed:
            for c in step.commands[-1:]:
                for line in c.tail[-12:]:
                    r.say(f"{name}:   | {line}")
    summary = {"mode": "cpu-smoke" if smoke else "gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "device": dev, "budget_s": args.budget_s, "total_s": round(r.elapsed(), 1), "data": str(data),
               "passed": all(s.passed for s in steps) and bool(steps),
               "failed_steps": [s.name for s in steps if s.failed],
               "skipped_steps": [s.name for s in steps if s.status.startswith("skipped")],
               "steps": [{**asdict(s), "commands": [{"cmd": " ".join(c.cmd), "rc": c.rc, "seconds": c.seconds,
                                                     "timed_out": c.timed_out} for c in s.commands]}
                         for s in steps]}
    (out_dir / "gpu-check.json").write_text(json.dumps(summary, indent=1, default=str))
    md = markdown(summary)
    (out_dir / "gpu-check.md").write_text(md)
    r.say(f"wrote {out_dir / 'gpu-check.json'}, {out_dir / 'gpu-check.md'}, {out_dir / 'gpu-check.log'}")
    r.close()
    print("\n" + md, flush=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if summary["failed_steps"] else 0  # a step skipped for the budget is recorded, not failed


if __name__ == "__main__":
    sys.exit(main())
