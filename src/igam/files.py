"""Files, written atomically and read without executing code.

Atomic writes (temp file beside the target, fsync, rename, fsync of the directory), JSON, safetensors
weights, plain-tensor torch files read with weights_only=True, and the crash-test kill points that the
reliability tests use (docs/RELIABILITY.md). Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from igam.errors import IgamError, WriteError

PACKAGE_VERSION = "0.1.0"

# ---------------------------------------------------------------------------------------------
# crash-test hook (docs/RELIABILITY.md): IGAM_TEST_KILL_AT=POINT:N makes the process SIGKILL itself the
# N-th time it reaches kill_point(POINT); POINT:N:hang makes it wait there until something else kills it
# (tests of `igam run` that cancel a job in the middle of a stage). Unset (normal use), it does nothing.
KILL_ENV = "IGAM_TEST_KILL_AT"
KILL_POINTS = ("step", "after-step", "optimizer-step", "checkpoint-write", "checkpoint-sidecar",
               "weights-write")
_kill_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Crash tests only: SIGKILL this process (or, with POINT:N:hang, wait until it is killed) at the N-th
    call with this name (see KILL_ENV above)."""
    spec = os.environ.get(KILL_ENV)
    if not spec or spec.partition(":")[0] != name:
        return
    _kill_hits[name] = _kill_hits.get(name, 0) + 1
    count, _, action = spec.partition(":")[2].partition(":")
    if _kill_hits[name] == int(count or 1):
        while action == "hang":
            time.sleep(1)
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


