"""rrm: robust representation matching (Vaishnavi, Eykholt & Rahmati, "Transferring adversarial robustness
through robust representation matching", USENIX Security 2022).

On clean images only, the student's penultimate features are pulled towards a robust teacher's:

    loss = CE(f_s(x), y) + feature_weight x (1 - mean_i cos(P phi_s(x_i), phi_t(x_i)))

phi_s from the same forward pass as the cross-entropy (one student forward and backward per image), phi_t
from the frozen teacher (a forward, cached per training image when the inputs do not change between
epochs), P a linear map learned with the student when the feature sizes differ (our choice where the paper
is silent; the identity when they agree). The released code (Ethos-lab/robust-representation-matching)
adds the mean cosine with a weight whose sign the scripts set; we write the loss as the paper does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.objectives.base import Metrics, Objective, Passes, count, register_objective
from igam.objectives.terms import FeatureMatching, capture, feature_term


class RRM(Objective):
    """CE(f_s(x), y) + the feature term (objectives/terms.py, FeatureMatching) on the same pass."""

    name = "rrm"

    def __init__(self, term: FeatureMatching):
        super().__init__()
        self.with_term(term)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Metrics, None]:
        assert isinstance(self.term, FeatureMatching)
        with capture(model, self.term.layer, "the student") as phi:
            logits = model(x)
            features = phi()
        ce = F.cross_entropy(logits, y)
        match, metrics = self.term.match(features, x, y, index)
        return ce + match, {"ce": ce.detach(), "acc": (logits.argmax(1) == y).float().mean(), **metrics}, None

    def passes(self, step: int) -> Passes:
        """One student forward and backward (the features come from the cross-entropy's pass) and the
        teacher's forward (first epoch only with the cache)."""
        assert isinstance(self.term, FeatureMatching)
        return {"student": count(1, 1), **self.term.teacher_passes(step)}


@register_objective(
    "rrm",
    help="robust representation matching (Vaishnavi et al. 2022): CE + feature_weight "
    "(1 - cos) between the student's and the robust teacher's penultimate features, clean images "
    "only",
    reads=("teacher", "feature_weight", "feature_layer", "teacher_feature_layer", "teacher_cache"),
    summary=("feature_weight", "feature_layer"),
    cost=1.3,
)
def make_rrm(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> RRM:
    return RRM(feature_term(cfg, model, spec, device))
