"""Issue 24, class 7: every reader of a run's files treats them as untrusted. One tiny real run (and a
fine-tuned teacher of it) is made once; each test damages one file type of a copy with random corruptions
(truncation, an empty file, binary junk, a wrong JSON/YAML top-level type, wrong-typed or deleted values,
unknown keys, NaN, infinities, huge numbers, ...) and runs every verb that reads that file through the
CLI in-process (one reader per example, drawn). Each must end with exit 0 or with exit 2 and an
`igam: error: ...` line, never with an exception (a traceback). IGAM_FUZZ_EXAMPLES=300 searches deeper."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_RUN, copy_run

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from igam.cli import main  # noqa: E402
from igam.runs import Run  # noqa: E402

EXAMPLES = int(os.environ.get("IGAM_FUZZ_EXAMPLES", "10"))  # more for a deeper search, e.g. 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
TINY = [f"{k}={v}" for k, v in {**TINY_RUN, "epochs": "0.25", "eval_n": "8"}.items()]

# ---------------------------------------------------------------------------------------------
# corruptions
ODD = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 10**400, -(10**30), -1, 0, 2**63, 0.5, True,
       None, "", "x" * 5000, "nan", "1e999", "../../etc", [], {}, [1, 2], {"a": {"b": [None]}}, "\x00\x01",
       "igam:mnist-linf-0.3", [[[[1]]]]]
odd = st.sampled_from(ODD) | st.integers() | st.floats() | st.text(max_size=8)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON-like object (dict keys and list indices)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:5]):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return obj


@st.composite
def structured(draw, original: Any) -> Any:
    """The original object with 1-3 changes: a value replaced by an odd one, a key deleted, an unknown key
    added, or the whole thing replaced by another type."""
    obj = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "replace", "delete", "unknown", "top"]))
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        if kind == "top":
            obj = draw(st.sampled_from([[1, 2], "text", 3, None, True, []]))
            break
        if kind == "replace":
            obj = _set(obj, path, draw(odd))
        elif kind == "delete" and path:
            obj = _set(obj, path, None, delete=True)
        elif kind == "unknown":
            dicts = [p for p in paths if isinstance(_get(obj, p), dict)]
            if dicts:
                _get(obj, draw(st.sampled_from(dicts)))[draw(st.text(min_size=1, max_size=6))] = draw(odd)
    return obj


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _dump_json(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode()


def _dump_yaml(obj: Any) -> bytes:
    try:
        return yaml.safe_dump(obj).encode()
    except yaml.YAMLError:
        return b"key: [unclosed\n"


@st.composite
def damaged(draw, original: bytes, parse: Callable[[bytes], Any] | None,
            dump: Callable[[Any], bytes] | None) -> bytes:
    """A damaged version of a file's bytes: text-level damage, or (for JSON/YAML) structural changes."""
    kind = draw(st.sampled_from(["truncate", "empty", "junk", "append", "flip"]
                                + (["structure"] * 6 if parse else [])))
    if kind == "truncate":
        return original[: draw(st.integers(0, max(0, len(original) - 1)))]
    if kind == "empty":
        return b""
    if kind == "junk":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=50))
    if kind == "flip":
        i = draw(st.integers(0, max(0, len(original) - 1)))
        return original[:i] + bytes([original[i] ^ 0xFF]) + original[i + 1:] if original else b"\xff"
    return dump(draw(structured(parse(original))))  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# the verbs
