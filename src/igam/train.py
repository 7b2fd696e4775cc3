"""The one training loop. Every method (standard, pgd-at, trades, finetune, igam, igr) is an objective
plugged into it; see igam.objectives.base for the contract.

Read top to bottom: set-up (device, data, model, objective, optimiser), resume, the step loop
(loss -> backward -> clip -> step -> objective.after_step -> log -> checkpoint), per-epoch evaluation,
final weights and metrics.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from igam.config import Config, parse_fraction, save_yaml
from igam.data import BatchLoader, DataSpec, load_data, resolve_augment, spec_of
from igam.errors import IgamError
from igam.models import create_model, model_from_args
from igam.objectives import create_objective
from igam.runs import (
    PACKAGE_VERSION,
    CSVLogger,
    git_commit,
    install_kill_hooks,
    kill_point,
    load_latest_state,
    load_weights,
    read_json,
    resolve_run,
    save_state,
    save_weights,
    write_json,
)
from igam.utils import Dist, bn_mode, seed_everything, setup_distributed, unwrap


# ---------------------------------------------------------------------------------------------
def run_name(cfg: Config) -> str:
    ds = cfg.dataset.replace(":", "-").replace("/", "_")[:40]
    return cfg.name or f"{cfg.method}-{cfg.model.replace(':', '-')}-{ds}-s{cfg.seed}"


def build_model(cfg: Config, spec: DataSpec) -> nn.Module:
    """The network a method trains: a zoo/timm/torchvision student, or (finetune) a frozen teacher with a
    new logit layer behind an input adapter."""
    if cfg.method == "finetune":
        from igam.teacher import build_finetune_model

        return build_finetune_model(cfg, spec)
    model = create_model(cfg.model, num_classes=spec.num_classes, in_chans=spec.shape[0],
                         input_size=spec.shape[1:], activation=cfg.activation, width=cfg.width,
                         normalize=cfg.normalize, mean=spec.mean, std=spec.std)
    if cfg.init_from:
        init_model_from(model, cfg.init_from)
    return model


def init_model_from(model: nn.Module, run: str | Path) -> None:
    """Load the final weights of run `run` into `model`, after checking architecture, classes and input."""
    src = resolve_run(run)
    theirs = read_json(src / "meta.json").get("model") or {}
    ours = unwrap(model).igam_args
    for key, what in (("name", "architecture"), ("num_classes", "number of classes"),
                      ("in_chans", "number of input channels"), ("width", "width"),
                      ("activation", "activation")):
        if theirs.get(key, ours[key]) != ours[key]:
            raise IgamError(f"init_from={run} cannot initialise this model: its {what} is "
                            f"{theirs.get(key)!r}, this run's is {ours[key]!r}. Start from a run with the "
                            "same model, dataset and width, or drop init_from.")
    weights = src / "model.safetensors"
    if not weights.exists():
        raise IgamError(f"init_from={run} has no model.safetensors yet; finish that run first (resume=true).")
    load_state_checked(model, load_weights(weights), f"init_from={run}")


def load_state_checked(model: nn.Module, state: dict[str, Any], what: str) -> None:
    """load_state_dict whose shape or key mismatches become one clear IgamError."""
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        first = "; ".join([t.strip() for t in str(e).splitlines() if t.strip()][1:3])[:300].rstrip(".")
        raise IgamError(f"{what} does not fit this model ({first}). It was written for another architecture, "
                        "input shape or number of classes.") from None


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


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (not biases, BatchNorm or normalisation buffers)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    if not decay and not no_decay:
        raise IgamError("This model has no trainable parameters.")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.method == "finetune":
        return torch.optim.Adam(groups, lr=cfg.finetune_lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             bn: str = "eval") -> float:
    """Clean accuracy in [0, 1] with eval-mode BatchNorm (or train-mode, labelled, for the official
    protocol)."""
    correct = 0
    device = next(model.parameters()).device
    with bn_mode(model, bn):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb
            correct += int((model(xb.to(device)).argmax(1) == y[i:i + batch_size].to(device)).sum())
    return correct / max(1, len(x))


def _rng_state() -> dict[str, Any]:
    """torch, CUDA, Python and NumPy generators as tensors and primitives (loadable with weights_only)."""
    import random

    import numpy as np

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, words, gauss = state["python"]
        random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def changed_settings(run_dir: Path, cfg: Config) -> str:
    """'lr 0.1 -> 0.05, ...' for the keys that differ from the run's saved config.yaml (resume aside)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    now = cfg.to_dict()
    return ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
                     if k != "resume" and k in saved and saved[k] != now[k])


