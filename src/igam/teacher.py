"""Robust teachers: loading (an igam run or a foreign checkpoint) and fine-tuning on the target task
(paper 4.1, eq. 6): freeze every weight, replace the logit layer with one for the target classes and train
it (and a learned adapter) on natural target images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from igam.adapters import Adapter, build_adapter
from igam.errors import IgamError
from igam.models import ImageClassifier, create_model, model_from_args
from igam.runs import load_weights, read_json


class AdaptedTeacher(nn.Module):
    """`adapter` then a frozen teacher `body` with a new logit layer: f_t(A x + b) (eqs. 15-16).

    With body_bn='eval' (default) the frozen body always runs with its running BatchNorm statistics;
    'train' reproduces the official code, which runs every network with batch statistics.
    """

    def __init__(self, adapter: Adapter, body: ImageClassifier, body_bn: str = "eval"):
        super().__init__()
        self.adapter, self.body, self.body_bn = adapter, body, body_bn
        self.adapter_spec = adapter.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.adapter(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.body_bn == "eval":
            self.body.eval()
        else:  # batch statistics without moving the frozen running averages
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0
        return self

    def get_classifier(self) -> nn.Linear:
        return self.body.get_classifier()

    @property
    def igam_args(self) -> dict[str, Any]:
        a = self.adapter.in_shape
        return {
            "name": f"adapted:{self.body.igam_args['name']}",
            "num_classes": self.body.num_classes,
            "in_chans": a[0],
            "input_size": list(a[1:]),
            "teacher": self.body.igam_args,
            "adapter": self.adapter.spec,
            "body_bn": self.body_bn,
        }


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
        return c, h, w
    except ValueError:
        raise IgamError(f"teacher_in_shape={text!r}: write CxHxW, e.g. 1x28x28.") from None


def load_teacher(path: str | Path, model: str = "", classes: int = 0, in_shape: str = "") -> ImageClassifier:
    """A teacher network: an igam run directory, or a foreign weights file (.safetensors, or .pt/.pth read
    with weights_only=True) with its architecture named (model, classes, in_shape)."""
    p = Path(path)
    if not p.exists():
        raise IgamError(f"Teacher '{path}' does not exist; give a run directory or a weights file.")
    if p.is_dir():
        from igam.train import load_run_model

        meta = read_json(p / "meta.json") if (p / "meta.json").exists() else {}
        if meta.get("status") not in (None, "finished"):
            raise IgamError(
                f"Teacher run '{p}' has status '{meta.get('status')}'; finish it (resume=true) first."
            )
        net = load_run_model(p)
        if isinstance(net, AdaptedTeacher):  # a fine-tuned teacher used again: keep its body
            return net.body
        return net
    if not model or not classes or not in_shape:
        raise IgamError(
            f"'{path}' is a weights file: name its architecture with teacher_model=NAME, "
            "teacher_classes=K and teacher_in_shape=CxHxW (e.g. madry-mnist, 10, 1x28x28)."
        )
    c, h, w = parse_shape(in_shape)
    state = load_weights(p)
    if not isinstance(state, dict):
        raise IgamError(f"'{path}' does not hold a state dict of tensors.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # a foreign checkpoint carries no normalisation buffers: the network then takes [0, 1] pixels as is
    # (as Madry et al.'s models do); an igam-written file restores its own normalisation
    native = "normalize.mean" in state
    net = create_model(
        model, num_classes=classes, in_chans=c, input_size=(h, w), normalize="dataset" if native else "none"
    )
    if not native:
        state.update({k: v for k, v in net.state_dict().items() if k.startswith("normalize.")})
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise IgamError(
            f"'{path}' does not fit a {model} with {classes} classes and input {in_shape}: "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    return net


def check_robustness(run_dir: Path, n: int = 200, log=print) -> float | None:
    """Warn when a teacher run is not robust on its own task: PGD-10 accuracy on n of its test images at the
    usual eps (0.3 MNIST-like, 8/255 otherwise). Returns the accuracy, or None when its data is missing."""
    from igam.attacks.presets import default_eps
    from igam.data import load_data
    from igam.evaluate import data_dir_of, run_attack
    from igam.train import load_run_model

    meta = read_json(run_dir / "meta.json")
    try:
        data = load_data(meta["data"]["dataset"], data_dir_of(run_dir), False, 0, n)
    except IgamError:
        return None
    model = load_run_model(run_dir)
    clean = run_attack(model, data.x_test, data.y_test, "clean")["accuracy"]
    robust = run_attack(model, data.x_test, data.y_test, "pgd10")["accuracy"]
    eps = default_eps(tuple(data.x_test.shape[1:]))[0]
    if robust < 0.05:
        log(
            f"igam: WARNING: the teacher {run_dir} is not robust on its own task: PGD-10 accuracy at eps "
            f"{eps:.3g} is {100 * robust:.1f}% on {len(data.x_test)} test images (clean {100 * clean:.1f}%). "
            "IGAM transfers the teacher's robustness, so expect little; train the teacher with method=pgd-at."
        )
    return robust


def build_finetune_model(cfg, spec) -> AdaptedTeacher:
    """Freeze the teacher, give it a new logit layer for the target classes (eq. 6), put the adapter in
    front. Trainable: the new head and a learned adapter only."""
    if not cfg.teacher:
        raise IgamError("method=finetune needs teacher=RUN_DIR (or a weights file with teacher_model=...).")
    body = load_teacher(cfg.teacher, cfg.teacher_model, cfg.teacher_classes, cfg.teacher_in_shape)
    if Path(cfg.teacher).is_dir() and body is not None:
        check_robustness(Path(cfg.teacher))
    for p in body.parameters():
        p.requires_grad_(False)
    body.reset_classifier(spec.num_classes)
    t_shape = (body.igam_args["in_chans"], *body.igam_args["input_size"])
    adapter = build_adapter(cfg.adapter, spec.shape, t_shape)
    return AdaptedTeacher(adapter, body, cfg.teacher_bn)


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """Re-create the network of a fine-tuned-teacher run from its meta.json (weights loaded by the caller)."""
    args = meta["model"]
    body = model_from_args(args["teacher"])
    body.reset_classifier(args["num_classes"])
    t_shape = (args["teacher"]["in_chans"], *args["teacher"]["input_size"])
    adapter = build_adapter(args["adapter"], (args["in_chans"], *args["input_size"]), t_shape)
    return AdaptedTeacher(adapter, body, args.get("body_bn", "eval"))


def frozen_teacher(path: str | Path, target_shape, target_classes: int, bn: str = "eval") -> AdaptedTeacher:
    """A fine-tuned teacher run ready for IGAM: every parameter frozen, checked against the target task."""
    from igam.train import load_run_model

    p = Path(path)
    net = load_run_model(p) if p.is_dir() else None
    if not isinstance(net, AdaptedTeacher):
        raise IgamError(
            f"teacher={path} is not a fine-tuned teacher. IGAM needs the teacher's logit layer "
            "trained on the target task first: run `igam finetune teacher=ROBUST_RUN "
            "dataset=TARGET` (paper 4.1) and pass that run as teacher=."
        )
    if tuple(net.adapter.in_shape) != tuple(target_shape):
        raise IgamError(
            f"The teacher was fine-tuned for inputs {'x'.join(map(str, net.adapter.in_shape))}, "
            f"but the target data is {'x'.join(map(str, target_shape))}. Fine-tune it on this "
            "dataset first."
        )
    if net.body.num_classes != target_classes:
        raise IgamError(
            f"The teacher's head has {net.body.num_classes} classes, the target task has "
            f"{target_classes}. Fine-tune the teacher on the target dataset first."
        )
    net.body_bn = bn
    for p_ in net.parameters():
        p_.requires_grad_(False)
    return net.train()
