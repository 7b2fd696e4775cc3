"""What a training step optimises. The one training loop (igam.train) calls, per batch:

    loss, metrics, aux = objective.loss(model, x, y, step)   # scalar whose .backward() gives every gradient
                                                             # (+ index=... when objective.needs_index)
    ... loop: zero_grad, loss.backward(), clip, optimizer.step() ...
    metrics |= objective.after_step(model, x, y, step, aux)  # e.g. a discriminator update every k steps

`aux` is whatever the step hands on to its own after_step (IGAM: the step's detached gradient maps); the
loop never looks inside. An objective is an nn.Module so its own networks (a discriminator, a learned
adapter) are saved and resumed with the run; `extra_state()` / `load_extra_state()` carry its optimisers.

An objective also declares what the loop must provide instead of the loop testing method names:
`needs_double_backward` (the student's loss differentiates an input gradient: no torch.compile of the
student), `needs_fp32` (finite differences: TF32 off on CUDA), `backprops_twice` (the pass at x is
backpropagated twice: compiled backwards must keep their buffers), `optimizer_settings(cfg)` (which
optimiser and base lr), `needs_index` (the loop passes `index=`, the (B,) int64 training-set positions of
the batch's images on the CPU, to `loss`: e.g. IGAM's teacher-gradient cache is keyed by it; objectives
that leave it False keep the four-argument `loss`), and, through `register_objective(name,
build_model=...)`, the network it trains.

Two more declarations shape the loop and its records: `replays` (each minibatch is trained on that many
steps in a row: free adversarial training) and `passes(step)`, the forward and backward passes one step
costs per training image, by network (student, teacher, discriminator) and kind (forward, backward,
double_backward), which `count_passes` sums over a run into the machine-independent cost every run
records (meta.json, metrics.json: `passes_per_image`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.config import core_keys
from igam.errors import IgamError, suggest
from igam.registry import OBJECTIVES, Key, MethodInfo, add_keys, add_method

Metrics = dict[str, torch.Tensor]
Passes = dict[str, dict[str, float]]  # network -> kind -> passes per training image

NETWORKS = ("student", "teacher", "discriminator")
PASS_KINDS = ("forward", "backward", "double_backward")


def count(forward: float = 0, backward: float = 0, double_backward: float = 0) -> dict[str, float]:
    """One network's passes per training image in a step: forward, (first-order) backward, and backward
    through a graph that holds a backward (double backprop), each counted as a pass over the image."""
    return {"forward": forward, "backward": backward, "double_backward": double_backward}


def add_passes(a: Passes, b: Passes) -> Passes:
    """The passes of two parts of a step, network by network and kind by kind."""
    out = {net: dict(kinds) for net, kinds in a.items()}
    for net, kinds in b.items():
        for kind, v in kinds.items():
            out.setdefault(net, {})
            out[net][kind] = out[net].get(kind, 0) + v
    return out


class TeacherTerm(nn.Module):
    """A loss term that pulls the student towards a robust teacher, added to an objective's loss by
    configuration (`teacher_term=`; implementations in igam.objectives.terms).

    `forward(model, x, y, step=, index=, x_train=, logits=)` returns (weighted scalar loss, scalar
    metrics) for the clean batch x (B, C, H, W) in [0, 1], labels y (B,), the points the step trains on
    `x_train` (x, or adversarial points) and the student's logits there `logits` (B, K), which a term
    may reuse instead of a forward pass of its own."""

    name = "term"
    needs_double_backward = False
    needs_index = False

    def passes(self, step: int) -> Passes:
        """The term's own passes per training image at this step (beyond the objective's)."""
        return {}

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        pass

    def eval_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {}

    def co_trained(self) -> list[nn.Module]:
        return []

    def wrap_for_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        pass


class Objective(nn.Module):
    """Base class: plain cross-entropy (standard training)."""

    name = "standard"
    needs_fp32 = False
    backprops_twice = False
    replays = 1  # steps each minibatch is trained on in a row (free-at: m)

    def __init__(self) -> None:
        super().__init__()
        self.term: TeacherTerm | None = None  # a teacher term added to this objective's loss (with_term)

    def with_term(self, term: TeacherTerm | None) -> Objective:
        """Add `term` (a TeacherTerm: feature, input-gradient or soft-label matching against a robust
        teacher) to this objective's loss; its passes, metrics and networks join the objective's."""
        self.term = term  # registered as a submodule: its learned parts are saved with the objective
        return self

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             step: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics, Any]:
        """(scalar loss, scalar metrics, aux for after_step) for a batch x (B, C, H, W) float in [0, 1],
        y (B,) int64, at training step `step` (0-based). `index` (B,) int64 on the CPU: which training
        images (positions in the training set) the batch holds; the loop passes it only to an objective
        whose `needs_index` is True, and it is None wherever the images have no training-set position.
        Standard training: CE(f(x), y), plus the teacher term if one is added."""
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        metrics = {"ce": ce.detach(), "acc": (logits.argmax(1) == y).float().mean()}
        return *self.add_term(ce, metrics, model, x, y, step, index, x_train=x, logits=logits), None

    def add_term(self, loss: torch.Tensor, metrics: Metrics, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor, step: int, index: torch.Tensor | None, *, x_train: torch.Tensor,
                 logits: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """loss + the teacher term's loss (and its metrics), or loss as it is without a term. `x_train` are
        the points the step trained on (x, or the adversarial points) and `logits` the student's logits
        there, which a term may reuse."""
        if self.term is None:
            return loss, metrics
        extra, more = self.term(model, x, y, step=step, index=index, x_train=x_train, logits=logits)
        return loss + extra, {**metrics, **more}

    def own_passes(self, step: int) -> Passes:
        """The passes of the objective itself, without its teacher term (see `passes`)."""
        return {"student": count(1, 1)}

    def passes(self, step: int) -> Passes:
        """Forward/backward passes per training image that step `step` costs, by network (NETWORKS) and
        kind (PASS_KINDS); networks left out cost nothing: `own_passes` (standard training: one forward
        and one backward of the student) plus the teacher term's."""
        own = self.own_passes(step)
        return add_passes(own, self.term.passes(step)) if self.term is not None else own

    @property
    def needs_index(self) -> bool:  # type: ignore[override]
        """Whether `loss` takes `index` (a teacher term with a per-image cache needs it)."""
        return self.term is not None and self.term.needs_index

    @property
    def needs_double_backward(self) -> bool:  # type: ignore[override]
        return self.term is not None and self.term.needs_double_backward

    def co_trained(self) -> list[nn.Module]:
        """Modules of the objective whose parameters the loop's optimiser trains with the student's (e.g.
        a learned projection of the student's features); their gradients come from the same backward."""
        return self.term.co_trained() if self.term is not None else []

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        """Called once before the loop with the run's length (for schedules such as igam_start) and this
        process's rank (for per-rank random streams)."""
        if self.term is not None:
            self.term.begin(total_steps, steps_per_epoch, rank)

    def optimizer_settings(self, cfg: Any) -> tuple[str, float]:
        """(optimizer name 'sgd' | 'adam', base learning rate) the loop trains the model with."""
        return cfg.optimizer, cfg.lr

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        """{id(parameter): multiple of the base learning rate} for parameters of `model` that learn at
        another rate (e.g. a fine-tuned body); {} for one rate."""
        return {}

    def eval_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Extra held-out metrics at each evaluation (eval mode), e.g. cos(J_s, J_t)."""
        return self.term.eval_metrics(model, x, y) if self.term is not None else {}

    def after_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, aux: Any) -> Metrics:
        """Called after the student's update with the aux its loss returned."""
        return {}

    def on_lr(self, lr_factor: float) -> None:
        """Called with the schedule's current factor (objectives with their own optimisers follow it)."""

    def accelerate(self, compile_fn: Callable[..., nn.Module] | None = None,
                   memory_format: torch.memory_format | None = None,
                   example: torch.Tensor | None = None) -> None:
        """compile / channels_last for the objective's own networks (igam.speed); none by default."""

    def wrap_for_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Under torchrun: route the objective's own trained networks through wrap (a DDP wrapper)."""
        if self.term is not None:
            self.term.wrap_for_ddp(wrap)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


