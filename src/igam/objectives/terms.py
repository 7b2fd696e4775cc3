"""Teacher terms: what a robust teacher adds to a student's loss, as parts any method can carry.

    feature    RRM (Vaishnavi, Eykholt & Rahmati, USENIX Security 2022): feature_weight x
               (1 - cos(P phi_s(x), phi_t(x))) on clean images, phi the penultimate features (or the layers
               feature_layer / teacher_feature_layer name), P a linear map learned with the student when
               the two sizes differ (the identity when they agree)
    gradient   IGAM's L_diff without the discriminator (paper eq. 13): lambda_diff x ||J_s - J_t||^2, or
               x (1 - cos(J_s, J_t)) with diff_loss=cos, on clean images (exact double backprop)
    distill    soft labels (ARD's term, Goldblum et al. AAAI 2020): distill_weight x T^2 KL(softmax(f_t(x)/T)
               || softmax(f_s(x')/T)) with x' the points the step trains on (x, or its adversarial points)

`teacher_term=feature|gradient|distill` adds one to an adversarial method's loss (fast-at, pgd-at, trades,
n-fgsm, free-at): teacher-guided cheap adversarial training by configuration. `rrm` (objectives/rrm.py) is
the cross-entropy with the feature term. The teacher is cfg.teacher: a fine-tuned teacher run (its new head
trained on the target task: `igam finetune`), or, for the feature term, also any robust model behind
cfg.adapter (its head is not used). What the teacher computes for a training image is cached when it
cannot change between epochs (teacher_cache, as IGAM's teacher gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.method.adapted import AdaptedTeacher
from igam.method.teacher_cache import TeacherGradientCache
from igam.objectives.base import Metrics, Passes, TeacherTerm, count, register_keys
from igam.objectives.igam import MATCHING, build_matching, check_double_backward, teacher_cache_decision
from igam.registry import Key
from igam.runs import Run
from igam.teachers import finetune_model, frozen_teacher, load_teacher
from igam.units import non_negative, positive
from igam.utils import bn_mode, unwrap

TERMS = ("none", "feature", "gradient", "distill")

register_keys(
    Key(
        "teacher_term",
        "none",
        "a teacher term added to an adversarial method's loss: none | feature (RRM's "
        "feature matching, feature_weight) | gradient (IGAM's L_diff, lambda_diff, diff_loss) | distill "
        "(soft "
        "labels, distill_weight, distill_temperature); docs/METHODS.md",
        "transfer",
        TERMS,
    ),
    Key(
        "feature_weight",
        1.0,
        "rrm and the feature term: weight of 1 - cos(P phi_s(x), phi_t(x)) (RRM's alpha)",
        "transfer",
        check=non_negative,
    ),
    Key(
        "feature_layer",
        "penultimate",
        "the student's layer whose output is matched: penultimate (the input "
        "of the logit layer) or a module name (`igam models` networks: e.g. features.4); flattened",
        "transfer",
    ),
    Key(
        "teacher_feature_layer",
        "penultimate",
        "the teacher's layer matched (penultimate, or a module name inside the teacher's network)",
        "transfer",
    ),
    Key(
        "distill_weight",
        1.0,
        "the distill term: weight of T^2 KL(teacher || student) on the points the step trains on",
        "transfer",
        check=non_negative,
    ),
    Key("distill_temperature", 1.0, "the distill term: softmax temperature T", "transfer", check=positive),
)


# ------------------------------------------------------------------------------------------- features
def _layer(net: nn.Module, name: str, what: str) -> tuple[nn.Module, bool]:
    """(module, take its input) for a feature layer: penultimate = the logit layer's input."""
    if name == "penultimate":
        get = getattr(net, "get_classifier", None)
        if get is None:
            raise IgamError(
                f"{what} has no logit layer to take the penultimate features from; name a layer "
                "(a module name of the network)."
            )
        return get(), True
    modules = dict(net.named_modules())
    if name not in modules:
        names = [n for n in modules if n][:12]
        raise IgamError(
            f"{what} has no layer '{name}'. Give penultimate or a module name, e.g. "
            f"{', '.join(names)}{' ...' if len(modules) > 13 else ''}."
        )
    return modules[name], False


