"""Divergence guards of the training loop (docs/RELIABILITY.md, "Divergence never looks like success").

- Non-finite loss terms and gradients: named per step (`nonfinite_terms`, `nonfinite_grads`); such a step
  is skipped (nan_policy=skip) or stops the run (nan_policy=stop).
- Skips have limits: MAX_SKIPS_IN_A_ROW in a row, or more than MAX_SKIP_SHARE of all steps, stop the run.
- An applied update is checked (`StateGuard.after_update`): one fused norm over the weights and floating
  buffers, one host-device sync. Non-finite, or more than GROWTH_LIMIT times the previous norm (e.g.
  lr=1e30), rejects the update: the run stops and rolls back to its last good checkpoint on disk. No copy of
  the weights is kept per step; checkpoints are written only from states that pass `StateGuard.finite`,
  and never during a run of skipped steps, so the newest checkpoint is always a known-good state.
- Slow drifts, against the run's own early values: the weights' norm more than DRIFT_LIMIT times its value
  at the run's start (checked on the norm `after_update` reads anyway), or the mean training loss of a log
  window more than LOSS_DRIFT_LIMIT times that of the run's first step (at least LOSS_FLOOR; the loss is
  the objective's cross-entropy term `ce`, a scale all objectives share, else its total loss; checked at
  each log row and checkpoint, one read-back per window). Either stops the run as a divergence.
- A run that never trained: the trainable weights' norm exactly as at the run's start after updates were
  applied (a learning rate or clip so small that no float32 weight moves) stops the run at its end.

Each rule has a name (`RULES`), recorded in meta.json (`stop_rule`) and said in the error. What the guard
remembers (the start norms, the reference loss, the open loss window, the updates applied) is saved in
every checkpoint (`state_dict`), so a resumed run stops exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn as nn

MAX_SKIPS_IN_A_ROW = 20  # nan_policy=skip gives up after this many non-finite steps in a row
MAX_SKIP_SHARE = 0.05  # ... or once more than this share of the run's steps has been skipped
GROWTH_LIMIT = 100.0  # an update that multiplies the weights' norm by more than this is an explosion
DRIFT_LIMIT = 1000.0  # weights' norm above this multiple of its value at the run's start: a slow drift
NORM_FLOOR = 1.0  # ... of at least this norm (a head initialised near 0 may grow far from its start)
LOSS_DRIFT_LIMIT = 1000.0  # a log window's mean |loss| above this multiple of the first step's: a drift
LOSS_FLOOR = 1.0  # ... of at least this |loss| (a run that starts from a trained model starts near 0)

# the names of the rules that stop a run (meta.json's stop_rule)
RULES = {
    "non-finite-step": "a non-finite loss term or gradient under nan_policy=stop",
    "skips-in-a-row": f"{MAX_SKIPS_IN_A_ROW} non-finite steps in a row",
    "skip-share": f"more than {MAX_SKIP_SHARE:.0%} of the run's steps skipped",
    "non-finite-update": "an update that made the weights non-finite",
    "explosion": f"an update that multiplied the weights' norm by more than {GROWTH_LIMIT:g}",
    "weight-drift": f"the weights' norm above {DRIFT_LIMIT:g}x its value at the run's start",
    "loss-drift": f"a log window's mean |loss| above {LOSS_DRIFT_LIMIT:g}x the run's first step's",
    "never-moved": "updates applied, yet the trainable weights exactly as at the run's start",
    "non-finite-state": "non-finite weights or buffers at a checkpoint",
    "non-finite-outputs": "a model whose outputs are non-finite",
    "other-rank": "another DDP rank's guard fired",
}


class Stop(NamedTuple):
    """Why a guard stops the run: the rule's name (RULES) and the message."""

    rule: str
    message: str


def skip_limit(total: int) -> float:
    """The number of skipped steps a run of `total` steps may exceed before it stops (5% of its steps)."""
    return MAX_SKIP_SHARE * total


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


