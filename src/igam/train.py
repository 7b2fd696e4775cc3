"""The one training loop. Every method (standard, pgd-at, trades, finetune, igam, igr, ...) is an
objective plugged into it (igam.objectives); this file names none of them.

Read top to bottom: `train` (the run folder and its lock), `_train` (set-up, resume, loop, finish), and
`Training`, the one state object of a run: set-up (data, model, objective, optimiser, speed settings, guard)
in its constructor, `checkpoint_parts` (the one list of what a checkpoint holds, with the loop's `Counters`)
saved and restored whole, `step` (loss -> backward -> clip -> update -> objective.after_step), `loop` (steps,
logs, evaluation, checkpoints) and `finish` (final evaluation, weights, metrics).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn as nn

import igam.progress as bars
from igam.config import Config, save_yaml
from igam.data import BatchLoader, load_data, resolve_augment, spec_of
from igam.distributed import (
    Dist,
    all_ranks,
    broadcast_state,
    combine,
    ddp,
    mean_over_ranks,
    ranks_in_sync,
    setup_distributed,
    shard,
)
from igam.errors import IgamError, NonFiniteOutputs, WriteError
from igam.evaluate import accuracy, evaluate_attack
from igam.files import (
    PACKAGE_VERSION,
    check_name,
    install_kill_hooks,
    kill_point,
    save_weights,
    write_json,
)
from igam.guard import (
    MAX_SKIP_SHARE,
    MAX_SKIPS_IN_A_ROW,
    StateGuard,
    Stop,
    nonfinite_grads,
    nonfinite_terms,
    skip_limit,
)
from igam.models import normalization_metadata
from igam.objectives import (
    Objective,
    build_model,
    builds_own_model,
    check_method,
    count_passes,
    create_objective,
    start_of,
    trained_model_name,
)
from igam.runs import CSVLogger, Run, git_commit, load_latest_state, load_state_checked, save_state
from igam.speed import float32_arithmetic, process_settings, speed_setup
from igam.units import parse_fraction
from igam.utils import bn_mode, check_threads, rng_state, seed_everything, set_rng_state, to_unit, unwrap

__all__ = ["MAX_SKIPS_IN_A_ROW", "MAX_SKIP_SHARE", "lr_factor", "make_optimizer", "nonfinite_grads",
           "nonfinite_terms", "run_name", "train"]


def run_name(cfg: Config) -> str:
    """cfg.name, or METHOD-MODEL-DATASET-sSEED (MODEL: the network trained, e.g. adapted-madry-mnist for a
    fine-tuned madry-mnist teacher)."""
    def part(text: str) -> str:
        return re.sub(r"[/\\\x00-\x1f\x7f]", "_", text.replace(":", "-"))

    ds = part(cfg.dataset)[:40]
    model = part(trained_model_name(cfg) or cfg.model)
    return check_name(cfg.name or f"{part(cfg.method)}-{model}-{ds}-s{cfg.seed}", "name")


def lr_factor(cfg: Config, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at `step`: linear warm-up, then cosine, step or constant."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        return cfg.lr_gamma ** sum(step >= m * total for m in cfg.lr_milestones)
    return 1.0


def make_optimizer(kind: str, lr: float, cfg: Config, model: nn.Module, extra: list[nn.Module] | None = None,
                   scales: dict[int, float] | None = None) -> torch.optim.Optimizer:
    """SGD (momentum cfg.momentum) or Adam at `lr` over the trainable parameters of `model` and of the
    modules `extra` (an objective's co-trained parts), weight decay on conv/linear weights only (not biases,
    BatchNorm or normalisation buffers). `scales` maps id(parameter) to a multiple of the learning rate
    (e.g. a fine-tuned body's smaller rate): those parameters get groups of their own, whose `lr_scale`
    the schedule keeps.

    Raises:
        IgamError: when the model has no trainable parameter.
    """
    scales = scales or {}
    by_scale: dict[float, tuple[list[nn.Parameter], list[nn.Parameter]]] = {}
    seen: set[int] = set()
    for m in [model, *(extra or [])]:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                decay, no_decay = by_scale.setdefault(scales.get(id(p), 1.0), ([], []))
                (decay if p.ndim > 1 else no_decay).append(p)
    if not seen:
        raise IgamError("This model has no trainable parameters.")
    by_scale.setdefault(1.0, ([], []))
    groups = []
    for scale in sorted(by_scale, key=lambda s: s != 1.0):  # the plain groups first, as they always were
        decay, no_decay = by_scale[scale]
        part = [{"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]
        if scale != 1.0:
            part = [{**g, "lr": lr * scale, "lr_scale": scale} for g in part if g["params"]]
        groups += part
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False)


def changed_settings(run: Run, cfg: Config) -> str:
    """'lr 0.1 -> 0.05, ...' for the keys that differ from the run's saved config.yaml (resume aside)."""
    saved, now = run.config, cfg.to_dict()
    return ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
                     if k != "resume" and k in saved and saved[k] != now[k])


