"""A method is one file (issue 22): a toy method written to a file of its own, with a key of its own, is
in `igam train --help`, in configuration (its key typed, checked and noted), trains in a run that records
its passes, and shows in an experiment's results table, without a line changed anywhere else."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from igam.cli import build_parser, main
from igam.config import config_notes, make_config
from igam.errors import IgamError
from igam.registry import METHODS

TOY = '''
"""toy: cross-entropy times toy_scale (a test method, one file)."""
import torch.nn.functional as F

from igam.objectives import Objective, register_objective
from igam.objectives.base import count
from igam.registry import Key
from igam.units import positive


class Toy(Objective):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def loss(self, model, x, y, step, index=None):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return self.scale * ce, {"ce": ce.detach()}, None

    def own_passes(self, step):
        return {"student": count(1, 1)}


@register_objective("toy-one-file", help="a toy: toy_scale x cross-entropy", reads=("toy_scale",),
                    summary=("toy_scale",), cost=1.0,
                    keys=(Key("toy_scale", 1.0, "the toy's factor on the cross-entropy", "toy",
                              check=positive),))
def make_toy(cfg, model, spec, device):
    return Toy(cfg.toy_scale)
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    """The toy method's file, imported once per process (registration is for the process's life)."""
    name = "toy-one-file"
    if name not in METHODS:
        path = tmp_path_factory.mktemp("plugin") / "toy_method.py"
        path.write_text(TOY)
        spec = importlib.util.spec_from_file_location("toy_method", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["toy_method"] = module
        spec.loader.exec_module(module)
    return name


def test_the_toy_method_is_in_train_help_with_its_key(toy: str) -> None:
    text = build_parser().verbs["train"].format_help()
    methods = text[text.index("methods (method=...") : text.index("configuration keys (key=value")]
    assert "toy-one-file" in methods and "toy_scale x cross-entropy" in methods
    assert " [toy]" in text and "  toy_scale " in text


def test_the_toy_key_is_typed_checked_and_noted(toy: str) -> None:
    cfg = make_config(overrides={"method": toy, "toy_scale": "2.5", "dataset": "synthetic:8x8x1:2"})
    assert cfg.toy_scale == 2.5 and cfg.to_dict()["toy_scale"] == 2.5
    with pytest.raises(IgamError, match="toy_scale=-1.0 must be positive"):
        make_config(overrides={"method": toy, "toy_scale": -1})
    with pytest.raises(IgamError, match="toy_scale.*needs a number"):
        make_config(overrides={"method": toy, "toy_scale": "lots"})
    with pytest.raises(IgamError, match="Unknown config key 'toy_scal'.*toy_scale"):
        make_config(overrides={"method": toy, "toy_scal": 2})
    # another method does not read it: a note says so
    notes = config_notes(make_config(overrides={"method": "standard", "toy_scale": 3}))
    assert any("does not use toy_scale=3.0" in n for n in notes)
    assert config_notes(cfg) == []


def test_the_toy_method_trains_and_shows_in_a_results_table(toy: str, tmp_path: Path) -> None:
    exp = tmp_path / "toy.yaml"
    exp.write_text(f"""experiment: toy
description: one-file method
out_dir: {tmp_path / "runs"}
primary_metric: fgsm
defaults: {{dataset: "synthetic:8x8x1:2", model: small-cnn, width: 4, epochs: 1, train_subset: 64,
           test_subset: 32, batch_size: 32, progress: false, tensorboard: false}}
stages:
  - {{name: toy, row: Toy, config: {{method: {toy}, toy_scale: 2}}}}
  - {{name: plain, row: Standard, config: {{method: standard}}}}
evaluation:
  - {{attacks: [clean, fgsm], n: 32}}
""")
    assert main(["run", str(exp)]) == 0
    run = tmp_path / "runs" / "toy"
    meta = (run / "meta.json").read_text()
    assert '"method": "toy-one-file"' in meta and '"status": "finished"' in meta
    results = (tmp_path / "runs" / "results.md").read_text()
    assert "| Toy |" in results and "toy_scale=2.0" in results