def _ok(argv: list[str]) -> tuple[int, str]:
    """main(argv): exit 0, or exit 2 with an `igam: error:` line. Any exception fails the test (with it)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    text = err.getvalue() + out.getvalue()  # (training says its warnings on stdout)
    assert rc in (0, 2), f"{argv}: exit {rc}\n{text}"
    assert "Traceback" not in text, text
    if rc == 2:
        assert any(line.startswith("igam: error: ") for line in text.splitlines()), text
    return rc, text


def _verbs(run: Path, work: Path, which: tuple[str, ...]) -> dict[str, list[str]]:
    out = {
        "info": ["info", str(run)],
        "info-json": ["info", str(run), "--json"],
        "evaluate": ["evaluate", str(run), "--attacks", "clean", "--n", "8"],
        "gradients": ["gradients", str(run), "--n", "1", "--out", str(work / "g.png")],
        "report": ["report", str(run), "--no-gradients", "--out", str(work / "r.html")],
        "finetune": ["finetune", f"teacher={run}", *TINY, f"out_dir={work}", "name=ft"],
        "init_from": ["train", f"init_from={run}", *TINY, f"out_dir={work}", "name=init"],
        "transfer": ["transfer", f"teacher={run}", *TINY, f"out_dir={work}", "name=tr"],
        "resume": ["train", *[f"{k}={v}" for k, v in TINY_RUN.items()], f"out_dir={run.parent}",
                   f"name={run.name}", "resume=true"],
    }
    return {k: out[k] for k in which}


@pytest.fixture(scope="module")
def runs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run (evaluated once, with an eps sweep) and a teacher fine-tuned from it."""
    root = tmp_path_factory.mktemp("fuzz")
    base = copy_run(tiny_run, root, "base")
    _ok(["evaluate", str(base), "--attacks", "clean,fgsm", "--n", "8", "--eps-sweep", "0.1,0.2"])
    _ok(["evaluate", str(base), "--attacks", "clean,fgsm", "--n", "8"])
    assert _ok(["finetune", f"teacher={base}", *TINY, f"out_dir={root}", "name=ft"])[0] == 0
    return {"base": base, "ft": root / "ft"}


