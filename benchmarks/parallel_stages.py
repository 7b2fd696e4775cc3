"""`igam run --jobs N` against `--jobs 1` on the same independent stages, back to back.

    .venv/bin/python benchmarks/parallel_stages.py                      # the issue's measurement (minutes)
    .venv/bin/python benchmarks/parallel_stages.py --tiny               # the same steps in seconds

Runs the chosen stages of an experiment file (default: four independent students of
experiments/cpu/animals-to-vehicles.yaml; training only: a copy of the file without its evaluation blocks,
with progress bars and TensorBoard off and --set / --tiny written into each stage) three ways, each into its
own temporary folder, with `igam run` as a user types it:

1. `--jobs 1 threads=C`: one stage after another, all C cores for each stage (timed);
2. `--jobs N`: N stages at once in local slots, C // N torch threads each (timed, right after 1);
3. `--jobs 1 threads=C//N`: one after another with the slots' threads: the reference for 2's weights
   (sha256 of each stage's model.safetensors must be identical; timed too).

Prints the wall times, the ratio parallel / serial (the issue's target for N = 2 on a 2-core CPU: at most
0.7), the two ratios that explain it (parallel / reference: how well the slots share the machine, ideally
1/N; reference / serial: what C threads give one stage), each stage's training time (meta.json's
train_time_s) in every run, the 1-minute load average around each timed run (a loaded machine makes the
ratios meaningless), and whether every stage's weights match. Exit status 1 when a weight differs or a run
fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FILE = REPO / "experiments" / "cpu" / "animals-to-vehicles.yaml"
STAGES = "standard,fast_at,standard_gelu,fast_at_gelu"  # need no teacher: independent of one another
TINY = ["train_subset=512", "epochs=0.5", "eval_n=64", "test_subset=64"]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def training_only(src: Path, dest: Path, settings: list[str]) -> Path:
    """The experiment file without its evaluation blocks (the stages' training is what is compared), with
    `settings` (KEY=VALUE) written into every stage's own configuration (`igam run`'s key=value overrides
    give way to a key the stage sets itself, e.g. train_subset)."""
    raw = yaml.safe_load(src.read_text())
    raw.pop("evaluation", None)
    values = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in settings)}
    for stage in raw["stages"]:
        stage["config"] = {**(stage.get("config") or {}), **values}
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def igam_run(path: Path, out: Path, stages: str, jobs: int, extra: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "igam", "run", str(path), "--only", stages, "--out-dir", str(out),
           "--jobs", str(jobs), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall, " ".join(cmd)


def train_times(out: Path, stages: list[str]) -> dict[str, float | None]:
    """Each stage's training time in seconds, as its meta.json records it (None where absent)."""
    times = {}
    for s in stages:
        try:
            times[s] = json.loads((out / s / "meta.json").read_text()).get("train_time_s")
        except (OSError, ValueError):
            times[s] = None
    return times


def weights(out: Path, stages: list[str]) -> dict[str, str]:
    return {s: hashlib.sha256((out / s / "model.safetensors").read_bytes()).hexdigest() for s in stages}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default=str(FILE), help="experiment file (default: %(default)s)")
    p.add_argument("--stages", default=STAGES, help="comma-separated stages that need no other stage "
                   "(default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="slots of the parallel run (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every stage (e.g. data_dir=/data, epochs=1)")
    p.add_argument("--tiny", action="store_true", help="a few seconds per stage: " + " ".join(TINY))
    p.add_argument("--keep", default=None, help="keep the runs in this folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    c = cores()
    if args.jobs < 2 or c // args.jobs < 1:
        sys.exit(f"--jobs {args.jobs} on {c} cores: give 2 or more, at most the number of cores")
    settings = ["progress=false", "tensorboard=false"] + (TINY if args.tiny else []) + list(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        path = training_only(Path(args.file), root / "stages.yaml", settings)
        runs = {}
        for name, jobs, threads in (("serial", 1, c), ("parallel", args.jobs, None),
                                    ("reference", 1, c // args.jobs)):
            before = load()
            threads_arg = [f"threads={threads}"] if threads else []  # --jobs N: cores // N per slot
            wall, cmd = igam_run(path, root / name, args.stages, jobs, threads_arg)
            runs[name] = {"wall_s": round(wall, 2), "load_before": before, "load_after": load(),
                          "command": cmd, "train_time_s": train_times(root / name, stages)}
        ref, par = weights(root / "reference", stages), weights(root / "parallel", stages)
        same = {s: ref[s] == par[s] for s in stages}
    wall = {name: r["wall_s"] for name, r in runs.items()}
    ratio = wall["parallel"] / wall["serial"]
    out = {"cores": c, "jobs": args.jobs, "stages": stages, "settings": settings, "runs": runs,
           "ratio": round(ratio, 3), "weights_identical": same,
           "parallel_over_reference": round(wall["parallel"] / wall["reference"], 3),
           "reference_over_serial": round(wall["reference"] / wall["serial"], 3)}
    print(f"{len(stages)} stages of {args.file} ({', '.join(stages)}), {c} cores, "
          f"settings: {' '.join(settings)}")
    for name in ("serial", "parallel", "reference"):
        r = runs[name]
        print(f"  {name:9s} {r['wall_s']:8.1f} s   1-min load average {r['load_before']:.2f} -> "
              f"{r['load_after']:.2f}   {r['command']}")
        print("            training time per stage (s): "
              + ", ".join(f"{s} {t}" for s, t in r["train_time_s"].items()))
    print(f"--jobs {args.jobs} / --jobs 1: {ratio:.3f} (target for 2 slots on 2 cores: <= 0.7; valid only on "
          "a quiet machine: the load averages above should stay well under 1)")
    print(f"  parallel / reference: {out['parallel_over_reference']:.3f} (ideal 1/{args.jobs}: how well the "
          f"slots share the machine); reference / serial: {out['reference_over_serial']:.3f} (what {c} "
          "threads give one stage: the parallel run can beat the serial one by at most this factor's "
          f"inverse times 1/{args.jobs})")
    print("weights identical to the serial run with the slots' threads: "
          + ", ".join(f"{s} {'yes' if ok else 'NO'}" for s, ok in same.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if not all(same.values()):
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