MAX_SKIPS_IN_A_ROW = 20  # nan_policy=skip gives up after this many non-finite steps in a row


def nonfinite_terms(loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> list[str]:
    """Names of the non-finite loss terms of a step ('loss' when only the total is). All flags are reduced
    on the device and read back at once: one host-device sync per step, not one per term."""
    names = [k for k, v in metrics.items() if torch.is_tensor(v)]
    flags = torch.stack([torch.isfinite(metrics[k].detach()).all().to(loss.device) for k in names]
                        + [torch.isfinite(loss.detach()).all()]).tolist()
    bad = [k for k, ok in zip(names, flags) if not ok]
    return bad or ([] if flags[-1] else ["loss"])


def nonfinite_grads(model: nn.Module, limit: int = 3) -> list[str]:
    """'gradient of NAME' for the first parameters whose gradient holds NaN/Inf."""
    names = [n for n, p in model.named_parameters()
             if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return [f"gradient of {', '.join(names[:limit]) or 'the parameters'}{more}"]


def _all_ranks(flag: bool, dist: Dist) -> bool:
    """flag on every rank (under DDP all ranks must skip a step together, or they deadlock)."""
    if not dist.enabled:
        return flag
    import torch.distributed as tdist

    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item() > 0)


def _reduce(values: dict[str, torch.Tensor], dist: Dist) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].float() for k in keys])
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(t)
        t /= dist.world
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP with the defaults that are correct here. Not static_graph=True: with the input-gradient
    backward it silently stops averaging gradients (ranks drift apart without an error)."""
    return nn.parallel.DistributedDataParallel(module,
                                               device_ids=[device.index] if device.type == "cuda" else None)


def try_compile(module: nn.Module, example: torch.Tensor, what: str, say=print,
                frozen_too: bool = False) -> nn.Module:
    """torch.compile(module), checked on `example` (a forward and a first-order input gradient, which is
    all the compiled parts need; frozen_too: also with every parameter's requires_grad off, as the IGAM
    discriminator runs in the student's step); the eager module, with a message, if compilation fails.
    Buffers (e.g. BatchNorm running statistics) are left as they were; no parameter gradient is made."""
    saved = {k: v.detach().clone() for k, v in module.named_buffers()}
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        compiled = torch.compile(module)
        for frozen in (False, True) if frozen_too else (False,):
            for p, flag in flags:
                p.requires_grad_(flag and not frozen)
            inp = example.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(compiled(inp).float().sum(), inp)
    except Exception as e:  # any backend failure: no C++ compiler, an unsupported op, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no message"
        say(f"igam: compile: {what} stays eager: torch.compile failed ({type(e).__name__}: {first})")
        return module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for k, v in module.named_buffers():
                v.copy_(saved[k])
    say(f"igam: compile: {what} compiled")
    return compiled


def speed_setup(cfg: Config, model: nn.Module, objective: nn.Module, spec: DataSpec, device: torch.device,
                say=print) -> tuple[nn.Module, nn.Module]:
    """channels_last and torch.compile as cfg asks and the method allows. Returns (the student as the
    training step calls it, the student as evaluation calls it); `model` itself stays the plain module
    that is saved and loaded.

    Student compilation: first-order methods (standard, pgd-at, trades, finetune) and IGAM/igr in
    finite-difference mode. Never in exact mode: its loss needs the double backward of the student, which
    torch.compile (aot_autograd) does not support (pytorch#92348) or silently gets wrong (#181581)."""
    if cfg.channels_last:
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
            objective.to(memory_format=torch.channels_last)
        else:
            say("igam: channels_last=true is ignored on CPU: measured slower for IGAM steps there "
                "(docs/PERFORMANCE.md); it is a GPU setting.")
    accelerate = getattr(objective, "accelerate", None)  # IGAM/igr: the teacher and the discriminator
    if accelerate is not None:
        def compile_fn(m: nn.Module, ex: torch.Tensor, what: str, frozen_too: bool = False) -> nn.Module:
            return try_compile(m, ex, what, say, frozen_too)

        accelerate(compile_fn=compile_fn if cfg.compile else None,
                   memory_format=torch.channels_last if cfg.channels_last and device.type == "cuda" else None,
                   example=torch.zeros(cfg.batch_size, *spec.shape, device=device))
    if not cfg.compile:
        return model, model
    example = torch.zeros(cfg.batch_size, *spec.shape, device=device)
    if cfg.method in ("igam", "igr") and cfg.grad_matching == "exact":
        say("igam: compile: the student stays eager: grad_matching=exact needs its double backward, which "
            "torch.compile does not support; grad_matching=finite-difference compiles it.")
        train_model = model
    else:
        if cfg.method in ("igam", "igr"):
            # finite differences backpropagate the pass at x twice (J_s first, with retain_graph): compiled
            # backwards must not donate (free) their saved buffers on the first call
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
        model.train()
        train_model = try_compile(model, example, "the student (training)", say)
    model.eval()
    eval_model = try_compile(model, torch.zeros(cfg.eval_batch_size, *spec.shape, device=device),
                             "the student (evaluation, attacks)", say)
    model.train()
    return train_model, eval_model


def _shard(n: int, dist: Dist) -> slice:
    """This rank's contiguous share of n evaluation images."""
    per = -(-n // dist.world)
    return slice(min(n, dist.rank * per), min(n, (dist.rank + 1) * per))


def _combine(value: float, count: int, dist: Dist, device: torch.device) -> float:
    """The mean over all ranks of a per-rank mean `value` over `count` items."""
    if not dist.enabled:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value * count, float(count)], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    tdist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def _ranks_in_sync(params: list[torch.Tensor], device: torch.device) -> bool:
    """True when every rank holds bit-identical `params` (compares a float64 checksum across ranks)."""
    import torch.distributed as tdist

    with torch.no_grad():
        sums = [q for p in params for q in (p.detach().double().sum(), p.detach().double().pow(2).sum())]
        t = torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64)
        t = torch.cat([t, -t]).to(device if device.type == "cuda" else "cpu")
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)  # max of v and of -v: every rank equal iff max == -min
    n = len(t) // 2
    return bool(torch.equal(t[:n], -t[n:]))


