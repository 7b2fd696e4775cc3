"""Issue 24, class 1: every file igam writes goes through one safe-write path (igam.files.safe_write and
the helpers on it): a symbolic link at the target is refused with an error naming it, and nothing is ever
written through a link to a file elsewhere. One test per writer, found by listing the writers in src/
(`test_no_raw_writes_outside_the_safe_write_module` keeps that list complete)."""

from __future__ import annotations

import ast
import csv
import io
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, copy_run

import igam
import igam.files as files
from igam.cli import main
from igam.config import make_config, save_yaml
from igam.errors import IgamError
from igam.runs import CSVLogger, Run, save_state

VICTIM = b"precious: not igam's\n"
LINK_ERROR = r"is a symbolic link .*never through links"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside every folder igam writes to, that a link will point at."""
    v = tmp_path / "elsewhere" / "victim.txt"
    v.parent.mkdir()
    v.write_bytes(VICTIM)
    return v


def _link(at: Path, victim: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.unlink(missing_ok=True)
    at.symlink_to(victim)
    return at


def _untouched(link: Path, victim: Path) -> None:
    assert victim.read_bytes() == VICTIM, "written through the link"
    assert link.is_symlink() and link.resolve() == victim.resolve(), "the link was replaced or removed"
    assert not list(link.parent.glob(f".{link.name}.*")), "a temp file was left behind"


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    return fig


# ---------------------------------------------------------------------------------------------
# the writers of igam.files (and the two that wrap them with their own format)
WRITERS = {
    "safe_write": lambda p: files.safe_write(p, lambda f: f.write(b"x")),
    "atomic_write_bytes": lambda p: files.atomic_write_bytes(p, b"x"),
    "atomic_write_text": lambda p: files.atomic_write_text(p, "x"),
    "write_json": lambda p: files.write_json(p, {"a": 1}),
    "copy_file": lambda p: files.copy_file(Path(__file__), p),
    "write_figure png": lambda p: files.write_figure(_figure(), p, format="png"),
    "write_figure pdf": lambda p: files.write_figure(_figure(), p, format="pdf"),
    "append_text": lambda p: files.append_text(p, "row\n"),
    "save_weights": lambda p: files.save_weights({"w": torch.ones(2)}, p),
    "check_writable": lambda p: files.check_writable(p),
    "config.save_yaml": lambda p: save_yaml(make_config().to_dict(), p),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_writer_refuses_a_link_and_writes_nothing_through_it(tmp_path: Path, victim: Path,
                                                                 writer: str) -> None:
    link = _link(tmp_path / "out" / "target.bin", victim)
    with pytest.raises(IgamError, match=LINK_ERROR):
        WRITERS[writer](link)
    _untouched(link, victim)
    WRITERS[writer](tmp_path / "out" / "plain.bin")  # a real path is written as before
    assert (tmp_path / "out" / "plain.bin").is_file() != (writer == "check_writable")  # (a probe only)
    assert not list((tmp_path / "out").glob(".*")), "a temp or probe file was left behind"


def test_a_link_made_after_the_check_is_replaced_never_followed(tmp_path: Path, victim: Path) -> None:
    """The write goes to a temp file renamed over the target: a link that appears between the check and
    the rename is replaced by the new file, never written through."""
    target = tmp_path / "out.json"

    def plant_then_write(f) -> None:
        _link(target, victim)
        f.write(b"{}")

    files.safe_write(target, plant_then_write)
    assert victim.read_bytes() == VICTIM and not target.is_symlink() and target.read_bytes() == b"{}"


def test_append_refuses_a_link_planted_between_check_and_open(tmp_path: Path, victim: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import igam.files

    target = tmp_path / "log.txt"
    real = igam.files.refuse_link
    calls = []

    def plant_after_first_check(path: Path) -> None:
        real(path)
        if not calls:
            calls.append(path)
            _link(target, victim)

    monkeypatch.setattr(igam.files, "refuse_link", plant_after_first_check)
    with pytest.raises(IgamError, match=LINK_ERROR):
        files.append_text(target, "row\n")
    assert victim.read_bytes() == VICTIM


# ---------------------------------------------------------------------------------------------
# the files of a run: training's writers, each with a link planted where it writes next
def test_training_log_append_refuses_a_link(tmp_path: Path, victim: Path) -> None:
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    logger.log(1, {"ce": 1.0})
    moved = tmp_path / "moved.csv"
    path.rename(moved)
    _link(path, victim)
    with pytest.raises(IgamError, match=LINK_ERROR):
        logger.log(2, {"ce": 0.5})  # the same columns: an append
    _untouched(path, victim)
    assert list(csv.DictReader(io.StringIO(moved.read_text())))[0]["ce"] == "1.0"


def test_training_log_rewrite_refuses_a_link(tmp_path: Path, victim: Path) -> None:
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    logger.log(1, {"ce": 1.0})
    path.unlink()
    _link(path, victim)
    with pytest.raises(IgamError, match=LINK_ERROR):
        logger.log(2, {"ce": 0.5, "acc": 0.1})  # a new column: the file is rewritten
    _untouched(path, victim)


@pytest.mark.parametrize("which", ["ckpt-000000003.pt", "ckpt-000000003.json"])
def test_checkpoint_writes_refuse_a_link(tmp_path: Path, victim: Path, which: str) -> None:
    (tmp_path / "checkpoints").mkdir()
    link = _link(tmp_path / "checkpoints" / which, victim)
    with pytest.raises(IgamError, match=LINK_ERROR):
        save_state(tmp_path, 3, {"step": 3, "model": {"w": torch.ones(1)}})
    _untouched(link, victim)


def test_tensorboard_folder_that_is_a_link_is_refused(tmp_path: Path, victim: Path) -> None:

    from igam.train import train

    (tmp_path / "runs" / "tb-run").mkdir(parents=True)
    _link(tmp_path / "runs" / "tb-run" / "tb", victim.parent)
    cfg = make_config(overrides={**TINY_RUN, "tensorboard": "true", "out_dir": str(tmp_path / "runs"),
                                 "name": "tb-run"})
    with pytest.raises(IgamError, match=LINK_ERROR):
        train(cfg, log=lambda *a: None)
    assert [p.name for p in victim.parent.iterdir()] == ["victim.txt"] and victim.read_bytes() == VICTIM


@pytest.mark.parametrize("name", [Run.CONFIG, Run.META, Run.METRICS, Run.WEIGHTS, Run.LOG, Run.EVAL_LOG])
def test_training_refuses_a_link_at_each_run_file(tmp_path: Path, victim: Path, name: str) -> None:

    from igam.train import train

    link = _link(tmp_path / "runs" / "t" / name, victim)
    for resume in ("false", "true"):
        cfg = make_config(overrides={**TINY_RUN, "out_dir": str(tmp_path / "runs"), "name": "t",
                                     "resume": resume})
        with pytest.raises(IgamError, match=LINK_ERROR):
            train(cfg, log=lambda *a: None)
    _untouched(link, victim)


# ---------------------------------------------------------------------------------------------
# the verbs that write pictures, reports and results into a run (or where --out says)
def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("name,argv", [
    ("gradients.png", ["gradients", "{run}", "--n", "2"]),
    ("gradients.pdf", ["gradients", "{run}", "--n", "2", "--pdf"]),
    ("landscape-0.png", ["landscape", "{run}", "--index", "0", "--grid", "3"]),
    ("landscape-0.pdf", ["landscape", "{run}", "--index", "0", "--grid", "3", "--pdf"]),
    ("report.html", ["report", "{run}", "--no-gradients"]),
    ("model_info.json", ["evaluate", "{run}", "--attacks", "clean", "--n", "4", "--model-info"]),
    (Run.EVAL, ["evaluate", "{run}", "--attacks", "clean", "--n", "4"]),
    (Run.CURVE, ["evaluate", "{run}", "--attacks", "fgsm", "--n", "4", "--eps-sweep", "0.1"]),
    (Run.CURVE_PNG, ["evaluate", "{run}", "--attacks", "fgsm", "--n", "4", "--eps-sweep", "0.1"]),
    ("autoattack-apgd-ce.log", ["evaluate", "{run}", "--attacks", "clean", "--n", "4"]),
])
def test_verbs_refuse_a_link_in_the_run_folder(tiny_run: Path, tmp_path: Path, victim: Path, capsys,
                                               name: str, argv: list[str]) -> None:
    run = copy_run(tiny_run, tmp_path)
    link = _link(run / name, victim)
    rc, err = _cli([a.replace("{run}", str(run)) for a in argv], capsys)
    assert rc == 2 and "symbolic link" in err and str(link) in err, err
    _untouched(link, victim)


@pytest.mark.parametrize("pdf", [False, True])
def test_an_out_path_that_is_a_link_is_refused(tiny_run: Path, tmp_path: Path, victim: Path, capsys,
                                               pdf: bool) -> None:
    out = tmp_path / "pics" / "g.png"
    link = _link(out.with_suffix(".pdf") if pdf else out, victim)
    rc, err = _cli(["gradients", str(tiny_run), "--n", "2", "--out", str(out), *(["--pdf"] if pdf else [])],
                   capsys)
    assert rc == 2 and "symbolic link" in err, err
    _untouched(link, victim)
    assert not out.exists() or not pdf, "with --pdf, neither file is written when one of them is a link"


# ---------------------------------------------------------------------------------------------
# the experiment folder: experiment.yaml, results, pictures, report
EXPERIMENT = """experiment: links
out_dir: {out}
primary_metric: fgsm
defaults: {{dataset: "synthetic:16x16x1:4", model: small-cnn, width: 4, train_subset: 64, test_subset: 32,
           batch_size: 32, epochs: 0.5, progress: false, tensorboard: false, eval_n: 16, threads: 1}}
