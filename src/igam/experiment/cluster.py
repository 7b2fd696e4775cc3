"""How `igam run` spreads stages: `--jobs`, `--executor` and the SLURM settings (`--partition`, `--time`,
`--gpus-per-job`, `--sbatch KEY=VALUE`, or an experiment file's `cluster:` block; the command line wins).
Parsing and checking only: nothing here starts anything (that is igam.experiment.executors)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from igam.errors import IgamError, suggest

EXECUTORS = ("local", "slurm")
CLUSTER_KEYS = ("partition", "time", "gpus_per_job", "sbatch")
# set by their own options: an --sbatch (or sbatch:) entry naming one of these is refused, so that one
# setting never has two spellings that could disagree
OWN_SBATCH = {"partition": "--partition", "time": "--time", "t": "--time", "gpus-per-node": "--gpus-per-job",
              "job-name": "(set by igam: igam-STAGE)", "output": "(set by igam: STAGE/jobs/)",
              "error": "(set by igam: STAGE/jobs/)", "array": "(one job per stage)"}


@dataclass(frozen=True)
class ClusterOptions:
    """SLURM settings of `igam run --executor slurm`.

    partition: the partition (None: the cluster's default); time: the time limit per job in minutes (None:
    the partition's default); gpus_per_job: GPUs per job (`#SBATCH --gpus-per-node`); sbatch: further
    `#SBATCH --KEY=VALUE` lines (a value of True writes the bare flag, e.g. `--exclusive`).
    """

    partition: str | None = None
    time: int | None = None
    gpus_per_job: int = 0
    sbatch: dict[str, str | bool] = field(default_factory=dict)

    def merged(self, other: ClusterOptions) -> ClusterOptions:
        """These settings with `other`'s (the command line's) taking precedence where given."""
        return replace(self, partition=other.partition or self.partition,
                       time=other.time if other.time is not None else self.time,
                       gpus_per_job=other.gpus_per_job or self.gpus_per_job,
                       sbatch={**self.sbatch, **other.sbatch})


def parse_time(text: Any, where: str = "--time") -> int:
    """A SLURM time limit as whole minutes (rounded up): MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS,
    DAYS-HOURS, DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS (sbatch's formats).

    Raises:
        IgamError: for anything else, or a limit of zero.
    """
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if isinstance(text, bool) or m is None:
        raise IgamError(f"{where}={text!r} is not a SLURM time limit; write minutes (90), "
                        "HOURS:MINUTES:SECONDS (4:00:00) or DAYS-HOURS:MINUTES:SECONDS (1-12:00:00).")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + (b or 0) * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise IgamError(f"{where}={text!r} is no time at all; give the longest a stage may run, e.g. "
                        "4:00:00.")
    return math.ceil(seconds / 60)


def parse_sbatch(items: list[str] | dict[str, Any], where: str = "--sbatch") -> dict[str, str | bool]:
    """`KEY=VALUE` strings (or a mapping, from a `cluster:` block) as #SBATCH options: KEY as sbatch spells it
    (`cpus-per-task`; `cpus_per_task` is the same), a bare KEY is a flag (`exclusive`).

    Raises:
        IgamError: a key that is not an option name, a value with a line break, or an option igam sets
            itself (partition, time, ...: their own options name them).
    """
    pairs: list[tuple[str, Any]]
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = [(t.partition("=")[0], t.partition("=")[2] if "=" in t else True) for t in items]
    out: dict[str, str | bool] = {}
    for key, value in pairs:
        k = str(key).strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", k):
            raise IgamError(f"{where}: {key!r} is not an sbatch option name; write KEY=VALUE as sbatch "
                            "spells it without the dashes, e.g. --sbatch account=myproject --sbatch mem=16G.")
        if k in OWN_SBATCH:
            raise IgamError(f"{where}: {k} is set by igam; use {OWN_SBATCH[k]} instead.")
        if value is None or value is False or (isinstance(value, str) and not value.strip()):
            raise IgamError(f"{where}: {k} has no value; write {k}=VALUE, or {k} alone for a flag.")
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            raise IgamError(f"{where}: the value of {k} holds a line break.")
        out[k] = True if value is True else str(value).strip()
    return out


def parse_gpus(value: Any, where: str = "--gpus-per-job") -> int:
    """A whole number of GPUs (0 or more).

    Raises:
        IgamError: anything else.
    """
    try:
        n = int(str(value))
    except ValueError:
        n = -1
    if isinstance(value, bool) or n < 0:
        raise IgamError(f"{where}={value!r} must be a whole number of GPUs (0 or more).")
    return n


def check_cluster(raw: Any, path: str) -> ClusterOptions:
    """An experiment file's `cluster:` block (partition, time, gpus_per_job, sbatch: {KEY: VALUE}).

    Raises:
        IgamError: a block that is not a mapping, an unknown key (the closest one suggested), a bad value.
    """
    if raw is None:
        return ClusterOptions()
    if not isinstance(raw, dict):
        raise IgamError(f"'{path}': cluster must be a mapping (partition, time, gpus_per_job, sbatch), not "
                        f"{type(raw).__name__}.")
    for key in raw:
        if key not in CLUSTER_KEYS:
            raise IgamError(f"'{path}': unknown key '{key}' in cluster.{suggest(str(key), CLUSTER_KEYS)} "
                            f"Keys: {', '.join(CLUSTER_KEYS)}.")
    where = f"'{path}': cluster"
    sbatch = raw.get("sbatch") or {}
    if not isinstance(sbatch, dict):
        raise IgamError(f"{where}: sbatch must be a mapping of sbatch options, e.g. {{account: myproject, "
                        "cpus-per-task: 8}.")
    partition = raw.get("partition")
    if partition is not None and (not isinstance(partition, str) or not partition.strip()):
        raise IgamError(f"{where}: partition={partition!r} must be a partition name.")
    return ClusterOptions(
        partition=partition.strip() if partition else None,
        time=parse_time(raw["time"], f"{where}: time") if raw.get("time") is not None else None,
        gpus_per_job=parse_gpus(raw.get("gpus_per_job", 0), f"{where}: gpus_per_job"),
        sbatch=parse_sbatch(sbatch, f"{where}: sbatch"),
    )


def parse_jobs(value: Any, executor: str = "local") -> int | None:
    """`--jobs`: a number of stages at once (1 or more), or `auto`: one per GPU here (1 without GPUs) for
    the local executor, no cap for SLURM (every ready stage is submitted; the cluster queues them). None
    means no cap.

    Raises:
        IgamError: anything else.
    """
    if value is None:
        return 1 if executor == "local" else None
    if str(value).strip().lower() == "auto":
        return max(1, len(visible_gpus())) if executor == "local" else None
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if isinstance(value, bool) or n < 1:
        raise IgamError(f"--jobs={value!r} must be a number of stages to run at once (1 or more) or auto "
                        "(one per GPU; 1 without GPUs).")
    return n


def check_executor(name: str) -> str:
    """`--executor`: local or slurm.

    Raises:
        IgamError: any other name.
    """
    if name not in EXECUTORS:
        raise IgamError(f"--executor={name!r}: choose local (this machine) or slurm (a SLURM cluster through "
                        f"submitit).{suggest(name, EXECUTORS)}")
    return name


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them ('0', '1', ... by default); [] on a
    machine without CUDA GPUs."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(n)]
    return names[:n]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
