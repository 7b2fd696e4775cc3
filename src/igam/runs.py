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
import json
import os
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
# atomic file writes: temp file in the same directory, fsync, rename
def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
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
            raise IgamError(f"'{path}' is not a valid safetensors file ({e}).") from None
    return load_torch_file(path)


def load_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True: a pickle payload that would run code is refused."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise IgamError(
            f"Refused to load '{path}': it is not a plain tensor checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). igam never unpickles arbitrary objects. If you trust the "
            "file, convert it to safetensors in a separate Python session "
            "(torch.load(..., weights_only=False) then safetensors.torch.save_file).") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return obj


# ---------------------------------------------------------------------------------------------
# resumable training state: tensors and primitives only, with a checksum
def save_state(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"ckpt-{step:09d}.pt"
    _atomic(path, lambda f: torch.save(state, f))
    write_json(path.with_suffix(".json"), {"step": step, "sha256": sha256_file(path), "time": time.time()})
    for old in sorted(ckdir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def load_latest_state(run_dir: Path, log=print) -> dict[str, Any] | None:
    """The newest checkpoint whose checksum matches; corrupt ones are reported and skipped."""
    ckdir = Path(run_dir) / "checkpoints"
    for path in sorted(ckdir.glob("ckpt-*.pt"), reverse=True):
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != sha256_file(path):
                raise ValueError("checksum mismatch (truncated or corrupted)")
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            log(f"igam: checkpoint {path.name} is unusable ({type(e).__name__}: {e}); trying the previous one.")
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
            # a resumed run re-logs the steps after its checkpoint: drop those rows
            rows = [r for r in _read_csv(self.path) if float(r["step"]) <= resume_step]
            self.keys = list(rows[0].keys()) if rows else []
            self._rewrite(rows)
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)
            except Exception:  # tensorboard missing or broken: CSV still works
                self.tb = None

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        import io

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
