"""Cheap adversarial training (fast-at, n-fgsm, free-at), kd-noise, smooth zoo students, and the cost in
passes per training image that every run records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.attacks import PGD
from igam.config import make_config, method_names
from igam.data import BatchLoader, load_data
from igam.errors import IgamError
from igam.files import read_json
from igam.method.gradients import flat_cosine, input_gradient
from igam.method.matching import InputGradientMatching
from igam.models import create_model, list_models
from igam.objectives import OBJECTIVES, count_passes, create_objective
from igam.objectives.cheap_at import NFGSM, FastAT, FreeAT
from igam.objectives.igam import IGAMObjective
from igam.objectives.kd_noise import KDNoise
from igam.objectives.pgd_at import PGDAT, TRADES
from igam.runs import load_run_model
from igam.teachers import frozen_teacher
from igam.train import train

CPU = torch.device("cpu")


class Net(nn.Module):
    def __init__(self, k: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 8 * 8, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _cfg(**kw: Any):
    return make_config(overrides={"dataset": "synthetic:8x8x1:4", "eps": "0.1", **kw})


def quiet(*_: Any, **__: Any) -> None:
    pass


# --------------------------------------------------------------------------- the methods' equations
def test_methods_are_registered_and_listed_in_train_help() -> None:
    from igam.cli import build_parser

    assert {"fast-at", "n-fgsm", "free-at", "kd-noise", "igr"} <= set(method_names()) <= set(OBJECTIVES)
    text = build_parser().verbs["train"].format_help()
    methods = text[text.index("methods (method=...") : text.index("configuration keys (key=value")]
    for m in method_names():
        assert f"\n  {m} " in methods, f"{m} missing from the method list of `igam train --help`"
    for key in ("fast_alpha", "nfgsm_noise", "free_replays", "kd_temperature", "kd_sigma", "kd_weight"):
        assert f"  {key} " in text


def test_fast_at_is_fgsm_from_a_random_start_projected_to_the_ball() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    obj = create_objective(_cfg(method="fast-at"), net, None, CPU)
    assert isinstance(obj, FastAT) and obj.step_size == pytest.approx(1.25 * 0.1) and obj.steps == 1
    assert create_objective(_cfg(method="fast-at", fast_alpha="0.05"), net, None, CPU).step_size == 0.05
    x, y = _batch()
    x_adv = obj.attack(net, x, y, step=3)
    d = (x_adv - x).abs()
    assert d.max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # a step of 1.25 eps from a random start ends on the ball's surface for most pixels (projected there)
    assert (d > 0.1 - 1e-6).float().mean() > 0.5
    assert torch.equal(x_adv, obj.attack(net, x, y, step=3))
    assert not torch.equal(x_adv, obj.attack(net, x, y, step=4))
    adv_ce = F.cross_entropy(net(x_adv), y)
    assert float(adv_ce.detach()) > float(F.cross_entropy(net(x), y).detach())


def test_n_fgsm_adds_noise_of_k_eps_and_does_not_project() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    obj = create_objective(_cfg(method="n-fgsm"), net, None, CPU)
    assert isinstance(obj, NFGSM) and obj.noise == 2.0 and obj.step_size == pytest.approx(0.1)
    x = torch.full((64, 1, 8, 8), 0.5)  # mid-grey: the image box never clips
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))
    x_adv = obj.attack(net, x, y, step=0)
    d = (x_adv - x).abs()
    assert d.max() > 0.1 + 0.05, "N-FGSM must not project to the eps-ball"
    assert d.max() <= 3 * 0.1 + 1e-6  # |noise| <= 2 eps, plus the step of eps
    assert torch.equal(x_adv, obj.attack(net, x, y, step=0))
    # with k = 0 it is FGSM of step eps from x itself
    plain = NFGSM(0.1, noise=0.0).attack(net, x, y, 0)
    x_in = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(x_in), y, reduction="sum"), x_in)
    torch.testing.assert_close(plain, (x + 0.1 * g.sign()).clamp(0, 1))


def test_free_at_carries_the_perturbation_from_the_training_backward() -> None:
    torch.manual_seed(0)
    net = Net()
    obj = create_objective(_cfg(method="free-at", free_replays=3), net, None, CPU)
    assert isinstance(obj, FreeAT) and obj.replays == 3
    x, y = _batch()
    deltas = []
    for step in range(4):
        net.zero_grad()
        loss, metrics, aux = obj.loss(net, x, y, step)
        loss.backward()
        grad = aux.grad.clone()
        before = aux.detach().clone()
        obj.after_step(net, x, y, step, aux)
        torch.testing.assert_close(obj.delta, (before + 0.1 * grad.sign()).clamp(-0.1, 0.1))
        assert all(p.grad is not None for p in net.parameters()), "one backward: weights and delta"
        deltas.append(obj.delta.clone())
    assert deltas[0].abs().max() == pytest.approx(0.1) and not torch.equal(deltas[0], deltas[3])
    aux = obj.delta.clone().requires_grad_(True)
    aux.grad = torch.full_like(aux, float("nan"))  # an fp16 overflow: the loss scaler skips the step
    obj.after_step(net, x, y, 4, aux)
    assert torch.equal(obj.delta, deltas[3])
    state = obj.extra_state()
    fresh = FreeAT(0.1, 3)
    fresh.load_extra_state(state)
    assert torch.equal(fresh.delta, obj.delta)


def test_loader_replays_each_batch_and_resumes_at_any_step() -> None:
    x = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    loader = BatchLoader(x, torch.arange(8), 2, seed=3)

    def ids(first: int, n: int, replays: int) -> list[int]:
        it = loader.steps(first, replays)
        return [int(next(it)[1][0]) for _ in range(n)]

    plain = ids(0, 12, 1)
    assert plain[:4] == [int(b[1][0]) for b in loader.epoch(0)] and plain[4:8] == [int(b[1][0]) for b in
                                                                                  loader.epoch(1)]
    three = ids(0, 24, 3)
    assert three == [b for b in plain[:8] for _ in range(3)]
    assert ids(7, 10, 3) == three[7:17]


def test_kd_noise_loss_is_ce_plus_t2_kl_on_noisy_inputs() -> None:
    torch.manual_seed(0)
    student, teacher = Net(), Net().eval()
    obj = KDNoise(teacher, temperature=2.0, sigma=0.3, weight=0.5, seed=7)
    x, y = _batch()
    loss, metrics, _ = obj.loss(student, x, y, step=5)
    xn = obj.noisy(x, 5)
    assert (xn - x).std() == pytest.approx(0.3, rel=0.1) and torch.equal(xn, obj.noisy(x, 5))
    pt, ls = F.softmax(teacher(xn) / 2, 1), F.log_softmax(student(xn) / 2, 1)
    kl = (pt * (pt.log() - ls)).sum(1).mean()
    torch.testing.assert_close(loss, F.cross_entropy(student(x), y) + 0.5 * 4 * kl)
    torch.testing.assert_close(metrics["kd_kl"], kl.detach())
    self_kl = KDNoise(student, 2.0, 0.3, 1.0).loss(student, x, y, 0)[1]["kd_kl"]
    assert float(self_kl) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(method="free-at", free_replays=0), "free_replays=0 must be at least 1"),
    (dict(method="n-fgsm", nfgsm_noise=-1), "nfgsm_noise=-1.0 must not be negative"),
    (dict(method="kd-noise", kd_temperature=0), "kd_temperature=0.0 must be positive"),
    (dict(method="kd-noise", kd_sigma=-0.1), "kd_sigma=-0.1 must not be negative"),
    (dict(method="fast-at", fast_alpha="2"), "fast_alpha=2 is larger than 1"),
    (dict(method="fast-at", freee_replays=2), "Unknown config key 'freee_replays'.*free_replays"),
    (dict(method="fast-at", epochs=1, eps_warmup_epochs=5), "eps_warmup_epochs=5 is not shorter than epochs"),
    (dict(method="pgd-at", epochs=2, eps_warmup_epochs=2), "the eps ramp would never reach eps=0.1"),
])
def test_bad_keys_are_clear_errors(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(IgamError, match=match):
        _cfg(**kw)


@pytest.mark.parametrize("method", ["fast-at", "n-fgsm", "free-at"])
def test_zero_eps_is_a_clear_error(method: str) -> None:
    with pytest.raises(IgamError, match=f"method={method} with eps=0 learns from clean images only"):
        create_objective(_cfg(method=method, eps="0"), Net(), None, CPU)


def test_keys_a_method_does_not_read_and_a_short_free_at_run_get_a_note(tmp_path: Path, capsys) -> None:
    """Settings that would be recorded in config.yaml but change nothing are named before the run starts
    (not an error: one config file often serves several methods); so is a free-at run too short to see
    every training image once."""
    from igam.cli import main
    from igam.config import config_notes

    notes = config_notes(_cfg(method="fast-at", teacher="igam:mnist-linf-0.3", kd_sigma=0.5, free_replays=8))
    assert len(notes) == 1
    assert ("method=fast-at does not use teacher=igam:mnist-linf-0.3, free_replays=8, kd_sigma=0.5"
            in notes[0])
    assert config_notes(_cfg(method="igam", lambda_adv=0, teacher="t", disc_layers=5)) == []
    assert config_notes(_cfg(method="igr", lambda_diff="1", teacher="t")) == []
    assert config_notes(_cfg(method="pgd-at", eps_warmup_epochs=1, epochs=3, attack_bn="train")) == []
    assert any("attack_bn=train" in n for n in config_notes(_cfg(method="free-at", attack_bn="train")))
    short = config_notes(_cfg(method="free-at", epochs=1, free_replays=4))
    assert len(short) == 1 and "passes over only 25% of the training images" in short[0]
    assert config_notes(_cfg(method="free-at", epochs=4, free_replays=4)) == []
    assert main(["train", "dataset=synthetic:8x8x1:4", "method=standard", "kd_sigma=0.3", "epochs=1",
                 "train_subset=32", "test_subset=16", "eval_n=16", "batch_size=16", "progress=false",
                 "tensorboard=false", "threads=1", f"out_dir={tmp_path}", "name=std"]) == 0
    assert "igam: note: method=standard does not use kd_sigma=0.3" in capsys.readouterr().err


def test_kd_noise_needs_a_finetuned_teacher() -> None:
    with pytest.raises(IgamError, match="method=kd-noise needs teacher=RUN_DIR"):
        create_objective(_cfg(method="kd-noise"), Net(), None, CPU)


# --------------------------------------------------------------------------- smooth zoo students
@pytest.mark.parametrize("act, cls", [("gelu", nn.GELU), ("softplus", nn.Softplus), ("silu", nn.SiLU)])
def test_every_zoo_model_takes_a_smooth_activation(act: str, cls: type[nn.Module]) -> None:
    names = [n for n in list_models() if " " not in n and ":" not in n] + ["wrn-16-1"]
    for name in names:
        m = create_model(name, num_classes=3, in_chans=1, input_size=16, activation=act, width=4)
        types = {type(mod) for mod in m.modules()}
        assert cls in types, f"{name} has no {act}"
        assert not types & {nn.ReLU, nn.LeakyReLU, nn.MaxPool2d}, f"{name} with {act} is not smooth: {types}"
        assert m(torch.rand(2, 1, 16, 16)).shape == (2, 3)
    relu = create_model("madry-mnist", num_classes=3, in_chans=1, input_size=16, width=4)
    assert nn.MaxPool2d in {type(mod) for mod in relu.modules()}  # Madry's architecture stays as it was
    with pytest.raises(IgamError, match="activation=gelu applies to zoo models"):
        create_model("torchvision:resnet18", num_classes=3, activation="gelu")


# --------------------------------------------------------------------------- passes per image
def test_each_objective_declares_its_passes() -> None:
    def student(obj: Any, steps: int = 10) -> dict[str, float]:
        return count_passes(obj, steps, 10)["student"]

    assert student(PGDAT(0.1, 0.02, 7)) == {"forward": 8, "backward": 8, "double_backward": 0}
    assert student(TRADES(0.1, 0.02, 5)) == {"forward": 8, "backward": 7, "double_backward": 0}
    assert student(FastAT(0.1, 0.125)) == student(NFGSM(0.1)) == {"forward": 2, "backward": 2,
                                                                   "double_backward": 0}
    assert student(FreeAT(0.1, 8)) == {"forward": 1, "backward": 1, "double_backward": 0}
    kd = count_passes(KDNoise(Net()), 10, 10)
    assert kd["student"]["forward"] == 2
    assert kd["teacher"] == {"forward": 1, "backward": 0, "double_backward": 0}
    # over a run: two epochs of pgd-7 are 16 forwards per training image
    assert count_passes(PGDAT(0.1, 0.02, 7), 20, 10)["student"]["forward"] == 16


def _igam(mode: str = "exact", scheme: str = "central", every: int = 5, use_teacher: bool = True,
          start: str = "0", lam: float | str = 1.0, target: str = "ce") -> IGAMObjective:
    from igam.method.discriminator import GradientDiscriminator

    disc = GradientDiscriminator((1, 8, 8), 2, 4) if use_teacher else None
    m = InputGradientMatching(Net(), disc, lambda_adv=1.0 if use_teacher else 0.0, lambda_diff=lam,
                              use_teacher=use_teacher, mode=mode, fd_scheme=scheme, disc_every=every,
                              gradient_target=target,
                              disc_optimizer=torch.optim.SGD(disc.parameters(), 0.1) if disc else None)
    obj = IGAMObjective("igam" if use_teacher else "igr", m, start)
    obj.begin(100, 10)
    return obj


def test_igam_passes_count_double_backward_teacher_and_discriminator_cadence() -> None:
    exact = count_passes(_igam(), 100, 10)  # 10 epochs, disc every 5 steps
    assert exact["student"] == {"forward": 10, "backward": 10, "double_backward": 10}
    assert exact["teacher"] == {"forward": 10, "backward": 10, "double_backward": 0}
    assert exact["discriminator"]["forward"] == pytest.approx(10 * 2 + 2 * 20 / 10)  # 20 updates of 2 maps
    assert count_passes(_igam("finite-difference"), 100, 10)["student"] == {
        "forward": 30, "backward": 30, "double_backward": 0}
    assert count_passes(_igam("finite-difference", "forward"), 100, 10)["student"]["backward"] == 20
    assert count_passes(_igam("finite-difference", "forward", target="true-prob"), 100, 10)["student"][
        "backward"] == 30  # the pass at x is backpropagated twice
    late = count_passes(_igam(start="0.5"), 100, 10)  # CE for the first half
    assert late["student"] == {"forward": 10, "backward": 10, "double_backward": 5}
    # igr: no discriminator; the teacher only sets lambda_diff=auto on the first matching step
    igr = count_passes(_igam(use_teacher=False, lam="auto"), 100, 10)
    assert igr["teacher"]["forward"] == pytest.approx(0.1) and igr["discriminator"]["forward"] == 0
    assert count_passes(_igam(use_teacher=False), 100, 10)["teacher"]["forward"] == 0


def test_igr_computes_the_teacher_gradient_only_to_set_the_scale() -> None:
    obj = _igam(use_teacher=False, lam="auto")
    calls = {"n": 0}
    teacher = obj.matching.teacher
    teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    x, y = _batch()
    for step in range(3):
        obj.loss(Net(), x, y, step)
    assert calls["n"] == 1 and torch.isfinite(obj.matching.lambda_diff)


# --------------------------------------------------------------------------- real effects, end to end
TASK = dict(dataset="synthetic:8x8x1:4", model="small-cnn", width=8, train_subset=1024, test_subset=256,
            batch_size=32, epochs=3, optimizer="adam", lr=0.003, weight_decay=0, augment="none", eps="0.1",
            progress=False, tensorboard=False, eval_every=0, eval_n=64, seed=0)


def _test_images() -> tuple[torch.Tensor, torch.Tensor]:
    arrays = load_data(TASK["dataset"], None, False, TASK["train_subset"], TASK["test_subset"])
    return arrays.x_test.float() / 255, arrays.y_test


def _accuracies(run: Path) -> tuple[float, float]:
    """(clean, PGD-10 at eps 0.1 with steps of eps/4) on the 256 test images."""
    net = load_run_model(run).eval()
    x, y = _test_images()
    x_adv = PGD(net, 0.1, 0.025, 10)(x, y, seed=1)
    with torch.no_grad():
        return (float((net(x).argmax(1) == y).float().mean()),
                float((net(x_adv).argmax(1) == y).float().mean()))


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("std")
    return train(make_config(overrides={**TASK, "method": "standard", "out_dir": str(out), "name": "std"}),
                 log=quiet)


@pytest.mark.parametrize("method, student", [("fast-at", (6, 6)), ("n-fgsm", (6, 6)), ("free-at", (3, 3))])
def test_cheap_at_raises_robust_accuracy_above_standard_training(method: str, student: tuple[int, int],
                                                                 standard_run: Path, tmp_path: Path) -> None:
    """On a tiny 4-class task (3 epochs, Adam), standard training keeps about a quarter of its accuracy
    under PGD-10 at eps 0.1 (measured 27%); each cheap method keeps clearly more (measured 47%, 49%, 47%
    at seed 0; 41-49% at seeds 1 and 2), at the cost its passes say."""
    run = train(make_config(overrides={**TASK, "method": method, "out_dir": str(tmp_path), "name": method}),
                log=quiet)
    (std_clean, std_rob), (clean, rob) = _accuracies(standard_run), _accuracies(run)
    assert std_clean > 0.85 and std_rob < 0.35, (std_clean, std_rob)
    assert clean > 0.6 and rob > std_rob + 0.1, (method, clean, rob, std_rob)
    meta, metrics = read_json(run / "meta.json"), read_json(run / "metrics.json")
    p = meta["passes_per_image"]
    assert (p["student"]["forward"], p["student"]["backward"]) == student  # 3 epochs x passes per step
    assert p["teacher"]["forward"] == p["discriminator"]["forward"] == 0
    assert metrics["passes_per_image"] == p
    std = read_json(standard_run / "meta.json")["passes_per_image"]["student"]
    assert (std["forward"], std["backward"], std["double_backward"]) == (3, 3, 0)


@pytest.fixture(scope="module")
def finetuned_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fast-at network of the task, fine-tuned on it again (a new head behind the identity adapter)."""
    out = tmp_path_factory.mktemp("teacher")
    src = train(make_config(overrides={**TASK, "method": "fast-at", "out_dir": str(out), "name": "src"}),
                log=quiet)
    return train(make_config(overrides={**TASK, "method": "finetune", "teacher": str(src),
                                        "adapter": "identity",
                                        "epochs": 2, "finetune_lr": 0.01, "out_dir": str(out), "name": "ft"}),
                 log=quiet)


