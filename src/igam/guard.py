"""Divergence guards of the training loop (docs/RELIABILITY.md, "Divergence never looks like success").

- Non-finite loss terms and gradients: named per step (`nonfinite_terms`, `nonfinite_grads`); such a step
  is skipped (nan_policy=skip) or stops the run (nan_policy=stop).
- Skips have limits: MAX_SKIPS_IN_A_ROW in a row, or more than MAX_SKIP_SHARE of all steps, stop the run.
- An applied update is checked (`StateGuard.after_update`): one fused norm over the weights and floating
  buffers, one host-device sync. Non-finite, or more than GROWTH_LIMIT times the previous norm (e.g.
  lr=1e30), rejects the update: the run stops and rolls back to its last good checkpoint on disk. No copy of
  the weights is kept per step; checkpoints are written only from states that pass `StateGuard.finite`,
  and never during a run of skipped steps, so the newest checkpoint is always a known-good state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

MAX_SKIPS_IN_A_ROW = 20  # nan_policy=skip gives up after this many non-finite steps in a row
MAX_SKIP_SHARE = 0.05  # ... or once more than this share of the run's steps has been skipped
GROWTH_LIMIT = 100.0  # an update that multiplies the weights' norm by more than this is an explosion


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
    non-finite values and explosions, and those of `extra` modules (e.g. a discriminator) for non-finite
    values only (their scale says nothing about the student's)."""

    def __init__(self, student: nn.Module, *extra: nn.Module):
        self.student = _floating(student)
        self.extra = [t for m in extra for t in _floating(m)]
        self.norm = self._norms()[0]

    def _norms(self) -> tuple[float, float]:
        """(student norm, extra norm), read back together: one host-device sync."""
        with torch.no_grad():
            parts = [torch.nn.utils.get_total_norm(ts) if ts else None for ts in (self.student, self.extra)]
            device = next((p.device for p in parts if p is not None), torch.device("cpu"))
            both = torch.stack([p.float().to(device) if p is not None else torch.zeros((), device=device)
                                for p in parts]).tolist()
        return both[0], both[1]

    def finite(self) -> bool:
        """Whether every watched value is finite now (fused norms: a NaN or Inf anywhere makes them
        non-finite; only then is each tensor looked at, as huge finite values also overflow a norm)."""
        if all(math.isfinite(v) for v in self._norms()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in (*self.student, *self.extra))

    def after_update(self) -> str:
        """'' when the state after an update is finite and has not exploded, else what went wrong (the
        update is then to be rejected)."""
        norm, extra = self._norms()
        if not (math.isfinite(norm) and math.isfinite(extra)):
            return "the update made the weights non-finite"
        if norm > GROWTH_LIMIT * max(self.norm, 1.0):
            return (f"the update made the weights explode (their norm went from {self.norm:.3g} to "
                    f"{norm:.3g} in one step)")
        self.norm = norm
        return ""


def _floating(module: nn.Module) -> list[torch.Tensor]:
    """The trainable parameters and floating buffers of `module` (frozen weights cannot change)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [t.detach() for t in (*params, *module.buffers()) if t.is_floating_point()]