def _umask() -> int:
    """The process umask (read without leaving it changed)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mkstemp(path: Path) -> tuple[int, str]:
    """A temp file beside `path`, with the permissions a plain open() would give (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


MAX_NAME = 200  # characters of a run or stage name (file systems allow 255 bytes per path component)


def check_name(name: Any, what: str = "name") -> str:
    """A run or stage name as the single path component it must be: a non-empty string of at most MAX_NAME
    characters, not '.' or '..', without '/', '\\', NUL or other control characters, so that
    out_dir/NAME is a folder directly inside out_dir and nothing is written outside it. Returns `name`.

    Raises:
        IgamError: naming `what`, the value and what to write instead.
    """
    text = name if isinstance(name, str) else ""
    problem = None
    if not isinstance(name, str):
        problem = f"is a {type(name).__name__}, not text"
    elif not text.strip():
        problem = "is empty" if not text else "is blank"
    elif text in (".", ".."):
        where = "out_dir itself" if text == "." else "the folder above out_dir"
        problem = f"is '{text}', which names {where}"
    elif "/" in text or "\\" in text:
        problem = "holds a path separator ('/' or '\\'): it would make a folder outside or below out_dir"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "holds a control character (NUL, newline, ...)"
    elif text != text.strip() or text.endswith("."):
        problem = ("starts or ends with a space or ends with '.', which some file systems (Windows, SMB "
                   "shares) drop, so the folder would not be found under this name")
    elif any(c in text for c in "\u2215\u2044\uff0f\u29f8\uff3c\u2216"):
        problem = "holds a character that looks like a path separator (a lookalike of '/' or '\\')"
    elif len(text) > MAX_NAME or len(text.encode("utf-8", "surrogatepass")) > 240:
        problem = f"is {len(text)} characters long (at most {MAX_NAME})"
    if problem is not None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise IgamError(f"{what}={shown} {problem}. A {what} is one folder name inside out_dir: letters, "
                        "digits and e.g. '-_.=' (e.g. igam-resnet20-s0); put folders in out_dir=... instead.")
    return text


def refuse_link(path: Path) -> None:
    """Refuse to write `path` when it is a symbolic link: igam never writes through a link to a file
    elsewhere (and never silently replaces one the user made).

    Raises:
        IgamError: naming the link and where it points.
    """
    path = Path(path)
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise IgamError(f"'{path}' is a symbolic link (to '{target}'). igam writes its files only as real "
                        "files, never through links; remove the link (or write elsewhere) and run again.")


def safe_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """THE way igam writes a file (every writer goes through it or the helpers below; a test scans src/
    for any other): `write(f)` fills a temp file beside `path` (binary), which is fsynced and renamed
    over `path`, then the directory is fsynced. A reader sees the old file or the new one, never a part;
    a crash leaves at most a `.NAME.*.tmp` file. A `path` that is a symbolic link is refused
    (`refuse_link`): nothing is ever written through a link; and the rename would replace a link made
    between the check and the write, never follow it.

    Raises:
        IgamError: when `path` is a symbolic link; WriteError (an IgamError naming `path`) when the write
            fails (a full disk, a read-only folder, permissions).
    """
    path = Path(path)
    refuse_link(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp(path)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_error(path: Path, e: BaseException) -> WriteError:
    """The WriteError of a failed write of `path`: 'Cannot write PATH (REASON); free disk space or fix the
    folder's permissions, then run the command again.' (callers that know more say it from e.path and
    e.reason)."""
    reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
    return WriteError(f"Cannot write '{path}' ({reason}); free disk space or fix the folder's permissions, "
                      "then run the command again.", path, reason)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    safe_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable(path: Path, size: int = 1 << 16) -> None:
    """Check, before long work, that `path` can be written: not a link, and a temp file beside it of
    `size` bytes (at least twice the file's current size) can be written, fsynced and removed.

    Raises:
        IgamError: when `path` is a symbolic link; WriteError (naming `path`) on a read-only folder, missing
            permissions or a full disk.
    """
    path = Path(path)
    refuse_link(path)
    with contextlib.suppress(OSError):
        size = max(size, 2 * path.stat().st_size) if path.is_file() else size
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def copy_file(src: Path, dst: Path) -> None:
    """Copy a small file's bytes to `dst` with `safe_write` (never through a link at `dst`)."""
    atomic_write_bytes(Path(dst), Path(src).read_bytes())


def write_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """A matplotlib figure written with `safe_write` (`fig.savefig(file, **savefig)`: give `format=`, e.g.
    'png' or 'pdf', and dpi). Returns `path`."""
    safe_write(Path(path), lambda f: fig.savefig(f, **savefig))
    return Path(path)


def append_text(path: Path, text: str) -> None:
    """Append `text` to a log file (created when missing), refusing a symbolic link: the file is opened
    with O_NOFOLLOW and O_APPEND, so a link planted at `path` makes this an IgamError, never a write
    elsewhere. (Appends are not atomic; logs whose rows are read back cut a torn last row, runs.CSVLogger.)

    Raises:
        IgamError: when `path` is a symbolic link; WriteError when the write fails.
    """
    path = Path(path)
    refuse_link(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if path.is_symlink():  # a link made between the check and the open: O_NOFOLLOW refused it
            refuse_link(path)
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "ab") as f:
            f.write(text.encode())
    except OSError as e:
        raise write_error(path, e) from None


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def write_json_or_overwrite(path: Path, data: Any) -> None:
    """`write_json`, and when that fails for want of space (a full disk or quota), the same text written
    over the existing file in place (no new file is needed, so it usually fits in the blocks the file
    already has). Used only to record that a run stopped (meta.json) when the disk is full: a torn file is
    then possible only if the process dies during that one small write, where a lie ('running') was
    certain. A link at `path` is refused either way.

    Raises:
        WriteError: when neither write succeeds.
    """
    path = Path(path)
    try:
        write_json(path, data)
        return
    except WriteError as first:
        if not path.is_file():
            raise
        err = first
    text = (json.dumps(data, indent=2, default=str) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.write(fd, text)
            os.ftruncate(fd, len(text))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        raise err from None


MAX_TEXT_BYTES = 16 << 20  # run files (meta.json, config.yaml, eval.json) and config files are small
MAX_NESTING = 64  # brackets / indentation levels a run or config file may nest


def _read_small_text(path: Path, what: str) -> str:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_TEXT_BYTES:
            raise IgamError(f"{what} '{path}' is {p.stat().st_size} bytes, more than the "
                            f"{MAX_TEXT_BYTES >> 20} MiB igam reads from such a file; it is not one igam "
                            "wrote. Restore or delete it.")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IgamError(f"'{path}' is missing.") from None
    except UnicodeDecodeError:
        raise IgamError(f"{what} '{path}' is not valid YAML or JSON: it is not UTF-8 text. "
                        "Restore or delete it.") from None
    except IsADirectoryError:
        raise IgamError(f"{what} '{path}' is a directory, not a file.") from None


def _nesting(text: str) -> int:
    """Deepest bracket nesting of a JSON text (strings are not parsed; an upper bound is all we need)."""
    depth = best = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def read_json(path: Path) -> Any:
    """A small JSON file. Raises IgamError (never a traceback) when it is missing, too large, nested too
    deeply, not UTF-8 or not valid JSON."""
    text = _read_small_text(path, "JSON file")
    if _nesting(text) > MAX_NESTING:
        raise IgamError(f"'{path}' nests brackets more than {MAX_NESTING} deep; it is not a file igam wrote. "
                        "Restore or delete it.")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise IgamError(f"'{path}' is not valid JSON ({' '.join(str(e).split())[:200]}). "
                        "Restore or delete it."
                        ) from None


def read_json_object(path: Path) -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object (meta.json, metrics.json, eval.json)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise IgamError(f"'{path}' holds a JSON {type(data).__name__}, not an object; it was not written "
                        "by igam or is damaged. Restore or delete it.")
    return data


class _DuplicateKey(Exception):
    """A mapping of a YAML file names one key twice (raised while constructing, turned into IgamError)."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no tags that build Python objects) that refuses documents whose aliases would
    expand to more than MAX_YAML_NODES nodes (a 'billion laughs' alias bomb) or that nest deeper than
    MAX_NESTING: checked on the composed node graph, before anything is constructed or expanded; and
    mappings that give a key twice (plain YAML loaders keep the last silently). Keys brought in by a merge
    (`<<: *base`) may be overridden, as YAML's merge means."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor refuses it below with its own message
                continue
            if first is not None:
                raise _DuplicateKey(f"gives the key {key!r} twice (line {first} and line {line}); YAML would "
                                    "silently keep the last one. Delete one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


MAX_YAML_NODES = 100_000


def _expanded_size(node: yaml.Node, memo: dict[int, int], depth: int = 0) -> int:
    if depth > MAX_NESTING:
        raise IgamError(f"it nests more than {MAX_NESTING} levels deep")
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a cycle (a recursive alias) counts as too large
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo, depth + 1) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1)
                       for k, v in node.value)
    else:
        size = 1 + len(str(node.value)) // 64
    size = min(size, MAX_YAML_NODES + 1)
    memo[id(node)] = size
    return size


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML safely: no Python tags (safe_load's rules), no alias bombs, no deep nesting. Raises
    IgamError naming `where` and the line of a syntax error."""
    try:
        loader = _BoundedLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            try:
                size = _expanded_size(node, {})
            except IgamError as e:
                raise IgamError(f"{where} is refused: {e}; igam's YAML files are flat key: value lists."
                                ) from None
            if size > MAX_YAML_NODES:
                raise IgamError(f"{where} is refused: its anchors and aliases expand to more than "
                                f"{MAX_YAML_NODES} entries (an 'alias bomb'); write the values out instead.")
            try:
                return loader.construct_document(node)
            except _DuplicateKey as e:
                raise IgamError(f"{where} {e}.") from None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        tag = re.search(r"for the tag '([^']+)'", str(e))
        if tag is not None:
            raise IgamError(f"{where} is not valid YAML for igam: it holds the tag '{tag.group(1)}'{at}, "
                            "which would build "
                            "a Python object. igam reads plain YAML only and never runs code from files; "
                            "delete the tag (or restore the file).") from None
        raise IgamError(f"{where} is not valid YAML: {what}{at}. Fix or delete it.") from None
    except RecursionError:
        raise IgamError(f"{where} nests too deeply to be read; igam's YAML files are flat key: value lists."
                        ) from None


def read_yaml(path: Path, what: str = "YAML file") -> Any:
    """A small YAML file read with `load_yaml_text` (IgamError for every malformed or hostile content)."""
    return load_yaml_text(_read_small_text(path, what), f"{what} '{path}'")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# weights: safetensors only
def save_weights(module_or_state: torch.nn.Module | dict, path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write a module's state dict (or a tensor dict) as safetensors, atomically; `metadata` (text keys and
    values, e.g. igam.models.normalization_metadata) goes into the file's header."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    refuse_link(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp(path)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata or None)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors recreates the file 0600; match the other files
        kill_point("weights-write")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:  # OSError, or safetensors' own SafetensorError on a full disk
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
        raise WriteError(f"Cannot write weights '{path}' ({reason}); the checkpoints are intact. Free disk "
                         "space (or fix permissions), then continue with resume=true.", path, reason
                         ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# one process per run directory: an OS lock (flock on POSIX, msvcrt.locking on Windows) on a small file
class LockHeld(IgamError):
    """Another live process holds the lock (its description is in `holder`)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class DirLock:
    """An exclusive, non-blocking OS lock on `path` (a small file that stays in place; it holds the
    holder's pid, host and command while locked and is emptied on release). The OS drops the lock when the
    holder dies, however it dies (SIGKILL included), so a lock left by a dead process is taken over; its
    old contents are then returned by `acquire` so the caller can say so.

    POSIX: fcntl.flock. Windows: msvcrt.locking on the file's first byte (also released by the OS when the
    process ends). Network file systems without lock support may not enforce it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, what: str) -> str:
        """Take the lock; return what a dead previous holder left in the file ('' when it was released
        cleanly).

        Raises:
            LockHeld: when another live process holds it (the message names `what`, its pid and the fix).
            IgamError: when the lock file cannot be created.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise IgamError(f"Cannot create the lock file '{self.path}' ({e.strerror or e}); check the "
                            "permissions of the run directory.") from None
        if not _try_lock(fd):
            holder = _read_fd(fd).strip() or "another process"
            os.close(fd)
            raise LockHeld(f"{what} is in use by {holder}. Wait for it to finish (or stop it), or choose "
                           f"another name=...; if that process is gone, the lock is released by the OS and "
                           f"a new start takes it over.", holder)
        old = _read_fd(fd).strip()
        import socket
        import sys

        me = f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})"
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, (me + "\n").encode())
        os.fsync(fd)
        self.fd = fd
        return old

    def release(self) -> None:
        """Empty the file (a clean release) and drop the lock; a no-op when not held."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor drops the OS lock
        self.fd = None


@contextlib.contextmanager
def waiting_lock(path: Path, what: str, timeout_s: float = 600.0,
                 log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the `DirLock` on `path` for the body, waiting for another holder to release it (polling; what
    is waited for is said once through `log`). For short read-merge-write sections such as a run's
    eval.json, which several processes may update.

    Raises:
        LockHeld: when another live process still holds it after `timeout_s` seconds.
        IgamError: when the lock file cannot be created (e.g. a read-only folder).
    """
    lock = DirLock(path)
    deadline, said = time.monotonic() + timeout_s, False
    while True:
        try:
            lock.acquire(what)
            break
        except LockHeld as e:
            if time.monotonic() > deadline:
                raise LockHeld(f"{what} has been held by {e.holder} for more than {timeout_s:.0f} s. If that "
                               "process hangs, stop it and run this command again.", e.holder) from None
            if not said and log is not None:
                log(f"igam: waiting for {e.holder}, which is writing {what} ...")
                said = True
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.release()


def lock_holder(path: Path) -> str | None:
    """Who holds the lock on `path` now (the text the holder wrote), or None when nobody does. Probing
    takes the lock for an instant and changes nothing in the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None
        return _read_fd(fd).strip() or "another process"
    finally:
        os.close(fd)  # drops the probe's lock, if it got one


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _read_fd(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return ""


def weights_metadata(path: Path) -> dict[str, str]:
    """The text metadata of a safetensors file's header ({} for other files or a header without any)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # an unreadable header: load_weights names the problem
        return {}


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
    return check_tensor_dict(load_torch_file(path), path)


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


def _not_checkpoint(e: BaseException) -> str:
    """Why a file is no checkpoint, without torch's advice (which suggests weights_only=False)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if text.startswith("Weights only load failed") or "weights_only" in text:
        return "not a zip or pickle file that torch.save writes"
    line = next((t.strip() for t in text.splitlines() if t.strip()), type(e).__name__)
    return f"{type(e).__name__}: {line[:160].rstrip('.')}"


def load_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True: a pickle payload that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise IgamError(f"Checkpoint file '{path}' does not exist.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if str(e).startswith("Weights only load failed") and re.search(r"GLOBAL|global", str(e)):
            raise IgamError(
                f"Refused to load '{path}': it is a pickle holding objects other than tensors "
                f"({_load_error(e)}). igam never unpickles arbitrary objects. Give a safetensors file or a "
                "plain state dict (torch.save(model.state_dict(), path)) from the checkpoint's author."
            ) from None
        raise IgamError(
            f"'{path}' is not a PyTorch checkpoint (it cannot be read as one: {_not_checkpoint(e)}). Give "
            "a .safetensors file or a "
            ".pt/.pth state dict saved with torch.save(model.state_dict(), path), or a run directory."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return obj


def check_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise IgamError(f"'{path}' does not hold a state dict (a mapping of parameter names to tensors), so "
                        "it cannot be loaded as model weights.")
    return obj
