"""The fine-tuned teacher f_t(A x + b) (paper 4.1 and 4.3, eqs. 6, 15-16): an input adapter in front of a
frozen robust network whose logit layer was replaced for the target task.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from igam.method.adapters import Adapter, build_adapter
from igam.models import ImageClassifier, model_from_args
from igam.utils import batchnorms, bn_batch_stats


class AdaptedTeacher(nn.Module):
    """`adapter` then a frozen teacher `body` with a new logit layer: f_t(A x + b) (eqs. 15-16).

    With body_bn='eval' (default) the frozen body always runs with its running BatchNorm statistics;
    'train' reproduces the official code, which runs every network with batch statistics. `frozen` is
    False while the body's own layers are trained (fine-tuning beyond the head, a robust start): the body
    then follows train/eval mode like any network being trained. A network loaded from disk is frozen.
    """

    def __init__(self, adapter: Adapter, body: ImageClassifier, body_bn: str = "eval"):
        super().__init__()
        self.adapter, self.body, self.body_bn = adapter, body, body_bn
        self.adapter_spec = adapter.spec
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Target-task logits (B, K) of target images x (B, C, H, W) in [0, 1]."""
        if self.body_bn == "train" and self.training and self.frozen:  # batch statistics, frozen averages
            with bn_batch_stats(self.body):
                return self.body(self.adapter(x))
        return self.body(self.adapter(x))

    def train(self, mode: bool = True):
        """The adapter follows `mode`; the frozen body stays in eval mode, except its BatchNorm layers
        with body_bn='train' (Dropout and every other layer never switch on in a frozen teacher). A body
        being trained (`frozen` False) follows `mode` as a whole."""
        super().train(mode)
        if not self.frozen:
            return self
        self.body.eval()
        if self.body_bn == "train":
            for m in batchnorms(self.body):
                m.train(mode)
        return self

    def get_classifier(self) -> nn.Linear:
        return self.body.get_classifier()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's penultimate features (B, D) of target images x (B, C, H, W) in [0, 1]."""
        return self.body.forward_features(self.adapter(x))

    @property
    def igam_args(self) -> dict[str, Any]:
        a = self.adapter.in_shape
        return {
            "name": f"adapted:{self.body.igam_args['name']}",
            "num_classes": self.body.num_classes,
            "in_chans": a[0],
            "input_size": list(a[1:]),
            "teacher": self.body.igam_args,
            "adapter": self.adapter.spec,
            "body_bn": self.body_bn,
        }


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """Re-create the network of a fine-tuned-teacher run from its meta.json (weights loaded by the caller)."""
    args = meta["model"]
    body = model_from_args(args["teacher"])
    body.reset_classifier(args["num_classes"])
    t_shape = (args["teacher"]["in_chans"], *args["teacher"]["input_size"])
    adapter = build_adapter(args["adapter"], (args["in_chans"], *args["input_size"]), t_shape)
    return AdaptedTeacher(adapter, body, args.get("body_bn", "eval"))
