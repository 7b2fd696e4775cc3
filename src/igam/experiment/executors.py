"""Where `igam run` runs its tasks (igam.experiment.scheduler): in its own process one after another
(`--jobs 1`, the default), in local slots (`--jobs N`: one process per task, each with its share of the
machine: cores // N torch threads, or one GPU through CUDA_VISIBLE_DEVICES), or as SLURM jobs
(`--executor slurm`). Local slots and SLURM jobs both go through submitit (its LocalExecutor and
SlurmExecutor), so one code path serves a laptop and a cluster.

A job's files live in its stage's folder, STAGE/jobs/: JOB_0_log.out (everything the task printed, stderr
included), JOB_igam.json (what it did: host, pid, phase, outcome, error) and, on SLURM, JOB_submission.sh.
submitit hands the task to the job as a pickle (JOB_submitted.pkl) and the job answers with one
(JOB_0_result.pkl); `igam run` never loads either (the outcome is read from JOB_igam.json and the run
folder) and deletes both once the job has ended.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from igam.errors import IgamError
from igam.experiment.cluster import ClusterOptions
from igam.experiment.scheduler import QUEUED, RUNNING, Task, run_task
from igam.experiment.spec import Experiment
from igam.files import append_text, read_json_object, write_json
from igam.runs import Run

LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local executor stops a job after timeout_min: never, in effect


class _Slots:
    """Slot bookkeeping shared by the executors: `slots` (None: no cap) and which are taken."""

    def __init__(self, slots: int | None):
        self.slots = slots
        self.taken: set[int] = set()

    def free_slot(self) -> int | None:
        if self.slots is None:
            return next(i for i in range(len(self.taken) + 1) if i not in self.taken)
        return next((i for i in range(self.slots) if i not in self.taken), None)

    def _take(self, slot: int) -> None:
        self.taken.add(slot)

    def _release(self, task: Task) -> None:
        if task.slot is not None:
            self.taken.discard(task.slot)


class InlineExecutor(_Slots):
    """`--jobs 1`: each task in this process, one after another (what `igam run` always did); what it says
    goes where `log` writes and, like a job's output, to STAGE/jobs/here-TIME_log.out."""

    poll_s = 1.0
    gpu = False  # (estimates: the 2-core CPU's)

    def __init__(self, log=print):
        super().__init__(1)
        self.log = log
        self.outcomes: dict[Task, dict[str, Any]] = {}

    def submit(self, exp: Experiment, task: Task, slot: int) -> None:
        self._take(slot)
        task.state, task.where = RUNNING, "here"
        folder = exp.out_dir / task.name / Run.JOBS
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"here-{time.strftime('%Y%m%d-%H%M%S')}-{task.kind}_log.out"
        task.log_path = str(path)
        def tee(text: str) -> None:
            self.log(text)
            append_text(path, f"{text}\n")  # (refuses a link planted at the log's path)

        self.outcomes[task] = run_task(exp, task, log=tee)

    def poll(self, tasks: list[Task]) -> dict[Task, str]:
        return {t: "ended" for t in tasks if t in self.outcomes}

    def finish(self, task: Task) -> dict[str, Any]:
        self._release(task)
        return self.outcomes.pop(task)

    def cancel(self, tasks: list[Task]) -> list[str]:
        return []


# ---------------------------------------------------------------------------------------------
# the job's side
class _Stop(KeyboardInterrupt):
    """SIGTERM in a job (scancel, pre-emption) or submitit's warning signal before the time limit (USR2): stop
    like Ctrl-C."""