stages:
  - {{name: a, row: A, curve: c, config: {{method: standard}}}}
  - {{name: b, row: B, curve: c, config: {{method: standard, lr: 0.05}}}}
evaluation:
  - {{attacks: [clean, fgsm], n: 16}}
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-stage experiment (its folder holds every file `igam run` writes)."""
    from igam.experiment import run_experiment

    root = tmp_path_factory.mktemp("exp")
    spec = root / "e.yaml"
    spec.write_text(EXPERIMENT.format(out=root / "out"))
    run_experiment(spec, log=lambda *a: None)
    return spec


def test_run_refuses_a_link_at_experiment_yaml(experiment: Path, victim: Path, capsys) -> None:
    out = experiment.parent / "out"
    link = _link(out / "experiment.yaml", victim)
    try:
        rc, err = _cli(["run", str(experiment)], capsys)
        assert rc == 2 and "experiment.yaml" in err and "symbolic link" in err, err
        _untouched(link, victim)
    finally:
        link.unlink()
        files.copy_file(experiment, out / "experiment.yaml")


@pytest.mark.parametrize("name", ["results.json", "results.md", "tradeoff.png", "frontier-clean.png",
                                  "frontier-cost.png", "report.html"])
def test_experiment_results_never_go_through_a_link(experiment: Path, victim: Path, name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each output of `igam run` in the experiment folder: a link at it is refused (the results and the
    other pictures are still written, or the run stops with the error), never written through."""
    import igam.experiment.runner as runner
    from igam.experiment.spec import load_experiment

    out = experiment.parent / "out"
    assert (out / name).is_file(), f"the experiment did not write {name}"
    if name != "report.html":  # the HTML report takes long and has its own case
        monkeypatch.setattr(runner, "write_report", lambda *a, **k: None)
    link = _link(out / name, victim)
    said: list[str] = []
    try:
        runner.write_results(load_experiment(experiment), log=said.append)
    except IgamError as e:
        said.append(str(e))
    try:
        assert any("symbolic link" in s and name in s for s in said), said
        _untouched(link, victim)
    finally:
        link.unlink()