def evaluate_during_training(cfg: Config, eval_model: nn.Module, model: nn.Module, objective: Objective,
                             eval_x: torch.Tensor, eval_y: torch.Tensor, epoch: float, dist: Dist,
                             device: torch.device) -> dict[str, float]:
    """Clean accuracy (and cfg.eval_attack's) on the held-out images, plus the objective's own metrics.
    Under torchrun each rank evaluates its share of the images and the accuracies are combined."""
    part = shard(len(eval_x), dist)
    px, py = eval_x[part], eval_y[part]
    res = {"epoch": round(epoch, 3),
           "clean_acc": combine(accuracy(eval_model, px, py, cfg.eval_batch_size, cfg.eval_bn), len(px),
                                dist, device)}
    with bn_mode(unwrap(model), cfg.eval_bn):  # a few images: every rank computes the same numbers
        xb = to_unit(eval_x[:256].to(device))
        res.update(objective.eval_metrics(unwrap(model), xb, eval_y[:256].to(device)))
    if cfg.eval_attack:
        # (each rank's share draws its own random starts: seed + rank)
        acc = evaluate_attack(eval_model, px, py, cfg.eval_attack, None, cfg.eval_batch_size,
                              cfg.seed + dist.rank, cfg.eval_bn) if len(px) else 0.0
        res[f"{cfg.eval_attack}_acc"] = combine(acc, len(px), dist, device)
    return res