def job_main(exp: Experiment, stage: str, kind: str, threads: int | None = None,
             gpu: str | None = None) -> str:
    """The function a job runs (submitted through submitit): one task of one stage, its outcome recorded in
    STAGE/jobs/JOB_igam.json. `threads`: torch threads for a stage that sets none (a SLURM job without it
    uses SLURM_CPUS_PER_TASK); `gpu`: the CUDA_VISIBLE_DEVICES of the slot. Exit status 2 when the task
    failed, 130 when stopped."""
    import submitit
    import torch

    env = submitit.JobEnvironment()
    record = Path(env.paths.folder) / f"{env.job_id}_igam.json"
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is None and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    if threads:
        torch.set_num_threads(threads)
    task = next(Task(st, kind, 0, 0.0) for st in exp.stages if st.name == stage)
    info: dict[str, Any] = {"stage": stage, "kind": kind, "job": env.job_id, "host": socket.gethostname(),
                            "pid": os.getpid(), "threads": torch.get_num_threads(), "gpu": gpu,
                            "started": time.time(), "phase": "running"}
    write_json(record, info)

    def stop(signum, frame):
        raise _Stop("SIGTERM (cancelled or pre-empted)" if signum == signal.SIGTERM
                    else f"{signal.Signals(signum).name} (the time limit is near)")

    # submitit's job would ignore SIGTERM until SLURM's SIGKILL, and take its warning signal for a time-out
    # only when it knows the time limit; the run's checkpoints make stopping at once safe
    signal.signal(signal.SIGTERM, stop)
    signal.signal(env._usr_sig(), stop)

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        out = run_task(exp, task, log=say, threads=threads, progress=False)
    except KeyboardInterrupt as e:
        why = f"stopped by {e.args[0]}" if e.args else "stopped by Ctrl-C"
        write_json(record, {**info, "phase": "ended", "ended": time.time(), "outcome": "stopped",
                            "error": f"{why}; rerun the same command to resume from the last checkpoint"})
        say(f"igam run: {stage}: {why}")
        raise SystemExit(130) from None
    write_json(record, {**info, "phase": "ended", "ended": time.time(), **out})
    if out["outcome"] == "failed":  # (run_task has printed why)
        raise SystemExit(2)
    return out["outcome"]


# ---------------------------------------------------------------------------------------------
# the scheduler's side
class _SubmititExecutor(_Slots, abc.ABC):
    """What local slots and SLURM jobs share: job folders, records, the end of a job. Each executor says
    how its jobs end without a final record (`ended_without_record`)."""

    record_tries = 1  # how often to look for a job's final record (a cluster's shared file system may lag)

    def __init__(self, slots: int | None):
        super().__init__(slots)
        self.jobs: dict[Task, Any] = {}

    @staticmethod
    def folder(exp: Experiment, task: Task) -> Path:
        return exp.out_dir / task.name / Run.JOBS

    def _submitted(self, task: Task, job: Any, where: str) -> None:
        self.jobs[task] = job
        task.log_path = str(job.paths.stdout)
        task.where = where
        for link in Path(job.paths.folder).glob(".submission_file_*"):  # submitit's leftover link
            link.unlink(missing_ok=True)

    def finish(self, task: Task) -> dict[str, Any]:
        job = self.jobs.pop(task, None)
        self._release(task)
        if job is None:
            return {}
        rec = self.record_of(job)
        if rec.get("outcome") not in ("ok", "failed", "busy"):  # stopped, killed, cancelled, timed out
            rec["error"] = self.ended_without_record(job, rec)
        for name in (job.paths.submitted_pickle, job.paths.result_pickle):  # never read back by igam
            Path(name).unlink(missing_ok=True)
        return rec

    def record_of(self, job: Any) -> dict[str, Any]:
        path = Path(job.paths.folder) / f"{job.job_id}_igam.json"
        rec: dict[str, Any] = {}
        for i in range(self.record_tries):
            try:
                rec = read_json_object(path) if path.exists() else {}
            except IgamError:
                rec = {}
            if rec.get("outcome") or i == self.record_tries - 1:
                break
            time.sleep(0.5)
        return rec

    @abc.abstractmethod
    def ended_without_record(self, job: Any, rec: dict[str, Any]) -> str:
        """Why `job` ended without an outcome of ok, failed or busy (stopped, killed, cancelled, timed out),
        with where its log is: the `error` of its record."""