def _broadcast_state(state: dict[str, Any] | None, dist: Dist, device: torch.device) -> dict[str, Any] | None:
    """Rank 0's resume state on every rank (ranks on other nodes need not see rank 0's disk)."""
    if not dist.enabled:
        return state
    import torch.distributed as tdist

    box = [state]
    tdist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


# ---------------------------------------------------------------------------------------------
def train(cfg: Config, log=print) -> Path:
    """Train according to cfg and return the run directory."""
    if cfg.amp_input_grad and cfg.amp != "bf16":
        raise IgamError("amp_input_grad=true runs the input-gradient path under amp=bf16; set amp=bf16 (fp16 "
                        "would need loss scaling inside the input gradient) or drop amp_input_grad.")
    dist, device = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)
    install_kill_hooks()  # crash tests only (IGAM_TEST_KILL_AT); no-op otherwise
    say = log if dist.main else (lambda *a, **k: None)

    run_dir = Path(cfg.out_dir) / run_name(cfg)
    state = None
    if cfg.resume:
        state = load_latest_state(run_dir, log=say) if dist.main else None
        state = _broadcast_state(state, dist, device)
        if state is None:
            say(f"igam: no usable checkpoint in {run_dir}; starting from the beginning.")
    elif (run_dir / "meta.json").exists() and read_json(run_dir / "meta.json").get("status") != "created":
        raise IgamError(f"Run directory '{run_dir}' already holds a run. Pass resume=true to continue it, "
                        "another name=..., or delete the directory.")

    # data and model ----------------------------------------------------------------------------
    arrays = load_data(cfg.dataset, cfg.data_dir or None, cfg.download, cfg.train_subset, cfg.test_subset)
    spec = spec_of(arrays)
    say(f"igam: {arrays.name} from {arrays.source}: {len(arrays.x_train)} train / {len(arrays.x_test)} test "
        f"images of shape {spec.shape}, {spec.num_classes} classes")
    model = build_model(cfg, spec).to(device)
    objective = create_objective(cfg, model, spec, device)
    optimizer = make_optimizer(cfg, model)
    augment = resolve_augment(cfg.augment, spec.shape)
    loader = BatchLoader(arrays.x_train, arrays.y_train, cfg.batch_size, augment=augment,
                         crop_padding=cfg.crop_padding, noise=parse_fraction(cfg.noise), seed=cfg.seed,
                         device=device, rank=dist.rank, world=dist.world)
    steps_per_epoch = len(loader)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    eval_x, eval_y = arrays.x_test[: cfg.eval_n or None], arrays.y_test[: cfg.eval_n or None]
    objective.begin(total, steps_per_epoch)

    step, elapsed_before, t_start = 0, 0.0, time.time()
    if state is not None:
        load_state_checked(model, state["model"], f"The checkpoint in {run_dir}")
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        objective.load_extra_state(state["objective_extra"])
        _set_rng_state(state["rng"])
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        say(f"igam: resumed {run_dir} at step {step}/{total}")
        changed = changed_settings(run_dir, cfg)
        if changed:
            say(f"igam: note: resuming with changed settings: {changed}")

    if cfg.amp != "none" and device.type != "cuda":
        say(f"igam: amp={cfg.amp} is a GPU setting; this {device.type} run uses float32.")
    if device.type == "cuda" and cfg.method in ("igam", "igr") and cfg.grad_matching == "finite-difference":
        # finite differences need full float32 arithmetic: TF32 (10-bit mantissa, cuDNN's default for
        # convolutions) rounds x + h v back to x at the steps used here
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        say("igam: TF32 is off for this run: finite-difference gradient matching needs float32 convolutions.")
    train_model, eval_model = speed_setup(cfg, model, objective, spec, device, say)
    if dist.enabled:
        train_model = _ddp(train_model, device)
        wrap = getattr(objective, "wrap_for_ddp", None)  # e.g. IGAM's discriminator: its own DDP wrapper
        if wrap is not None:
            wrap(lambda m: _ddp(m, device))

    meta = {"status": "running", "method": cfg.method, "model": unwrap(model).igam_args,
            "data": spec.to_dict(), "augment": augment, "seed": cfg.seed, "version": PACKAGE_VERSION,
            "git_commit": git_commit(), "torch": torch.__version__, "device": str(device),
            "world_size": dist.world, "steps": total, "steps_per_epoch": steps_per_epoch,
            "adapter": getattr(unwrap(model), "adapter_spec", None), "teacher": cfg.teacher or None,
            "eval_bn": cfg.eval_bn}
    if dist.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IgamError(f"Cannot create the run directory '{run_dir}' ({e.strerror or e}); choose "
                            "another out_dir=... or name=....") from None
        save_yaml(cfg.to_dict(), run_dir / "config.yaml")
        write_json(run_dir / "meta.json", meta)
    logger = CSVLogger(run_dir / "log.csv", (run_dir / "tb") if cfg.tensorboard else None,
                       resume_step=step if state else None) if dist.main else None
    eval_logger = CSVLogger(run_dir / "eval_log.csv", None, resume_step=step if state else None) \
        if dist.main else None

    def checkpoint() -> None:
        if dist.main:
            save_state(run_dir, step, {
                "step": step, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "objective": objective.state_dict(), "objective_extra": objective.extra_state(),
                "rng": _rng_state(), "scaler": scaler.state_dict(),
                "elapsed_s": elapsed_before + time.time() - t_start},
                keep=cfg.keep_checkpoints)

    def evaluate_now(epoch: float) -> dict[str, float]:
        # under torchrun each rank evaluates its share of the images and the accuracies are combined
        part = _shard(len(eval_x), dist)
        px, py = eval_x[part], eval_y[part]
        res = {"epoch": round(epoch, 3),
               "clean_acc": _combine(accuracy(eval_model, px, py, cfg.eval_batch_size, cfg.eval_bn), len(px),
                                     dist, device)}
        with bn_mode(unwrap(model), cfg.eval_bn):  # a few images: every rank computes the same numbers
            xb = eval_x[:256].to(device).float() / 255
            res.update(objective.eval_metrics(unwrap(model), xb, eval_y[:256].to(device)))
        if cfg.eval_attack:
            from igam.evaluate import evaluate_attack

            # (each rank's share draws its own random starts: seed + rank)
            acc = evaluate_attack(eval_model, px, py, cfg.eval_attack, spec, cfg.eval_batch_size,
                                  cfg.seed + dist.rank, cfg.eval_bn) if len(px) else 0.0
            res[f"{cfg.eval_attack}_acc"] = _combine(acc, len(px), dist, device)
        if dist.main:
            eval_logger.log(step, res)
        return res

    # the loop --------------------------------------------------------------------------------
    amp_ctx = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
               if cfg.amp != "none" and device.type == "cuda" else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=(cfg.amp == "fp16" and device.type == "cuda"))
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    eval_every_steps = max(1, round(cfg.eval_every * steps_per_epoch)) if cfg.eval_every > 0 else 0
    sums: dict[str, torch.Tensor] = {}
    count, skipped, skipped_in_a_row, t0, last = 0, 0, 0, time.time(), {}
    bar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=run_name(cfg), unit="step", dynamic_ncols=True,
                   mininterval=1.0, leave=False)
    while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        for x, y in loader.epoch(epoch, start):
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            factor = lr_factor(cfg, step, total, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = (cfg.finetune_lr if cfg.method == "finetune" else cfg.lr) * factor
            objective.on_lr(factor)
            model.train()
            with amp_ctx:
                loss, metrics = objective.loss(train_model, x, y, step)
            optimizer.zero_grad(set_to_none=True)
            # NaN/Inf guard: a non-finite loss term skips the backward, a non-finite gradient the update
            bad = nonfinite_terms(loss, metrics)
            if _all_ranks(not bad, dist):
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
                metrics["grad_norm"] = gnorm.detach()
                if _all_ranks(bool(torch.isfinite(gnorm)), dist):
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, gnorm)
                elif not scaler.is_enabled():  # (fp16: overflows are the scaler's to skip and rescale)
                    bad = nonfinite_grads(unwrap(model))
            if bad:
                msg = f"non-finite {', '.join(bad)} at step {step}"
                skipped += 1
                skipped_in_a_row += 1
                if cfg.nan_policy == "stop" or skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    why = "" if cfg.nan_policy == "stop" else f" ({MAX_SKIPS_IN_A_ROW} steps in a row)"
                    checkpoint()
                    if dist.main:
                        write_json(run_dir / "meta.json", {**meta, "status": "stopped", "stopped": msg})
                        logger.close()
                    raise IgamError(f"Training stopped: {msg}{why}. The last good state is checkpointed "
                                    f"in {run_dir}; lower lr or the lambdas, or set grad_clip, then "
                                    "resume=true.")
                say(f"igam: {msg}; step skipped (nan_policy=skip)")
                optimizer.zero_grad(set_to_none=True)
            else:
                skipped_in_a_row = 0
                scaler.step(optimizer)
                scaler.update()
                metrics.update(objective.after_step(train_model, x, y, step))
                kill_point("after-step")  # crash tests: die after the updates, before the step is counted
            step += 1
            kill_point("step")  # crash tests: die between steps, away from checkpoints
            if not bad:  # skipped steps stay out of the logged averages
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                count += 1
            if step % cfg.log_every == 0 or step == total:
                last = {k: v / max(1, count) for k, v in _reduce(sums, dist).items()}
                last.update(lr=optimizer.param_groups[0]["lr"], epoch=round(step / steps_per_epoch, 3),
                            images_per_s=round(count * cfg.batch_size * dist.world
                                               / max(1e-9, time.time() - t0), 1),
                            skipped_steps=skipped)
                if dist.main:
                    logger.log(step, last)
                sums, count, t0 = {}, 0, time.time()
                if bar is not None:
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("ce", "acc") if k in last})
            if bar is not None:
                bar.update(1)
            if eval_every_steps and step % eval_every_steps == 0 and step < total:
                res = evaluate_now(step / steps_per_epoch)
                say(f"igam: epoch {res['epoch']:.2f} " + " ".join(f"{k}={v:.4f}" for k, v in res.items()
                                                                   if k != "epoch"))
            if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0:
                checkpoint()
            if step >= total:
                break
    if bar is not None:
        bar.close()

    # the end -----------------------------------------------------------------------------------
    final = evaluate_now(step / steps_per_epoch)
    if dist.enabled:  # every rank must hold the same networks (student and e.g. the discriminator)
        meta["ranks_in_sync"] = _ranks_in_sync([*model.parameters(), *objective.parameters()], device)
        if not meta["ranks_in_sync"]:
            say("igam: WARNING: the ranks' parameters differ at the end of training (gradients were not "
                "averaged: see docs/DISTRIBUTED.md, pitfalls); rank 0's are saved.")
    checkpoint()
    if dist.main:
        save_weights(unwrap(model), run_dir / "model.safetensors")
        if objective.state_dict():  # e.g. the discriminator and the resolved lambda_diff
            save_weights(objective, run_dir / "objective.safetensors")
        metrics = {"final": final, "train": last, "skipped_steps": skipped, "steps": step}
        write_json(run_dir / "metrics.json", metrics)
        meta.update(status="finished", finished=time.time(), epochs=round(step / steps_per_epoch, 4),
                    train_time_s=round(elapsed_before + time.time() - t_start, 1))
        write_json(run_dir / "meta.json", meta)
        logger.close()
        say(f"igam: finished {run_dir}: "
            + " ".join(f"{k}={v:.4f}" for k, v in final.items() if k != "epoch"))
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    return run_dir


def load_run_model(run: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained network of a run (including its adapter and teacher body for fine-tuned runs)."""
    run_dir = resolve_run(run)
    meta = read_json(run_dir / "meta.json")
    if meta.get("method") == "finetune" or meta.get("adapter"):
        from igam.teacher import model_from_meta

        model = model_from_meta(meta)
    else:
        model = model_from_args(meta.get("model") or {})
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise IgamError(f"Run '{run_dir}' has no model.safetensors yet (status: {meta.get('status')}). "
                        "Finish it first, e.g. with resume=true.")
    load_state_checked(model, load_weights(weights), f"{weights}")
    return model.to(device).eval()
