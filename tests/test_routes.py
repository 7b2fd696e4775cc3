"""The other routes from a robust model (issue 22), their mechanisms on a tiny synthetic task: whole-network
fine-tuning and its per-layer learning rates, the robust start, RRM's features and learned projection, the
cosine matching term, ARD / RSLAD, the teacher terms composed with adversarial training, their caches, passes
and resumes. What they do on real data: tests/test_routes_real.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from igam.config import make_config
from igam.errors import IgamError
from igam.method.matching import InputGradientMatching
from igam.objectives import build_model, create_objective
from igam.objectives.finetune import parse_layers, weight_layers
from igam.objectives.terms import FeatureMatching, capture
from igam.runs import Run, load_run_model, read_log
from igam.train import train

BASE = dict(
    dataset="synthetic:8x8x3:4",
    width=4,
    train_subset=96,
    test_subset=32,
    batch_size=32,
    progress=False,
    tensorboard=False,
    eval_every=0,
    eval_n=32,
    log_every=1,
    threads=1,
    augment="none",
)
CPU = torch.device("cpu")


def quiet(*_: Any, **__: Any) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny robust teacher (fast AT, width 8) and its head fine-tuned on the same synthetic task."""
    out = tmp_path_factory.mktemp("routes")
    base = {**BASE, "out_dir": str(out)}
    teacher = train(
        make_config(
            overrides={
                **base,
                "name": "teacher",
                "method": "fast-at",
                "eps": "0.1",
                "width": 8,
                "epochs": 2,
                "lr": 0.05,
            }
        ),
        log=quiet,
    )
    tuned = train(
        make_config(
            overrides={
                **base,
                "method": "finetune",
                "teacher": str(teacher),
                "name": "tuned",
                "epochs": 1,
                "adapter": "identity",
            }
        ),
        log=quiet,
    )
    return {"teacher": teacher, "tuned": tuned, "out": out}


def cfg_of(runs: dict[str, Path], name: str, **kw: Any):
    return make_config(
        overrides={**BASE, "out_dir": str(runs["out"]), "name": name, "epochs": 2, "lr": 0.02, **kw}
    )


def spec_of(cfg):
    from igam.data import load_data
    from igam.data import spec_of as spec

    d = load_data(cfg.dataset, None, False, cfg.train_subset, cfg.test_subset)
    return spec(d)


# ---------------------------------------------------------------------------------------- weights
def test_finetune_layers_parse_and_refuse() -> None:
    assert parse_layers("head") == 0 and parse_layers("all") is None and parse_layers("last-3") == 3
    for bad in ("last-0", "last", "tail-2", "3"):
        with pytest.raises(IgamError, match="finetune_layers.*head.*last-K.*all"):
            parse_layers(bad)
    with pytest.raises(IgamError, match="finetune_layers"):
        make_config(overrides={"method": "finetune", "finetune_layers": "everything"})


@pytest.mark.parametrize("layers, moved", [("head", 0), ("last-1", 1), ("all", None)])
def test_finetune_layers_train_exactly_the_layers_named(runs, layers: str, moved: int | None) -> None:
    """head: the body's weights stay the teacher's; last-K: the last K weight layers move, the others do not;
    all: every layer moves. The head always learns."""
    run = train(
        cfg_of(
            runs,
            f"ft-{layers}",
            method="finetune",
            teacher=str(runs["teacher"]),
            adapter="identity",
            finetune_layers=layers,
            finetune_body_lr=0.5,
        ),
        log=quiet,
    )
    before = load_run_model(runs["teacher"])
    after = load_run_model(run).body
    groups_before, groups_after = weight_layers(before)[:-1], weight_layers(after)[:-1]
    changed = [
        any(not torch.equal(a, b) for a, b in zip(ga, gb)) for ga, gb in zip(groups_before, groups_after)
    ]
    expected = len(changed) if moved is None else moved
    assert changed == [False] * (len(changed) - expected) + [True] * expected
    passes = Run(run).meta["passes_per_image"]["teacher"]
    assert passes["backward"] == (0 if layers == "head" else 2)  # 2 epochs, a backward through the body