class LocalExecutor(_SubmititExecutor):
    """`--jobs N` (N > 1): one process per task on this machine, at most N at once (submitit's
    LocalExecutor). Slot i gets `threads` torch threads and, with GPUs, the GPU gpus[i % len(gpus)]."""

    poll_s = 0.5

    def __init__(self, slots: int, threads: int, gpus: list[str]):
        super().__init__(slots)
        self.threads, self.gpus = threads, gpus
        self.gpu = bool(gpus)

    def describe(self) -> str:
        each = f"{self.threads} torch thread{'s' * (self.threads > 1)}"
        if self.gpus:
            each += ", one GPU (CUDA_VISIBLE_DEVICES)"
        return f"local slots of {each} each"

    def submit(self, exp: Experiment, task: Task, slot: int) -> None:
        import submitit

        self._take(slot)
        gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
        ex = submitit.LocalExecutor(folder=self.folder(exp, task))
        params: dict[str, Any] = {"timeout_min": LOCAL_TIMEOUT_MIN, "stderr_to_stdout": True}
        if gpu is not None and gpu.isdigit():
            params.update(gpus_per_node=1, visible_gpus=(int(gpu),))
        ex.update_parameters(**params)
        job = ex.submit(job_main, exp, task.name, task.kind, self.threads, gpu)
        task.state = RUNNING
        self._submitted(task, job, f"slot {slot + 1}" + (f", GPU {gpu}" if gpu is not None else "")
                        + f", pid {job.job_id}")

    def poll(self, tasks: list[Task]) -> dict[Task, str]:
        return {t: (RUNNING if self.jobs[t].state == "RUNNING" else "ended") for t in tasks if t in self.jobs}

    def ended_without_record(self, job: Any, rec: dict[str, Any]) -> str:
        if rec.get("error"):  # stopped (SIGINT, SIGTERM): the job said so
            return str(rec["error"])
        return ("its process ended without finishing (killed, or out of memory); rerun the same command to "
                "resume from the last checkpoint")

    def cancel(self, tasks: list[Task]) -> list[str]:
        for t in tasks:
            with contextlib.suppress(Exception):
                self.jobs[t].cancel()  # SIGINT to the slot's controller, which stops the task
        deadline = time.time() + 15
        while time.time() < deadline and any(self.jobs[t].state == "RUNNING" for t in tasks):
            time.sleep(0.2)
        return [f"stopped {len(tasks)} local slot{'s' * (len(tasks) > 1)}: "
                + ", ".join(f"{t.label} [{t.where}]" for t in tasks)
                + "; rerun the same command to resume them from their last checkpoints"]


