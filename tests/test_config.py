"""Configuration: defaults, YAML, key=value / --key value overrides, and the errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from igam.config import (
    Config,
    all_keys,
    apply_overrides,
    check_eps,
    config_help,
    load_yaml,
    make_config,
    parse_fraction,
    parse_override_args,
    save_yaml,
)
from igam.errors import IgamError


def test_defaults_are_valid_and_every_key_has_help() -> None:
    cfg = make_config()
    assert cfg == Config()
    text = config_help()
    for name, f in all_keys().items():
        assert f.help, name
        assert f"  {name} " in text


def test_the_adapter_help_says_what_transpose_conv_does_to_channels_and_size() -> None:
    """The `adapter` key's help describes transpose-conv as igam.method.adapters builds it: exactly twice
    the height and width (no size N), the teacher's channels when it is the last spatial step (else its
    input's), x2 linear interpolation of input channel o mod C at the start, trained by finetune."""
    import torch

    from igam.method.adapters import build_adapter

    help = all_keys()["adapter"].help
    for claim in ("HxW -> 2Hx2W, no N", "the teacher's channels when it is the last",
                  "else keeps its input's", "x2 linear interpolation",
                  "of the channel average for fewer channels (3 -> 1: grey)", "or of channel o mod C",
                  "trained by finetune"):
        assert claim in help, claim
    last = build_adapter("transpose-conv", (3, 8, 8), (1, 16, 16))
    assert last.out_shape == (1, 16, 16) and last.learned
    assert build_adapter("transpose-conv+resize20", (3, 8, 8), (3, 20, 20)).steps[0].out_shape == (3, 16, 16)
    assert build_adapter("transpose-conv+gray", (3, 8, 8), (1, 16, 16)).steps[0].out_shape == (1, 16, 16)
    with pytest.raises(IgamError, match="maps the target input 3x8x8 to 3x16x16"):
        build_adapter("transpose-conv", (3, 8, 8), (3, 24, 24))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        y = build_adapter("transpose-conv", (3, 8, 8), (3, 16, 16))(x)
        assert torch.allclose(y[..., ::2, ::2], x)  # x2 linear interpolation, channel by channel
        assert torch.allclose(y[..., 1:-1:2, ::2], (x[..., :-1, :] + x[..., 1:, :]) / 2)
        grey = build_adapter("gray+transpose-conv", (3, 8, 8), (1, 16, 16))(x)
        torch.testing.assert_close(last(x), grey)  # 3 -> 1 starts from the grey channel average
    with pytest.raises(IgamError, match="transpose-conv takes no size"):
        build_adapter("transpose-conv99", (3, 8, 8), (1, 16, 16))


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.3", 0.3), (" 2 / 255 ", 2 / 255), (0.5, 0.5),
                                        (1, 1.0), ("1e-3", 1e-3)])
def test_parse_fraction(text: str | float, value: float) -> None:
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "1/0", "inf", "nan", "8//255", "", True])
def test_parse_fraction_rejects_junk(text: object) -> None:
    with pytest.raises(IgamError):
        parse_fraction(text)  # type: ignore[arg-type]


def test_eps_on_the_255_scale_is_caught_with_the_fix() -> None:
    with pytest.raises(IgamError, match=r"eps=8 is larger than 1.*write eps=8/255"):
        make_config(overrides={"eps": "8"})
    with pytest.raises(IgamError, match="step_size=2 is larger than 1"):
        make_config(overrides={"step_size": 2})
    with pytest.raises(IgamError, match="negative"):
        check_eps("-0.1")
    assert make_config(overrides={"eps": "8/255"}).eps == "8/255"
    assert check_eps("0.3") == pytest.approx(0.3)


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(IgamError, match="Unknown config key 'learning_rat'. Did you mean 'lr'?|Did you mean"):
        make_config(overrides={"learning_rat": 1})
    with pytest.raises(IgamError, match="Did you mean 'batch_size'"):
        make_config(overrides={"batchsize": 64})
    with pytest.raises(IgamError, match="Did you mean 'epochs'"):
        make_config(overrides={"epoch": 3})


@pytest.mark.parametrize("key,value,want", [
    ("epochs", "three", "a number"), ("batch_size", "1.5", "an integer"), ("batch_size", True, "an integer"),
    ("resume", "maybe", "true/false"), ("lr", [1, 2], "a number"),
    ("lr_milestones", "a,b", "a comma-separated list"),
    ("model", {"a": 1}, "a string"), ("seed", "1e400", "an integer"),
])
def test_wrong_types_name_the_key_and_the_type(key: str, value: object, want: str) -> None:
    with pytest.raises(IgamError, match=f"'{key}' needs {want}"):
        make_config(overrides={key: value})


@pytest.mark.parametrize("key,value,msg", [
    ("optimizer", "adma", "Did you mean 'adam'"), ("augment", "crop_flip", "Did you mean 'crop-flip'"),
    ("method", "igma", "Did you mean 'igam'"), ("preset", "oficial", "Did you mean 'official'"),
    ("batch_size", 0, "at least 1"), ("lr", -1, "must not be negative"), ("seed", -3, "seed=-3"),
    ("keep_checkpoints", 0, "at least 1"), ("lr_milestones", "0.5,2", "fractions of training"),
    ("noise", "-1/255", "negative"), ("lambda_diff", "x", "not a number"), ("resume", None, "has no value"),
])
def test_invalid_values(key: str, value: object, msg: str) -> None:
    with pytest.raises(IgamError, match=msg):
        make_config(overrides={key: value})


