"""Speed settings of a training run: torch.compile, channels_last, and the float32 arithmetic that
finite-difference gradient matching needs on CUDA (restored when the run ends: `process_settings`). What
an objective allows is read from its declared properties (needs_double_backward, needs_fp32,
backprops_twice), never from its name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from igam.objectives import Objective


def try_compile(module: nn.Module, example: torch.Tensor, what: str, say: Callable[[str], Any] = print,
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


@contextlib.contextmanager
def process_settings() -> Iterator[None]:
    """Restore, on leaving, the process-wide torch settings a run may change: TF32 (turned off for
    finite differences), deterministic algorithms (deterministic=true) and the number of threads
    (threads=N). Several runs in one process (`igam run`'s stages, the Python API) then each start from
    the caller's settings, not from what the run before them left."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if torch.get_num_threads() != saved[4]:
            torch.set_num_threads(saved[4])


def float32_arithmetic(objective: Objective, device: torch.device, say: Callable[[str], Any] = print) -> None:
    """TF32 off on CUDA for objectives that need full float32 arithmetic: TF32 (10-bit mantissa, cuDNN's
    default for convolutions) rounds x + h v back to x at the finite-difference steps used here."""
    if device.type == "cuda" and objective.needs_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        say("igam: TF32 is off for this run: finite-difference gradient matching needs float32 convolutions.")


def speed_setup(cfg: Any, model: nn.Module, objective: Objective, input_shape: tuple[int, ...],
                device: torch.device, say: Callable[[str], Any] = print) -> tuple[nn.Module, nn.Module]:
    """channels_last and torch.compile as cfg asks and the objective allows. Returns (the student as the
    training step calls it, the student as evaluation calls it); `model` itself stays the plain module
    that is saved and loaded.

    The student is compiled unless the objective needs its double backward (IGAM/igr in exact mode),
    which torch.compile (aot_autograd) does not support (pytorch#92348) or silently gets wrong (#181581).
    The objective's own networks (IGAM: the teacher and the discriminator) are compiled by its
    `accelerate`."""
    cuda = device.type == "cuda"
    if cfg.channels_last:
        if cuda:
            model.to(memory_format=torch.channels_last)
            objective.to(memory_format=torch.channels_last)
        else:
            say("igam: channels_last=true is ignored on CPU: measured slower for IGAM steps there "
                "(docs/PERFORMANCE.md); it is a GPU setting.")

    def compile_fn(m: nn.Module, ex: torch.Tensor, what: str, frozen_too: bool = False) -> nn.Module:
        return try_compile(m, ex, what, say, frozen_too)

    objective.accelerate(compile_fn=compile_fn if cfg.compile else None,
                         memory_format=torch.channels_last if cfg.channels_last and cuda else None,
                         example=torch.zeros(cfg.batch_size, *input_shape, device=device))
    if not cfg.compile:
        return model, model
    example = torch.zeros(cfg.batch_size, *input_shape, device=device)
    if objective.needs_double_backward:
        say("igam: compile: the student stays eager: grad_matching=exact needs its double backward, which "
            "torch.compile does not support; grad_matching=finite-difference compiles it.")
        train_model = model
    else:
        if objective.backprops_twice:
            # finite differences backpropagate the pass at x twice (J_s first, with retain_graph): compiled
            # backwards must not donate (free) their saved buffers on the first call
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
        model.train()
        train_model = try_compile(model, example, "the student (training)", say)
    model.eval()
    eval_model = try_compile(model, torch.zeros(cfg.eval_batch_size, *input_shape, device=device),
                             "the student (evaluation, attacks)", say)
    model.train()
    return train_model, eval_model