class SlurmExecutor(_SubmititExecutor):
    """`--executor slurm`: one SLURM job per task (submitit's SlurmExecutor), submitted as soon as the task
    is ready (at most `slots` queued or running at once; None: no cap). Job states come from `squeue` (no
    accounting database needed); what a job did, from its record and its run folder."""

    record_tries = 10

    def __init__(self, slots: int | None, options: ClusterOptions):
        super().__init__(slots)
        self.options = options
        self.gpu = bool(options.gpus_per_job)
        self.poll_s = 2.0
        self.last_poll = 0.0
        self.states: dict[str, tuple[str, str]] = {}
        self.submitted_any = False

    def check(self) -> None:
        """Before anything is submitted: is there a SLURM here?

        Raises:
            IgamError: sbatch or squeue is not on PATH.
        """
        if shutil.which("sbatch") is None or shutil.which("squeue") is None:
            raise IgamError("--executor slurm: no SLURM here (sbatch and squeue are not on PATH). Run igam "
                            "on a cluster's login node, or drop --executor slurm to run the stages on this "
                            "machine.")

    def describe(self) -> str:
        o = self.options
        parts = [f"partition {o.partition}" if o.partition else "the default partition",
                 f"time limit {o.time} min" if o.time else "the partition's time limit",
                 f"{o.gpus_per_job} GPU(s) per job" if o.gpus_per_job else "no GPU"]
        parts += [f"--{k}" + ("" if v is True else f"={v}") for k, v in o.sbatch.items()]
        return "SLURM jobs: " + ", ".join(parts)

    def submit(self, exp: Experiment, task: Task, slot: int) -> None:
        import submitit

        self._take(slot)
        o = self.options
        ex = submitit.SlurmExecutor(folder=self.folder(exp, task))
        # time=None: no --time line, the partition's default limit (submitit's own default is 5 minutes)
        params: dict[str, Any] = {"job_name": f"igam-{task.kind}-{task.name}"[:100], "stderr_to_stdout": True,
                                  "time": o.time}
        if o.partition:
            params["partition"] = o.partition
        if o.gpus_per_job:
            params["gpus_per_node"] = o.gpus_per_job
        if o.sbatch:
            params["additional_parameters"] = dict(o.sbatch)
        ex.update_parameters(**params)
        try:
            job = ex.submit(job_main, exp, task.name, task.kind, None, None)
        except Exception as e:  # noqa: BLE001  (sbatch's refusal: a bad partition, account, limit, ...)
            self._release(task)
            why = " ".join(str(getattr(e, "stderr", "") or e).split())[:400]
            if not self.submitted_any:  # nothing runs yet: a setting is wrong, say so once
                raise IgamError(f"sbatch refused the job of {task.label}: {why}. Check --partition, --time, "
                                "--gpus-per-job and --sbatch (or the file's cluster: block).") from None
            raise
        self.submitted_any = True
        self.poll_s = 2.0
        task.state = QUEUED
        self._submitted(task, job, f"job {job.job_id}")
        self.states[job.job_id] = ("PENDING", "")

    def _squeue(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        """{job id: (state, node)} for the jobs squeue still knows (finished ones stay a while, MinJobAge)."""
        try:
            r = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%N", "-j", ",".join(ids)],
                               capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return {i: self.states.get(i, ("UNKNOWN", "")) for i in ids}  # ask again next time
        if r.returncode != 0 and "Invalid job id" not in r.stderr:
            return {i: self.states.get(i, ("UNKNOWN", "")) for i in ids}
        out = {}
        for line in r.stdout.splitlines():
            jid, _, rest = line.partition("|")
            state, _, node = rest.partition("|")
            out[jid.strip()] = (state.strip(), node.strip())
        return out

    def poll(self, tasks: list[Task]) -> dict[Task, str]:
        if not tasks or time.time() - self.last_poll < self.poll_s:
            return {}
        self.last_poll = time.time()
        jobs = {self.jobs[t].job_id: t for t in tasks if t in self.jobs}
        seen = self._squeue(list(jobs))
        out = {}
        for jid, t in jobs.items():
            state, node = seen.get(jid, ("GONE", ""))
            self.states[jid] = (state, node)
            if state in ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
                         "RESV_DEL_HOLD", "UNKNOWN"):
                out[t] = QUEUED
            elif state in ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"):
                t.where = f"job {jid} on {node}" if node else f"job {jid}"
                out[t] = RUNNING
            else:
                out[t] = "ended"
        busy = [t for t in tasks if out.get(t) in (QUEUED, RUNNING)]
        # watch closely while things change, then every 10 s (a cluster's controller is shared)
        self.poll_s = 2.0 if len(busy) != len(tasks) else min(10.0, self.poll_s * 1.5)
        return out

    def ended_without_record(self, job: Any, rec: dict[str, Any]) -> str:
        state = self.states.get(job.job_id, ("", ""))[0]
        how = {"CANCELLED": "was cancelled (scancel)", "TIMEOUT": "reached its time limit (--time)",
               "PREEMPTED": "was pre-empted", "NODE_FAIL": "lost its node",
               "OUT_OF_MEMORY": "ran out of memory", "BOOT_FAIL": "could not start",
               "DEADLINE": "passed its deadline"}.get(state.split()[0] if state else "", "")
        what = f"SLURM job {job.job_id} {how}" if how else (
            f"SLURM job {job.job_id} ended ({state or 'no longer known to squeue'}) without finishing")
        said = str(rec.get("error", "")).partition(";")[0]  # e.g. 'stopped by SIGTERM (...)'
        what += f" ({said})" if said else ""
        return f"{what}; rerun the same command to resume from the last checkpoint"

    def cancel(self, tasks: list[Task]) -> list[str]:
        ids = [self.jobs[t].job_id for t in tasks if t in self.jobs]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        return ["cancelled SLURM jobs " + ", ".join(f"{self.jobs[t].job_id} ({t.label})" for t in tasks
                                                   if t in self.jobs)
                + "; rerun the same command to resume them from their last checkpoints"]
