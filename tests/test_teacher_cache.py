"""IGAM's teacher-gradient cache (issue 15, item 2): teacher_cache=auto|on|off.

Cached and uncached training give the same loss trajectory (exact and finite-difference modes), a resumed
cached run matches an uninterrupted one, `on` is refused where the cache would be wrong, auto decides as
documented, and the loader's per-batch indices name the images the batch holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import igam.method.matching as matching_module
from igam.config import make_config
from igam.data import BatchLoader, DataSpec
from igam.errors import IgamError
from igam.method.adapted import AdaptedTeacher
from igam.method.adapters import build_adapter
from igam.method.teacher_cache import TeacherGradientCache, teacher_cache_blockers
from igam.models import create_model
from igam.objectives.igam import teacher_cache_decision
from igam.runs import load_latest_state, read_log
from igam.train import train

BASE = dict(dataset="synthetic:8x8x3:4", width=4, train_subset=96, test_subset=32, batch_size=32,
            progress=False, tensorboard=False, eval_every=0, eval_n=32, log_every=1, threads=1)


def quiet(*_: Any, **__: Any) -> None:
    pass


@pytest.fixture(scope="module")
def tuned_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fine-tuned teacher (small-cnn-bn body, so eval-mode BatchNorm matters) for synthetic 8x8x3."""
    out = tmp_path_factory.mktemp("cache-teacher")
    base = {**BASE, "out_dir": str(out), "augment": "none"}
    teacher = train(make_config(overrides={**base, "model": "small-cnn-bn", "name": "teacher", "epochs": 1,
                                           "lr": 0.05}), log=quiet)
    return train(make_config(overrides={**base, "method": "finetune", "teacher": str(teacher),
                                        "name": "tuned", "epochs": 1, "adapter": "identity"}), log=quiet)


def igam_cfg(tmp_path: Path, teacher: Path, name: str, **kw: Any):
    return make_config(overrides={**BASE, "out_dir": str(tmp_path), "name": name, "method": "igam",
                                  "teacher": str(teacher), "model": "small-cnn-bn", "epochs": 3,
                                  "augment": "none", "disc_every": 2, "lambda_diff": "auto",
                                  "lambda_adv": 1, "lr": 0.02, "checkpoint_every": 2, **kw})


TERMS = ("ce", "l_diff", "l_adv", "jt_norm", "js_norm", "cos_js_jt", "lambda_diff", "grad_norm")


