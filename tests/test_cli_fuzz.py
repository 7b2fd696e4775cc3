"""Fuzzing the configuration and the command line with hypothesis: every input ends in success, a clean
IgamError (the CLI: exit code 2 and one `igam: error: ...` paragraph) or argparse's own SystemExit, and
never in any other exception."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

# a dev dependency: machines without it (the GPU machine's python) skip this module instead of failing to
# collect the whole suite
pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from igam.cli import main  # noqa: E402
from igam.config import Config, all_keys, make_config, parse_override_args  # noqa: E402
from igam.errors import IgamError  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = sorted(all_keys())

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(["8/255", "1/0", "0.3", "-1", "1e999", "nan", "true", "",
                                                     "synthetic", "auto", "adam", "igam", "x" * 5000]))
values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=5), scalars, max_size=2)
# keys: real ones (as written and with dashes), near misses, and junk
keys = (st.sampled_from(KEYS) | st.sampled_from(KEYS).map(lambda k: k.replace("_", "-"))
        | st.sampled_from(KEYS).map(lambda k: k[:-1]) | st.text(max_size=12))


def _clean(fn, *args: Any, **kwargs: Any) -> Any:
    """Run fn; an IgamError is a clean outcome, any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except IgamError as e:
        assert str(e).strip(), "an IgamError must say what is wrong"
        return e


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_make_config_never_crashes(overrides: dict[str, Any]) -> None:
    out = _clean(make_config, None, overrides)
    assert isinstance(out, Config | IgamError)
    if isinstance(out, Config):  # whatever was accepted re-validates and survives a YAML round trip
        assert make_config(None, yaml.safe_load(yaml.safe_dump(out.to_dict()))) == out


@FUZZ
@given(st.lists(st.text(max_size=15) | st.sampled_from(["--", "--lr", "lr=", "=", "--=1", "-x", "--resume"]),
                max_size=8))
def test_override_args_never_crash(args: list[str]) -> None:
    out = _clean(parse_override_args, args)
    if isinstance(out, dict):
        assert all(isinstance(k, str) and k for k in out)
        assert isinstance(_clean(make_config, None, out), Config | IgamError)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
       | st.dictionaries(keys, values, max_size=5).map(lambda d: yaml.safe_dump(d)))
def test_yaml_files_never_crash(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") if text.isascii() else text.encode("latin-1",
                                                                                                   "replace"))
        assert isinstance(_clean(make_config, str(path)), Config | IgamError)


def _cli(argv: list[str]) -> tuple[int, str]:
    """main(argv) with training replaced by a stub: (exit code, stderr)."""
    err = io.StringIO()
    with (mock.patch("igam.train.train", lambda cfg, *a, **k: Path(cfg.out_dir) / "stub"),
          contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO())):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help (0) and usage errors (2)
            code = e.code if isinstance(e.code, int) else 2
            assert code in (0, 2), argv
    return code, err.getvalue()


tokens = (st.sampled_from(KEYS).map(lambda k: f"{k}=") .flatmap(lambda k: values.map(lambda v: f"{k}{v}"))
          | st.sampled_from(KEYS).map(lambda k: f"--{k.replace('_', '-')}")
          | st.sampled_from(["--config", "--config=/nonexistent.yaml", "-h", "--json", "--attacks", "--n",
                             "x",
                             "-1", "--", "resume", "eps=8", "method=igma", "dataset=mnsit", "--data-dir"])
          | st.text(max_size=12))


@FUZZ
@given(st.sampled_from(["train", "finetune", "transfer", "info", "evaluate", "models", "nope", "", "-x"]),
       st.lists(tokens, max_size=6))
def test_cli_never_shows_a_traceback(verb: str, rest: list[str]) -> None:
    argv = [verb, *rest] if verb else rest
    if verb in ("info", "evaluate"):  # point them at paths that are surely not runs
        argv = [verb, "/nonexistent/run", *rest]
    code, err = _cli(argv)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2 and "igam: error:" in err:
        assert err.count("igam: error:") == 1


@pytest.mark.parametrize("argv,msg", [
    (["train", "learning_rate=0.1"], "Unknown config key 'learning_rate'"),
    (["train", "--batchsize", "3"], "Did you mean 'batch_size'"),
    (["train", "eps=8"], "write eps=8/255"),
    (["train", "method=igma"], "Did you mean 'igam'"),
    (["train", "epochs=three"], "needs a number"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["train", "oops"], "Cannot read argument 'oops'"),
    (["info", "/nonexistent/run"], "does not exist"),
])
def test_cli_errors_are_one_paragraph(argv: list[str], msg: str) -> None:
    code, err = _cli(argv)
    assert code == 2 and err.startswith("igam: error: ") and msg in err
    assert err.strip().count("\n") == 0  # one paragraph, no traceback


@pytest.mark.parametrize("argv", [
    ["train", "lr=0.05", "--epochs", "3", "--resume", "--data-dir", "/data", "--batch-size=64"],
    ["train", "--epochs", "3", "lr=0.05", "--data-dir", "/data", "--resume", "batch_size=64"],
    ["train", "--data-dir", "/data", "--epochs", "3", "--lr", "0.05", "--batch-size", "64", "--resume"],
])
def test_cli_train_accepts_both_override_spellings_in_any_order(argv: list[str]) -> None:
    seen: list[Config] = []
    with mock.patch("igam.train.train", lambda cfg, *a, **k: seen.append(cfg) or Path("x")), \
            contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    assert (seen[0].lr, seen[0].epochs, seen[0].resume, seen[0].data_dir, seen[0].batch_size) == (
        0.05, 3.0, True, "/data", 64)
