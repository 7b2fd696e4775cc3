"""igam: Input Gradient Adversarial Matching (Chan, Tay & Ong, CVPR 2020) in PyTorch.

Public API:
    load                    a trained classifier: a run folder, igam:NAME, robustbench:..., a weights file
    benchmark               robust accuracy of any classifier with `igam evaluate`'s attacks and checks
    InputGradientMatching   the IGAM loss terms for a batch (eqs. 7-14) and the discriminator step
    GradientDiscriminator   the discriminator on input-gradient maps (Appendix A)
    build_adapter           differentiable input adapters (paper 4.3)
    create_model            the model zoo (timm-style), plus timm:NAME / torchvision:NAME
    input_gradient          per-example input gradients (eqs. 8-9)
    register_objective      add a training method (one file; docs/ARCHITECTURE.md, "Adding a method")
"""

from igam.api import benchmark, load
from igam.files import PACKAGE_VERSION as __version__
from igam.method.adapters import build_adapter
from igam.method.discriminator import GradientDiscriminator
from igam.method.gradients import input_gradient
from igam.method.matching import InputGradientMatching
from igam.models import create_model, list_models
from igam.objectives import register_keys, register_objective  # imports and registers every method

__all__ = ["GradientDiscriminator", "InputGradientMatching", "__version__", "benchmark", "build_adapter",
           "create_model", "input_gradient", "list_models", "load", "register_keys", "register_objective"]
