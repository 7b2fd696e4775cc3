"""Fine-tuning a robust teacher on the target task (paper 4.1, eq. 6): the network is the frozen teacher
with a new logit layer behind an input adapter (igam.teachers.finetune_model); the objective is plain
cross-entropy, trained with Adam at cfg.finetune_lr.

Set-up checks the teacher on its own task first: a run directory's robustness
(igam.evaluate.check_teacher_robustness: IGAM transfers the teacher's robustness, so a teacher that has
none is worth a warning), a foreign teacher's clean accuracy on the dataset it was trained on
(igam.evaluate.check_foreign_teacher, teacher_dataset: near chance means its weights are read wrongly, and
is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from igam.data import default_data_dir
from igam.errors import IgamError
from igam.evaluate import check_foreign_teacher, check_shipped_teacher, check_teacher_robustness
from igam.method.adapted import AdaptedTeacher
from igam.models import shipped
from igam.objectives.base import Objective, Passes, count, register_objective
from igam.teachers import finetune_model, load_teacher, teacher_architecture


class Finetune(Objective):
    """Cross-entropy of the fine-tuned teacher's new head (eq. 6), with Adam at cfg.finetune_lr."""

    name = "finetune"

    def __init__(self, learned_adapter: bool = False):
        super().__init__()
        self.learned_adapter = learned_adapter

    def passes(self, step: int) -> Passes:
        """The trained network is the frozen teacher with a new head: a teacher forward per image, and a
        backward through it only when the adapter in front of it learns (a new head's own backward is a
        single linear layer, not counted)."""
        return {"teacher": count(1, 1 if self.learned_adapter else 0)}

    def optimizer_settings(self, cfg: Any) -> tuple[str, float]:
        return "adam", cfg.finetune_lr


# keys that describe a foreign teacher (a weights file); a run or a shipped teacher records its own
FILE_TEACHER_KEYS = ("teacher_model", "teacher_classes", "teacher_in_shape", "teacher_width",
                     "teacher_normalize", "teacher_dataset")


def build_finetune_model(cfg: Any, spec: Any) -> AdaptedTeacher:
    """The network `igam finetune` trains: cfg.teacher (a run directory, a shipped `igam:NAME`, a weights file
    named by teacher_model / teacher_classes / teacher_in_shape, or robustbench:...), checked on its own task
    first (a run: robustness; a shipped teacher: its certified clean accuracy; a foreign teacher: clean
    accuracy on cfg.teacher_dataset), frozen, with a new head for spec.num_classes behind the adapter
    cfg.adapter.

    Raises:
        IgamError: no teacher given, one that cannot be loaded or adapted, or a foreign teacher that does
            not fit teacher_dataset or is near chance on it.
    """
    if not cfg.teacher:
        raise IgamError("method=finetune needs teacher=RUN_DIR, teacher=igam:NAME (a shipped teacher: `igam "
                        "models`) or a weights file with teacher_model=....")
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
    return finetune_model(body, spec.shape, spec.num_classes, cfg.adapter, cfg.teacher_bn)


def finetune_model_name(cfg: Any, planned: Mapping[str, str]) -> str:
    """`adapted:BODY`, BODY the teacher's architecture (igam.teachers.teacher_architecture), as the
    fine-tuned teacher's meta.json names it; '' when the teacher's architecture cannot be told yet."""
    body = teacher_architecture(cfg.teacher, cfg.teacher_model, planned)
    return f"adapted:{body}" if body else ""


@register_objective("finetune", build_model=build_finetune_model, model_name=finetune_model_name)
def make_finetune(cfg: Any, model: nn.Module, spec: Any, device: Any) -> Finetune:
    adapter = getattr(model, "adapter", None)
    return Finetune(adapter is not None and any(p.requires_grad for p in adapter.parameters()))