Factory = Callable[..., Objective]
ModelBuilder = Callable[..., nn.Module]
ModelNamer = Callable[..., str]


def register_keys(*keys: Key) -> None:
    """Bring configuration keys (igam.registry.Key) that more than one method reads, from the file that
    owns them; a method's own keys go through register_objective(keys=...).

    Raises:
        ValueError: a key name that is taken.
    """
    add_keys(*keys, core=core_keys())


def register_objective(name: str, *, help: str = "",
                       reads: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = (),
                       summary: tuple[str, ...] = (), adversarial: bool = False,
                       cost: float | Callable[[Any], float] = 1.0, check: Callable[[Any], None] | None = None,
                       keys: tuple[Key, ...] = (), notes: Callable[[Any], list[str]] | None = None,
                       build_model: ModelBuilder | None = None,
                       model_name: ModelNamer | None = None) -> Callable[[Factory], Factory]:
    """Decorator: register factory(cfg, model, spec, device) -> Objective as method `name`, with everything
    the rest of igam asks about a method (igam.registry.MethodInfo):

    - help: its line in `igam train --help`;
    - keys: the configuration keys it brings (igam.registry.Key: name, default, help, group, choices,
      check); they work like the core keys on every verb, in YAML and in config.yaml;
    - reads: the keys (or key groups) outside the common ones that it reads, as a tuple or a function of the
      config (called with None it must name every key it can read): what `igam train` notes as unused
      otherwise, and what makes an experiment stage stale when changed;
    - summary: the keys that tell its stages apart in results tables;
    - adversarial: it trains on attacks within eps (eps ramp checks);
    - cost: a step's training time relative to a standard step, or a function of the config (the
      `igam run --dry-run` estimate; the exact, machine-independent cost is Objective.passes);
    - check: cross-key validation of a config with this method (raises IgamError);
    - notes: extra lines `igam train` prints before it starts (e.g. settings that half-work);
    - build_model(cfg, spec) -> nn.Module: the network it trains, when not the student cfg.model, with
      model_name(cfg, planned) -> str naming it without building it ('' when it cannot be told; `planned`
      maps run directories not made yet to their model names).

    Raises:
        ValueError: a method or key name that is taken.
    """
    def deco(fn: Factory) -> Factory:
        register_keys(*keys)
        add_method(MethodInfo(name=name, factory=fn, help=help, reads=reads, summary=tuple(summary),
                              adversarial=adversarial, cost=cost, check=check, build_model=build_model,
                              model_name=model_name, extra={"notes": notes} if notes else {}))
        return fn

    return deco