def test_the_body_learns_at_finetune_body_lr_times_the_heads_rate(runs) -> None:
    from igam.train import make_optimizer

    cfg = cfg_of(
        runs,
        "ft-rates",
        method="finetune",
        teacher=str(runs["teacher"]),
        adapter="identity",
        finetune_layers="all",
        finetune_body_lr=0.25,
    )
    spec = spec_of(cfg)
    model = build_model(cfg, spec)
    objective = create_objective(cfg, model, spec, CPU)
    opt = make_optimizer("adam", 0.004, cfg, model, objective.co_trained(), objective.lr_scales(model))
    head = {id(p) for p in model.get_classifier().parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g.get("lr_scale", 1.0) == (1.0 if id(p) in head else 0.25)
            assert g["lr"] == pytest.approx(0.004 * g.get("lr_scale", 1.0))


def test_a_robust_start_trains_the_teachers_network_from_its_weights(runs) -> None:
    """model=teacher: the network built is the teacher's behind the adapter with a new head, every layer
    learning, its body equal to the teacher's; init_from loads a fine-tuned run of it (head included)."""
    cfg = cfg_of(
        runs,
        "rs",
        method="fast-at",
        eps="0.1",
        model="teacher",
        teacher=str(runs["teacher"]),
        adapter="identity",
    )
    spec = spec_of(cfg)
    net = build_model(cfg, spec)
    teacher = load_run_model(runs["teacher"])
    body = {k: v for k, v in net.body.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in body.items())
    assert all(p.requires_grad for p in net.parameters()) and not net.frozen
    net.train()
    assert net.body.training  # a network being trained, not a frozen teacher
    started = build_model(cfg.replace(init_from=str(runs["tuned"])), spec)
    tuned = load_run_model(runs["tuned"])
    assert torch.equal(started.get_classifier().weight, tuned.get_classifier().weight)
    run = train(cfg, log=quiet)
    meta = Run(run).meta
    assert meta["model"]["name"] == "adapted:small-cnn" and meta["status"] == "finished"
    assert meta["passes_per_image"]["student"] == {"forward": 4.0, "backward": 4.0, "double_backward": 0.0}
    assert Run(run).config["model"] == "teacher"
    assert meta["start"]["teacher_weights"] == str(runs["teacher"]) and meta["start"]["passes_counted"] == 0


# ------------------------------------------------------------------------------------------ features
def test_rrm_learns_a_projection_when_the_feature_sizes_differ_and_none_when_they_agree(runs) -> None:
    for width, projected in ((4, True), (8, False)):  # the teacher is width 8: 256-dim features
        cfg = cfg_of(runs, f"rrm-{width}", method="rrm", teacher=str(runs["tuned"]), width=width)
        spec = spec_of(cfg)
        model = build_model(cfg, spec)
        objective = create_objective(cfg, model, spec, CPU)
        term = objective.term
        assert isinstance(term, FeatureMatching) and (term.projection is not None) == projected
        assert objective.co_trained() == ([term.projection] if projected else [])
    run = train(
        cfg_of(runs, "rrm-run", method="rrm", teacher=str(runs["tuned"]), feature_weight=2), log=quiet
    )
    saved = load_file(str(run / Run.OBJECTIVE))
    assert set(saved) == {"term.projection.weight"}  # the learned projection is saved with the run
    init = FeatureMatching(
        load_run_model(runs["tuned"]),
        build_model(cfg_of(runs, "x", method="rrm", teacher=str(runs["tuned"])), spec_of(cfg)),
        (3, 8, 8),
    )
    assert init.projection.weight.shape == saved["term.projection.weight"].shape
    log = read_log(run)
    assert {"feature_cos", "feature_loss", "ce"} <= set(log[-1])


def test_the_feature_term_matches_the_teachers_features_with_the_cosine(runs) -> None:
    """loss = weight x (1 - mean cos(P phi_s, phi_t)): computed by hand from the captured features."""
    cfg = cfg_of(runs, "rrm-check", method="rrm", teacher=str(runs["tuned"]), feature_weight=3)
    spec = spec_of(cfg)
    model = build_model(cfg, spec).train()
    objective = create_objective(cfg, model, spec, CPU)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    loss, metrics, _ = objective.loss(model, x, y, 0)
    with torch.no_grad(), capture(model, "penultimate", "s") as phi:
        logits = model(x)
        fs = phi()
    ft = objective.term.teacher_features(x)
    cos = torch.nn.functional.cosine_similarity(objective.term.projection(fs), ft, dim=1, eps=1e-8)
    expected = torch.nn.functional.cross_entropy(logits, y) + 3 * (1 - cos.mean())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["feature_cos"], cos.mean(), rtol=1e-5, atol=1e-6)