def test_kd_noise_distils_the_teacher_and_its_input_gradients(finetuned_teacher: Path, standard_run: Path,
                                                              tmp_path: Path) -> None:
    """Distillation on noisy inputs makes the student agree with the teacher off the data (the KL on
    held-out noisy images drops ~100x against standard training; measured 0.003 vs 0.33) and, as
    Srinivas & Fleuret's equivalence says, brings its input gradients closer to the teacher's (cosine
    0.86 vs 0.81 at seed 0, 0.66 vs 0.59 at seed 1)."""
    run = train(make_config(overrides={**TASK, "method": "kd-noise", "teacher": str(finetuned_teacher),
                                       "kd_sigma": 0.1, "out_dir": str(tmp_path), "name": "kd"}), log=quiet)
    teacher = frozen_teacher(finetuned_teacher, (1, 8, 8), 4).eval()
    x, y = _test_images()
    xn = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    jt, _ = input_gradient(teacher, x, y)
    with torch.no_grad():
        log_pt = F.log_softmax(teacher(xn) / 4, 1)
    out = {}
    for name, r in (("std", standard_run), ("kd", run)):
        net = load_run_model(r).eval()
        with torch.no_grad():
            kl = F.kl_div(F.log_softmax(net(xn) / 4, 1), log_pt, reduction="batchmean", log_target=True)
        js, _ = input_gradient(net, x, y)
        out[name] = (float(kl), float(flat_cosine(js, jt).mean()))
    assert out["kd"][0] < out["std"][0] / 10, out
    assert out["kd"][1] > out["std"][1] + 0.02, out
    assert _accuracies(run)[0] > 0.8
    p = read_json(run / "meta.json")["passes_per_image"]
    assert p["student"]["forward"] == 6
    assert p["teacher"] == {"forward": 3, "backward": 0, "double_backward": 0}


def test_results_table_shows_passes_per_image() -> None:
    from igam.experiment import load_experiment
    from igam.experiment.results import format_passes, results_markdown

    assert format_passes({"student": {"forward": 8, "backward": 8, "double_backward": 0},
                          "teacher": {"forward": 2, "backward": 2}, "discriminator": {}}) == "S 8/8 · T 2/2"
    assert format_passes({"student": {"forward": 1, "backward": 1, "double_backward": 1}}) == "S 1/1/1"
    assert format_passes(None) == "-"
    exp = load_experiment(Path(__file__).resolve().parents[1] / "src/igam/demo_configs/demo-quick.yaml")
    st = exp.stages[0]
    row = {"stage": st.name, "row": "PGD-7", "curve": "", "accuracy": {"clean": 90.0}, "paper": {}, "n": {},
           "masking_checks": None, "masking_failed": [], "train_time_s": 60, "time_per_epoch_s": None,
           "config": {},
           "passes_per_image": {"student": {"forward": 16, "backward": 16, "double_backward": 0}}}
    table = results_markdown(exp, {"rows": [row]}, lambda c: c)
    assert "| passes/img |" in table and "| S 16/16 |" in table