# ---------------------------------------------------------------------------------------------
# no writer outside the safe-write path: a new one must be added here with its reason, and tested above
# calls that write files: as module functions (os.replace, ...), as methods of anything (Path.write_text,
# fig.savefig, ...), and as bare names (open with a write mode, safetensors' save_file, ...)
MODULE_WRITES = {"os": {"open", "replace", "rename", "link", "symlink", "truncate"},
                 "shutil": {"copy", "copy2", "copyfile", "copytree", "move"},
                 "torch": {"save"}, "np": {"save", "savez", "savez_compressed"}, "json": {"dump"},
                 "yaml": {"dump", "safe_dump"}}
METHOD_WRITES = {"savefig", "write_text", "write_bytes", "rename", "symlink_to", "hardlink_to", "touch",
                 "tofile", "to_csv", "imsave", "add_scalar"}
NAME_WRITES = {"save_file", "save", "SummaryWriter", "copyfile"}
ALLOWED = {  # (file, call) -> how many; why each cannot write through a link or outside its folder
    ("files.py", "*"): None,  # the safe-write module itself
    ("report/common.py", "savefig"): 1,  # png_bytes: into a BytesIO (HTML embedding), no file
    ("runs.py", "torch.save"): 1,  # into a BytesIO; the bytes then go through safe_write
    ("runs.py", "SummaryWriter"): 1,  # TensorBoard's own writer, into RUN/tb/ (refuse_symlinks: no links)
    ("runs.py", "add_scalar"): 1,  # (its events, into that writer's file)
    ("config.py", "yaml.safe_dump"): 1,  # to a string, written with atomic_write_text
    ("experiment/stages.py", "rename"): 1,  # a stale stage's folder renamed beside itself in out_dir
    ("cli.py", "os.open"): 1,  # /dev/null, to silence a broken pipe
    ("attacks/autoattack.py", "save"): 1,  # safetensors' save() to bytes, written with atomic_write_bytes
}