@contextlib.contextmanager
def capture(net: nn.Module, name: str, what: str) -> Iterator[Callable[[], torch.Tensor]]:
    """Within the block, the features (B, D) of net's layer `name` from its latest forward pass, flattened:
    `with capture(model, 'penultimate', 'the student') as phi: logits = model(x); f = phi()`.

    Raises:
        IgamError: a layer the network lacks.
    """
    module, take_input = _layer(unwrap(net), name, what)
    seen: list[torch.Tensor] = []

    def hook(_m, inputs, output=None):
        seen[:] = [(inputs[0] if take_input else output).flatten(1)]

    handle = module.register_forward_pre_hook(hook) if take_input else module.register_forward_hook(hook)

    def latest() -> torch.Tensor:
        if not seen:
            raise IgamError(f"{what}'s layer '{name}' was not reached by its forward pass.")
        return seen[0]

    try:
        yield latest
    finally:
        handle.remove()


def teacher_for_features(cfg: Any, spec: Any, device: torch.device) -> AdaptedTeacher:
    """The teacher whose features the student matches: a fine-tuned teacher run as it is, or any robust
    model (run, igam:NAME, weights file, robustbench:...) behind cfg.adapter (its head is not used), frozen.

    Raises:
        IgamError: no teacher, or one that cannot be loaded or adapted to the target inputs.
    """
    if not cfg.teacher:
        raise IgamError(
            f"method={cfg.method} needs teacher=: a robust model (a run, igam:NAME, a weights file "
            "or robustbench:...) whose features the student matches."
        )
    p = Path(str(cfg.teacher))
    if p.is_dir() and (p / Run.META).is_file() and isinstance(Run.open(p).load_model(), AdaptedTeacher):
        net = frozen_teacher(
            cfg.teacher,
            spec.shape,
            spec.num_classes,
            cfg.teacher_bn,
            class_names=spec.class_names,
            dataset=spec.dataset,
        )
    else:
        body = load_teacher(
            cfg.teacher,
            cfg.teacher_model,
            cfg.teacher_classes,
            cfg.teacher_in_shape,
            normalize=cfg.teacher_normalize,
            teacher_dir=cfg.teacher_dir,
        )
        net = finetune_model(body, spec.shape, max(2, spec.num_classes), cfg.adapter, cfg.teacher_bn)
        for q in net.parameters():
            q.requires_grad_(False)
    return net.to(device).train()


