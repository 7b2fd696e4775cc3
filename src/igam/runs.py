"""A run directory and everything written into it, atomically.

    RUN/
      config.yaml          the effective configuration
      meta.json            architecture, dataset, classes, input shape, adapter, seed, version, git commit
      model.safetensors    final weights (plus e.g. discriminator.safetensors)
      checkpoints/         resumable training states: ckpt-STEP.pt + ckpt-STEP.json (sha256, step)
      metrics.json         final metrics; eval.json holds attack results
      log.csv, tb/         per-step logs (CSV and TensorBoard)

Nothing here unpickles: weights are safetensors and training states load with weights_only=True.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from igam.errors import IgamError

PACKAGE_VERSION = "0.1.0"


# ---------------------------------------------------------------------------------------------
# crash-test hook (docs/RELIABILITY.md): IGAM_TEST_KILL_AT=POINT:N makes the process SIGKILL itself the
# N-th time it reaches kill_point(POINT). Unset (normal use), kill_point does nothing.
KILL_ENV = "IGAM_TEST_KILL_AT"
KILL_POINTS = ("step", "after-step", "optimizer-step", "checkpoint-write", "checkpoint-sidecar",
               "weights-write")
_kill_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Crash tests only: SIGKILL this process at the N-th call with this name (see KILL_ENV above)."""
    spec = os.environ.get(KILL_ENV)
    if not spec or spec.partition(":")[0] != name:
        return
    _kill_hits[name] = _kill_hits.get(name, 0) + 1
    if _kill_hits[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def install_kill_hooks() -> None:
    """Under IGAM_TEST_KILL_AT=optimizer-step:N, count every optimizer.step() of the process (the student's
    and e.g. the discriminator's), so a crash test can die inside an objective's own update."""
    if os.environ.get(KILL_ENV, "").startswith("optimizer-step:"):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: kill_point("optimizer-step"))


# ---------------------------------------------------------------------------------------------
# atomic file writes: temp file in the same directory, fsync, rename, fsync the directory
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _mkstemp(path: Path) -> tuple[int, str]:
    """A temp file beside `path`, with the permissions a plain open() would give (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return fd, tmp


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IgamError(f"'{path}' is missing.") from None
    except json.JSONDecodeError as e:
        raise IgamError(f"'{path}' is not valid JSON ({e}).") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# weights: safetensors only
def save_weights(module_or_state: torch.nn.Module | dict, path: Path) -> None:
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        kill_point("weights-write")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code: safetensors, or .pt/.pth with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise IgamError(f"Weights file '{path}' does not exist.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise IgamError(f"'{path}' is not a valid safetensors file ({e}); it may be truncated or "
                            "corrupted. Re-create it (e.g. rerun the training with resume=true).") from None
    return _check_tensor_dict(load_torch_file(path), path)


def _load_error(e: BaseException) -> str:
    """The one informative line of a torch.load failure (torch's own text is long and has ANSI codes):
    for a refused pickle payload, the line naming the forbidden global."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    if text.startswith("Weights only load failed"):
        named = [t for t in lines[1:] if re.search(r"GLOBAL|global|WeightsUnpickler error", t)]
        line = named[0] if named else "the file holds objects other than tensors"
        line = re.sub(r"^WeightsUnpickler error: ", "", line).split(" Please use")[0]
    else:
        line = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {line[:200].rstrip('.')}"


def load_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True: a pickle payload that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise IgamError(f"Checkpoint file '{path}' does not exist.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise IgamError(
            f"Refused to load '{path}': it is not a plain tensor checkpoint ({_load_error(e)}). igam never "
            "unpickles arbitrary objects. If you trust the file, convert it to safetensors in a separate "
            "Python session (torch.load(..., weights_only=False), then safetensors.torch.save_file)."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return obj


def _check_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise IgamError(f"'{path}' does not hold a state dict (a mapping of parameter names to tensors), so "
                        "it cannot be loaded as model weights.")
    return obj


# ---------------------------------------------------------------------------------------------
# resumable training state: tensors and primitives only, with a checksum
def save_state(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ckpt-STEP.pt atomically, then its sidecar ckpt-STEP.json (step, sha256): a checkpoint counts
    only once its sidecar exists and matches. Older checkpoints beyond `keep` are removed afterwards."""
    ckdir = Path(run_dir) / "checkpoints"
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
        _atomic(path, write)
        kill_point("checkpoint-sidecar")  # crash tests: die between the file and its sidecar
        write_json(path.with_suffix(".json"), {"step": step, "sha256": hashlib.sha256(data).hexdigest(),
                                               "size": len(data), "time": time.time()})
    except OSError as e:
        raise IgamError(f"Cannot write checkpoint '{path}' ({e.strerror or e}); the previous checkpoints are "
                        "intact. Free disk space (or fix permissions), then continue with resume=true."
                        ) from None
    for old in sorted(ckdir.glob("ckpt-*.pt"))[:-max(1, keep)]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


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

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resume_step: int | None = None):
        self.path = Path(path)
        self.keys: list[str] = []
        if self.path.exists() and resume_step is not None:
            # a resumed run re-logs the steps after its checkpoint: drop those rows (and a row cut short
            # by a crash in the middle of an append)
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.keys = [k for k in (reader.fieldnames or []) if k]
                rows = [r for r in reader if _complete(r) and float(r["step"]) <= resume_step]
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

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **values}
        new = [k for k in row if k not in self.keys]
        if new or not self.path.exists():
            rows = _read_csv(self.path) if self.path.exists() else []
            self.keys += new
            self._rewrite(rows + [row])
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.keys).writerow({k: row.get(k, "") for k in self.keys})
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _complete(row: dict[Any, Any]) -> bool:
    """A CSV row with every column present (a crash mid-append leaves a short one) and a numeric step."""
    if None in row or any(v is None for v in row.values()):
        return False
    try:
        float(row.get("step", ""))
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_log(run_dir: Path, name: str = "log.csv") -> list[dict[str, Any]]:
    """Rows of a run's CSV log with numbers converted to floats and empty cells dropped."""
    path = Path(run_dir) / name
    if not path.exists():
        return []
    out = []
    for r in _read_csv(path):
        conv: dict[str, Any] = {}
        for k, v in r.items():
            if v in ("", None):
                continue
            try:
                conv[k] = float(v)
            except ValueError:
                conv[k] = v
        out.append(conv)
    return out


def resolve_run(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "meta.json").exists():
        if p.exists():
            raise IgamError(f"'{path}' is not an igam run directory (no meta.json). Give a directory written "
                            "by `igam train`, `igam finetune` or `igam transfer`.")
        raise IgamError(f"Run directory '{path}' does not exist.")
    return p