# ---------------------------------------------------------------------------------------------
def train(cfg: Config, log=print) -> Path:
    """Train according to cfg and return the run directory. The run directory is locked for the whole run
    (one process per run folder; the OS drops the lock if the process dies).

    Raises:
        IgamError: for any problem of the input (method, data, model, teacher, run directory), when another
            process holds the run directory, and when training stops on divergence: non-finite values
            under nan_policy=stop, too many skipped steps, an update that makes the weights non-finite or
            explode, or a model whose outputs are non-finite (meta.json then says `stopped`, the last good
            checkpoint stays, and an earlier model.safetensors is not replaced).
    """
    check_method(cfg.method)
    if not cfg.dataset.strip():
        raise IgamError("dataset= is required: name the data to train on, e.g. dataset=mnist or "
                        "dataset=cifar10 (dataset=synthetic for a synthetic stand-in, for smoke tests; `igam "
                        "train --help` lists the datasets).")
    check_threads(cfg.threads)  # machine-dependent, so checked here rather than with the config
    dist, device = setup_distributed(cfg.device)
    say = log if dist.main else (lambda *a, **k: None)
    run = Run(Path(cfg.out_dir) / run_name(cfg))
    try:
        if run.dir.is_symlink():  # a real folder inside out_dir: nothing is written elsewhere
            raise IgamError(f"'{run.dir}' is a symbolic link (to '{os.readlink(run.dir)}'). igam writes "
                            "a run only into a real folder inside out_dir; give out_dir=... the folder you "
                            "want, or another name=....")
        fresh = not run.dir.exists()
        made = [p for p in run.dir.parents if not p.exists()]  # out_dir (and folders above) made for it
    except OSError as e:  # e.g. a name too long for the file system
        raise IgamError(f"Cannot use the run directory '{str(run.dir)[:200]}' ({e.strerror or e}); choose "
                        "another out_dir=... or name=....") from None

    def undo_if_empty() -> bool:
        """Refused before anything was written: leave no empty run folder, nor an out_dir made for it
        (while the lock is still held, so no other process is inside)."""
        if not (fresh and run.remove_if_empty()):
            return False
        for p in made:  # nearest first; a folder something else wrote into stays
            try:
                p.rmdir()
            except OSError:
                break
        return True

    lock = run.lock(log=say) if dist.main else None  # a second process on this folder stops here
    try:
        # TF32, determinism, threads: as the caller had them after the run; the evaluations' progress bars
        # only where the training bar is shown
        with process_settings(), bars.enabled(cfg.progress and dist.main):
            return _train(cfg, run, dist, device, say)
    except WriteError as e:  # a full disk or a read-only folder: meta.json must not go on saying `running`
        text = str(e) if "resume=true" in str(e) else (
            f"Training stopped: cannot write '{e.path}' ({e.reason}). Free disk space (or fix permissions), "
            "then continue with resume=true.")
        if (lock is not None and not undo_if_empty()
                and run.mark_stopped(f"cannot write '{e.path}' ({e.reason})") is None):
            text += " meta.json could not be updated either, so it still says `running`; nothing trains it."
        e.args = (text,)
        raise
    except BaseException:
        if lock is not None:
            undo_if_empty()
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, run: Run, dist: Dist, device: torch.device, say) -> Path:
    """The body of `train`, run while holding the run directory's lock: set up (or resume), step, finish."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)
    install_kill_hooks()  # crash tests only (IGAM_TEST_KILL_AT); no-op otherwise
    state = None
    if cfg.resume:
        state = load_latest_state(run.dir, log=say) if dist.main else None
        state = broadcast_state(state, dist, device)
        if state is None:
            say(f"igam: no usable checkpoint in {run.dir}; starting from the beginning.")
    elif run.meta_path.exists() and run.meta.get("status") != "created":
        raise IgamError(f"Run directory '{run.dir}' already holds a run. Pass resume=true to continue it, "
                        "another name=..., or delete the directory.")
    training = Training(cfg, run, dist, device, say)
    if state is not None:
        training.load_state_dict(state)
    training.begin()
    training.loop()
    return training.finish()


@dataclass
class Counters:
    """The loop's own state beside the networks, saved in every checkpoint with them so that a resumed run
    stops, logs and reports exactly as an uninterrupted one: the step, the training time of the run's
    earlier processes, the skip counters (docs/RELIABILITY.md, section 3) and the open log window. The field
    names are the checkpoint's keys."""

    step: int = 0
    elapsed_s: float = 0.0  # seconds trained by this run's earlier processes
    skipped: int = 0  # steps skipped for non-finite values (nan_policy=skip), in the whole run
    skipped_in_a_row: int = 0
    last_log: dict[str, float] = field(default_factory=dict)  # the last logged window's averages
    log_count: int = 0  # steps in the open log window
    log_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # their metric sums
    started: float = field(default_factory=time.time)  # when this process began (not saved)

    def elapsed(self) -> float:
        """Seconds this run has trained, over all its processes."""
        return self.elapsed_s + time.time() - self.started

    def state_dict(self, window: dict[str, float]) -> dict[str, Any]:
        """The counters as plain values; `window`: log_sums averaged over ranks (the same on every rank)."""
        return {"step": self.step, "elapsed_s": self.elapsed(), "skipped": self.skipped,
                "skipped_in_a_row": self.skipped_in_a_row, "last_log": self.last_log,
                "log_count": self.log_count, "log_sums": window}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore `state_dict` (every key but `step` may be missing from an older igam's checkpoint).

        Raises:
            KeyError, TypeError, ValueError: on a missing step or counters that cannot be.
        """
        self.step = int(state["step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.skipped = int(state.get("skipped", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.last_log = dict(state.get("last_log", {}))
        self.log_count = int(state.get("log_count", 0))
        self.log_sums = {k: torch.tensor(v, device=device) for k, v in state.get("log_sums", {}).items()}
        if self.step < 0 or not 0 <= self.skipped_in_a_row <= self.skipped <= self.step:
            raise ValueError(f"step {self.step}, {self.skipped} skipped")


class Training:
    """One run while it trains: the networks, objective, optimiser, data and guards, and the loop's
    `Counters`. Built in the order below (data, model, objective, optimiser, speed settings, guard, loss
    scaler); `state_dict` / `load_state_dict` save and restore all of it at once (`checkpoint_parts`: the one
    list of what a checkpoint holds); `step` is one optimisation step, `loop` runs them with logging,
    evaluation and checkpoints, `finish` evaluates and writes the final weights and metrics."""

    def __init__(self, cfg: Config, run: Run, dist: Dist, device: torch.device, say: Callable[..., Any]):
        self.run, self.dist, self.device, self.say = run, dist, device, say
        arrays = load_data(cfg.dataset, cfg.data_dir or None, cfg.download, cfg.train_subset, cfg.test_subset)
        spec = spec_of(arrays)
        say(f"igam: {arrays.name} from {arrays.source}: {len(arrays.x_train)} train / {len(arrays.x_test)} "
            f"test images of shape {spec.shape}, {spec.num_classes} classes")
        self.model = build_model(cfg, spec).to(device)
        if builds_own_model(cfg.method):  # config.yaml records the network trained, not the student default
            cfg = cfg.replace(model=unwrap(self.model).igam_args["name"])
        self.cfg = cfg
        self.objective = objective = create_objective(cfg, self.model, spec, device)
        optimizer_kind, self.base_lr = objective.optimizer_settings(cfg)
        self.optimizer = make_optimizer(optimizer_kind, self.base_lr, cfg, self.model, objective.co_trained(),
                                        objective.lr_scales(self.model))
        self.augment = resolve_augment(cfg.augment, spec.shape)
        self.loader = BatchLoader(arrays.x_train, arrays.y_train, cfg.batch_size, augment=self.augment,
                                  crop_padding=cfg.crop_padding, noise=parse_fraction(cfg.noise),
                                  seed=cfg.seed, device=device, rank=dist.rank, world=dist.world)
        self.steps_per_epoch = len(self.loader)
        self.total = max(1, round(cfg.epochs * self.steps_per_epoch))
        self.eval_x, self.eval_y = arrays.x_test[: cfg.eval_n or None], arrays.y_test[: cfg.eval_n or None]
        objective.begin(self.total, self.steps_per_epoch, dist.rank)
        self.counters = Counters()  # (its clock starts here, before any compilation)

        if cfg.amp != "none" and device.type != "cuda":
            say(f"igam: amp={cfg.amp} is a GPU setting; this {device.type} run uses float32.")
        float32_arithmetic(objective, device, say)
        self.train_model, self.eval_model = speed_setup(cfg, self.model, objective, spec.shape, device, say)
        if dist.enabled:
            self.train_model = ddp(self.train_model, device)
            objective.wrap_for_ddp(lambda m: ddp(m, device))  # e.g. IGAM's discriminator update
        self.guard = StateGuard(unwrap(self.model), objective)
        amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        self.amp_ctx = (torch.autocast(device.type, dtype=amp_dtype)
                        if cfg.amp != "none" and device.type == "cuda" else nullcontext())
        self.scaler = torch.amp.GradScaler(device.type, enabled=(cfg.amp == "fp16" and device.type == "cuda"))
        self.resumed = False
        self.last_good: int | None = None  # the step of the newest known-good checkpoint
        self.meta: dict[str, Any] = {
            "status": "running", "method": cfg.method, "model": unwrap(self.model).igam_args,
            "data": spec.to_dict(), "augment": self.augment, "seed": cfg.seed, "version": PACKAGE_VERSION,
            "git_commit": git_commit(), "torch": torch.__version__, "device": str(device),
            "world_size": dist.world, "steps": self.total, "steps_per_epoch": self.steps_per_epoch,
            "adapter": getattr(unwrap(self.model), "adapter_spec", None), "teacher": cfg.teacher or None,
            "eval_bn": cfg.eval_bn,
            # the machine-independent cost: forward/backward passes per training image, by network
            "passes_per_image": count_passes(objective, self.total, self.steps_per_epoch)}
        start = start_of(cfg)
        if start is not None:  # e.g. a robust start: what the weights come from, whose passes count as zero
            self.meta["start"] = start
        self.logger: CSVLogger | None = None
        self.eval_logger: CSVLogger | None = None

    # the checkpoint: one list ---------------------------------------------------------------------
    def checkpoint_parts(self) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
        """What a checkpoint holds besides the `Counters`: name -> (get, put): the part's state now, and
        how to restore it. A part whose `put` accepts None may be missing from an older igam's checkpoint
        (`OPTIONAL_PARTS`)."""
        where = f"The checkpoint in {self.run.dir}"
        return {
            "model": (lambda: unwrap(self.model).state_dict(),
                      lambda v: load_state_checked(self.model, v, where)),
            "optimizer": (self.optimizer.state_dict, self.optimizer.load_state_dict),
            "objective": (self.objective.state_dict, self.objective.load_state_dict),
            "objective_extra": (self.objective.extra_state, self.objective.load_extra_state),
            "rng": (rng_state, set_rng_state),
            "scaler": (self.scaler.state_dict, lambda v: v and self.scaler.load_state_dict(v)),
            "guard": (self.guard.state_dict, self.guard.load_state_dict),  # early values, open loss window
        }

    OPTIONAL_PARTS = ("scaler", "guard")

    def state_dict(self) -> dict[str, Any]:
        """The whole resumable state (a collective under torchrun: every rank calls it)."""
        window = mean_over_ranks(self.counters.log_sums, self.dist, self.device)  # the same on every rank
        return {**self.counters.state_dict(window),
                **{name: get() for name, (get, _) in self.checkpoint_parts().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` whole.

        Raises:
            IgamError: when the checkpoint does not fit this run (other settings, or tampered with).
        """
        try:  # a checkpoint whose checksum matches but whose contents do not fit: one clear error
            for name, (_, put) in self.checkpoint_parts().items():
                put(state.get(name) if name in self.OPTIONAL_PARTS else state[name])
            self.counters.load_state_dict(state, self.device)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError,
                OverflowError) as e:
            raise IgamError(f"The newest checkpoint in {self.run.dir / 'checkpoints'} does not fit this run "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); it was not written by "
                            "this run's settings or was tampered with. Delete it (and its .json) to resume "
                            "from the one before, or resume with the settings it was written with.") from None
        self.resumed, self.last_good = True, self.counters.step
        self.say(f"igam: resumed {self.run.dir} at step {self.counters.step}/{self.total}")
        changed = changed_settings(self.run, self.cfg)
        if changed:
            self.say(f"igam: note: resuming with changed settings: {changed}")

    def checkpoint(self) -> None:
        """Save the resumable state, only from a state that passes the finite and drift checks."""
        if not self.guard.finite():
            self.stop("non-finite weights or buffers (e.g. BatchNorm statistics) at step "
                      f"{self.counters.step}", "non-finite-state")
        self.stop_if(self.guard.loss_drift())  # checkpoints only from a state that has not drifted
        state = self.state_dict()
        if self.dist.main:
            save_state(self.run.dir, self.counters.step, state, keep=self.cfg.keep_checkpoints)
        self.last_good = self.counters.step

    # stopping, evaluating, logging ----------------------------------------------------------------
    def stop(self, msg: str, rule: str) -> NoReturn:
        """End the run as `stopped`: meta.json says why and which guard rule fired (guard.RULES),
        model.safetensors is left as it was."""
        if self.dist.main:
            write_json(self.run.meta_path,
                       {**self.meta, "status": "stopped", "stopped": msg, "stop_rule": rule})
            if self.logger is not None:
                self.logger.close()
        where = (f"No good state is checkpointed yet in {self.run.dir} (resume=true starts over)"
                 if self.last_good is None else
                 f"The last good state (step {self.last_good}) is checkpointed in {self.run.dir}")
        fix = ("raise lr (or grad_clip), then resume=true" if rule == "never-moved" else
               "lower lr or the lambdas, or set grad_clip, then resume=true")
        raise IgamError(f"Training stopped: {msg}. {where}; {fix}. (Guard rule: {rule}; docs/RELIABILITY.md, "
                        "section 3.)")

    def stop_if(self, why: Stop | None) -> None:
        """Stop when a guard rule fired on this rank or on any other (all ranks agree)."""
        if not all_ranks(why is None, self.dist):
            why = why or Stop("other-rank", "another rank's guard stopped the run")
            self.stop(why.message, why.rule)

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """`evaluate_during_training` at this step, logged to eval_log.csv (a resumed final evaluation
        replaces its row); non-finite outputs stop the run."""
        try:
            res = evaluate_during_training(self.cfg, self.eval_model, self.model, self.objective, self.eval_x,
                                           self.eval_y, self.counters.step / self.steps_per_epoch, self.dist,
                                           self.device)
        except NonFiniteOutputs as e:
            self.stop(f"the model's outputs are non-finite at step {self.counters.step} ({e})",
                      "non-finite-outputs")
        if self.eval_logger is not None:
            self.eval_logger.log(self.counters.step, res, replace=final)
        return res

    def begin(self) -> None:
        """Write config.yaml and meta.json (`running`) and open the logs (a resumed run's continue at its
        step)."""
        resume_step = self.counters.step if self.resumed else None
        if self.dist.main:
            save_yaml(self.cfg.to_dict(), self.run.config_path)
            write_json(self.run.meta_path, self.meta)
            self.logger = CSVLogger(self.run / Run.LOG, (self.run / Run.TB) if self.cfg.tensorboard else None,
                                    resume_step=resume_step, log=self.say)
            self.eval_logger = CSVLogger(self.run / Run.EVAL_LOG, None, resume_step=resume_step, log=self.say)

    # the step and the loop ------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        """One optimisation step on the batch (x: float images in [0, 1] or uint8, shape (B, C, H, W); y:
        int64 labels, shape (B,); index: the images' positions in the training set): learning rate, loss,
        backward, the NaN/Inf guard (a non-finite loss term skips the backward, a non-finite gradient the
        update), clip, update, the update's guard, the objective's after_step, the counters."""
        cfg, c, optimizer, scaler = self.cfg, self.counters, self.optimizer, self.scaler
        objective = self.objective
        if cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        factor = lr_factor(cfg, c.step, self.total, self.steps_per_epoch)
        for g in optimizer.param_groups:
            g["lr"] = self.base_lr * factor * g.get("lr_scale", 1.0)
        objective.on_lr(factor)
        self.model.train()
        with self.amp_ctx:
            loss, metrics, aux = objective.loss(self.train_model, x, y, c.step,
                                                **({"index": index} if objective.needs_index else {}))
        optimizer.zero_grad(set_to_none=True)
        bad = nonfinite_terms(loss, metrics)
        if all_ranks(not bad, self.dist):
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
            metrics["grad_norm"] = gnorm.detach()
            if all_ranks(bool(torch.isfinite(gnorm)), self.dist):
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, gnorm)
            elif not scaler.is_enabled():  # (fp16: overflows are the scaler's to skip and rescale)
                bad = nonfinite_grads(unwrap(self.model))
        if bad:
            self.skip(f"non-finite {', '.join(bad)} at step {c.step}")
            optimizer.zero_grad(set_to_none=True)
        else:
            c.skipped_in_a_row = 0
            scaler.step(optimizer)
            scaler.update()
            # a finite loss and gradient can still make an update that explodes the weights (or lets them
            # drift far from the run's start): reject it (the run rolls back to its last good checkpoint; no
            # per-step copy is kept)
            rejected = self.guard.after_update()
            if rejected is not None:
                rejected = rejected._replace(message=f"{rejected.message} at step {c.step} (update rejected)")
            self.stop_if(rejected)
            # the drift rule watches the training cross-entropy (a scale every objective shares), or the total
            # loss of an objective that reports no `ce`
            self.guard.add_loss(metrics.get("ce", loss))
            metrics.update(objective.after_step(self.train_model, x, y, c.step, aux))
            kill_point("after-step")  # crash tests: die after the updates, before the step is counted
        c.step += 1
        kill_point("step")  # crash tests: die between steps, away from checkpoints
        if not bad:  # skipped steps stay out of the logged averages
            for k, v in metrics.items():
                c.log_sums[k] = c.log_sums.get(k, 0) + v.detach().float()
            c.log_count += 1

    def skip(self, msg: str) -> None:
        """Count a skipped step (nan_policy=skip), or stop the run by nan_policy=stop or the skip limits."""
        c = self.counters
        c.skipped += 1
        c.skipped_in_a_row += 1
        if self.cfg.nan_policy == "stop":
            if c.skipped_in_a_row == 1 and self.guard.finite():  # the state before this step is good
                self.checkpoint()
            self.stop(msg, "non-finite-step")
        if c.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            self.stop(f"{msg} ({MAX_SKIPS_IN_A_ROW} steps in a row)", "skips-in-a-row")
        if c.skipped > skip_limit(self.total):
            self.stop(f"{msg} ({c.skipped} of {self.total} steps skipped: more than "
                      f"{MAX_SKIP_SHARE:.0%} of the run)", "skip-share")
        self.say(f"igam: {msg}; step skipped (nan_policy=skip)")

    def log_window(self, t0: float, timed_from: int) -> None:
        """Close the open log window: its averages to log.csv (and TensorBoard), the drift rule's check.
        `t0`, `timed_from`: when this process began timing the window, and the steps before that."""
        c = self.counters
        sums = mean_over_ranks(c.log_sums, self.dist, self.device)
        last = {k: v / max(1, c.log_count) for k, v in sums.items()}
        last.update(lr=self.optimizer.param_groups[0]["lr"], epoch=round(c.step / self.steps_per_epoch, 3),
                    images_per_s=round((c.log_count - timed_from) * self.cfg.batch_size * self.dist.world
                                       / max(1e-9, time.time() - t0), 1),
                    skipped_steps=c.skipped)
        c.last_log, c.log_sums, c.log_count = last, {}, 0
        if self.logger is not None:
            self.logger.log(c.step, last)
        self.stop_if(self.guard.loss_drift(reset=True))

    def loop(self) -> None:
        """Steps until the run's total, with logging every cfg.log_every steps, evaluation every
        cfg.eval_every epochs and a checkpoint every cfg.checkpoint_every steps and at every epoch's end."""
        cfg, c, spe, total = self.cfg, self.counters, self.steps_per_epoch, self.total
        eval_every_steps = max(1, round(cfg.eval_every * spe)) if cfg.eval_every > 0 else 0
        t0, timed_from = time.time(), c.log_count  # (images_per_s: only the steps timed by this process)
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=c.step, desc=run_name(cfg), unit="step", dynamic_ncols=True,
                       mininterval=1.0, leave=False)
        while c.step < total:
            for x, y, index in self.loader.steps(c.step, self.objective.replays):
                self.step(x, y, index)
                if c.step % cfg.log_every == 0 or c.step == total:
                    self.log_window(t0, timed_from)
                    t0, timed_from = time.time(), 0
                    if bar is not None:
                        bar.set_postfix({k: f"{c.last_log[k]:.3g}" for k in ("ce", "acc") if k in c.last_log})
                if bar is not None:
                    bar.update(1)
                if eval_every_steps and c.step % eval_every_steps == 0 and c.step < total:
                    res = self.evaluate()
                    self.say(f"igam: epoch {res['epoch']:.2f} " + " ".join(
                        f"{k}={v:.4f}" for k, v in res.items() if k != "epoch"))
                # never in a run of skipped steps (the newest checkpoint stays a good one), nor at the last
                # step (the end checkpoints once the final model has passed its evaluation)
                if ((c.step % cfg.checkpoint_every == 0 or c.step % spe == 0) and not c.skipped_in_a_row
                        and c.step < total):
                    self.checkpoint()
                if c.step >= total:
                    break
        if bar is not None:
            bar.close()

    def finish(self) -> Path:
        """The end: the final model must have trained and give finite outputs before it replaces anything;
        then the last checkpoint, model.safetensors (and objective.safetensors), metrics.json and meta.json
        (`finished`). Returns the run directory."""
        c, run, meta = self.counters, self.run, self.meta
        self.stop_if(self.guard.never_moved())
        final = self.evaluate(final=True)
        if self.dist.enabled:  # every rank must hold the same networks (student and e.g. the discriminator)
            meta["ranks_in_sync"] = ranks_in_sync([*self.model.parameters(), *self.objective.parameters()],
                                                  self.device)
            if not meta["ranks_in_sync"]:
                self.say("igam: WARNING: the ranks' parameters differ at the end of training (gradients were "
                         "not averaged: see docs/DISTRIBUTED.md, pitfalls); rank 0's are saved.")
        self.checkpoint()
        if self.dist.main:
            model = unwrap(self.model)
            save_weights(model, run.weights_path, normalization_metadata(model))
            if self.objective.state_dict():  # e.g. the discriminator and the resolved lambda_diff
                save_weights(self.objective, run.objective_path)
            write_json(run.metrics_path, {"final": final, "train": c.last_log, "skipped_steps": c.skipped,
                                          "steps": c.step, "passes_per_image": meta["passes_per_image"]})
            meta.update(status="finished", finished=time.time(),
                        epochs=round(c.step / self.steps_per_epoch, 4), train_time_s=round(c.elapsed(), 1))
            write_json(run.meta_path, meta)
            self.logger.close()
            self.say(f"igam: finished {run.dir}: "
                     + " ".join(f"{k}={v:.4f}" for k, v in final.items() if k != "epoch"))
        if self.dist.enabled:
            import torch.distributed as tdist

            tdist.barrier()
        return run.dir
