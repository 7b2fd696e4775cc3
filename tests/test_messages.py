"""Issue 24, class 8: messages that mislead, and runs that record what they did not do. Each case of the
issue (a missing teacher, a stage cycle, a read-only folder or full disk during evaluate or training,
--eps 0 and --seed -1, adversarial training without an attack, a test label without training images, a
`!!python` tag in a teacher run's config.yaml, a tampered shipped teacher) and a few more of the same kind
gets the message that names the real problem and its fix."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, copy_run

import igam.files
from igam.cli import main
from igam.errors import suggest
from igam.files import read_json
from igam.runs import Run

TINY = [f"{k}={v}" for k, v in {**TINY_RUN, "epochs": "0.25", "eval_n": "8"}.items()]


def _error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str,
           absent: tuple[str, ...] = ()) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("igam: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    for n in absent:
        assert n not in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
def test_a_missing_teacher_run_is_called_missing(tmp_path: Path, capsys) -> None:
    for verb in ("transfer", "train"):
        extra = ["method=kd-noise"] if verb == "train" else []
        _error(capsys, [verb, f"teacher={tmp_path / 'runs' / 'nonexistent'}", *TINY, *extra,
                        f"out_dir={tmp_path / 'new' / 'deeper'}"], "does not exist",
               absent=("not a fine-tuned teacher",))
    assert list(tmp_path.iterdir()) == [], "a refused run leaves no folder, nor the out_dir made for it"


def test_a_stage_cycle_names_the_order_not_a_spelling(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "e.yaml"
    head = f"out_dir: {tmp_path / 'out'}\ndefaults: {{dataset: synthetic}}\nstages:\n"
    spec.write_text(head +
                    "  - {name: a, config: {method: igam, teacher: '{b}'}}\n"
                    "  - {name: b, config: {method: igam, teacher: '{a}'}}\n")
    line = _error(capsys, ["run", str(spec), "--dry-run"], "'b'", "later", "cycle", absent=("Did you mean",))
    assert "move 'b' above 'a'" in line
    spec.write_text(head + "  - {name: a, config: {teacher: '{a}'}}\n")
    _error(capsys, ["run", str(spec), "--dry-run"], "refers to itself", absent=("Did you mean",))
    spec.write_text(head + "  - {name: teacher, config: {}}\n"
                    "  - {name: s, config: {init_from: '{teachr}'}}\n")
    _error(capsys, ["run", str(spec), "--dry-run"], "not a stage", "Did you mean 'teacher'?")


def test_suggest_never_offers_the_name_written() -> None:
    assert suggest("b", ["a", "b", "c"]) == ""
    assert suggest("bb", ["a", "b"]) == " Did you mean 'b'?"


# ---------------------------------------------------------------------------------------------
# a read-only folder or a full disk during evaluate: said before any attack runs, naming eval.json
WHY = {errno.EROFS: "Read-only file system", errno.ENOSPC: "No space left on device"}


def _fail_writes_in(folder: Path, err: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real = igam.files._mkstemp

    def refuse(path: Path):
        if Path(path).parent.resolve() == folder.resolve():
            raise OSError(err, WHY[err])
        return real(path)

    monkeypatch.setattr(igam.files, "_mkstemp", refuse)


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_evaluate_on_an_unwritable_run_stops_before_the_attacks(tiny_run: Path, tmp_path: Path, capsys,
                                                                 monkeypatch, err) -> None:
    import igam.evaluate

    run = copy_run(tiny_run, tmp_path)
    attacked = []
    real = igam.evaluate.run_attack
    monkeypatch.setattr(igam.evaluate, "run_attack", lambda *a, **k: attacked.append(1) or real(*a, **k))
    _fail_writes_in(run, err, monkeypatch)
    line = _error(capsys, ["evaluate", str(run), "--attacks", "clean,fgsm", "--n", "8"], str(run / Run.EVAL),
                  "nothing was evaluated", absent=("resume",))
    assert ("Read-only" if err == errno.EROFS else "No space") in line
    assert not attacked, "an attack ran before the folder was found unwritable"


def test_a_full_disk_in_the_middle_of_evaluate_says_what_was_saved(tiny_run: Path, tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import igam.evaluate

    run = copy_run(tiny_run, tmp_path)
    real = igam.evaluate.run_attack

    def fill_disk_after_clean(model, x, y, attack, **k):
        if attack != "clean":
            _fail_writes_in(run, errno.ENOSPC, monkeypatch)
        return real(model, x, y, attack, **k)

    monkeypatch.setattr(igam.evaluate, "run_attack", fill_disk_after_clean)
    line = _error(capsys, ["evaluate", str(run), "--attacks", "clean,fgsm", "--n", "8"], str(run / Run.EVAL),
                  "No space left", "fgsm", "clean", absent=("resume",))
    assert "lost" in line
    assert set(read_json(run / Run.EVAL)) == {"clean"}


def test_an_unwritable_output_of_another_verb_gives_no_training_advice(tiny_run: Path, tmp_path: Path,
                                                                       capsys, monkeypatch) -> None:
    (tmp_path / "pics").mkdir()
    _fail_writes_in(tmp_path / "pics", errno.EROFS, monkeypatch)
    _error(capsys, ["gradients", str(tiny_run), "--n", "1", "--out", str(tmp_path / "pics" / "g.png")],
           str(tmp_path / "pics" / "g.png"), "Read-only", absent=("resume",))


# ---------------------------------------------------------------------------------------------
# a full disk during training: meta.json says `stopped` (with the reason), never `running`
@pytest.mark.parametrize("failing", ["model.safetensors", "metrics.json", "log.csv", "checkpoint"])
def test_a_full_disk_during_training_is_recorded_as_a_stop(tmp_path: Path, capsys, monkeypatch,
                                                           failing: str) -> None:
    real = igam.files._mkstemp
    run = tmp_path / "runs" / "full"

    def full(path: Path):
        name = Path(path).name
        if name == failing or (failing == "checkpoint" and name.startswith("ckpt-")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(igam.files, "_mkstemp", full)
    if failing == "log.csv":  # a full disk on an append of the log
        real_append = igam.files.append_text

        def append_full(path, text):
            if Path(path).name == "log.csv":
                raise igam.files.write_error(Path(path), OSError(errno.ENOSPC, "No space left on device"))
            return real_append(path, text)

        monkeypatch.setattr("igam.runs.append_text", append_full)
    _error(capsys, ["train", *TINY, "log_every=1", f"out_dir={tmp_path / 'runs'}", "name=full"],
           "No space left", "resume=true")
    meta = read_json(run / Run.META)
    assert meta["status"] == "stopped", meta
    assert "No space left" in meta["stopped"] and failing.split(".")[0][:4] in meta["stopped"]


def test_meta_is_corrected_in_place_when_not_even_a_temp_file_fits(tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    """When the disk is so full that meta.json's own temp file cannot be written, its text is written over
    the old file in place: `stopped` is recorded rather than a lasting `running`."""
    real = igam.files._mkstemp
    full_now = []

    def full(path: Path):
        if Path(path).name == "model.safetensors":
            full_now.append(True)
        if full_now:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(igam.files, "_mkstemp", full)
    _error(capsys, ["train", *TINY, f"out_dir={tmp_path}", "name=r"], "No space left")
    meta = read_json(tmp_path / "r" / Run.META)
    assert meta["status"] == "stopped" and "model.safetensors" in meta["stopped"]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["--eps", "0"], "radius of 0"), (["--eps", "0/255"], "radius of 0"), (["eps=0.0"], "radius of 0"),
    (["--seed", "-1"], "--seed -1"), (["seed=-5"], "--seed -5"),
])
def test_evaluate_refuses_eps_0_and_a_negative_seed(tiny_run: Path, capsys, argv: list[str],
                                                     needle: str) -> None:
    _error(capsys, ["evaluate", str(tiny_run), "--attacks", "clean,fgsm", "--n", "8", *argv], needle)


@pytest.mark.parametrize("method,extra,key", [
    ("pgd-at", ["eps=0"], "eps=0"), ("trades", ["eps=0/255"], "eps=0"), ("fast-at", ["eps=0"], "eps=0"),
    ("n-fgsm", ["eps=0"], "eps=0"), ("free-at", ["eps=0"], "eps=0"), ("pgd-at", ["steps=0"], "steps=0"),
    ("pgd-at", ["step_size=0"], "step_size=0"), ("trades", ["trades_beta=0"], "trades_beta=0"),
])
def test_adversarial_training_without_an_attack_is_refused(tmp_path: Path, capsys, method: str,
                                                           extra: list[str], key: str) -> None:
    _error(capsys, ["train", *TINY, f"method={method}", *extra, f"out_dir={tmp_path}"], key,
           f"recorded as {method}", "method=standard")
    assert not list(tmp_path.iterdir())


def test_an_experiment_stage_of_adversarial_training_without_an_attack_is_refused(tmp_path: Path,
                                                                                  capsys) -> None:
    spec = tmp_path / "e.yaml"
    spec.write_text(f"out_dir: {tmp_path / 'o'}\nstages:\n"
                    "  - {name: s, config: {method: pgd-at, eps: 0}}\n")
    _error(capsys, ["run", str(spec), "--dry-run"], "Stage 's'", "eps=0")


def test_standard_training_with_eps_0_is_fine(tmp_path: Path, capsys) -> None:
    assert main(["train", *TINY, "eps=0", f"out_dir={tmp_path}", "name=s"]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
def _npz(path: Path, y_train, y_test, **extra) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (len(y_train), 8, 8), dtype=np.uint8),
             y_train=np.array(y_train), x_test=rng.integers(0, 255, (len(y_test), 8, 8), dtype=np.uint8),
             y_test=np.array(y_test), **extra)
    return path


@pytest.mark.parametrize("y_test,names", [([0, 1, 9, 9], None), ([0, 1, 2, 3], None),
                                          ([0, 1, 3, 3], ["a", "b", "c", "d"])])
def test_a_test_label_without_training_images_is_an_error(tmp_path: Path, capsys, y_test, names) -> None:
    extra = {"class_names": np.array(names)} if names else {}
    data = _npz(tmp_path / "d.npz", [0, 1, 2] * 20, y_test, **extra)
    unseen = sorted(set(y_test) - {0, 1, 2})
    line = _error(capsys, ["train", *TINY, f"dataset=npz:{data}", f"out_dir={tmp_path / 'o'}"],
                  "no training image has", ", ".join(map(str, unseen)))
    assert str(data) in line


def test_an_image_folder_class_without_training_images_is_an_error(tmp_path: Path, capsys) -> None:
    from PIL import Image

    for split, classes in (("train", {"cat": 3, "dog": 3, "owl": 0}), ("test", {"cat": 1, "owl": 2})):
        for c, k in classes.items():
            (tmp_path / "f" / split / c).mkdir(parents=True)
            for i in range(k):
                image = Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8))
                image.save(tmp_path / "f" / split / c / f"{i}.png")
    _error(capsys, ["train", *TINY, f"dataset=imagefolder:{tmp_path / 'f'}", f"out_dir={tmp_path / 'o'}"],
           "no training image has")


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["finetune", "init_from", "transfer"])
def test_a_python_tag_in_a_teacher_runs_config_is_refused(tiny_run: Path, tmp_path: Path, capsys,
                                                         verb: str) -> None:
    """docs/RELIABILITY.md promises that every verb that reads a run refuses a `!!python` tag in its
    config.yaml; `finetune teacher=RUN` used to finish."""
    run = copy_run(tiny_run, tmp_path)
    (run / Run.CONFIG).write_text("x: !!python/object/apply:os.system ['echo pwned']\n")
    argv = {"finetune": ["finetune", f"teacher={run}"], "init_from": ["train", f"init_from={run}"],
            "transfer": ["transfer", f"teacher={run}"]}[verb]
    _error(capsys, [*argv, *TINY, f"out_dir={tmp_path / 'o'}"], "config.yaml", "python/object")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_info_flags_a_tampered_shipped_teacher(tmp_path: Path, capsys, monkeypatch) -> None:
    from igam.models import shipped

    copy = tmp_path / "weights"
    shutil.copytree(shipped.WEIGHTS_DIR, copy)
    data = bytearray((copy / "mnist-linf-0.3.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (copy / "mnist-linf-0.3.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", copy)
    rc = main(["info", "igam:mnist-linf-0.3"])
    out, err = capsys.readouterr()
    assert rc == 2 and "MISMATCH" in out and "does not match its certificate" in err
    rc = main(["info", "igam:mnist-linf-0.3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and '"weights_match_certificate": false' in out
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", shipped.Path(shipped.__file__).resolve().parent / "weights")
    assert main(["info", "igam:mnist-linf-0.3"]) == 0
    assert "sha256 matches the certificate" in capsys.readouterr().out


def test_a_tampered_checkpoint_with_a_matching_checksum_is_one_clear_error(tiny_run: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """A checkpoint rewritten with a new sidecar (so its checksum matches) but whose contents do not fit
    the run: resume says which file and what to do, never a traceback."""
    import torch

    from igam.runs import save_state

    run = copy_run(tiny_run, tmp_path)
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    shutil.rmtree(run / "checkpoints")
    for bad in ({**state, "optimizer": {"state": {}, "param_groups": []}}, {**state, "step": -3},
                {**state, "rng": {"torch": torch.zeros(3)}}):
        save_state(run, int(state["step"]), bad)
        _error(capsys, ["train", *[f"{k}={v}" for k, v in TINY_RUN.items()], f"out_dir={tmp_path}", "name=r",
                        "resume=true"], "checkpoint", "Delete it")
