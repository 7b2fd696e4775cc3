"""Robust teachers from disk: loading one (an igam run or a foreign checkpoint), building the network that
fine-tuning trains (paper 4.1, eq. 6: every weight frozen, a new logit layer for the target classes, an
input adapter in front), and loading a fine-tuned teacher for IGAM, checked against the target task.

Whether a teacher is robust on its own task is checked by igam.evaluate.check_teacher_robustness, called
by the fine-tuning method's set-up, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from igam.errors import IgamError
from igam.files import load_weights, read_json
from igam.method.adapted import AdaptedTeacher
from igam.method.adapters import build_adapter
from igam.models import ImageClassifier, create_model
from igam.runs import Run


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
        run = Run(p)
        status = run.status
        if status not in (None, "finished"):
            raise IgamError(f"Teacher run '{p}' has status '{status}'; finish it (resume=true) first.")
        net = Run.open(p).load_model()
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


def finetune_model(body: ImageClassifier, target_shape: tuple[int, int, int], target_classes: int,
                   adapter: str = "auto", body_bn: str = "eval") -> AdaptedTeacher:
    """Freeze `body`, give it a new logit layer for `target_classes` (eq. 6), put the adapter `adapter`
    from `target_shape` (C, H, W) to the body's input in front. Trainable: the new head and a learned
    adapter only. The new head is initialised from the global torch generator.

    Raises:
        IgamError: for an adapter spec that does not map target_shape to the body's input.
    """
    for p in body.parameters():
        p.requires_grad_(False)
    body.reset_classifier(target_classes)
    t_shape = (body.igam_args["in_chans"], *body.igam_args["input_size"])
    return AdaptedTeacher(build_adapter(adapter, target_shape, t_shape), body, body_bn)


WEAK_TEACHER = 2.0  # a fine-tuned teacher below this multiple of chance accuracy is reported as weak


def frozen_teacher(path: str | Path, target_shape, target_classes: int, bn: str = "eval",
                   log: Callable[[str], Any] = print) -> AdaptedTeacher:
    """A fine-tuned teacher run ready for IGAM: every parameter frozen, checked against the target task.
    A teacher whose recorded clean accuracy on the target task is below WEAK_TEACHER x chance is reported
    through `log` (its input gradients carry little about the task).

    Raises:
        IgamError: not a fine-tuned teacher run, or fine-tuned for another input shape or class count.
    """
    p = Path(path)
    net = Run.open(p).load_model() if p.is_dir() else None
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
    metrics = Run(p).metrics_path
    clean = (read_json(metrics).get("final") or {}).get("clean_acc") if metrics.exists() else None
    if isinstance(clean, int | float) and clean < WEAK_TEACHER / target_classes:
        log(f"igam: WARNING: the fine-tuned teacher {p} reaches only {100 * clean:.1f}% clean accuracy on "
            f"the target task (chance: {100 / target_classes:.1f}%). IGAM matches its input gradients, which "
            "then say little about the task: fine-tune longer or at another finetune_lr (e.g. 0.01), or try "
            "another adapter.")
    net.body_bn = bn
    for p_ in net.parameters():
        p_.requires_grad_(False)
    return net.train()