def test_a_named_feature_layer_is_used_and_an_unknown_one_is_refused(runs) -> None:
    cfg = cfg_of(
        runs,
        "rrm-layer",
        method="rrm",
        teacher=str(runs["tuned"]),
        feature_layer="features.0",
        teacher_feature_layer="body.features.0",
    )
    spec = spec_of(cfg)
    model = build_model(cfg, spec)
    term = create_objective(cfg, model, spec, CPU).term
    assert term.sizes[0] != term.sizes[1] or term.sizes[0] > 64  # a conv layer's flattened map
    with pytest.raises(IgamError, match="has no layer 'features.99'.*penultimate"):
        create_objective(cfg.replace(feature_layer="features.99"), model, spec, CPU)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("rrm", {}),
        ("ard", {"eps": "0.1", "steps": 1, "step_size": "0.125"}),
        ("fast-at", {"eps": "0.1", "teacher_term": "distill"}),
    ],
)
def test_a_cached_teacher_gives_the_uncached_trajectory_and_asks_the_teacher_once(
    runs, method: str, extra: dict
) -> None:
    """The teacher's features (rrm) or soft labels (ard, the distill term) of a training image are computed
    once when the inputs do not change (augment none): the same losses as without the cache, and the
    teacher's passes counted for the first epoch only."""
    paths = {}
    for cache in ("on", "off"):
        paths[cache] = train(
            cfg_of(
                runs,
                f"{method}-{extra.get('teacher_term', '')}-cache-{cache}",
                method=method,
                teacher=str(runs["tuned"]),
                teacher_cache=cache,
                epochs=3,
                **extra,
            ),
            log=quiet,
        )
    on, off = read_log(paths["on"]), read_log(paths["off"])
    keys = [k for k in on[-1] if k not in ("images_per_s", "lr", "epoch", "step", "skipped_steps")]
    for k in keys:
        torch.testing.assert_close(
            torch.tensor([r[k] for r in on]),
            torch.tensor([r[k] for r in off]),
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, k=k: f"{k}: {m}",
        )
    teacher_passes = {c: Run(p).meta["passes_per_image"]["teacher"]["forward"] for c, p in paths.items()}
    assert teacher_passes == {"on": 1.0, "off": 3.0}


# -------------------------------------------------------------------------------------- gradients
def test_the_cosine_matching_term_is_one_minus_the_cosine_and_has_no_scale() -> None:
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    m = InputGradientMatching(
        teacher, None, lambda_adv=0.0, lambda_diff="auto", lambda_diff_auto=4.0, diff_loss="cos"
    )
    js, jt = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    m.resolve_lambda_diff(jt * 100, 5)  # the teacher's scale does not matter to a cosine
    assert float(m.lambda_diff) == 4.0
    total, metrics = m.matching_loss(js, jt)
    cos = torch.nn.functional.cosine_similarity(js.flatten(1), jt.flatten(1), dim=1)
    torch.testing.assert_close(metrics["l_diff"], (1 - cos).mean())
    torch.testing.assert_close(total, 4.0 * (1 - cos).mean())
    with pytest.raises(IgamError, match="diff_loss=cos.*igr has J_t = 0"):
        make_config(overrides={"method": "igr", "diff_loss": "cos", "lambda_diff": "1"})


def test_the_gradient_term_needs_exact_matching(runs) -> None:
    cfg = cfg_of(
        runs,
        "g",
        method="fast-at",
        eps="0.1",
        teacher=str(runs["tuned"]),
        teacher_term="gradient",
        grad_matching="finite-difference",
    )
    spec = spec_of(cfg)
    with pytest.raises(IgamError, match="teacher_term=gradient needs grad_matching=exact"):
        create_objective(cfg, build_model(cfg, spec), spec, CPU)


# ------------------------------------------------------------------------------------ composition
@pytest.mark.parametrize(
    "term, student, teacher",
    [
        ("feature", {"forward": 3.0, "backward": 3.0, "double_backward": 0.0}, (1.0, 0.0)),
        ("distill", {"forward": 2.0, "backward": 2.0, "double_backward": 0.0}, (1.0, 0.0)),
        ("gradient", {"forward": 3.0, "backward": 3.0, "double_backward": 1.0}, (1.0, 1.0)),
    ],
)
def test_a_teacher_term_adds_its_passes_and_its_loss_to_fast_at(
    runs, term: str, student: dict, teacher: tuple
) -> None:
    """Per epoch: fast AT's 2 / 2 student passes plus the term's (cached teacher: first epoch only; one
    epoch here), and the term's metrics in the log."""
    run = train(
        cfg_of(
            runs,
            f"fast-{term}",
            method="fast-at",
            eps="0.1",
            teacher=str(runs["tuned"]),
            teacher_term=term,
            epochs=1,
        ),
        log=quiet,
    )
    passes = Run(run).meta["passes_per_image"]
    assert passes["student"] == student
    assert (passes["teacher"]["forward"], passes["teacher"]["backward"]) == teacher
    metric = {"feature": "feature_cos", "distill": "distill_kl", "gradient": "l_diff"}[term]
    assert metric in read_log(run)[-1]


