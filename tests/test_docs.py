"""The docs tell the truth about files and commands: every repository path named in README.md, docs/*.md
and the `--help` texts exists, and every `igam` command in their code blocks and examples parses: its verb,
its options and keys (config keys through make_config, attack names through the attack parser), its
--config file; `igam run FILE` runs with --dry-run, `igam info` / `igam models` / `--help` run as written.
Commands with placeholders (`...`, shell variables, {a,b} braces) are checked only as far as they are
written out."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from igam.cli import CONFIG_VERBS, build_parser, main, split_argv
from igam.config import make_config, parse_override_args
from igam.errors import IgamError
from igam.evaluate import validate_attacks

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSER = build_parser()
VERBS = PARSER.verbs  # type: ignore[attr-defined]


def help_texts() -> dict[str, str]:
    return {"igam --help": PARSER.format_help(),
            **{f"igam {v} --help": sp.format_help() for v, sp in VERBS.items()}}


def texts() -> dict[str, str]:
    return {**{str(p.relative_to(ROOT)): p.read_text() for p in DOCS}, **help_texts()}


# --------------------------------------------------------------------------------------------- paths
PATH = re.compile(r"(?<![\w/.$~:-])((?:experiments|docs|src|scripts|benchmarks|tests|\.ci)/[\w.+/=-]*\w/?)")
TICKED = re.compile(r"`([\w.-]+/[\w./-]*\.(?:py|yaml|md|css|json|sh)|[\w-]+/(?:[\w-]+/)*)`")


def named_paths() -> list[tuple[str, str]]:
    """(where, path) for repository paths: top-level folders written out, and backticked module paths
    (`method/matching.py`, `models/weights/`) that name files of the package."""
    out = []
    for where, text in texts().items():
        for m in PATH.finditer(text):
            if "{" not in text[m.end():m.end() + 2]:  # NAME.{safetensors,json}
                out.append((where, m.group(1)))
        for m in TICKED.finditer(text):
            out.append((where, m.group(1)))
    return out


def exists(path: str) -> bool:
    if re.search(r"[A-Z]{3,}|\*|\{", path):  # placeholders (NAME, DATASET, RUN), globs, braces
        return True
    return any((base / path).exists() for base in (ROOT, ROOT / "src", ROOT / "src" / "igam"))


def test_paths_named_in_the_docs_exist() -> None:
    found = named_paths()
    assert len(found) > 50  # the scan found the docs
    # run folders, data roots and outputs named in prose are not repository files
    skip = ("runs/", "data/", "tb/", "checkpoints/", "weights/", "RUN/", "jobs/")
    missing = sorted({(w, p) for w, p in found if not p.startswith(skip) and not exists(p)})
    assert missing == [], "named in the docs but not in the repository: " + "; ".join(
        f"{p} ({w})" for w, p in missing)


# --------------------------------------------------------------------------------------------- commands
def code_lines(text: str, help_text: bool = False) -> list[str]:
    """Shell lines of fenced code blocks and indented examples (every line of a --help text), continuations
    joined, prompts removed."""
    if help_text:
        blocks = [text]
    else:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        blocks += [m.group(0) for m in re.finditer(r"(?m)(?:^ {4}.*\n?)+", prose)]
    out = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            out.append(line)
    return out


COMMAND = re.compile(r"^(?:\w+=\S+\s+)*(?:igam|\S*python3?\s.*?-m igam|torchrun\s.*?-m igam) ([a-z-].*)$")


def igam_commands(text: str, help_text: bool = False) -> list[list[str]]:
    """`igam VERB ...` commands (also `python -m igam`, `torchrun ... -m igam`), as argument lists."""
    return [argv for argv, _ in documented_commands(text, help_text)]


def documented_commands(text: str, help_text: bool = False) -> list[tuple[list[str], bool]]:
    """(argv, refused) for the `igam` commands of `text`; refused: the docs show it followed by its
    `igam: error: ...` line (an example of a refusal, e.g. docs/RELIABILITY.md's bad values)."""
    cmds = []
    pinned = False  # a command documented "at git COMMIT" (a comment on it or just above) is history
    lines = code_lines(text, help_text)
    for i, line in enumerate(lines):
        if line.startswith("#"):
            pinned = pinned or "at git " in line
            continue
        m = COMMAND.match(line)
        if not m or "[-h]" in line or "[RUN ...]" in line:
            continue
        if pinned or "at git " in line:
            pinned = False
            continue
        body = m.group(1).split(" #")[0].split(" && ")[0].split(" | ")[0].strip()
        try:
            argv = [a for a in shlex.split(body) if not a.startswith((">", "2>", "&"))]
        except ValueError:
            continue
        if argv:
            refused = i + 1 < len(lines) and lines[i + 1].startswith("igam: error:")
            cmds.append((argv, refused))
    return cmds


def all_commands() -> list[tuple[str, list[str], bool]]:
    return [(where, argv, refused) for where, text in texts().items()
            for argv, refused in documented_commands(text, help_text=where.startswith("igam "))]


def placeholder(token: str) -> bool:
    return "..." in token or "$" in token or "{" in token or re.search(r"\b[A-Z]{3,}\b", token) is not None


def check(argv: list[str]) -> None:
    """Parse one command as igam would, without training or evaluating anything."""
    verb, args = argv[0], [a for a in argv[1:] if a != "..."]
    if verb in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        return
    assert verb in VERBS, f"no verb '{verb}'"
    if "--help" in args:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        return
    if verb in CONFIG_VERBS:
        config = None
        if "--config" in args:
            i = args.index("--config")
            config, args = args[i + 1], args[:i] + args[i + 2:]
            if placeholder(config):
                config = None
            else:
                assert (ROOT / config).is_file(), f"--config {config} does not exist"
        overrides = parse_override_args([a for a in args if not placeholder(a)])
        overrides.pop("data_dir", None)
        make_config(str(ROOT / config) if config else None, overrides)  # keys, types, values
        return
    if verb == "run":
        path = args[0]
        assert placeholder(path) or (ROOT / path).is_file(), f"{path} does not exist"
        if not placeholder(path):
            rest = [a for a in args[1:] if not placeholder(a) and a not in ("--dry-run", "--results-only")
                    and not a.startswith(("data_dir=", "out_dir="))]
            if "--out-dir" in rest:
                i = rest.index("--out-dir")
                rest = rest[:i] + rest[i + 2:]
            assert main(["run", str(ROOT / path), "--dry-run", *rest]) == 0, argv
        return
    if verb in ("info", "models") and not any(map(placeholder, args)) and (
            verb == "models" or args[0].startswith("igam:")):
        assert main([verb, *args]) == 0, argv
        return
    _, tokens, extra = split_argv(PARSER, [verb, *("x" if placeholder(a) else a for a in args)])
    assert not extra, f"`igam {verb}` does not take {extra}"
    VERBS[verb].parse_args(tokens + (["x"] if verb != "demo" and not any(
        not t.startswith("-") for t in tokens) else []))
    if verb == "evaluate" and "--attacks" in tokens:
        validate_attacks(tokens[tokens.index("--attacks") + 1].split(","))


def test_igam_commands_in_the_docs_parse(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # a dry run writes nothing, but be sure
    commands = all_commands()
    assert len(commands) > 40 and {a[0] for _, a, _ in commands} >= {"train", "evaluate", "run", "finetune"}
    assert sum(refused for _, _, refused in commands) >= 5  # docs/RELIABILITY.md's refusals were found
    failed = []
    for where, argv, refused in commands:
        try:
            check(argv)
        except IgamError as e:
            if not refused:  # a refusal shown with its error may be refused by the checks (a bad value)
                failed.append(f"{where}: igam {' '.join(argv)}: {type(e).__name__}: {str(e)[:200]}")
        except (AssertionError, SystemExit) as e:
            # a refusal's example file (`--config c.yaml`, `igam run exp.yaml`) is the reader's, not ours;
            # its verb and options must still exist
            if not (refused and "does not exist" in str(e)):
                failed.append(f"{where}: igam {' '.join(argv)}: {type(e).__name__}: {str(e)[:200]}")
        capsys.readouterr()
    assert failed == [], "\n".join(failed)


def test_the_scan_catches_a_wrong_command_and_a_missing_path() -> None:
    assert igam_commands("```bash\nigam train learning_rat=1 dataset=mnist   # x\n```") == [
        ["train", "learning_rat=1", "dataset=mnist"]]
    assert documented_commands("```\n$ igam train lr=-1\nigam: error: lr=-1 ...\n$ igam train lr=1\n```") == [
        (["train", "lr=-1"], True), (["train", "lr=1"], False)]
    with pytest.raises(IgamError, match="learning_rat"):
        check(["train", "learning_rat=1"])
    with pytest.raises(AssertionError, match="does not take"):
        check(["evaluate", "runs/x", "--no-such-flag"])
    assert not exists("experiments/cpu/teacher.yaml") and exists("experiments/configs/mnist-teacher.yaml")
