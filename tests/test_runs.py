"""Run directories: safetensors weights, tensor-only training states with checksums, atomic writes, logs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SLOWER

from igam.errors import IgamError
from igam.files import (
    KILL_POINTS,
    atomic_write_text,
    kill_point,
    load_torch_file,
    load_weights,
    read_json,
    safe_write,
    save_weights,
    sha256_file,
    write_json,
)
from igam.models import create_model
from igam.runs import CSVLogger, load_latest_state, read_log, resolve_run, save_state


class Payload:
    """A pickle payload: unpickling it would create `path` (i.e. run code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _state(step: int = 3) -> dict:
    torch.manual_seed(step)
    m = create_model("small-cnn", num_classes=3, input_size=8, width=4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    return {"step": step, "model": m.state_dict(), "optimizer": opt.state_dict(), "objective": {},
            "objective_extra": {},
            "rng": {"torch": torch.get_rng_state(), "python": [3, torch.arange(4), None]}}


def test_safetensors_round_trip(tmp_path: Path) -> None:
    m = create_model("small-cnn-bn", num_classes=5, input_size=16, width=4)
    m(torch.rand(4, 3, 16, 16))  # BatchNorm running statistics change
    save_weights(m, tmp_path / "w.safetensors")
    again = create_model("small-cnn-bn", num_classes=5, input_size=16, width=4)
    again.load_state_dict(load_weights(tmp_path / "w.safetensors"))
    for (k, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_weights_only_torch_files_load(tmp_path: Path) -> None:
    sd = create_model("small-cnn", num_classes=2, input_size=8, width=4).state_dict()
    for wrap in (lambda s: s, lambda s: {"state_dict": s}, lambda s: {"model": s, "epoch": 3}):
        torch.save(wrap(sd), tmp_path / "t.pth")
        got = load_weights(tmp_path / "t.pth")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"a": 1, "b": "text"}, tmp_path / "notweights.pt")
    with pytest.raises(IgamError, match="does not hold a state dict"):
        load_weights(tmp_path / "notweights.pt")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_payload_in_a_teacher_file_is_refused_and_never_runs(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"teacher{suffix}"
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, path)
    with pytest.raises(IgamError, match=r"Refused to load .*not a plain tensor checkpoint.*io.open|Refused"):
        load_weights(path)
    with pytest.raises(IgamError, match="never unpickles arbitrary objects"):
        load_torch_file(path)
    assert not marker.exists()


def test_bad_weight_files(tmp_path: Path) -> None:
    with pytest.raises(IgamError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(IgamError, match="not a valid safetensors file"):
        load_weights(tmp_path / "t.safetensors")
    save_weights({"w": torch.ones(100)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IgamError, match="truncated or corrupted"):
        load_weights(tmp_path / "cut.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(IgamError, match="not a PyTorch checkpoint"):
        load_weights(tmp_path / "junk.pt")


def test_training_state_round_trip_under_weights_only(tmp_path: Path) -> None:
    st = _state(7)
    path = save_state(tmp_path, 7, st)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["step"] == 7 and meta["sha256"] == sha256_file(path)
    # the file loads with plain weights_only=True (tensors and primitives only)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7
    got = load_latest_state(tmp_path, log=lambda *a: None)
    assert got is not None and got["step"] == 7
    for k, v in st["model"].items():
        assert torch.equal(got["model"][k], v)
    assert got["optimizer"]["state"][0]["momentum_buffer"].shape == st["optimizer"]["state"][0][
        "momentum_buffer"].shape
    assert torch.equal(got["rng"]["torch"], st["rng"]["torch"])


def test_keep_only_the_newest_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save_state(tmp_path, step, {"step": step, "model": {}}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-000000003.json", "ckpt-000000003.pt", "ckpt-000000004.json", "ckpt-000000004.pt"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-sidecar", "bad-sidecar"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    save_state(tmp_path, 10, _state(10))
    newest = save_state(tmp_path, 20, _state(20))
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "no-sidecar":
        newest.with_suffix(".json").unlink()
    else:
        newest.with_suffix(".json").write_text("{not json")
    messages: list[str] = []
    got = load_latest_state(tmp_path, log=messages.append)
    assert got is not None and got["step"] == 10
    assert len(messages) == 1 and "ckpt-000000020.pt is unusable" in messages[0]
    assert "trying the previous one" in messages[0]


def test_no_usable_checkpoint(tmp_path: Path) -> None:
    assert load_latest_state(tmp_path / "nothing-here") is None
    p = save_state(tmp_path, 5, _state(5))
    p.write_bytes(b"")
    msgs: list[str] = []
    assert load_latest_state(tmp_path, log=msgs.append) is None and "checksum mismatch" in msgs[0]


def test_checkpoint_with_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    """A planted checkpoint, even with a matching checksum, is refused: it is not silently skipped and its
    payload never runs."""
    save_state(tmp_path, 10, _state(10))
    marker = tmp_path / "pwned"
    evil = {**_state(20), "extra": Payload(marker)}
    buf = io.BytesIO()
    torch.save(evil, buf)
    path = tmp_path / "checkpoints" / "ckpt-000000020.pt"
    path.write_bytes(buf.getvalue())
    write_json(path.with_suffix(".json"), {"step": 20, "sha256": sha256_file(path)})
    with pytest.raises(IgamError, match=r"Refused to load checkpoint .*ckpt-000000020.pt.*io.open"):
        load_latest_state(tmp_path, log=lambda *a: None)
    assert not marker.exists()


def test_partial_temp_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    save_state(tmp_path, 4, _state(4))
    junk = tmp_path / "checkpoints" / ".ckpt-000000008.pt.abc123.tmp"
    junk.write_bytes(b"half a checkpoint")
    got = load_latest_state(tmp_path, log=lambda *a: None)
    assert got is not None and got["step"] == 4 and not junk.exists()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})

    def half_then_fail(f) -> None:
        f.write(b'{"v": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        safe_write(path, half_then_fail)
    assert read_json(path) == {"v": 1} and sorted(os.listdir(tmp_path)) == ["a.json"]
    atomic_write_text(path, "{}")
    assert read_json(path) == {}


def test_kill_point_hook_kills_only_at_the_named_point(monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("from igam.runs import kill_point\n"
            "for i in range(5):\n    kill_point('other')\n    kill_point('here')\n    print(i, flush=True)\n")
    env = {**os.environ, "IGAM_TEST_KILL_AT": "here:3"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120 * SLOWER)
    assert r.returncode == -signal.SIGKILL and r.stdout.split() == ["0", "1"]
    # unset, or naming another point, it does nothing
    monkeypatch.delenv("IGAM_TEST_KILL_AT", raising=False)
    kill_point("here")
    monkeypatch.setenv("IGAM_TEST_KILL_AT", "checkpoint-write:1")
    kill_point("here")
    assert "checkpoint-write" in KILL_POINTS


def test_csv_logger_new_columns_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    log = CSVLogger(path)
    log.log(1, {"ce": 2.0})
    log.log(2, {"ce": 1.5, "acc": 0.5})  # a new column rewrites the file
    log.log(3, {"ce": 1.0, "acc": 0.6})
    log.log(4, {"ce": 0.9, "acc": 0.7})
    log.close()
    with open(path, "a") as f:
        f.write("5,0.8")  # a row cut short by a crash in the middle of an append
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows[:4]] == [1, 2, 3, 4] and "acc" not in rows[0] and rows[1]["acc"] == 0.5
    # resuming from the checkpoint at step 3 drops the rows after it (they will be logged again)
    log = CSVLogger(path, resume_step=3)
    log.log(4, {"ce": 0.95, "acc": 0.65})
    log.close()
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["ce"] == 0.95
    # a fresh (not resumed) logger starts a new file
    CSVLogger(path).close()
    assert not path.exists()


def test_csv_logger_resume_of_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("step,ce\n1,2.0\nx,1\n2,1.0,extra\n3\n")
    log = CSVLogger(path, resume_step=10)
    log.log(11, {"ce": 0.5})
    assert [r["step"] for r in read_log(tmp_path)] == [1, 11]
    path.write_text("")
    CSVLogger(path, resume_step=10).log(11, {"ce": 0.5})
    assert read_log(tmp_path) == [{"step": 11, "ce": 0.5}]


def test_resolve_run(tmp_path: Path) -> None:
    with pytest.raises(IgamError, match="does not exist"):
        resolve_run(tmp_path / "nope")
    with pytest.raises(IgamError, match="not an igam run directory"):
        resolve_run(tmp_path)
    write_json(tmp_path / "meta.json", {"status": "finished"})
    assert resolve_run(tmp_path) == tmp_path
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(IgamError, match="not valid JSON"):
        read_json(tmp_path / "meta.json")


def test_a_run_refused_before_it_writes_anything_leaves_no_folder(tmp_path: Path) -> None:
    """A bad teacher is refused at set-up: the new run folder (only its lock so far) is removed, while an
    existing folder with content is never touched."""
    from igam.cli import main

    args = ["transfer", "teacher=igam:mnist-linf-0.3", "dataset=synthetic", "train_subset=16", "epochs=0.1",
            "progress=false", f"out_dir={tmp_path}", "name=refused"]
    assert main(args) != 0
    assert not (tmp_path / "refused").exists()
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(args[:-1] + ["name=kept"]) != 0
    assert (keep / "notes.txt").read_text() == "mine"