def test_a_teacher_term_needs_a_teacher_and_is_noted_unused_elsewhere(runs) -> None:
    from igam.config import config_notes

    cfg = cfg_of(runs, "nt", method="fast-at", eps="0.1", teacher_term="feature")
    spec = spec_of(cfg)
    with pytest.raises(IgamError, match="needs teacher="):
        create_objective(cfg, build_model(cfg, spec), spec, CPU)
    notes = config_notes(cfg_of(runs, "nt2", method="standard", teacher_term="feature", feature_weight=2))
    assert any(
        "does not use" in n and "teacher_term=feature" in n and "feature_weight=2.0" in n for n in notes
    )


# --------------------------------------------------------------------------------- distillation
def test_rslad_attacks_the_kl_to_the_teachers_soft_labels(runs) -> None:
    """RSLAD's x' raises KL(f_t(x) || f_s(x')) above the clean KL and stays in the eps-ball."""
    cfg = cfg_of(
        runs, "rslad-x", method="rslad", teacher=str(runs["tuned"]), eps="0.1", steps=5, step_size="0.03"
    )
    spec = spec_of(cfg)
    model = build_model(cfg, spec).eval()
    objective = create_objective(cfg, model, spec, CPU)
    objective.begin(10, 5)
    x = torch.rand(32, 3, 8, 8)
    t = objective.soft.teacher_logits(x, None, None)
    x_adv = objective.kl_attack(model, x, t, 0)
    from igam.objectives.terms import soft_label_kl

    with torch.no_grad():
        assert soft_label_kl(model(x_adv), t, 1.0) > soft_label_kl(model(x), t, 1.0)
    assert (
        float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    )


@pytest.mark.parametrize("alpha, student", [(1.0, 2.0), (0.5, 3.0)])
def test_ard_passes_count_the_clean_pass_only_when_it_trains_on_it(
    runs, alpha: float, student: float
) -> None:
    run = train(
        cfg_of(
            runs,
            f"ard-{alpha}",
            method="ard",
            teacher=str(runs["tuned"]),
            eps="0.1",
            steps=1,
            step_size="0.125",
            ard_alpha=alpha,
            epochs=1,
        ),
        log=quiet,
    )
    assert Run(run).meta["passes_per_image"]["student"]["forward"] == student
    assert ("ce" in read_log(run)[-1]) == (alpha < 1)


def test_distillation_refuses_a_teacher_not_fine_tuned_on_the_task(runs) -> None:
    cfg = cfg_of(runs, "ard-raw", method="ard", teacher=str(runs["teacher"]), eps="0.1")
    spec = spec_of(cfg)
    with pytest.raises(IgamError, match="not a fine-tuned teacher"):
        create_objective(cfg, build_model(cfg, spec), spec, CPU)


def test_an_rrm_run_killed_mid_way_then_resumed_is_bit_identical(runs, tmp_path: Path) -> None:
    """The projection, its optimiser state and the log window survive a SIGKILL and resume exactly (both
    runs in subprocesses of one thread, as a user runs them)."""
    import os
    import signal
    import subprocess
    import sys

    args = [
        f"{k}={v}"
        for k, v in {
            **BASE,
            "method": "rrm",
            "teacher": str(runs["tuned"]),
            "epochs": 3,
            "checkpoint_every": 2,
            "out_dir": str(tmp_path),
            "lr": 0.02,
        }.items()
    ]
    env = {k: v for k, v in os.environ.items() if k != "IGAM_TEST_KILL_AT"}

    def igam_train(name: str, *extra: str, kill: str = "") -> subprocess.CompletedProcess:
        e = {**env, **({"IGAM_TEST_KILL_AT": kill} if kill else {})}
        return subprocess.run(
            [sys.executable, "-m", "igam", "train", *args, f"name={name}", *extra],
            env=e,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert igam_train("whole").returncode == 0
    assert igam_train("part", kill="step:5").returncode == -signal.SIGKILL
    r = igam_train("part", "resume=true")
    assert r.returncode == 0, r.stderr
    for f in (Run.WEIGHTS, Run.OBJECTIVE):
        a, b = load_file(str(tmp_path / "whole" / f)), load_file(str(tmp_path / "part" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def timeless(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_log(run)]

    assert timeless(tmp_path / "whole") == timeless(tmp_path / "part")