def _fuzz(runs: dict[str, Path], which: str, name: str, data, verbs: tuple[str, ...],
          parse: Callable | None, dump: Callable | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        run = copy_run(runs[which], work, "run")
        target = run / name if not name.startswith("checkpoints/") else sorted(
            (run / "checkpoints").glob(name.split("/")[1]))[-1]
        target.write_bytes(data.draw(damaged(target.read_bytes(), parse, dump), label=name))
        verb = data.draw(st.sampled_from(verbs), label="verb")  # one reader per example: seconds per test
        _ok(_verbs(run, work, (verb,))[verb])


def _json(b: bytes) -> Any:
    return json.loads(b)


def _yaml(b: bytes) -> Any:
    return yaml.safe_load(b)


@FUZZ
@given(st.data())
def test_damaged_meta_json(runs, data) -> None:
    _fuzz(runs, "base", Run.META, data, ("info", "evaluate", "gradients", "finetune", "init_from"), _json,
          _dump_json)


@FUZZ
@given(st.data())
def test_damaged_meta_json_of_a_fine_tuned_teacher(runs, data) -> None:
    _fuzz(runs, "ft", Run.META, data, ("info-json", "evaluate", "transfer"), _json, _dump_json)


@FUZZ
@given(st.data())
def test_damaged_config_yaml(runs, data) -> None:
    _fuzz(runs, "base", Run.CONFIG, data, ("evaluate", "gradients", "finetune", "init_from", "resume"), _yaml,
          _dump_yaml)


@FUZZ
@given(st.data())
def test_damaged_eval_json(runs, data) -> None:
    _fuzz(runs, "base", Run.EVAL, data, ("info", "evaluate", "report"), _json, _dump_json)


@FUZZ
@given(st.data())
def test_damaged_metrics_json(runs, data) -> None:
    _fuzz(runs, "ft", Run.METRICS, data, ("info", "report", "transfer"), _json, _dump_json)


@FUZZ
@given(st.data())
def test_damaged_robustness_curve(runs, data) -> None:
    _fuzz(runs, "base", Run.CURVE, data, ("report",), _json, _dump_json)


def _csv(b: bytes) -> Any:
    return [line.split(",") for line in b.decode().splitlines()]


def _dump_csv(rows: Any) -> bytes:
    if not isinstance(rows, list):
        return json.dumps(rows).encode()
    return "\n".join(",".join(str(c) for c in (r if isinstance(r, list) else [r])) for r in rows).encode()


@FUZZ
@given(st.data(), st.sampled_from([Run.LOG, Run.EVAL_LOG]))
def test_damaged_csv_logs(runs, data, name: str) -> None:
    _fuzz(runs, "base", name, data, ("report", "resume"), _csv, _dump_csv)


@FUZZ
@given(st.data())
def test_damaged_weights(runs, data) -> None:
    _fuzz(runs, "base", Run.WEIGHTS, data, ("evaluate", "gradients", "finetune", "init_from"), None, None)


@FUZZ
@given(st.data())
def test_damaged_weights_of_a_fine_tuned_teacher(runs, data) -> None:
    _fuzz(runs, "ft", Run.WEIGHTS, data, ("evaluate", "transfer"), None, None)


@FUZZ
@given(st.data(), st.sampled_from(["checkpoints/ckpt-*.pt", "checkpoints/ckpt-*.json"]))
def test_damaged_checkpoints(runs, data, name: str) -> None:
    parse, dump = (_json, _dump_json) if name.endswith(".json") else (None, None)
    _fuzz(runs, "base", name, data, ("resume",), parse, dump)


# ---------------------------------------------------------------------------------------------
# experiment folders: `igam run --results-only` reads each stage's meta.json, config.yaml and eval.json
@pytest.mark.parametrize("name,text", [
    (Run.EVAL, '{"clean": {"accuracy": "high", "n": "many"}, "fgsm": [1, 2]}'),
    (Run.EVAL, '{"clean": {"accuracy": NaN, "n": 1e400, "seed": null, "attack": 5}}'),
    (Run.EVAL, '{"masking_checks": {"checks": {"x": 1}, "observations": [{"name": 1}], "failed": 7}}'),
    (Run.EVAL, "[]"), (Run.EVAL, ""),
    (Run.META, '{"status": "finished", "model": 5}'),
    (Run.META, '{"status": 5, "model": {}, "data": {}}'),
    (Run.CONFIG, "lr: [1, 2]\nepochs: .nan\n"), (Run.CONFIG, "- a\n"),
    (Run.CONFIG, "method: !!python/none ''\n"),
    (Run.METRICS, '{"final": {"clean_acc": "x"}, "passes_per_image": {"S": "many"}}'),
])
def test_damaged_stage_files_and_results_only(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              name: str, text: str) -> None:
    import igam.experiment.runner as runner

    real = runner.write_report  # without the gradient pictures (seconds each); `report` is fuzzed above
    monkeypatch.setattr(runner, "write_report", lambda path, **k: real(path, gradients=False))
    spec = tmp_path / "e.yaml"
    out = tmp_path / "out"
    copy_run(runs["base"], out, "s")
    cfg = yaml.safe_load((out / "s" / Run.CONFIG).read_text())
    spec.write_text(yaml.safe_dump({
        "experiment": "fuzz", "out_dir": str(out), "primary_metric": "fgsm",
        "stages": [{"name": "s", "row": "S", "config": {k: v for k, v in cfg.items()
                                                         if k not in ("out_dir", "name")}}],
        "evaluation": [{"attacks": ["clean", "fgsm"], "n": 8}]}))
    (out / "s" / name).write_text(text)
    _ok(["run", str(spec), "--results-only"])
    _ok(["run", str(spec), "--dry-run"])


# ---------------------------------------------------------------------------------------------
# the cases of the issue, and those the fuzzing found, held as plain tests
def _eval_with(run: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((run / Run.EVAL).read_text())
    change(data)
    (run / Run.EVAL).write_text(json.dumps(data))


def _meta_with(run: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((run / Run.META).read_text())
    change(data)
    (run / Run.META).write_text(json.dumps(data))


CASES = {
    # the issue: `igam report` crashed on a wrong-typed value in eval.json
    "report: accuracy as text": (lambda r: _eval_with(r, lambda d: d["fgsm"].update(accuracy="0.5")),
                                 ["report", "{run}", "--no-gradients"], "fgsm"),
    "report: per_class as a list": (lambda r: _eval_with(r, lambda d: d["clean"].update(per_class=[1])),
                                    ["report", "{run}", "--no-gradients"], "clean"),
    "report: a record that is a number": (lambda r: _eval_with(r, lambda d: d.update(pgd20=7)),
                                          ["report", "{run}", "--no-gradients"], "pgd20"),
    "report: checks as a list": (lambda r: _eval_with(r, lambda d: d["masking_checks"].update(checks=[1])),
                                 ["report", "{run}", "--no-gradients"], "masking_checks"),
    # the issue: `igam evaluate` crashed on an unknown key in a stored masking observation
    "evaluate: unknown key in an observation": (
        lambda r: _eval_with(r, lambda d: d["masking_checks"]["observations"].append(
            {"name": "check:fgsm", "kind": "fgsm", "eps": 0.1, "accuracy": 0.5, "n": 8, "colour": "red"})),
        ["evaluate", "{run}", "--attacks", "clean", "--n", "8"], "masking-check observation"),
    "evaluate: a record without its accuracy": (
        lambda r: _eval_with(r, lambda d: d["fgsm"].pop("accuracy")),
        ["evaluate", "{run}", "--attacks", "clean", "--n", "8"], "'fgsm'"),
    "evaluate: masking_checks as a list": (
        lambda r: _eval_with(r, lambda d: d.update(masking_checks=[1, 2])),
        ["evaluate", "{run}", "--attacks", "clean", "--n", "8"], "masking_checks"),
    "model info: damaged bits": (lambda r: _eval_with(r, lambda d: d["fgsm"].update(correct="!!")),
                                 ["evaluate", "{run}", "--attacks", "clean", "--n", "8", "--model-info"],
                                 None),
    # found by fuzzing the old code
    "info: model entry a number": (lambda r: _meta_with(r, lambda d: d.update(model=0.5)),
                                   ["info", "{run}"], "meta.json"),
    "info: passes_per_image as text": (lambda r: _meta_with(r, lambda d: d.update(passes_per_image="x")),
                                       ["info", "{run}"], "meta.json"),
    "report: a huge train time": (lambda r: _meta_with(r, lambda d: d.update(train_time_s=10**400)),
                                  ["report", "{run}", "--no-gradients"], "meta.json"),
    "report: text in a numeric log cell": (
        lambda r: (r / Run.LOG).write_text((r / Run.LOG).read_text().replace("0.005", "fast", 1)),
        ["report", "{run}", "--no-gradients"], None),
    "resume: a log that is not UTF-8": (lambda r: (r / Run.LOG).write_bytes(b"\x80\x81junk\n"),
                                        ["train", *[f"{k}={v}" for k, v in TINY_RUN.items()],
                                         "out_dir={parent}", "name={name}", "resume=true"], "log.csv"),
    "report: a NaN in the robustness curve": (
        lambda r: (r / Run.CURVE).write_text(
            (r / Run.CURVE).read_text().replace('"accuracy": 0.', '"accuracy": NaN, "x": 0.', 1)),
        ["report", "{run}", "--no-gradients"], "robustness_curve.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_run_files_of_the_issue_and_the_fuzzing(runs, tmp_path: Path, case: str) -> None:
    damage, argv, needle = CASES[case]
    run = copy_run(runs["base"], tmp_path, "run")
    damage(run)
    rc, err = _ok([a.format(run=run, parent=run.parent, name=run.name) for a in argv])
    if needle is not None:  # the damaged file (or entry) is named, in the error, a warning or the report
        report = (run / "report.html").read_text() if (run / "report.html").exists() else ""
        assert needle in err or needle in report, err
