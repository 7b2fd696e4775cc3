"""A run directory: its layout, its files, resumable training states, logs and its trained model.

    RUN/
      config.yaml          the effective configuration
      meta.json            architecture, dataset, classes, input shape, adapter, seed, version, git commit,
                           status, passes per training image
      model.safetensors    final weights (objective.safetensors: e.g. the discriminator, lambda_diff)
      checkpoints/         resumable training states: ckpt-STEP.pt + ckpt-STEP.json (sha256, step)
      metrics.json         final metrics; eval.json holds attack results (`igam evaluate`)
      log.csv, eval_log.csv, tb/   per-step and per-evaluation logs (CSV and TensorBoard)
      .lock                held by the process that trains in the folder
    written by other verbs:
      robustness_curve.json, robustness_curve.png   the latest `igam evaluate --eps-sweep`
      autoattack-state-KEY/, autoattack-KEY.log     an unfinished AutoAttack's resume state, its log
      model_info.json      `igam evaluate --model-info` (RobustBench's format)
      report.html          `igam report`; gradients.png, landscape-INDEX.png: `igam gradients`, `landscape`
      jobs/                the jobs `igam run --jobs N` / `--executor slurm` ran for this stage: per job its
                           log (JOB_0_log.out, .err), its state (JOB_igam.json) and, on SLURM, its script

`Run(path)` owns these names; nothing else spells them. Nothing here unpickles: weights are safetensors
and training states load with weights_only=True.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from igam.errors import IgamError, WriteError
from igam.files import (
    DirLock,
    _load_error,
    append_text,
    atomic_write_text,
    kill_point,
    load_weights,
    lock_holder,
    read_json,
    read_json_object,
    read_yaml,
    safe_write,
    sha256_file,
    write_json,
    write_json_or_overwrite,
)
from igam.method.adapted import model_from_meta
from igam.models import check_model_args, model_from_args, shipped
from igam.utils import unwrap


# ---------------------------------------------------------------------------------------------
# resumable training state: tensors and primitives only, with a checksum
def save_state(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ckpt-STEP.pt atomically, then its sidecar ckpt-STEP.json (step, sha256): a checkpoint counts
    only once its sidecar exists and matches. Older checkpoints beyond `keep` are removed afterwards. The
    caller writes only states that passed its finite check, so pruning never drops the last good state.

    Raises:
        IgamError: when the write fails, or checkpoints/ (or an entry in it) is a symbolic link.
    """
    ckdir = Path(run_dir) / "checkpoints"
    refuse_symlinks(Path(run_dir), ("checkpoints",))
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"ckpt-{step:09d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()

    def write(f) -> None:
        f.write(data[: len(data) // 2])
        f.flush()
        kill_point("checkpoint-write")  # crash tests: die with half a file written
        f.write(data[len(data) // 2:])

    try:
        safe_write(path, write)
        kill_point("checkpoint-sidecar")  # crash tests: die between the file and its sidecar
        write_json(path.with_suffix(".json"), {"step": step, "sha256": hashlib.sha256(data).hexdigest(),
                                               "size": len(data), "time": time.time()})
    except (WriteError, OSError) as e:
        reason = e.reason if isinstance(e, WriteError) else (e.strerror or str(e))
        where = e.path if isinstance(e, WriteError) and e.path else path
        raise WriteError(f"Cannot write checkpoint '{where}' ({reason}); the previous checkpoints are "
                         "intact. Free disk space (or fix permissions), then continue with resume=true.",
                         where, reason) from None
    for old in sorted(ckdir.glob("ckpt-*.pt"))[:-max(1, keep)]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def refuse_symlinks(run_dir: Path, names: tuple[str, ...] | None = None) -> None:
    """Refuse a run directory whose entries (all of them, or `names`) or whose checkpoints/ and tb/
    entries are symbolic links: igam writes and deletes only inside the run folder, and a link would make
    it write through to (or prune files of) another place. The run directory itself may be a link.

    Raises:
        IgamError: naming the link and its target.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    entries = [run_dir / n for n in names] if names is not None else list(run_dir.iterdir())
    for sub in ("checkpoints", "tb"):
        folder = run_dir / sub
        if (names is None or sub in names) and folder.is_dir() and not folder.is_symlink():
            entries += list(folder.iterdir())
    for e in entries:
        if e.is_symlink():
            raise IgamError(f"'{e}' is a symbolic link (to '{os.readlink(e)}'). igam writes and deletes only "
                            "inside a run folder, never through links; replace the link with a real "
                            f"{'folder' if e.name in ('checkpoints', 'tb') else 'file'} (or remove it).")


def clean_partial_writes(run_dir: Path) -> None:
    """Remove the temp files (.NAME.*.tmp) that a process killed while writing left in a run directory
    and its checkpoints/ (never renamed into place, so never read)."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def load_latest_state(run_dir: Path, log=print) -> dict[str, Any] | None:
    """The newest checkpoint whose sidecar checksum matches; truncated, corrupted or unfinished ones are
    reported and skipped. A checkpoint with a matching checksum that still fails to load under
    weights_only=True holds objects other than tensors (e.g. a planted pickle payload): refused with an
    IgamError instead of silently falling back."""
    ckdir = Path(run_dir) / "checkpoints"
    clean_partial_writes(run_dir)
    for path in sorted(ckdir.glob("ckpt-*.pt"), reverse=True):
        meta_path = path.with_suffix(".json")
        try:
            if not meta_path.exists():
                raise ValueError(f"its sidecar {meta_path.name} is missing (the write was interrupted)")
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or meta.get("sha256") != sha256_file(path):
                raise ValueError("checksum mismatch: the file is truncated or corrupted")
        except Exception as e:
            log(f"igam: checkpoint {path.name} is unusable ({e}); trying the previous one.")
            continue
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise IgamError(
                f"Refused to load checkpoint '{path}': its checksum matches, but it holds something other "
                f"than tensors ({_load_error(e)}). igam never unpickles arbitrary objects; this file was not "
                "written by igam or was tampered with. Delete it (and its .json) to resume from an earlier "
                "checkpoint.") from None
        if not isinstance(state, dict) or "step" not in state or "model" not in state:
            raise IgamError(f"Checkpoint '{path}' is not an igam training state (no step/model entries).")
        return state
    return None


# ---------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


class CSVLogger:
    """Appends metric rows to a CSV file (rewritten only when a new column appears) and to TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resume_step: int | None = None,
                 log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.keys: list[str] = []
        if self.path.exists() and resume_step is not None:
            # a resumed run re-logs the steps after its checkpoint: drop those rows (and a row cut short
            # by a crash in the middle of an append)
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    self.keys = [k for k in (reader.fieldnames or []) if k]
                    rows = [r for r in reader if _complete(r) and float(r["step"]) <= resume_step]
            except (csv.Error, UnicodeDecodeError, ValueError) as e:
                self.keys, rows = [], []
                if log is not None:
                    log(f"igam: WARNING: '{self.path}' is damaged ({' '.join(str(e).split())[:120]}); it is "
                        f"started anew from step {resume_step} (the rows before are lost).")
            self._rewrite(rows)
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir),
                                        purge_step=None if resume_step is None else resume_step + 1)
            except Exception:  # tensorboard missing or broken: CSV still works
                self.tb = None

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.keys)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in self.keys} for r in rows])
        atomic_write_text(self.path, buf.getvalue())

    def log(self, step: int, values: dict[str, Any], replace: bool = False) -> None:
        """Append a row; replace=True first drops the rows of the same step (a final evaluation redone by a
        resume of a run that had already reached it)."""
        row = {"step": step, **values}
        new = [k for k in row if k not in self.keys]
        old = [r for r in _read_csv(self.path)] if replace and self.path.exists() else []
        if replace and any(_same_step(r, step) for r in old):
            self.keys += new
            self._rewrite([r for r in old if not _same_step(r, step)] + [row])
        elif new or not self.path.exists():
            rows = _read_csv(self.path) if self.path.exists() else []
            self.keys += new
            self._rewrite(rows + [row])
        else:
            buf = io.StringIO()
            csv.DictWriter(buf, fieldnames=self.keys).writerow({k: row.get(k, "") for k in self.keys})
            append_text(self.path, buf.getvalue())
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _complete(row: dict[Any, Any]) -> bool:
    """A CSV row with every column present (a crash mid-append leaves a short one) and a finite numeric
    step."""
    if None in row or any(v is None for v in row.values()):
        return False
    try:
        return math.isfinite(float(row.get("step", "")))
    except ValueError:
        return False


def _same_step(row: dict[str, Any], step: int) -> bool:
    try:
        return float(row.get("step", "")) == step
    except (TypeError, ValueError):
        return False


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_log(run_dir: Path, name: str = "log.csv") -> list[dict[str, Any]]:
    """Rows of a run's CSV log with numbers converted to floats; empty cells, cells that are not finite
    numbers, and rows without a step (damage: igam logs numbers only) are left out.

    Raises:
        IgamError: when the file is not a readable CSV file (not UTF-8 text, a field too large, ...).
    """
    path = Path(run_dir) / name
    if not path.exists():
        return []
    out = []
    try:
        rows = _read_csv(path)
    except (csv.Error, UnicodeDecodeError, ValueError) as e:
        raise IgamError(f"'{path}' is not a readable CSV log ({' '.join(str(e).split())[:160]}); it was not "
                        "written by igam or is damaged. Delete it (training rewrites it on resume)."
                        ) from None
    damaged = 0
    for r in rows:  # igam's logs hold numbers only: a cell that is none (damage) is left out
        conv: dict[str, Any] = {}
        for k, v in r.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                damaged += k is None or v is None or bool(v)  # an extra field or a cell without a column
                continue
            try:
                x = float(v)
            except ValueError:
                damaged += bool(v.strip())  # (an empty cell is a column this row did not log)
                continue
            if math.isfinite(x) and abs(x) < 1e300:
                conv[k] = x
        if "step" in conv:
            out.append(conv)
        else:
            damaged += 1
    if damaged:  # never silently: the curves drawn from this file lack what was left out
        print(f"igam: WARNING: '{path}' holds {damaged} damaged cell(s) or row(s) (igam writes numbers "
              "only); they are left out of what is drawn from it. Delete the file to drop it (training "
              "rewrites it on resume).", file=sys.stderr)
    return out


def resolve_run(path: str | Path) -> Path:
    """`path` as a run directory (one that holds meta.json).

    Raises:
        IgamError: a path that does not exist or is not a run directory; a teacher name (`igam:NAME`,
            `robustbench:...`), which is not a run, gets what to do with it instead.
    """
    p = Path(path)
    if not (p / "meta.json").exists():
        spec = str(path)
        if not p.exists() and spec.startswith(("igam:", "robustbench:")):
            if spec.startswith(shipped.PREFIX):
                shipped.shipped_name(spec)  # an unknown name: the shipped teachers there are
            info = (f"its certificate (the accuracies it was measured to have, and the evaluation command) "
                    f"is in `igam info {spec}`; " if spec.startswith("igam:") else "")
            raise IgamError(f"'{spec}' is a teacher, not a run directory: {info}to use it, fine-tune its "
                            f"head on your task (`igam finetune teacher={spec} dataset=TARGET`) and evaluate "
                            "or transfer from that run.")
        if p.exists():
            raise IgamError(f"'{path}' is not an igam run directory (no meta.json). Give a directory written "
                            "by `igam train`, `igam finetune` or `igam transfer`.")
        raise IgamError(f"Run directory '{path}' does not exist.")
    return p


# ---------------------------------------------------------------------------------------------
def load_state_checked(model: nn.Module, state: dict[str, Any], what: str) -> None:
    """load_state_dict whose shape or key mismatches become one clear IgamError naming `what`."""
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        first = "; ".join([t.strip() for t in str(e).splitlines() if t.strip()][1:3])[:300].rstrip(".")
        raise IgamError(f"{what} does not fit this model ({first}). It was written for another architecture, "
                        "input shape or number of classes.") from None


def _number(v: Any) -> bool:
    """A finite int or float (not a bool) of a size a float holds with room to compute (|v| < 1e300)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    return abs(v) < 1e300 if isinstance(v, int) else math.isfinite(v) and abs(v) < 1e300


def check_meta(meta: Any, path: Path | str = "meta.json") -> dict[str, Any]:
    """The fields of a run's meta.json that are used to rebuild its model and data, checked for type and
    bounds before anything is built (a hostile or damaged file gives one IgamError, never an allocator
    error, KeyError or RecursionError). Returns `meta` unchanged."""
    def bad(what: str) -> IgamError:
        return IgamError(f"'{path}' is not a valid igam meta.json: {what}. It was not written by igam or is "
                         "damaged; restore it, or retrain the run.")

    if not isinstance(meta, dict):
        raise bad(f"it holds a JSON {type(meta).__name__}, not an object")
    model, data = meta.get("model"), meta.get("data")
    if not isinstance(model, dict):
        raise bad("the 'model' entry is missing or not an object")
    if not isinstance(data, dict):
        raise bad("the 'data' entry is missing or not an object")
    if not isinstance(data.get("dataset"), str) or not data["dataset"]:
        raise bad("'data.dataset' is missing or not a name")
    if meta.get("status") is not None and not isinstance(meta["status"], str):
        raise bad("'status' is not a string")
    descriptions = [("model", model)]
    if model.get("adapter") is not None:
        if not isinstance(model.get("adapter"), str) or not isinstance(model.get("teacher"), dict):
            raise bad("a fine-tuned teacher needs 'model.adapter' (a name) and 'model.teacher' (an object)")
        descriptions.append(("model.teacher", model["teacher"]))
    for where, d in descriptions:
        missing = [k for k in ("name", "num_classes", "in_chans", "input_size") if k not in d]
        if missing:
            raise bad(f"'{where}' lacks {', '.join(missing)}")
        try:
            check_model_args(d["name"], d["num_classes"], d["in_chans"], d["input_size"], d.get("width", 0))
        except IgamError as e:
            raise bad(f"in '{where}': {str(e).rstrip('.')}") from None
    for key in ("shape", "num_classes"):
        v = data.get(key)
        if key == "shape" and v is not None and (not isinstance(v, list) or len(v) != 3
                                                 or not all(isinstance(i, int) and 0 < i <= 4096 for i in v)):
            raise bad(f"'data.shape' {str(v)[:80]} is not [channels, height, width]")
        if key == "num_classes" and v is not None and (not isinstance(v, int) or not 0 < v <= 100_000):
            raise bad(f"'data.num_classes' {str(v)[:80]} is not a whole number in 1 .. 100000")
    names = data.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(c, str | int) for c in names)):
        raise bad("'data.class_names' is not a list of names")
    # the fields that reports and `igam info` show: absent is fine, the wrong type is damage
    for key, types in (("method", str), ("seed", int), ("version", str), ("git_commit", str), ("torch", str),
                       ("device", str), ("augment", str), ("stopped", str), ("teacher", str),
                       ("adapter", str | dict), ("steps", int), ("steps_per_epoch", int),
                       ("world_size", int), ("epochs", float), ("train_time_s", float),
                       ("finished", float), ("eval_bn", str), ("ranks_in_sync", bool)):
        v = meta.get(key)
        ok = (_number(v) if types is float else isinstance(v, types)
              and (types is bool or not isinstance(v, bool)))
        if v is not None and not ok:
            what = "number" if types is float else getattr(types, "__name__", "value")
            raise bad(f"'{key}' is {str(v)[:60]!r}, not a {what} as igam writes it")
    passes = meta.get("passes_per_image")
    if passes is not None and not (isinstance(passes, dict) and all(
            isinstance(c, dict) and all(_number(v) for v in c.values()) for c in passes.values())):
        raise bad("'passes_per_image' is not a mapping of network -> {pass: count}")
    return meta


class Run:
    """One run directory and the files in it (see the module docstring for the layout).

    `Run(path)` checks nothing; `Run.open(path)` requires meta.json (an existing run). Attribute names are
    the files' paths; `meta`, `config` read them; `load_model()` rebuilds the trained network.
    """

    CONFIG, META, METRICS, EVAL = "config.yaml", "meta.json", "metrics.json", "eval.json"
    WEIGHTS, OBJECTIVE = "model.safetensors", "objective.safetensors"
    LOG, EVAL_LOG, TB, CHECKPOINTS = "log.csv", "eval_log.csv", "tb", "checkpoints"
    JOBS = "jobs"  # `igam run`'s job files for this stage (igam.experiment.executors)
    LOCK = ".lock"  # held (OS lock) by the one process that trains in this folder
    EVAL_LOCK = ".eval.lock"  # held while a process updates eval.json (records.update_eval_json)
    CURVE, CURVE_PNG = "robustness_curve.json", "robustness_curve.png"  # `igam evaluate --eps-sweep`

    def __init__(self, path: str | Path):
        self.dir = Path(path)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run directory.

        Raises:
            IgamError: when `path` does not exist or holds no meta.json.
        """
        return cls(resolve_run(path))

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def config_path(self) -> Path:
        return self.dir / self.CONFIG

    @property
    def meta_path(self) -> Path:
        return self.dir / self.META

    @property
    def weights_path(self) -> Path:
        return self.dir / self.WEIGHTS

    @property
    def objective_path(self) -> Path:
        return self.dir / self.OBJECTIVE

    @property
    def metrics_path(self) -> Path:
        return self.dir / self.METRICS

    @property
    def eval_path(self) -> Path:
        return self.dir / self.EVAL

    @property
    def curve_path(self) -> Path:
        """The robustness curve of the latest `igam evaluate --eps-sweep` (JSON)."""
        return self.dir / self.CURVE

    @property
    def curve_png_path(self) -> Path:
        """Its picture (PNG)."""
        return self.dir / self.CURVE_PNG

    @property
    def meta(self) -> dict[str, Any]:
        """meta.json (architecture, data, status, provenance).

        Raises:
            IgamError: when it is missing, not valid JSON, or its fields are malformed (`check_meta`).
        """
        return check_meta(read_json(self.meta_path), self.meta_path)

    @property
    def config(self) -> dict[str, Any]:
        """config.yaml as a plain mapping ({} when absent), read with safe YAML (no Python tags, no alias
        bombs).

        Raises:
            IgamError: when it is unreadable, malformed or hostile, or not a mapping.
        """
        if not self.config_path.exists():
            return {}
        try:
            cfg = read_yaml(self.config_path, "The run's config file")
        except OSError as e:
            raise IgamError(f"Cannot read '{self.config_path}' ({e.strerror or e}).") from None
        if cfg is None:
            return {}
        if not isinstance(cfg, dict):
            raise IgamError(f"'{self.config_path}' must hold a mapping of key: value, not "
                            f"{type(cfg).__name__}; "
                            "it was not written by igam or is damaged. Restore or delete it.")
        return cfg

    def read_metrics(self, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """metrics.json for the readers that show it ({} when absent): `final` and `train` keep only their
        finite numbers, `steps` and `skipped_steps` only whole numbers, `passes_per_image` only the shape
        igam writes; what does not fit is left out with one warning through `log` naming the file.

        Raises:
            IgamError: when the file is not JSON or not an object.
        """
        if not self.metrics_path.exists():
            return {}
        data = read_json_object(self.metrics_path)
        out: dict[str, Any] = {}
        bad: list[str] = []
        for k, v in data.items():
            if k in ("final", "train"):
                if not isinstance(v, dict):
                    bad.append(k)
                    continue
                out[k] = {m: x for m, x in v.items() if _number(x)}
                bad += [f"{k}.{m}" for m in v if m not in out[k]]
            elif k in ("steps", "skipped_steps"):
                ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**15
                out.update({k: v} if ok else {})
                bad += [] if ok else [k]
            elif k == "passes_per_image":
                ok = isinstance(v, dict) and all(isinstance(c, dict) and all(_number(x) for x in c.values())
                                                 for c in v.values())
                out.update({k: v} if ok else {})
                bad += [] if ok else [k]
            else:
                out[k] = v
        if bad and log is not None:
            log(f"igam: WARNING: '{self.metrics_path}' holds damaged entries, left out: "
                f"{', '.join(map(str, bad))[:300]}.")
        return out

    @property
    def data_dir(self) -> str | None:
        """The data root the run was trained from (its config.yaml), or None."""
        d = self.config.get("data_dir") or None
        if d is not None and not isinstance(d, str):
            raise IgamError(f"'{self.config_path}': data_dir={d!r} is not a path; fix or delete the line.")
        return d

    def lock(self, log=print) -> DirLock:
        """Create the folder if needed and take its lock (released by `.release()`, or by the OS when the
        process dies). A lock a dead process left is taken over with a note.

        Raises:
            IgamError: when another live process holds it (naming its pid), the folder cannot be created,
                or an entry of the folder is a symbolic link.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IgamError(f"Cannot create the run directory '{self.dir}' ({e.strerror or e}); choose "
                            "another out_dir=... or name=....") from None
        refuse_symlinks(self.dir)
        lock = DirLock(self.dir / self.LOCK)
        old = lock.acquire(f"Run directory '{self.dir}'")
        if old:
            log(f"igam: note: took over the lock of {self.dir} from {old}, which is no longer running.")
        return lock

    def remove_if_empty(self) -> bool:
        """Remove the run folder when it holds nothing but its lock file (a run refused before it wrote
        anything); returns whether it was removed. Nothing else is ever deleted."""
        try:
            entries = {p.name for p in self.dir.iterdir()}
            if entries - {self.LOCK}:
                return False
            (self.dir / self.LOCK).unlink(missing_ok=True)
            self.dir.rmdir()
            return True
        except OSError:
            return False

    def holder(self) -> str | None:
        """Who holds the folder's lock now ('pid N on HOST (...)'), or None when nobody does."""
        return lock_holder(self.dir / self.LOCK)

    def mark_stopped(self, reason: str) -> bool | None:
        """Record in meta.json that training stopped (status `stopped`, `stopped`: reason) when it still
        says `running`, even on a full disk (`write_json_or_overwrite`). Returns True when recorded, False
        when meta.json did not say `running` (nothing to correct), None when it could not be written; never
        raises (it runs while another error is being reported)."""
        try:
            meta = read_json(self.meta_path) if self.meta_path.is_file() else None
        except IgamError:
            return False
        if not isinstance(meta, dict) or meta.get("status") != "running":
            return False
        try:
            write_json_or_overwrite(self.meta_path, {**meta, "status": "stopped", "stopped": reason})
            return True
        except IgamError:
            return None

    @property
    def status(self) -> str | None:
        return self.meta.get("status") if self.meta_path.exists() else None

    def build_model(self) -> nn.Module:
        """The run's network with freshly initialised weights, re-created from meta.json (a fine-tuned
        teacher comes back with its adapter and frozen body)."""
        meta = self.meta
        args = meta["model"]
        try:
            if args.get("adapter") is not None:  # an adapted (fine-tuned) teacher
                return model_from_meta(meta)
            return model_from_args(args)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise IgamError(f"'{self.meta_path}' describes a model that cannot be built ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]}); it was not written by igam or is damaged. "
                            "Restore it, or retrain the run.") from None

    def load_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The trained network in eval mode on `device`.

        Raises:
            IgamError: when the run has no model.safetensors yet, or the weights do not fit meta.json.
        """
        meta = self.meta
        model = self.build_model()
        if not self.weights_path.exists():
            raise IgamError(f"Run '{self.dir}' has no model.safetensors yet (status: {meta.get('status')}). "
                            "Finish it first, e.g. with resume=true.")
        load_state_checked(model, load_weights(self.weights_path), f"{self.weights_path}")
        return model.to(device).eval()


def load_run_model(run: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained network of a run directory in eval mode (see `Run.load_model`)."""
    return Run.open(run).load_model(device)


def init_model_from(model: nn.Module, run: str | Path) -> None:
    """Load the final weights of run `run` into `model`, after checking architecture, classes and input.

    Raises:
        IgamError: when the runs' models differ, or `run` has not finished.
    """
    src = Run.open(run)
    src.config  # noqa: B018  (read to check it: a hostile or damaged config.yaml refuses the run)
    theirs = src.meta.get("model") or {}
    ours = unwrap(model).igam_args
    for key, what in (("name", "architecture"), ("num_classes", "number of classes"),
                      ("in_chans", "number of input channels"), ("width", "width"),
                      ("activation", "activation")):
        if key in ours and theirs.get(key, ours[key]) != ours[key]:
            raise IgamError(f"init_from={run} cannot initialise this model: its {what} is "
                            f"{theirs.get(key)!r}, this run's is {ours[key]!r}. Start from a run with the "
                            "same model, dataset and width, or drop init_from.")
    if not src.weights_path.exists():
        raise IgamError(f"init_from={run} has no model.safetensors yet; finish that run first (resume=true).")
    load_state_checked(model, load_weights(src.weights_path), f"init_from={run}")
