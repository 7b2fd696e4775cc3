"""CUDA paths: bf16 autocast and the float32 input-gradient path, finite differences with TF32 off, the lean
double backward, torch.compile of teacher / discriminator / finite-difference student, channels_last, the
benchmark's CUDA memory figures. Every test is marked `cuda` and skipped, with the reason, where no CUDA
device is visible; run them on a GPU with `python3 -m pytest -q -m cuda tests/` (scripts/gpu-check, step
'tests').

Only igam's public API (`from igam import ...`) and its command line (`python -m igam ...`) are used, so the
tests survive internal moves; the CPU versions of these checks are in tests/test_precision.py and
tests/test_igam.py. Sizes are small: the whole file is meant to take about a minute on one GPU, most of it
the cold torch.compile of the compile test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igam import GradientDiscriminator, InputGradientMatching, build_adapter, create_model

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: these tests run on a GPU machine (scripts/gpu-check)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
CUDA = torch.device("cuda")
MODES = [("exact", "central"), ("finite-difference", "central"), ("finite-difference", "forward")]


@pytest.fixture
def tf32_off() -> Iterator[None]:
    """float32 convolutions and matmuls (what `igam train` sets for finite differences), restored after."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _batch(n: int = 32, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    device = device or CUDA
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device))


def _teacher(device: torch.device | None = None) -> tuple[nn.Module, nn.Module]:
    """The paper's Table-1 teacher shape: madry-mnist behind gray+crop28 (random weights, frozen)."""
    device = device or CUDA
    torch.manual_seed(0)
    adapter = build_adapter("gray+crop28", (3, 32, 32), (1, 28, 28))
    body = create_model("madry-mnist", num_classes=10, in_chans=1, input_size=28)
    return nn.Sequential(adapter, body).to(device).eval().requires_grad_(False), adapter


def _matching(mode: str, scheme: str = "central", amp_input_grad: bool = False,
              device: torch.device | None = None, double_backward: str = "lean") -> InputGradientMatching:
    device = device or CUDA
    teacher, adapter = _teacher(device)
    torch.manual_seed(1)
    disc = GradientDiscriminator((3, 28, 28), layers=3, channels=8).to(device)
    return InputGradientMatching(teacher, disc, lambda_adv=1.0, lambda_diff=10.0, mode=mode, fd_scheme=scheme,
                                 amp_input_grad=amp_input_grad, disc_view=adapter.disc_view,
                                 double_backward=double_backward).to(device)


def _student(device: torch.device | None = None, name: str = "resnet20", **kw) -> nn.Module:
    device = device or CUDA
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_chans=3, input_size=32, width=8, **kw).to(device).train()


