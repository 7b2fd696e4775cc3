"""Transfer through weights: a robust teacher's network trained on the target task.

`finetune` (paper 4.1, eq. 6; Shafahi et al., ICLR 2020): the network is the teacher with a new logit layer
behind an input adapter (igam.teachers.finetune_model), trained with cross-entropy and Adam at
cfg.finetune_lr. `finetune_layers` says how much of it learns: the new head only (`head`, the paper's FT),
the last K weight layers of the body and the head (`last-K`), or every layer (`all`; Shafahi et al. and
Salman et al., NeurIPS 2020, fine-tune the whole robust network), the body at finetune_body_lr x
finetune_lr.

`model=teacher` gives any other method (fast-at, pgd-at, standard, rrm, ...) the same network to train, every
layer of it, starting from the robust teacher's weights (robust initialisation): `teacher_network`. The
teacher's own training is not counted in the run's passes (the premise: the robust model exists).

Set-up checks the teacher on its own task first (igam.teacher_checks): a run directory's robustness
(`check_teacher_robustness`: IGAM transfers the teacher's robustness, so a teacher that has none is worth a
warning), a foreign teacher's clean accuracy on the dataset it was trained on (`check_foreign_teacher`,
teacher_dataset: near chance means its weights are read wrongly, and is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from igam.data import default_data_dir
from igam.errors import IgamError
from igam.method.adapted import AdaptedTeacher
from igam.models import shipped
from igam.objectives.base import Objective, Passes, count, register_objective
from igam.registry import Key
from igam.runs import init_model_from
from igam.teacher_checks import check_foreign_teacher, check_shipped_teacher, check_teacher_robustness
from igam.teachers import finetune_model, load_teacher, teacher_architecture
from igam.units import positive


class Finetune(Objective):
    """Cross-entropy of the fine-tuned teacher (eq. 6), with Adam at cfg.finetune_lr (the body's layers, when
    they learn, at finetune_body_lr x finetune_lr)."""

    name = "finetune"

    def __init__(self, learned_adapter: bool = False, body_learns: bool = False, body_lr: float = 1.0):
        super().__init__()
        self.learned_adapter, self.body_learns, self.body_lr = learned_adapter, body_learns, body_lr

    def own_passes(self, step: int) -> Passes:
        """The trained network is the teacher with a new head: a teacher forward per image, and a backward
        through it when the body or the adapter in front of it learns (a new head's own backward is a single
        linear layer, not counted; a backward that stops after the last K layers counts as a whole one)."""
        return {"teacher": count(1, 1 if self.learned_adapter or self.body_learns else 0)}

    def optimizer_settings(self, cfg: Any) -> tuple[str, float]:
        return "adam", cfg.finetune_lr

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        """The body's parameters learn at finetune_body_lr x the head's rate."""
        body = getattr(model, "body", None)
        if body is None or self.body_lr == 1.0:
            return {}
        head = {id(p) for p in body.get_classifier().parameters()}
        return {id(p): self.body_lr for p in body.parameters() if id(p) not in head}


def weight_layers(body: nn.Module) -> list[list[nn.Parameter]]:
    """The body's layers that carry weights, in forward order (module registration order), each a list of
    parameters: a convolution or linear layer together with the normalisation layers that follow it; the
    logit layer is the last."""
    layers: list[list[nn.Parameter]] = []
    for m in body.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, nn.Conv2d | nn.Linear | nn.ConvTranspose2d) or not layers:
            layers.append(own)
        else:  # BatchNorm / LayerNorm / ... belong to the weight layer before them
            layers[-1].extend(own)
    return layers


def parse_layers(text: str) -> int | None:
    """finetune_layers: 'head' -> 0, 'last-K' -> K, 'all' -> None (every layer).

    Raises:
        IgamError: anything else, naming the three forms.
    """
    t = str(text).strip().lower()
    if t == "head":
        return 0
    if t == "all":
        return None
    if t.startswith("last-") and t[5:].isdigit() and int(t[5:]) >= 1:
        return int(t[5:])
    raise IgamError(f"finetune_layers={text!r}: write head (the new logit layer only, paper eq. 6), last-K "
                    "(the last K weight layers of the body and the head, e.g. last-2) or all (every layer).")


def unfreeze(net: AdaptedTeacher, layers: int | None) -> None:
    """Let the last `layers` weight layers of net's body learn (None: every layer; 0: the head only, as
    finetune_model leaves it), and the body run as a trained network (its own train/eval mode) when any
    body layer learns."""
    groups = weight_layers(net.body)[:-1]  # the head is the last and learns already
    chosen = groups if layers is None else groups[len(groups) - layers:] if layers else []
    for params in chosen:
        for p in params:
            p.requires_grad_(True)
    if chosen:
        net.frozen = False


# keys that describe a foreign teacher (a weights file); a run or a shipped teacher records its own
FILE_TEACHER_KEYS = ("teacher_model", "teacher_classes", "teacher_in_shape", "teacher_width",
                     "teacher_normalize", "teacher_dataset")


def teacher_body(cfg: Any) -> Any:
    """cfg.teacher's network (a run directory, a shipped `igam:NAME`, a weights file named by teacher_model /
    teacher_classes / teacher_in_shape, or robustbench:...), checked on its own task first (a run:
    robustness; a shipped teacher: its certified clean accuracy; a foreign teacher: clean accuracy on
    cfg.teacher_dataset).

    Raises:
        IgamError: no teacher given, one that cannot be loaded, foreign-teacher keys given for a teacher that
            records its own, or a foreign teacher that does not fit teacher_dataset or is near chance on it.
    """
    if not cfg.teacher:
        raise IgamError(f"{'model=teacher' if cfg.model == 'teacher' else 'method=finetune'} needs "
                        "teacher=RUN_DIR, teacher=igam:NAME (a shipped teacher: `igam models`) or a weights "
                        "file with teacher_model=....")
    own = str(cfg.teacher).startswith(shipped.PREFIX) or Path(cfg.teacher).is_dir()
    given = [k for k in (*FILE_TEACHER_KEYS, "teacher_dir") if getattr(cfg, k)]  # teacher_dir: robustbench:
    if own and given:  # they would be ignored: say so rather than fine-tune something else than meant
        what = "a shipped teacher" if str(cfg.teacher).startswith(shipped.PREFIX) else "an igam run"
        raise IgamError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for a teacher weights "
                        f"file (teacher_dir: for a robustbench: teacher); teacher={cfg.teacher} is {what}, "
                        "which records its own architecture, classes, input shape, normalisation and "
                        f"dataset. Drop {' and '.join(given)}.")
    root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    body = load_teacher(cfg.teacher, cfg.teacher_model, cfg.teacher_classes, cfg.teacher_in_shape,
                        normalize=cfg.teacher_normalize, width=cfg.teacher_width,
                        teacher_dir=cfg.teacher_dir or root / "robustbench")
    if str(cfg.teacher).startswith(shipped.PREFIX):
        check_shipped_teacher(cfg.teacher, root)
    elif Path(cfg.teacher).is_dir():
        check_teacher_robustness(Path(cfg.teacher))
    else:  # a weights file or robustbench: its own task is teacher_dataset (implied for robustbench)
        check_foreign_teacher(body, str(cfg.teacher), cfg.teacher_dataset, root)
    return body


def build_finetune_model(cfg: Any, spec: Any) -> AdaptedTeacher:
    """The network `igam finetune` trains: cfg.teacher's network (teacher_body), with a new head for
    spec.num_classes behind the adapter cfg.adapter; the head (and a learned adapter) learns, and the last
    layers of the body as cfg.finetune_layers says.

    Raises:
        IgamError: see teacher_body; a malformed finetune_layers.
    """
    layers = parse_layers(cfg.finetune_layers)
    net = finetune_model(teacher_body(cfg), spec.shape, spec.num_classes, cfg.adapter, cfg.teacher_bn)
    unfreeze(net, layers)
    return net


def teacher_network(cfg: Any, spec: Any) -> AdaptedTeacher:
    """`model=teacher`: cfg.teacher's network behind cfg.adapter with a new head for spec.num_classes, every
    layer learning from the robust teacher's weights (the head from a fresh initialisation), trained by
    whatever method the config names; init_from loads a run of the same network over it (e.g. the
    fine-tuned teacher, whose head is trained already).

    Raises:
        IgamError: see teacher_body; an init_from run of another network.
    """
    net = finetune_model(teacher_body(cfg), spec.shape, spec.num_classes, cfg.adapter, cfg.teacher_bn)
    unfreeze(net, None)
    if cfg.init_from:
        init_model_from(net, cfg.init_from)
    return net


def finetune_model_name(cfg: Any, planned: Mapping[str, str]) -> str:
    """`adapted:BODY`, BODY the teacher's architecture (igam.teachers.teacher_architecture), as the
    fine-tuned teacher's meta.json names it; '' when the teacher's architecture cannot be told yet."""
    body = teacher_architecture(cfg.teacher, cfg.teacher_model, planned)
    return f"adapted:{body}" if body else ""


def _learning_rate(value: float, key: str) -> None:
    if value == 0:
        raise IgamError(f"{key}=0 makes every training step a no-op (the weights never change); give a "
                        f"positive {key}.")
    positive(value, key)


def _check_layers(value: str, key: str) -> None:
    parse_layers(value)


@register_objective(
    "finetune", help="a robust teacher's network on the target task: its new logit layer (paper eq. 6; `igam "
    "finetune`), or more layers with finetune_layers=last-K|all (Shafahi et al. 2020)",
    reads=("teacher", "finetune"), summary=("finetune_layers", "finetune_lr", "finetune_body_lr"),
    cost=lambda cfg: 0.6 if parse_layers(cfg.finetune_layers) == 0 else 1.0,
    build_model=build_finetune_model, model_name=finetune_model_name,
    keys=(Key("finetune_lr", 3e-3, "Adam learning rate of the new logit layer (and learned adapter); past a "
              "point a higher one (or more epochs) buys the fine-tuned teacher clean accuracy with its "
              "robustness: 3e-3 balances them (measured: docs/RESULTS.md; the official code: 1e-3)",
              "finetune", check=_learning_rate),
          Key("finetune_layers", "head", "which layers of the teacher learn: head (the new logit layer only, "
              "paper eq. 6) | last-K (the last K weight layers of the body too) | all (every layer, Shafahi "
              "et al. 2020)", "finetune", check=_check_layers),
          Key("finetune_body_lr", 0.1, "learning rate of the body's layers that learn, as a multiple of "
              "finetune_lr (smaller: the robust features move less)", "finetune", check=positive)))
def make_finetune(cfg: Any, model: nn.Module, spec: Any, device: Any) -> Finetune:
    adapter = getattr(model, "adapter", None)
    body_learns = not getattr(model, "frozen", True)
    return Finetune(adapter is not None and any(p.requires_grad for p in adapter.parameters()), body_learns,
                    float(cfg.finetune_body_lr))