class FeatureMatching(TeacherTerm):
    """weight x mean_i (1 - cos(P phi_s(x_i), phi_t(x_i))) (RRM's loss beside the cross-entropy), phi the
    flattened output of the named layers, P: nn.Linear(D_s, D_t, no bias) learned with the student when
    D_s != D_t, else the identity. Teacher features are computed under no_grad (and cached per training
    image with `cache`)."""

    name = "feature"

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        shape: tuple[int, ...],
        weight: float = 1.0,
        layer: str = "penultimate",
        teacher_layer: str = "penultimate",
        cache: bool = False,
    ):
        super().__init__()
        self._teacher = (teacher,)  # a plain attribute: the frozen teacher is not saved with the objective
        self.weight, self.layer, self.teacher_layer = float(weight), layer, teacher_layer
        self.cache = TeacherGradientCache() if cache else None
        probe = torch.full((2, *shape), 0.5, device=next(teacher.parameters()).device)
        d_t = self.teacher_features(probe).shape[1]
        with torch.no_grad(), bn_mode(unwrap(student), "eval"), capture(student, layer, "the student") as phi:
            student(probe)
            d_s = phi().shape[1]
        self.projection = nn.Linear(d_s, d_t, bias=False) if d_s != d_t else None
        self.sizes = (d_s, d_t)
        self.steps_per_epoch = 0
        self._project = (self.projection,)  # what the step calls: the projection, or its DDP wrapper

    @property
    def needs_index(self) -> bool:  # type: ignore[override]
        return self.cache is not None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """phi_t(x) (B, D_t), detached."""
        with capture(self.teacher, self.teacher_layer, "the teacher") as phi:
            self.teacher(x)
            return phi().detach().float()

    def targets(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.cache is not None and index is not None:
            return self.cache.lookup(index, x, y, lambda xb, _yb: self.teacher_features(xb))
        return self.teacher_features(x)

    def match(
        self, phi_s: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, Metrics]:
        """(weight x (1 - mean cos), {feature_cos}) for the student's features phi_s (B, D_s) of x."""
        phi_t = self.targets(x, y, index)
        proj = self._project[0](phi_s.float()) if self.projection is not None else phi_s.float()
        cos = F.cosine_similarity(proj, phi_t, dim=1, eps=1e-8)
        loss = 1 - cos.mean()
        return self.weight * loss, {"feature_loss": loss.detach(), "feature_cos": cos.detach().mean()}

    def forward(self, model, x, y, *, step, index=None, x_train=None, logits=None):
        """The term beside another method's loss: a student forward pass at the clean x of its own."""
        with capture(model, self.layer, "the student") as phi:
            model(x)
            return self.match(phi(), x, y, index)

    def passes(self, step: int) -> Passes:
        """Beside another method: the student at the clean x (a forward and a backward) and the teacher's
        forward (see FeatureMatching.teacher_passes)."""
        return {"student": count(1, 1), **self.teacher_passes(step)}

    def teacher_passes(self, step: int) -> Passes:
        """The teacher's forward per image; with the cache, in the first epoch only."""
        cached = self.cache is not None and step >= self.steps_per_epoch
        return {} if cached else {"teacher": count(1, 0)}

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        self.steps_per_epoch = steps_per_epoch

    def co_trained(self) -> list[nn.Module]:
        return [self.projection] if self.projection is not None else []

    def wrap_for_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Under torchrun the projection's gradient is averaged over ranks through its own DDP wrapper."""
        if self.projection is not None:
            self._project = (wrap(self.projection),)

    @torch.no_grad()
    def eval_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The mean feature cosine on held-out images (eval mode)."""
        with capture(model, self.layer, "the student") as phi:
            model(x)
            _, m = self.match(phi(), x, y, None)
        return {"feature_cos": float(m["feature_cos"])}


def feature_term(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> FeatureMatching:
    teacher = teacher_for_features(cfg, spec, device)
    cache, _ = teacher_cache_decision(cfg, spec, teacher)
    return FeatureMatching(
        teacher, model, spec.shape, cfg.feature_weight, cfg.feature_layer, cfg.teacher_feature_layer, cache
    ).to(device)


# ------------------------------------------------------------------------------------ input gradients
class GradientMatching(TeacherTerm):
    """lambda_diff x L_diff (IGAM's eq. 13 without the discriminator, l2 or cos) at the clean images, by
    exact double backprop (igam.method.matching.InputGradientMatching with the cross-entropy left out)."""

    name = "gradient"
    needs_double_backward = True

    def __init__(self, matching: nn.Module):
        super().__init__()
        self.matching = matching
        self.steps_per_epoch = 0

    @property
    def needs_index(self) -> bool:  # type: ignore[override]
        return self.matching.teacher_cache is not None

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        self.steps_per_epoch = steps_per_epoch

    def forward(self, model, x, y, *, step, index=None, x_train=None, logits=None):
        terms = self.matching(model, x, y, index)
        loss = terms.pop("loss")
        return loss, {
            k: v for k, v in terms.items() if k in ("l_diff", "cos_js_jt", "js_norm", "lambda_diff")
        }

    def passes(self, step: int) -> Passes:
        """The student at x with its input gradient and the double backward through it; the teacher's input
        gradient (first epoch only with the cache)."""
        cached = self.matching.teacher_cache is not None and step >= self.steps_per_epoch
        return {"student": count(1, 1, 1), **({} if cached else {"teacher": count(1, 1)})}

    def eval_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return self.matching.held_out_metrics(model, x, y)


def gradient_term(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> GradientMatching:
    if cfg.grad_matching != "exact":
        raise IgamError(
            "teacher_term=gradient needs grad_matching=exact (the finite-difference surrogate "
            "carries the cross-entropy's gradient, which the adversarial loss already has)."
        )
    check_double_backward(model, spec.shape, device)
    return GradientMatching(
        build_matching(cfg, spec, device, use_teacher=True, lambda_adv=0.0, include_ce=False)
    )


# ---------------------------------------------------------------------------------------- soft labels
def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (Hinton et al. 2015's
    T^2 keeps the gradient's scale independent of T). Logits (B, K); a scalar."""
    log_ps = F.log_softmax(student_logits.float() / t, 1)
    log_pt = F.log_softmax(teacher_logits.float() / t, 1)
    return t * t * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


class SoftLabels(TeacherTerm):
    """weight x T^2 KL(softmax(f_t(x)/T) || softmax(f_s(x')/T)): the student at the points the step trains
    on, x' (its logits there are reused: no pass of its own), the teacher at the clean x (no_grad; cached
    per training image with `cache`)."""

    name = "distill"

    def __init__(
        self, teacher: nn.Module, weight: float = 1.0, temperature: float = 1.0, cache: bool = False
    ):
        super().__init__()
        self._teacher = (teacher,)
        self.weight, self.temperature = float(weight), float(temperature)
        self.cache = TeacherGradientCache() if cache else None
        self.steps_per_epoch = 0

    @property
    def needs_index(self) -> bool:  # type: ignore[override]
        return self.cache is not None

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        self.steps_per_epoch = steps_per_epoch

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """f_t(x) (B, K), detached (from the cache when it holds them)."""

        def compute(xb: torch.Tensor, _yb: torch.Tensor) -> torch.Tensor:
            return self._teacher[0](xb).detach().float()

        if self.cache is not None and index is not None:
            return self.cache.lookup(index, x, y, compute)
        return compute(x, y)

    def forward(self, model, x, y, *, step, index=None, x_train=None, logits=None):
        kl = soft_label_kl(logits, self.teacher_logits(x, y, index), self.temperature)
        return self.weight * kl, {"distill_kl": kl.detach()}

    def passes(self, step: int) -> Passes:
        cached = self.cache is not None and step >= self.steps_per_epoch
        return {} if cached else {"teacher": count(1, 0)}


def fine_tuned_teacher(cfg: Any, spec: Any, device: torch.device) -> AdaptedTeacher:
    """cfg.teacher as a frozen fine-tuned teacher of this task (its head answers for the target classes).

    Raises:
        IgamError: no teacher, or one not fine-tuned on this task (igam.teachers.frozen_teacher).
    """
    if not cfg.teacher:
        raise IgamError(
            f"method={cfg.method} with soft labels needs teacher=RUN_DIR: a robust teacher fine-tuned "
            "on this dataset (`igam finetune teacher=ROBUST dataset=...`)."
        )
    return frozen_teacher(
        cfg.teacher,
        spec.shape,
        spec.num_classes,
        cfg.teacher_bn,
        class_names=spec.class_names,
        dataset=spec.dataset,
    ).to(device)


def distill_term(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> SoftLabels:
    teacher = fine_tuned_teacher(cfg, spec, device)
    return SoftLabels(
        teacher, cfg.distill_weight, cfg.distill_temperature, teacher_cache_decision(cfg, spec, teacher)[0]
    )


# --------------------------------------------------------------------------------------- composition
BUILDERS: dict[str, Callable[..., TeacherTerm]] = {
    "feature": feature_term,
    "gradient": gradient_term,
    "distill": distill_term,
}
TERM_KEYS = {
    "feature": ("teacher", "feature_weight", "feature_layer", "teacher_feature_layer", "teacher_cache"),
    "gradient": ("teacher", *MATCHING),
    "distill": ("teacher", "distill_weight", "distill_temperature", "teacher_cache"),
}
TERM_COST = {"feature": 1.3, "gradient": 2.5, "distill": 0.3}  # a step's extra time, in standard steps


def build_term(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> TeacherTerm | None:
    """The teacher term cfg.teacher_term names, for the student `model` (None for none).

    Raises:
        IgamError: a term whose teacher is missing or does not fit the task.
    """
    if cfg.teacher_term == "none":
        return None
    return BUILDERS[cfg.teacher_term](cfg, model, spec, device).to(device)


def term_reads(cfg: Any) -> tuple[str, ...]:
    """The keys cfg's teacher term reads (every term's when cfg is None)."""
    if cfg is None:
        return tuple(k for keys in TERM_KEYS.values() for k in keys)
    return TERM_KEYS.get(cfg.teacher_term, ())


def term_cost(cfg: Any) -> float:
    """The teacher term's rough step cost in standard steps, for `igam run --dry-run`."""
    return TERM_COST.get(cfg.teacher_term, 0.0)
