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
    """Watches the floating tensors of the student (weights and buffers such as BatchNorm statistics) and
    of the objective (e.g. a discriminator) for non-finite values and explosions."""

    def __init__(self, *modules: nn.Module):
        self.tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        self.norm = self._norm()

    def _norm(self) -> float:
        if not self.tensors:
            return 0.0
        with torch.no_grad():
            return float(torch.nn.utils.get_total_norm([t.detach() for t in self.tensors]))

    def finite(self) -> bool:
        """Whether every watched value is finite now (one fused norm: a NaN or Inf anywhere makes it
        non-finite; only then is each tensor looked at, as huge finite values also overflow the norm)."""
        if math.isfinite(self._norm()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in self.tensors)

    def after_update(self) -> str:
        """'' when the state after an update is finite and has not exploded, else what went wrong (the
        update is then to be rejected)."""
        norm = self._norm()
        if not math.isfinite(norm):
            return "the update made the weights non-finite"
        if norm > GROWTH_LIMIT * max(self.norm, 1.0):
            return (f"the update made the weights explode (their norm went from {self.norm:.3g} to "
                    f"{norm:.3g} in one step)")
        self.norm = norm
        return ""