def test_coercions() -> None:
    cfg = make_config(overrides={"epochs": "2.5", "batch_size": "64", "resume": "yes",
                                 "lr_milestones": "0.3, 0.6", "seed": 3.0, "tensorboard": "off", "eps": 0.1})
    got = (cfg.epochs, cfg.batch_size, cfg.resume, cfg.lr_milestones, cfg.seed, cfg.tensorboard, cfg.eps)
    assert got == (2.5, 64, True, [0.3, 0.6], 3, False, "0.1")
    # dashes and underscores are the same key
    assert make_config(overrides={"batch-size": 32}).batch_size == 32


def test_method_accepts_every_registered_objective() -> None:
    from igam.objectives import OBJECTIVES, register_objective
    from igam.objectives.base import Objective

    for name in OBJECTIVES:
        assert make_config(overrides={"method": name}).method == name
    assert set(OBJECTIVES) >= {"standard", "finetune"}
    name = "test-config-registered-objective"
    if name not in OBJECTIVES:
        register_objective(name, help="a test")(lambda cfg, model, spec, device: Objective())
    assert make_config(overrides={"method": name}).method == name
    with pytest.raises(IgamError, match="Choose one of:.*standard"):
        make_config(overrides={"method": "no-such-method"})


def test_override_args_both_spellings() -> None:
    got = parse_override_args(["lr=0.1", "--epochs", "3", "--resume", "--batch-size=64", "name=a=b", "--x"])
    assert got == {"lr": "0.1", "epochs": "3", "resume": "true", "batch-size": "64", "name": "a=b",
                   "x": "true"}
    # a flag followed by a key=value is a boolean flag, not a key taking that value
    assert parse_override_args(["--resume", "lr=0.1"]) == {"resume": "true", "lr": "0.1"}
    with pytest.raises(IgamError, match="Cannot read argument 'oops'"):
        parse_override_args(["oops"])
    with pytest.raises(IgamError, match="the key is empty"):
        parse_override_args(["=3"])
    cfg = make_config(overrides=parse_override_args(["--epochs", "3", "lr=0.05", "--resume"]))
    assert (cfg.epochs, cfg.lr, cfg.resume) == (3.0, 0.05, True)


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.05\nbatch-size: 64\neps: 8/255\nlr_milestones: [0.4, 0.8]\n")
    cfg = make_config(str(path), {"lr": "0.01"})
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.lr_milestones) == (3.0, 0.01, 64, [0.4, 0.8])
    # the saved config reloads to the same Config
    save_yaml(cfg.to_dict(), tmp_path / "saved.yaml")
    assert make_config(str(tmp_path / "saved.yaml")) == cfg
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["lr"] == 0.01


@pytest.mark.parametrize("text,msg", [
    ("epochs: [3\n", "not valid YAML"), ("- 1\n- 2\n", "must hold a mapping"),
    ("lr: 0.1\nlrr: 2\n", "Did you mean"), (b"\xff\xfe bad bytes", "not valid YAML"),
    ("eps: 8\n", "write eps=8/255"), ("!!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
])
def test_bad_yaml_files(tmp_path: Path, text: str | bytes, msg: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(IgamError, match=msg):
        make_config(str(path))


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(IgamError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    assert make_config(None, None) == Config()


def test_empty_yaml_is_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert make_config(str(tmp_path / "empty.yaml")) == Config()


def test_replace_validates() -> None:
    cfg = Config().replace(epochs=1)
    assert cfg.epochs == 1.0
    with pytest.raises(IgamError):
        cfg.replace(eps=16)
    with pytest.raises(IgamError):
        apply_overrides(cfg, {"nope": 1})


def test_official_preset_needs_a_numeric_lambda_diff() -> None:
    """preset=official with lambda_diff=auto collapsed in the CPU experiment: refused with the fix."""
    with pytest.raises(IgamError, match=r"lambda_diff=auto does not work.*lambda_diff=100"):
        make_config(overrides={"method": "igam", "preset": "official"})
    cfg = make_config(overrides={"method": "igam", "preset": "official", "lambda_diff": "100"})
    assert cfg.gradient_target == "true-prob" and cfg.lambda_diff == "100"
    assert make_config(overrides={"method": "igam", "preset": "paper"}).lambda_diff == "auto"
    # only the IGAM objectives use lambda_diff: other methods keep working with the preset
    assert make_config(overrides={"method": "standard", "preset": "official"}).preset == "official"


def test_method_names_are_the_registered_objectives() -> None:
    """config.method_names() (the help's list, what validation accepts) is the registry, built-ins
    included: importing igam registers every method of igam/objectives/."""
    from igam.config import method_names
    from igam.registry import METHODS, OBJECTIVES

    assert set(method_names()) == set(METHODS) == set(OBJECTIVES)
    assert {"standard", "pgd-at", "trades", "fast-at", "n-fgsm", "free-at", "finetune", "igam", "igr",
            "kd-noise", "rrm", "ard", "rslad"} <= set(method_names())