class StateGuard:
    """Watches the trainable weights and floating buffers (e.g. BatchNorm statistics) of the student for
    non-finite values, explosions and slow drifts, and those of `extra` modules (e.g. a discriminator) for
    non-finite values only (their scale says nothing about the student's); and the training loss for slow
    drifts (`add_loss`, `loss_drift`)."""

    def __init__(self, student: nn.Module, *extra: nn.Module):
        self.student = _floating(student)
        self.params = [p.detach() for p in student.parameters() if p.requires_grad]
        self.extra = [t for m in extra for t in _floating(m)]
        self.norm = self._norms()[0]
        # the run's own early values (replaced by a checkpoint's on resume: `load_state_dict`)
        self.start_norm, self.start_param_norm = self.norm, self._param_norm()
        self.ref_loss: torch.Tensor | float | None = None  # |loss| of the run's first applied step
        self.loss_sum: torch.Tensor | float = 0.0  # the open window's sum of |loss| (no sync per step)
        self.loss_count = 0
        self.updates = 0  # updates applied in the run

    def _norms(self) -> tuple[float, float]:
        """(student norm, extra norm), read back together: one host-device sync."""
        with torch.no_grad():
            parts = [torch.nn.utils.get_total_norm(ts) if ts else None for ts in (self.student, self.extra)]
            device = next((p.device for p in parts if p is not None), torch.device("cpu"))
            both = torch.stack([p.float().to(device) if p is not None else torch.zeros((), device=device)
                                for p in parts]).tolist()
        return both[0], both[1]

    def _param_norm(self) -> float:
        with torch.no_grad():
            return float(torch.nn.utils.get_total_norm(self.params)) if self.params else 0.0

    def finite(self) -> bool:
        """Whether every watched value is finite now (fused norms: a NaN or Inf anywhere makes them
        non-finite; only then is each tensor looked at, as huge finite values also overflow a norm)."""
        if all(math.isfinite(v) for v in self._norms()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in (*self.student, *self.extra))

    def after_update(self) -> Stop | None:
        """None when the state after an update is finite, has not exploded and has not drifted, else the
        rule that fired (the update is then to be rejected)."""
        norm, extra = self._norms()
        if not (math.isfinite(norm) and math.isfinite(extra)):
            return Stop("non-finite-update", "the update made the weights non-finite")
        if norm > GROWTH_LIMIT * max(self.norm, 1.0):
            return Stop("explosion", f"the update made the weights explode (their norm went from "
                                     f"{self.norm:.3g} to {norm:.3g} in one step)")
        if norm > DRIFT_LIMIT * max(self.start_norm, NORM_FLOOR):
            return Stop("weight-drift", f"the weights drifted: their norm grew to {norm:.3g}, more than "
                                        f"{DRIFT_LIMIT:g}x its {self.start_norm:.3g} at the run's start (the "
                                        "weight-drift rule)")
        self.norm = norm
        self.updates += 1
        return None

    def add_loss(self, loss: torch.Tensor) -> None:
        """Count an applied step's loss into the open window (device-side; nothing is read back)."""
        value = loss.detach().float().abs()
        if self.ref_loss is None:
            self.ref_loss = value
        self.loss_sum = self.loss_sum + value
        self.loss_count += 1

    def loss_drift(self, reset: bool = False) -> Stop | None:
        """None, or the loss-drift rule when the open window's mean |loss| is more than LOSS_DRIFT_LIMIT
        times max(|loss| of the run's first step, LOSS_FLOOR). One read-back; `reset` starts a new window
        (at a log row)."""
        out = None
        if self.loss_count and self.ref_loss is not None:
            self.ref_loss = float(self.ref_loss)
            mean = float(self.loss_sum) / self.loss_count
            ref = max(self.ref_loss, LOSS_FLOOR)
            if not mean <= LOSS_DRIFT_LIMIT * ref:
                out = Stop("loss-drift",
                           f"the training loss drifted: its mean over the last {self.loss_count} steps is "
                           f"{mean:.3g}, more than {LOSS_DRIFT_LIMIT:g}x the {ref:.3g} of the run's first "
                           "step (the loss-drift rule)")
        if reset:
            self.loss_sum, self.loss_count = 0.0, 0
        return out

    def never_moved(self) -> Stop | None:
        """None, or the never-moved rule when updates were applied but the trainable weights' norm is exactly
        what it was at the run's start (no float32 weight moved: lr or grad_clip far too small)."""
        if self.updates and self.params and self._param_norm() == self.start_param_norm:
            return Stop("never-moved", f"the trainable weights never changed in {self.updates} applied "
                                       "updates (their norm is bit-identical to the run's start): the steps "
                                       "are too small to move a float32 weight (the never-moved rule)")
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the guard remembers, as plain numbers for a checkpoint."""
        return {"start_norm": self.start_norm, "start_param_norm": self.start_param_norm,
                "ref_loss": None if self.ref_loss is None else float(self.ref_loss),
                "loss_sum": float(self.loss_sum), "loss_count": self.loss_count, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict`, after the watched networks' own weights were restored: the guard looks at
        them as they are now (a checkpoint of an older igam has no guard state: the run's early values are
        then taken from now)."""
        self.norm = self._norms()[0]
        if not state:
            self.start_norm, self.start_param_norm = self.norm, self._param_norm()
            return
        self.start_norm, self.start_param_norm = float(state["start_norm"]), float(state["start_param_norm"])
        self.ref_loss = None if state.get("ref_loss") is None else float(state["ref_loss"])
        self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
        self.updates = int(state["updates"])


def _floating(module: nn.Module) -> list[torch.Tensor]:
    """The trainable parameters and floating buffers of `module` (frozen weights cannot change)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [t.detach() for t in (*params, *module.buffers()) if t.is_floating_point()]