def assert_same_trajectory(a: Path, b: Path, rtol: float = 1e-4) -> None:
    ra, rb = read_log(a), read_log(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) == 9
    for k in TERMS:
        va = torch.tensor([r[k] for r in ra if k in r], dtype=torch.float64)
        vb = torch.tensor([r[k] for r in rb if k in r], dtype=torch.float64)
        assert len(va) == len(vb) > 0, k
        torch.testing.assert_close(va, vb, rtol=rtol, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def count_teacher_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch sizes of every teacher input-gradient computation of the IGAM step."""
    calls: list[int] = []
    real = matching_module.teacher_gradient

    def counting(teacher, x, *a, **kw):
        calls.append(len(x))
        return real(teacher, x, *a, **kw)

    monkeypatch.setattr(matching_module, "teacher_gradient", counting)
    return calls


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "fd-forward", "fd-central"])
def test_cached_training_follows_the_uncached_loss_trajectory(tmp_path: Path, tuned_teacher: Path, mode: str,
                                                              count_teacher_calls: list[int]) -> None:
    """3 epochs of 3 steps, same seed: every logged term of every step agrees; with the cache the teacher
    is asked only in epoch 0 (3 batches) and by the final held-out metrics (1 batch)."""
    kw: dict[str, Any] = {} if mode == "exact" else {
        "grad_matching": "finite-difference", "fd_scheme": mode.split("-")[1]}
    off = train(igam_cfg(tmp_path, tuned_teacher, "off", teacher_cache="off", **kw), log=quiet)
    assert count_teacher_calls == [32] * 9 + [32]
    count_teacher_calls.clear()
    on = train(igam_cfg(tmp_path, tuned_teacher, "on", teacher_cache="on", **kw), log=quiet)
    assert count_teacher_calls == [32] * 3 + [32]
    assert_same_trajectory(off, on)


def test_images_left_over_by_drop_last_keep_the_run_bit_identical(tmp_path: Path,
                                                                  tuned_teacher: Path) -> None:
    """100 images in batches of 32: 4 images drop out of each epoch and meet the cache later, in batches
    of mostly cached images. Their J_t is computed with the whole batch (a sub-batch of 1-4 images rounds
    differently in oneDNN), so the cached run stays bit-identical to the uncached one on this CPU."""
    off = train(igam_cfg(tmp_path, tuned_teacher, "off", teacher_cache="off", train_subset=100), log=quiet)
    on = train(igam_cfg(tmp_path, tuned_teacher, "on", teacher_cache="on", train_subset=100), log=quiet)
    assert [r["ce"] for r in read_log(off)] == [r["ce"] for r in read_log(on)]
    a, b = load_file(str(off / "model.safetensors")), load_file(str(on / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_caches_and_a_resumed_cached_run_matches_an_uninterrupted_one(
        tmp_path: Path, tuned_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """teacher_cache=auto is on here (augment none, noise 0, teacher_bn eval, identity adapter). The cache is
    not saved: a run interrupted after step 5 (last checkpoint at step 4) and resumed refills it lazily and
    ends with the same per-step losses and weights as the uninterrupted run."""
    ref = train(igam_cfg(tmp_path, tuned_teacher, "ref"), log=quiet)

    class Interrupted(Exception):
        pass

    hits = {"step": 0}

    def interrupt(name: str) -> None:
        hits[name] = hits.get(name, 0) + 1
        if name == "step" and hits[name] == 5:
            raise Interrupted

    cfg = igam_cfg(tmp_path, tuned_teacher, "cut")
    monkeypatch.setattr("igam.train.kill_point", interrupt)
    with pytest.raises(Interrupted):
        train(cfg, log=quiet)
    monkeypatch.undo()
    assert load_latest_state(tmp_path / "cut", log=quiet)["step"] == 4
    calls: list[int] = []
    real = matching_module.teacher_gradient
    monkeypatch.setattr(matching_module, "teacher_gradient",
                        lambda t, x, *a, **k: calls.append(len(x)) or real(t, x, *a, **k))
    resumed = train(cfg.replace(resume=True), log=quiet)
    # the cache refills: steps 5-6 compute (empty cache), and so does every epoch-2 batch holding an image
    # of epoch 1's first batch; the teacher always runs on whole batches (then the final held-out metrics)
    assert 2 <= len(calls) - 1 <= 5 and set(calls) == {32}
    assert_same_trajectory(ref, resumed, rtol=1e-5)
    ref_w, res_w = load_file(str(ref / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in ref_w:
        torch.testing.assert_close(ref_w[k], res_w[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,reason", [
    ({"augment": "crop-flip"}, "augment=crop-flip gives the student new inputs every epoch"),
    ({"augment": "auto"}, r"augment=crop-flip \(auto for this data\)"),
    ({"noise": "4/255"}, "noise=4/255 adds fresh noise"),
    ({"teacher_bn": "train"}, "teacher_bn=train runs the teacher with batch statistics"),
])
def test_on_is_refused_where_the_cache_would_be_wrong(tmp_path: Path, tuned_teacher: Path,
                                                      kw: dict[str, str], reason: str) -> None:
    with pytest.raises(IgamError, match=f"teacher_cache=on would reuse teacher gradients that are wrong: "
                                        f"{reason}"):
        train(igam_cfg(tmp_path, tuned_teacher, "refused", teacher_cache="on", **kw), log=quiet)


def _teacher(adapter: str = "identity", bn: str = "eval", size: int = 8) -> AdaptedTeacher:
    body = create_model("small-cnn-bn", num_classes=4, in_chans=3, input_size=size, width=4)
    return AdaptedTeacher(build_adapter(adapter, (3, 8, 8), (3, size, size)), body, bn)


SPEC = DataSpec("synthetic", (3, 8, 8), 4, [0.5] * 3, [0.25] * 3, ["a", "b", "c", "d"])


@pytest.mark.parametrize("kw,teacher,on", [
    ({"augment": "none"}, _teacher(), True),
    ({"augment": "auto", "dataset": "synthetic:8x8x1:4"}, _teacher(), True),  # auto is none for grey data
    ({"augment": "auto"}, _teacher(), False),  # crop-flip for colour data
    ({"augment": "flip"}, _teacher(), False),
    ({"augment": "none", "noise": "1/255"}, _teacher(), False),
    ({"augment": "none"}, _teacher(bn="train"), False),
    ({"augment": "none"}, _teacher("random-pad", size=12), False),
    ({"augment": "none"}, _teacher("pad", size=12), True),
    ({"augment": "none"}, None, False),  # no teacher (igr without one): nothing to cache
    ({"augment": "none", "teacher_cache": "off"}, _teacher(), False),
])
def test_auto_is_on_exactly_when_the_cache_is_exact(kw: dict[str, str], teacher: AdaptedTeacher | None,
                                                    on: bool) -> None:
    cfg = make_config(overrides={"method": "igam", **kw})
    shape = (1, 8, 8) if kw.get("dataset", "").endswith("x1:4") else (3, 8, 8)
    spec = DataSpec("synthetic", shape, 4, [0.5], [0.25], list("abcd"))
    decided, reasons = teacher_cache_decision(cfg, spec, teacher)
    assert decided is on and (reasons == []) is (on or teacher is None or cfg.teacher_cache == "off")


def test_a_random_adapter_blocks_the_cache_with_its_reason() -> None:
    assert teacher_cache_blockers(_teacher()) == []
    (why,) = teacher_cache_blockers(_teacher("random-pad", size=12))
    assert "random-pad" in why
    cfg = make_config(overrides={"method": "igam", "augment": "none", "teacher_cache": "on"})
    with pytest.raises(IgamError, match="random-pad"):
        teacher_cache_decision(cfg, SPEC, _teacher("random-pad", size=12))


# ---------------------------------------------------------------------------------------------
def test_cache_computes_each_image_once_and_serves_it_bit_for_bit() -> None:
    cache = TeacherGradientCache()
    seen: list[int] = []

    def compute(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x * 2 + y[:, None, None, None]

    data = torch.rand(20, 3, 4, 4)
    labels = torch.arange(20) % 3
    a = torch.tensor([3, 7, 1])
    out = cache.lookup(a, data[a], labels[a], compute)
    assert torch.equal(out, data[a] * 2 + labels[a][:, None, None, None]) and seen == [3]
    b = torch.tensor([7, 19, 3, 0])  # two cached, two new (and the store grows past index 19)
    out = cache.lookup(b, data[b], labels[b], compute)  # the whole batch computed, as without the cache
    assert torch.equal(out, data[b] * 2 + labels[b][:, None, None, None]) and seen == [3, 4]
    out = cache.lookup(b, torch.zeros(4, 3, 4, 4), labels[b], compute)  # all served: x is not read
    assert torch.equal(out, data[b] * 2 + labels[b][:, None, None, None]) and seen == [3, 4]
    assert len(cache) == 5 and cache.computed == 5 and cache.served == 6 and cache.where == "host"
    with pytest.raises(ValueError, match="index has 2 entries for a batch of 3"):
        cache.lookup(torch.tensor([1, 2]), data[:3], labels[:3], compute)


def test_loader_yields_the_training_positions_of_each_batch() -> None:
    x = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(40) % 5
    whole = list(BatchLoader(x, y, 8, seed=3).epoch(1, with_index=True))
    for xb, yb, idx in whole:
        assert idx.dtype == torch.int64 and idx.device.type == "cpu"
        assert torch.equal(xb, x[idx].float() / 255) and torch.equal(yb, y[idx])
    assert sorted(torch.cat([i for *_, i in whole]).tolist()) == list(range(40))
    plain = list(BatchLoader(x, y, 8, seed=3).epoch(1))
    assert all(len(b) == 2 and torch.equal(b[0], w[0]) for b, w in zip(plain, whole))
    r1 = list(BatchLoader(x, y, 4, seed=3, rank=1, world=2).epoch(1, start=2, with_index=True))
    assert [i.tolist() for *_, i in r1] == [i[4:].tolist() for *_, i in whole[2:]]
