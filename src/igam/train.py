"""The one training loop. Every method (standard, pgd-at, trades, finetune, igam, igr, ...) is an
objective plugged into it (igam.objectives); this file names none of them.

Read top to bottom: set-up (device, data, model, objective, optimiser), resume, the step loop
(loss -> backward -> clip -> step -> objective.after_step -> log -> checkpoint), per-epoch evaluation,
final weights and metrics.
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NoReturn

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
    """The body of `train`, run while holding the run directory's lock."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)
    install_kill_hooks()  # crash tests only (IGAM_TEST_KILL_AT); no-op otherwise

    run_dir = run.dir
    state = None
    if cfg.resume:
        state = load_latest_state(run_dir, log=say) if dist.main else None
        state = broadcast_state(state, dist, device)
        if state is None:
            say(f"igam: no usable checkpoint in {run_dir}; starting from the beginning.")
    elif run.meta_path.exists() and run.meta.get("status") != "created":
        raise IgamError(f"Run directory '{run_dir}' already holds a run. Pass resume=true to continue it, "
                        "another name=..., or delete the directory.")

    # data, model, objective, optimiser -----------------------------------------------------------
    arrays = load_data(cfg.dataset, cfg.data_dir or None, cfg.download, cfg.train_subset, cfg.test_subset)
    spec = spec_of(arrays)
    say(f"igam: {arrays.name} from {arrays.source}: {len(arrays.x_train)} train / {len(arrays.x_test)} test "
        f"images of shape {spec.shape}, {spec.num_classes} classes")
    model = build_model(cfg, spec).to(device)
    if builds_own_model(cfg.method):  # config.yaml records the network trained, not the student default
        cfg = cfg.replace(model=unwrap(model).igam_args["name"])
    objective = create_objective(cfg, model, spec, device)
    optimizer_kind, base_lr = objective.optimizer_settings(cfg)
    optimizer = make_optimizer(optimizer_kind, base_lr, cfg, model, objective.co_trained(),
                               objective.lr_scales(model))
    augment = resolve_augment(cfg.augment, spec.shape)
    loader = BatchLoader(arrays.x_train, arrays.y_train, cfg.batch_size, augment=augment,
                         crop_padding=cfg.crop_padding, noise=parse_fraction(cfg.noise), seed=cfg.seed,
                         device=device, rank=dist.rank, world=dist.world)
    steps_per_epoch = len(loader)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    eval_x, eval_y = arrays.x_test[: cfg.eval_n or None], arrays.y_test[: cfg.eval_n or None]
    objective.begin(total, steps_per_epoch, dist.rank)

    # what a checkpoint carries besides the networks: skip counters and the open log window, so that a
    # resumed run stops, logs and reports exactly as an uninterrupted one
    step, elapsed_before, t_start = 0, 0.0, time.time()
    skipped, skipped_in_a_row, count, last = 0, 0, 0, {}
    sums: dict[str, torch.Tensor] = {}
    if state is not None:
        try:  # a checkpoint whose checksum matches but whose contents do not fit: one clear error
            load_state_checked(model, state["model"], f"The checkpoint in {run_dir}")
            optimizer.load_state_dict(state["optimizer"])
            objective.load_state_dict(state["objective"])
            objective.load_extra_state(state["objective_extra"])
            set_rng_state(state["rng"])
            step = int(state["step"])
            elapsed_before = float(state.get("elapsed_s", 0.0))
            skipped, skipped_in_a_row = int(state.get("skipped", 0)), int(state.get("skipped_in_a_row", 0))
            last = dict(state.get("last_log", {}))
            count = int(state.get("log_count", 0))
            sums = {k: torch.tensor(v, device=device) for k, v in state.get("log_sums", {}).items()}
            if step < 0 or not 0 <= skipped_in_a_row <= skipped <= step:
                raise ValueError(f"step {step}, {skipped} skipped")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError,
                OverflowError) as e:
            raise IgamError(f"The newest checkpoint in {run_dir / 'checkpoints'} does not fit this run "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); it was not written by "
                            "this run's settings or was tampered with. Delete it (and its .json) to resume "
                            "from the one before, or resume with the settings it was written with.") from None
        say(f"igam: resumed {run_dir} at step {step}/{total}")
        changed = changed_settings(run, cfg)
        if changed:
            say(f"igam: note: resuming with changed settings: {changed}")
    last_good = step if state is not None else None  # the step of the newest known-good checkpoint

    if cfg.amp != "none" and device.type != "cuda":
        say(f"igam: amp={cfg.amp} is a GPU setting; this {device.type} run uses float32.")
    float32_arithmetic(objective, device, say)
    train_model, eval_model = speed_setup(cfg, model, objective, spec.shape, device, say)
    if dist.enabled:
        train_model = ddp(train_model, device)
        objective.wrap_for_ddp(lambda m: ddp(m, device))  # e.g. IGAM's discriminator update
    guard = StateGuard(unwrap(model), objective)
    if state is not None:  # the run's early values and open loss window (docs/RELIABILITY.md, section 3)
        guard.load_state_dict(state.get("guard"))

    meta = {"status": "running", "method": cfg.method, "model": unwrap(model).igam_args,
            "data": spec.to_dict(), "augment": augment, "seed": cfg.seed, "version": PACKAGE_VERSION,
            "git_commit": git_commit(), "torch": torch.__version__, "device": str(device),
            "world_size": dist.world, "steps": total, "steps_per_epoch": steps_per_epoch,
            "adapter": getattr(unwrap(model), "adapter_spec", None), "teacher": cfg.teacher or None,
            "eval_bn": cfg.eval_bn,
            # the machine-independent cost: forward/backward passes per training image, by network
            "passes_per_image": count_passes(objective, total, steps_per_epoch)}
    start = start_of(cfg)
    if start is not None:  # e.g. a robust start: what the weights come from, whose passes count as zero
        meta["start"] = start
    if dist.main:
        save_yaml(cfg.to_dict(), run.config_path)
        write_json(run.meta_path, meta)
    resume_step = step if state else None
    logger = CSVLogger(run / Run.LOG, (run / Run.TB) if cfg.tensorboard else None,
                       resume_step=resume_step, log=say) if dist.main else None
    eval_logger = CSVLogger(run / Run.EVAL_LOG, None, resume_step=resume_step, log=say) if dist.main else None

    amp_ctx = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
               if cfg.amp != "none" and device.type == "cuda" else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=(cfg.amp == "fp16" and device.type == "cuda"))
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])

    def stop(msg: str, rule: str) -> NoReturn:
        """End the run as `stopped`: meta.json says why and which guard rule fired (guard.RULES),
        model.safetensors is left as it was."""
        if dist.main:
            write_json(run.meta_path, {**meta, "status": "stopped", "stopped": msg, "stop_rule": rule})
            logger.close()
        where = (f"No good state is checkpointed yet in {run_dir} (resume=true starts over)"
                 if last_good is None else
                 f"The last good state (step {last_good}) is checkpointed in {run_dir}")
        fix = ("raise lr (or grad_clip), then resume=true" if rule == "never-moved" else
               "lower lr or the lambdas, or set grad_clip, then resume=true")
        raise IgamError(f"Training stopped: {msg}. {where}; {fix}. (Guard rule: {rule}; docs/RELIABILITY.md, "
                        "section 3.)")

    def stop_if(why: Stop | None) -> None:
        """Stop when a guard rule fired on this rank or on any other (all ranks agree)."""
        if not all_ranks(why is None, dist):
            why = why or Stop("other-rank", "another rank's guard stopped the run")
            stop(why.message, why.rule)

    def checkpoint() -> None:
        """Save a resumable state, only from a state that passes the finite check."""
        nonlocal last_good
        if not guard.finite():
            stop(f"non-finite weights or buffers (e.g. BatchNorm statistics) at step {step}",
                 "non-finite-state")
        stop_if(guard.loss_drift())  # a checkpoint is only written from a state that has not drifted
        window = mean_over_ranks(sums, dist, device)  # the open log window, the same on every rank
        if dist.main:
            save_state(run_dir, step, {
                "step": step, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "objective": objective.state_dict(), "objective_extra": objective.extra_state(),
                "rng": rng_state(), "scaler": scaler.state_dict(),
                "elapsed_s": elapsed_before + time.time() - t_start,
                "skipped": skipped, "skipped_in_a_row": skipped_in_a_row, "last_log": last,
                "log_count": count, "log_sums": window, "guard": guard.state_dict()},
                keep=cfg.keep_checkpoints)
        last_good = step

    def evaluate_now(final: bool = False) -> dict[str, float]:
        try:
            res = evaluate_during_training(cfg, eval_model, model, objective, eval_x, eval_y,
                                           step / steps_per_epoch, dist, device)
        except NonFiniteOutputs as e:
            stop(f"the model's outputs are non-finite at step {step} ({e})", "non-finite-outputs")
        if dist.main:
            eval_logger.log(step, res, replace=final)  # a resumed final evaluation replaces its row
        return res

    # the loop --------------------------------------------------------------------------------
    eval_every_steps = max(1, round(cfg.eval_every * steps_per_epoch)) if cfg.eval_every > 0 else 0
    t0, timed_from = time.time(), count  # (images_per_s counts only the steps timed by this process)
    bar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=run_name(cfg), unit="step", dynamic_ncols=True,
                   mininterval=1.0, leave=False)
    while step < total:
        for x, y, index in loader.steps(step, objective.replays):
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            factor = lr_factor(cfg, step, total, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = base_lr * factor * g.get("lr_scale", 1.0)
            objective.on_lr(factor)
            model.train()
            with amp_ctx:
                loss, metrics, aux = objective.loss(train_model, x, y, step,
                                                    **({"index": index} if objective.needs_index else {}))
            optimizer.zero_grad(set_to_none=True)
            # NaN/Inf guard: a non-finite loss term skips the backward, a non-finite gradient the update
            bad = nonfinite_terms(loss, metrics)
            if all_ranks(not bad, dist):
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
                metrics["grad_norm"] = gnorm.detach()
                if all_ranks(bool(torch.isfinite(gnorm)), dist):
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, gnorm)
                elif not scaler.is_enabled():  # (fp16: overflows are the scaler's to skip and rescale)
                    bad = nonfinite_grads(unwrap(model))
            if bad:
                msg = f"non-finite {', '.join(bad)} at step {step}"
                skipped += 1
                skipped_in_a_row += 1
                if cfg.nan_policy == "stop":
                    if skipped_in_a_row == 1 and guard.finite():  # the state before this step is good
                        checkpoint()
                    stop(msg, "non-finite-step")
                if skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    stop(f"{msg} ({MAX_SKIPS_IN_A_ROW} steps in a row)", "skips-in-a-row")
                if skipped > skip_limit(total):
                    stop(f"{msg} ({skipped} of {total} steps skipped: more than "
                         f"{MAX_SKIP_SHARE:.0%} of the run)", "skip-share")
                say(f"igam: {msg}; step skipped (nan_policy=skip)")
                optimizer.zero_grad(set_to_none=True)
            else:
                skipped_in_a_row = 0
                scaler.step(optimizer)
                scaler.update()
                # a finite loss and gradient can still make an update that explodes the weights (or lets
                # them drift far from the run's start): reject it (the run rolls back to its last good
                # checkpoint; no per-step copy is kept)
                rejected = guard.after_update()
                if rejected is not None:
                    rejected = rejected._replace(
                        message=f"{rejected.message} at step {step} (update rejected)")
                stop_if(rejected)
                # the drift rule watches the training cross-entropy (a scale every objective shares), or
                # the total loss of an objective that reports no `ce`
                guard.add_loss(metrics.get("ce", loss))
                metrics.update(objective.after_step(train_model, x, y, step, aux))
                kill_point("after-step")  # crash tests: die after the updates, before the step is counted
            step += 1
            kill_point("step")  # crash tests: die between steps, away from checkpoints
            if not bad:  # skipped steps stay out of the logged averages
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                count += 1
            if step % cfg.log_every == 0 or step == total:
                last = {k: v / max(1, count) for k, v in mean_over_ranks(sums, dist, device).items()}
                last.update(lr=optimizer.param_groups[0]["lr"], epoch=round(step / steps_per_epoch, 3),
                            images_per_s=round((count - timed_from) * cfg.batch_size * dist.world
                                               / max(1e-9, time.time() - t0), 1),
                            skipped_steps=skipped)
                if dist.main:
                    logger.log(step, last)
                sums, count, t0, timed_from = {}, 0, time.time(), 0
                stop_if(guard.loss_drift(reset=True))
                if bar is not None:
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("ce", "acc") if k in last})
            if bar is not None:
                bar.update(1)
            if eval_every_steps and step % eval_every_steps == 0 and step < total:
                res = evaluate_now()
                say(f"igam: epoch {res['epoch']:.2f} " + " ".join(f"{k}={v:.4f}" for k, v in res.items()
                                                                   if k != "epoch"))
            # never in a run of skipped steps (the newest checkpoint stays a good one), nor at the last step
            # (the end checkpoints once the final model has passed its evaluation)
            if ((step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0) and not skipped_in_a_row
                    and step < total):
                checkpoint()
            if step >= total:
                break
    if bar is not None:
        bar.close()

    # the end: the final model must have trained and give finite outputs before it replaces anything -----
    stop_if(guard.never_moved())
    final = evaluate_now(final=True)
    if dist.enabled:  # every rank must hold the same networks (student and e.g. the discriminator)
        meta["ranks_in_sync"] = ranks_in_sync([*model.parameters(), *objective.parameters()], device)
        if not meta["ranks_in_sync"]:
            say("igam: WARNING: the ranks' parameters differ at the end of training (gradients were not "
                "averaged: see docs/DISTRIBUTED.md, pitfalls); rank 0's are saved.")
    checkpoint()
    if dist.main:
        save_weights(unwrap(model), run.weights_path, normalization_metadata(unwrap(model)))
        if objective.state_dict():  # e.g. the discriminator and the resolved lambda_diff
            save_weights(objective, run.objective_path)
        write_json(run.metrics_path, {"final": final, "train": last, "skipped_steps": skipped, "steps": step,
                                      "passes_per_image": meta["passes_per_image"]})
        meta.update(status="finished", finished=time.time(), epochs=round(step / steps_per_epoch, 4),
                    train_time_s=round(elapsed_before + time.time() - t_start, 1))
        write_json(run.meta_path, meta)
        logger.close()
        say(f"igam: finished {run_dir}: "
            + " ".join(f"{k}={v:.4f}" for k, v in final.items() if k != "epoch"))
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    return run_dir