def _step(igm: InputGradientMatching, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
          autocast: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """IGAM terms of one batch (optionally inside bf16 autocast, as amp=bf16 runs the step) and the
    student's parameter gradient of their loss."""
    student.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        terms = igm(student, x, y)
    terms["loss"].backward()
    return terms, torch.cat([p.grad.flatten() for p in student.parameters()])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors, compared on the CPU (they may come from different devices)."""
    return float(F.cosine_similarity(a.double().cpu().flatten(), b.double().cpu().flatten(), dim=0))


@pytest.mark.parametrize("mode,scheme", MODES)
def test_bf16_autocast_leaves_the_igam_terms_at_float32(mode: str, scheme: str, tf32_off: None) -> None:
    """amp=bf16 wraps the training step in autocast; the IGAM terms (J_t, J_s, L_diff, L_adv, the finite
    differences) run in float32 by default, so they equal the float32 terms up to kernel nondeterminism."""
    x, y = _batch()
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):  # autocast really is active on this device ...
        assert _student()(x).dtype == torch.bfloat16
    ref, ref_grad = _step(_matching(mode, scheme), _student(), x, y, autocast=False)
    got, grad = _step(_matching(mode, scheme), _student(), x, y, autocast=True)
    for key in ("loss", "ce", "l_diff", "l_adv", "js_norm", "jt_norm", "cos_js_jt"):
        assert got[key].dtype == torch.float32, key  # ... and the IGAM terms ignore it
        torch.testing.assert_close(got[key].detach(), ref[key].detach(), rtol=1e-4, atol=1e-6, msg=key)
    assert _cos(grad, ref_grad) > 0.9999


def test_amp_input_grad_puts_the_path_in_bf16_and_stays_close() -> None:
    """amp_input_grad=true (exact mode) runs J_s and J_t in bf16: different numbers, close to float32."""
    x, y = _batch()
    ref, ref_grad = _step(_matching("exact"), _student(), x, y, autocast=False)
    got, grad = _step(_matching("exact", amp_input_grad=True), _student(), x, y, autocast=True)
    assert not torch.equal(got["js_norm"], ref["js_norm"])  # the option really changes the precision
    for key in ("js_norm", "jt_norm", "l_diff"):
        rel = abs(float(got[key]) - float(ref[key])) / max(abs(float(ref[key])), 1e-12)
        assert rel < 0.1, f"{key}: bf16 {float(got[key]):.6g} vs float32 {float(ref[key]):.6g}"
    assert _cos(grad, ref_grad) > 0.9
    assert math.isfinite(float(got["loss"].detach()))


@pytest.mark.parametrize("bn", [False, True])
def test_finite_differences_with_tf32_off_match_exact_as_on_cpu(bn: bool, tf32_off: None) -> None:
    """tests/test_igam.py's check on the GPU: with TF32 off (as igam train sets it for finite differences)
    the FD student gradient of a smooth network matches exact double backprop, and the GPU's FD gradient
    matches the CPU's for the same weights and batch."""
    name = "small-cnn-bn" if bn else "small-cnn"
    grads = {}
    for device in (torch.device("cpu"), CUDA):
        x, y = _batch(32, device)
        for mode in ("exact", "finite-difference"):
            student = _student(device, name, activation="softplus")
            _, grads[device.type, mode] = _step(_matching(mode, device=device), student, x, y, autocast=False)
    assert _cos(grads["cuda", "exact"], grads["cuda", "finite-difference"]) >= 0.99
    assert _cos(grads["cuda", "exact"], grads["cpu", "exact"]) >= 0.9999
    assert _cos(grads["cuda", "finite-difference"], grads["cpu", "finite-difference"]) >= 0.999


@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_double_backward_matches_pytorchs_on_cuda(channels_last: bool, tf32_off: None) -> None:
    """double_backward=lean (the default) against PyTorch's formulas, exact IGAM step on resnet20 (TF32
    off, so both are float32 throughout; tests/test_double_backward.py checks them in float64 on CPU)."""
    x, y = _batch()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    ref, ref_grad = _step(_matching("exact", double_backward="torch"), _student().to(memory_format=fmt),
                          x, y, autocast=False)
    got, grad = _step(_matching("exact"), _student().to(memory_format=fmt), x, y, autocast=False)
    torch.testing.assert_close(got["loss"].detach(), ref["loss"].detach(), rtol=1e-5, atol=1e-6)
    assert _cos(grad, ref_grad) > 1 - 1e-5


def test_channels_last_igam_step_gives_finite_loss_close_to_contiguous(tf32_off: None) -> None:
    x, y = _batch()
    ref, ref_grad = _step(_matching("exact"), _student(), x, y, autocast=False)
    igm, student = _matching("exact"), _student()
    for net in (student, igm.teacher, igm.discriminator):
        net.to(memory_format=torch.channels_last)
    got, grad = _step(igm, student, x.contiguous(memory_format=torch.channels_last), y, autocast=False)
    assert torch.isfinite(got["loss"]) and torch.isfinite(grad).all()
    torch.testing.assert_close(got["loss"].detach(), ref["loss"].detach(), rtol=1e-3, atol=1e-5)
    assert _cos(grad, ref_grad) > 0.999


# ---------------------------------------------------------------------------------------------
# through the command line: what `igam train` / `igam transfer` do with compile / channels_last / amp
def _igam(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m igam ARGS` from this tree; the timeout keeps a hung run from eating the GPU check's
    budget (pytest-timeout is not installed on the GPU machine)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "igam", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"igam {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


COMMON = ("progress=false", "tensorboard=false", "eval_every=0", "eval_n=64", "log_every=1")


@pytest.fixture(scope="module")
def teacher_ft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned teacher run (madry-mnist on synthetic digits, head fine-tuned on synthetic colour
    images through gray+crop28), made on the CPU: the CUDA runs below load it."""
    out = tmp_path_factory.mktemp("cuda-teacher")
    small = ("train_subset=256", "epochs=1", "batch_size=64", "device=cpu", f"out_dir={out}", *COMMON)
    _igam("train", "method=standard", "dataset=synthetic:28x28x1:10", "model=madry-mnist", "width=4",
          "name=teacher", *small, cwd=out)
    _igam("finetune", f"teacher={out / 'teacher'}", "dataset=synthetic:32x32x3:10", "adapter=gray+crop28",
          "name=teacher_ft", *small, cwd=out)
    return out / "teacher_ft"


def _transfer(teacher: Path, out: Path, name: str, *extra: str, timeout: float = 120
              ) -> tuple[str, dict, dict]:
    res = _igam("transfer", f"teacher={teacher}", "dataset=synthetic:32x32x3:10", "train_subset=256",
                "epochs=1", "batch_size=32", "device=cuda", f"out_dir={out}", f"name={name}",
                "disc_layers=3", "disc_channels=8", "disc_every=1", *COMMON, *extra, cwd=out,
                timeout=timeout)
    run = out / name
    return (res.stdout + res.stderr, json.loads((run / "meta.json").read_text()),
            json.loads((run / "metrics.json").read_text()))


def _finite_run(meta: dict, metrics: dict) -> None:
    assert meta["status"] == "finished" and meta["device"].startswith("cuda")
    assert metrics["steps"] == 8 and metrics["skipped_steps"] == 0
    train = {k: v for k, v in metrics["train"].items() if isinstance(v, float)}
    assert train and all(math.isfinite(v) for v in train.values()), train
    assert "l_diff" in train and "ce" in train


def test_compile_teacher_discriminator_and_fd_student_through_the_cli(teacher_ft: Path,
                                                                      tmp_path: Path) -> None:
    """`igam transfer compile=true grad_matching=finite-difference device=cuda`: the teacher, the
    discriminator, the trained (FD) student and the evaluated student all compile, none stays eager, and
    the compiled run trains with finite losses."""
    text, meta, metrics = _transfer(teacher_ft, tmp_path, "compiled", "compile=true", "model=small-cnn-bn",
                                    "width=8", "grad_matching=finite-difference", "fd_scheme=forward",
                                    timeout=150)  # cold inductor compiles of five graphs
    for what in ("the teacher", "the discriminator", "the student (training)",
                 "the student (evaluation, attacks)"):
        assert f"compile: {what} compiled" in text, f"{what} was not compiled:\n{text[-3000:]}"
    assert "stays eager" not in text, text[-3000:]
    assert "TF32 is off" in text  # finite differences on CUDA: float32 convolutions
    _finite_run(meta, metrics)


def test_channels_last_and_bf16_training_through_the_cli(teacher_ft: Path, tmp_path: Path) -> None:
    """`igam transfer channels_last=true amp=bf16 device=cuda` (exact mode, BatchNorm student) trains with
    finite losses; so does a PGD-7 run with the same settings."""
    _, meta, metrics = _transfer(teacher_ft, tmp_path, "cl-bf16", "channels_last=true", "amp=bf16",
                                 "model=resnet20", "width=8")
    _finite_run(meta, metrics)
    _igam("train", "method=pgd-at", "dataset=synthetic:32x32x3:10", "model=resnet20", "width=8",
          "train_subset=256", "epochs=1", "batch_size=32", "device=cuda", "channels_last=true", "amp=bf16",
          f"out_dir={tmp_path}", "name=pgd", *COMMON, cwd=tmp_path)
    m = json.loads((tmp_path / "pgd" / "metrics.json").read_text())
    assert m["skipped_steps"] == 0 and math.isfinite(m["train"]["ce"])


def test_step_cost_benchmark_reports_positive_cuda_memory_figures() -> None:
    path = REPO / "benchmarks" / "step_cost.py"
    spec = importlib.util.spec_from_file_location("bench_step_cost_cuda", path)
    step_cost = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = step_cost  # dataclasses look their module up by name
    spec.loader.exec_module(step_cost)
    tf32 = torch.backends.cudnn.allow_tf32
    out = step_cost.main(["--tiny", "--device", "cuda", "--quiet", "--steps", "2", "--warmup", "1"])
    assert torch.backends.cudnn.allow_tf32 == tf32  # the per-method TF32 settings do not leak
    assert set(out["peak_memory_mib"]) == set(out["seconds_per_step"])
    assert all(v is not None and v > 0 for v in out["peak_memory_mib"].values()), out["peak_memory_mib"]
    assert all(v > 0 for v in out["images_per_s"].values())
    assert out["tf32"]["igam-fd-forward"] is False and out["tf32"]["igam-fd-central"] is False
    assert out["machine"] == torch.cuda.get_device_name(0)


def test_pgd_at_with_an_eps_ramp_trains_on_cuda(tmp_path: Path) -> None:
    """The first GPU check (2026-11-29, H200) crashed here: the eps ramp's train_eps metric was made on the
    CPU and the logged means stacked it with CUDA tensors. It must train and log train_eps."""
    _igam("train", "method=pgd-at", "dataset=synthetic:28x28x1:10", "model=madry-mnist", "width=4",
          "train_subset=256", "epochs=1", "batch_size=32", "device=cuda", "eps=0.3", "step_size=0.1",
          "steps=2", "eps_warmup_epochs=0.5", f"out_dir={tmp_path}", "name=ramp", *COMMON, cwd=tmp_path)
    m = json.loads((tmp_path / "ramp" / "metrics.json").read_text())
    assert m["skipped_steps"] == 0 and math.isfinite(m["train"]["ce"]) and m["train"]["train_eps"] > 0


@pytest.mark.parametrize("limit,where", [(None, "device"), (0, "pinned host")])
def test_teacher_cache_on_the_device_and_in_pinned_host_memory(limit: int | None, where: str) -> None:
    """teacher_cache=True (issue 15): the store lives on the GPU under the size limit, else in pinned host
    memory; either way a second epoch serves J_t bit for bit as the first computed it, on the GPU."""
    teacher, adapter = _teacher()
    igm = InputGradientMatching(teacher, None, lambda_adv=0.0, lambda_diff=10.0, teacher_cache=True,
                                cache_device_limit_bytes=limit).to(CUDA)
    x, y = _batch(32)
    first = [igm.teacher_gradients(x[i:i + 8], y[i:i + 8], torch.arange(i, i + 8)) for i in range(0, 32, 8)]
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    again = igm.teacher_gradients(torch.zeros_like(x), y[order.to(CUDA)], order)  # x unread when cached
    assert igm.teacher_cache.where == where and again.device.type == "cuda"
    assert torch.equal(again, torch.cat(first)[order.to(CUDA)])
    uncached = InputGradientMatching(teacher, None, lambda_adv=0.0, lambda_diff=10.0).to(CUDA)
    torch.testing.assert_close(again, uncached.teacher_gradients(x[order.to(CUDA)], y[order.to(CUDA)]),
                               rtol=1e-4, atol=1e-7)