def _raw_writes(path: Path) -> Counter:
    """Calls in a source file that may write files: open() with a write mode (or a mode that is not a
    literal), and MODULE_WRITES, METHOD_WRITES and NAME_WRITES."""
    found: Counter = Counter()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else (
                "r" if mode is None else "?")
            if set(text) & set("wax+?"):
                found["open(write)"] += 1
        elif isinstance(f, ast.Name) and f.id in NAME_WRITES:
            found[f.id] += 1
        elif isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else ""
            if f.attr in MODULE_WRITES.get(owner, ()):
                found[f"{owner}.{f.attr}"] += 1
            elif f.attr in METHOD_WRITES:
                found[f.attr] += 1
    return found


def test_no_raw_writes_outside_the_safe_write_module() -> None:
    src = Path(igam.__file__).parent  # the package under test
    unexpected = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        if (rel, "*") in ALLOWED:
            continue
        for call, count in _raw_writes(path).items():
            if count != ALLOWED.get((rel, call), 0):
                unexpected.append(f"{rel}: {count} x {call} (allowed: {ALLOWED.get((rel, call), 0)})")
    assert not unexpected, ("file writes outside igam.files' safe-write path (use safe_write, write_json, "
                            "write_figure, copy_file or append_text; or list a write that cannot reach a "
                            "file in ALLOWED with its reason): " + "; ".join(unexpected))


def test_the_scan_sees_raw_writes(tmp_path: Path) -> None:
    """The scanner itself: each kind of raw write is counted."""
    p = tmp_path / "m.py"
    p.write_text("open(p, 'w')\nopen(p, mode='a')\nopen(p, m)\nopen(p)\nopen(p, 'rb')\nos.open(p, 1)\n"
                 "fig.savefig(p)\nPath(p).write_text('x')\nshutil.copyfile(a, b)\ntorch.save(x, p)\n"
                 "'a'.replace('a', 'b')\nos.replace(a, b)\nsave_file(t, p)\n")
    assert _raw_writes(p) == Counter({"open(write)": 3, "os.open": 1, "savefig": 1, "write_text": 1,
                                      "shutil.copyfile": 1, "torch.save": 1, "os.replace": 1,
                                      "save_file": 1})