def count_passes(objective: Objective, total_steps: int, steps_per_epoch: int) -> Passes:
    """Passes per training image over a run of `total_steps` steps: sum_s objective.passes(s) /
    steps_per_epoch (an epoch of steps trains on every training image once, replays included, under
    torchrun too), for every network and kind (zeros included), rounded to 4 decimals. A function of the
    settings alone: the same on every machine, and on a resumed run."""
    out = {net: dict.fromkeys(PASS_KINDS, 0.0) for net in NETWORKS}
    memo: dict[str, tuple[tuple[str, str, float], ...]] = {}
    for s in range(total_steps):
        p = objective.passes(s)
        key = repr(p)
        if key not in memo:
            memo[key] = tuple((net, kind, float(v)) for net, kinds in p.items() for kind, v in kinds.items())
        for net, kind, v in memo[key]:
            if net not in out or kind not in out[net]:
                raise ValueError(f"{type(objective).__name__}.passes names {net}/{kind}; networks are "
                                 f"{NETWORKS}, kinds {PASS_KINDS}")
            out[net][kind] += v
    return {net: {k: round(v / max(1, steps_per_epoch), 4) for k, v in kinds.items()}
            for net, kinds in out.items()}


def check_method(method: str) -> None:
    """Raises IgamError unless `method` names a registered objective."""
    if method not in OBJECTIVES:
        raise IgamError(f"method={method!r} is not a training objective.{suggest(method, OBJECTIVES)} "
                        f"Choose one of: {', '.join(sorted(OBJECTIVES))}.")


register_objective("standard", help="cross-entropy on clean images")(
    lambda cfg, model, spec, device: Objective())
