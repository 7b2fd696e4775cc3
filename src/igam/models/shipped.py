"""Teachers that ship inside the package: robust networks trained by this project, each a safetensors file
with a certificate beside it, loadable offline as `teacher=igam:NAME` (e.g. `igam:mnist-linf-0.3`).

Public teacher checkpoints keep disappearing behind dead links; these cannot. A certificate
(`weights/NAME.json`) records what the weights were measured to do and how they were made:

    name, dataset, threat ("Linf"), eps (input units in [0, 1]), model (the architecture as igam_args:
    name, num_classes, in_chans, input_size, width, activation, normalize), sha256 of the weights file,
    accuracy {clean, pgd100x3-mix-cos (igam's strongest PGD), autoattack, ...} in [0, 1] on the first n
    test images, n, attacks (the attack versions and settings), command (that trained it), train_minutes,
    machine, date, igam_version, torch; recertified (when a figure was re-measured: date, command, commit,
    the figures it replaced; `scripts/recertify-teacher`).

`load_shipped` refuses weights whose sha256 differs from the certificate's (a damaged or replaced file);
`scripts/ship-teacher` writes both files from a finished, evaluated run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from igam.errors import IgamError
from igam.files import load_weights, read_json_object, sha256_file
from igam.models import ImageClassifier, model_from_args

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PREFIX = "igam:"
CERTIFICATE_KEYS = ("name", "dataset", "threat", "eps", "model", "sha256", "accuracy", "n", "command")


def list_shipped() -> list[str]:
    """Names of the shipped teachers (without the `igam:` prefix), sorted."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json")
                  if (WEIGHTS_DIR / f"{p.stem}.safetensors").is_file())


def shipped_name(spec: str) -> str:
    """'igam:mnist-linf-0.3' -> 'mnist-linf-0.3', checked against the shipped teachers.

    Raises:
        IgamError: not an `igam:` name, or no such shipped teacher (the message lists those there are).
    """
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else ""
    if not name or name not in list_shipped():
        have = ", ".join(f"{PREFIX}{n}" for n in list_shipped()) or "none"
        raise IgamError(f"No shipped teacher '{spec}'. Shipped teachers: {have} (`igam models` lists them "
                        "with their certificates).")
    return name


def certificate(spec: str) -> dict[str, Any]:
    """The certificate of shipped teacher `spec` ('igam:NAME' or 'NAME') as a dict (see the module doc).

    Raises:
        IgamError: unknown name, or a certificate that lacks a field of CERTIFICATE_KEYS.
    """
    name = shipped_name(spec if spec.startswith(PREFIX) else PREFIX + spec)
    cert = read_json_object(WEIGHTS_DIR / f"{name}.json")
    missing = [k for k in CERTIFICATE_KEYS if k not in cert]
    if missing:
        raise IgamError(f"The certificate of {PREFIX}{name} lacks {', '.join(missing)}; the package is "
                        "damaged. Reinstall igam.")
    return cert


def weights_mismatch(spec: str) -> str:
    """'' when the weights file of shipped teacher `spec` has the sha256 its certificate names; otherwise
    what is wrong (the file was damaged or replaced), as one sentence with the fix."""
    cert = certificate(spec)
    path = WEIGHTS_DIR / f"{cert['name']}.safetensors"
    try:
        digest = sha256_file(path)
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e}); reinstall igam."
    if digest != cert["sha256"]:
        return (f"{path} does not match its certificate (sha256 {digest[:12]}... instead of "
                f"{str(cert['sha256'])[:12]}...): the file was damaged or replaced. Reinstall igam.")
    return ""


def load_shipped(spec: str) -> ImageClassifier:
    """The shipped teacher `spec` ('igam:NAME') in eval mode on the CPU, float32, inputs in [0, 1] pixel
    units of shape (N, C, H, W) as its certificate's model says; it returns logits (N, num_classes).

    Raises:
        IgamError: unknown name, a certificate that does not describe a buildable model, or weights whose
            sha256 differs from the certificate's (the file was damaged or replaced: reinstall igam).
    """
    cert = certificate(spec)
    name = cert["name"]
    path = WEIGHTS_DIR / f"{name}.safetensors"
    problem = weights_mismatch(spec)
    if problem:
        raise IgamError(problem)
    net = model_from_args(cert["model"])
    try:
        net.load_state_dict(load_weights(path))
    except RuntimeError as e:
        raise IgamError(f"{path} does not fit the architecture its certificate names "
                        f"({' '.join(str(e).split())[:200]}); reinstall igam.") from None
    return net.eval()


def describe(cert: dict[str, Any]) -> str:
    """One line for `igam models`: name, architecture, task, eps and the certified accuracies (%)."""
    acc = cert.get("accuracy") or {}
    figures = ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items() if isinstance(v, int | float))
    model = cert["model"]
    width = f" width {model['width']}" if model.get("width") else ""
    return (f"{PREFIX}{cert['name']}: {model['name']}{width}, {cert['dataset']}, {cert['threat']} eps "
            f"{cert['eps']:.4g}; {figures} (% on the first {cert['n']} test images)")
