"""AutoAttack through the reference implementation: Croce & Hein, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", ICML 2020 (arXiv:2003.01690), as published
by its authors (github.com/fra31/auto-attack) in the package `pyautoattack` (pinned in pyproject.toml).

igam adds what an evaluation record needs around it and changes none of the attacks:

- the attack contract of igam.attacks.base: float NCHW inputs in [0, 1], eval mode (or train-mode BatchNorm,
  labelled), seeding that leaves the global RNG as it was;
- models with fewer classes than a component needs: APGD-T and FAB-T use min(9, classes - 1) target
  classes (recorded as `reduced` and shown in the column label); components that cannot run at all (the
  DLR loss needs 3 logits, the targeted DLR loss 4) are refused with an IgamError naming the fix;
- AutoAttack's own warnings ("flags": randomised or dynamic defence, probabilities instead of logits,
  zero gradients, Square beating the white-box attacks) captured from its logger into the record;
- resumable evaluations: after each component on each batch, the adversarial images found so far are
  written atomically to a state folder, so an interrupted `igam evaluate` continues where it stopped.
  (pyautoattack's own `state_path` cannot be used for this: in 0.2.0 a saved state never loads again - its
  set of attacks is written as a string and compared with a set - and it keeps no adversarial images.)

Each component runs through `pyautoattack.AutoAttack.run_standard_evaluation` on the images that are still
correctly classified, in the published order and with the published settings, which is how AutoAttack
itself chains its components; the per-image worst case is returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import igam.progress as progress
from igam.attacks.base import Attack, project
from igam.errors import IgamError
from igam.files import append_text, atomic_write_bytes, write_json
from igam.utils import bn_mode

LIBRARY = "pyautoattack"
PINNED_VERSION = "0.2.0"
FLAGS_DOC = "https://github.com/fra31/auto-attack/blob/master/flags_doc.md"
INSTALL_HINT = (
    f"AutoAttack needs the reference implementation, the package {LIBRARY}=={PINNED_VERSION} (a dependency "
    f"of igam). Reinstall igam (`pip install -e .` in the repository) or run `pip install "
    f"{LIBRARY}=={PINNED_VERSION}`. Without it, use the built-in presets pgdKxR, pgdK-cw and square.")

# The published versions (pyautoattack's `_set_version`, Linf): components in the order they run.
VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# Fewest classes each component can run on at all, and why (pyautoattack indexes sorted logits).
MIN_CLASSES: dict[str, tuple[int, str]] = {
    "apgd-ce": (2, "cross-entropy needs two classes"),
    "apgd-dlr": (3, "the DLR loss divides by z_max - z_3rd, the gap to the third-largest logit"),
    "apgd-t": (4, "the targeted DLR loss divides by z_max - (z_3rd + z_4th) / 2, so it needs four logits"),
    "fab": (2, "FAB needs a second class"),
    "fab-t": (2, "FAB-T needs a target class"),
    "square": (2, "the margin loss needs a second class"),
}
PUBLISHED_TARGETS = 9  # APGD-T and FAB-T in the standard and plus versions


def pyautoattack_version() -> str | None:
    """The installed pyautoattack version, or None when it cannot be imported."""
    try:
        import pyautoattack
    except Exception:  # ImportError, or a broken install
        return None
    return str(getattr(pyautoattack, "__version__", "unknown"))


def preset_name(version: str, components: tuple[str, ...] | None = None) -> str:
    """The igam attack name of a version or a single component: autoattack, autoattack-plus, apgd-t,
    aa-square (AutoAttack's Square; `square` is igam's own)."""
    if components is None or tuple(components) == VERSIONS[version]:
        return "autoattack" if version == "standard" else f"autoattack-{version}"
    if len(components) == 1:
        return "aa-square" if components[0] == "square" else components[0]
    return "autoattack-custom"


def check_classes(name: str, components: tuple[str, ...], num_classes: int) -> dict[str, int]:
    """Target classes APGD-T / FAB-T will use with `num_classes` classes ({} when nothing is targeted).

    Raises IgamError when a component cannot run with that many classes, naming the components that can."""
    k = int(num_classes)
    impossible = [(c, *MIN_CLASSES[c]) for c in components if k < MIN_CLASSES[c][0]]
    if impossible:
        why = "; ".join(f"{c.upper()} needs at least {m} classes ({reason})" for c, m, reason in impossible)
        # the standard version's order, with APGD-DLR standing in for APGD-T where the DLR loss works
        ok = [c for c in ("apgd-ce", "apgd-dlr", "fab-t", "square") if k >= MIN_CLASSES[c][0]]
        alt = ",".join("aa-square" if c == "square" else c for c in ok)
        fix = (f"Run the AutoAttack components that work with {k} classes instead, e.g. --attacks {alt} "
               "(their worst case per image is what AutoAttack reports), together with strong PGD "
               "(pgd100x5, pgd100-cw)." if ok else "No AutoAttack component applies; use a classifier with "
               "at least 2 outputs.")
        raise IgamError(f"Attack '{name}' cannot run on this {k}-class model: {why}. {fix}")
    return {c: min(PUBLISHED_TARGETS, k - 1) for c in components if c in ("apgd-t", "fab-t")}


@torch.no_grad()
def count_classes(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Number of logits of `model` on one zero image of shape (C, H, W) (eval mode, restored after)."""
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    with bn_mode(model, "eval"):
        out = model(torch.zeros(1, *tuple(shape)[-3:], device=device, dtype=dtype))
    return int(out.shape[-1])


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes, bytes): a resume state is only reused
    for the same weights."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        if torch.is_tensor(t):
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class _Lines(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@contextmanager
def capture_log(sink: list[logging.LogRecord]) -> Iterator[None]:
    """Collect everything pyautoattack logs (logger 'auto-attack', DEBUG and up) into `sink`, without
    printing it; the logger's level, handlers and propagation are restored after."""
    logger = logging.getLogger("auto-attack")
    handler, level, propagate = _Lines(sink), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class AutoAttack(Attack):
    """AutoAttack (L-inf) through pyautoattack, the authors' implementation.

    Versions as published: 'standard' runs APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes)
    and Square (5000 queries), 100 iterations and 1 restart each; 'plus' adds APGD-DLR and FAB with 5
    restarts; 'rand' (randomised defences) runs APGD-CE and APGD-DLR with 20 EOT iterations. Each
    component runs on the images the previous ones left correctly classified.

    Arguments:
        model: maps (N, C, H, W) float images in [0, 1] to logits (N, K).
        eps: L-inf radius in [0, 1] pixel units, e.g. 8/255 or 0.3.
        version: 'standard' | 'plus' | 'rand'.
        components: run only these components of the version, with the version's settings (e.g.
            ('apgd-t',)); default: all of them. Names: apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square.
        num_classes: K; default: read from the logits of the first batch. With K < 10, APGD-T and FAB-T
            use K - 1 target classes (labelled `reduced`); components that cannot run raise IgamError.
        n_iter, n_queries: override the published iterations (APGD, FAB) and Square queries, for tests
            and quick looks; the record then says `as_published: false`.
        batch_size: images per pyautoattack call (default: the whole batch given to the attack).
        state_dir: folder for the resume state (None: no resume). A batch already finished there, for the
            same weights, settings and seed, is returned without attacking again.
        log_path: file that receives pyautoattack's log lines (appended), or None.
        progress: called with one line per component and batch (e.g. print), or None.
        bn, seed: as for every igam attack.
    Shape: x (N, C, H, W) float in [0, 1]; y (N,) int64. Returns x_adv of x's shape and dtype, with
        |x_adv - x| <= eps and values in [0, 1].
    Raises: IgamError for an unknown version/component, a bad override, or too few classes.
    Example:
        >>> attack = AutoAttack(model, eps=8 / 255)            # the standard version
        >>> x_adv = attack(x, y)
        >>> attack.settings()["component_settings"]["apgd-t"]["n_target_classes"]
        9
    """

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, *, version: str = "standard",
                 components: tuple[str, ...] | list[str] | None = None, num_classes: int | None = None,
                 n_iter: int | None = None, n_queries: int | None = None, batch_size: int | None = None,
                 bn: str = "eval", seed: int = 0, state_dir: str | Path | None = None,
                 log_path: str | Path | None = None, progress: Callable[[str], None] | None = None):
        super().__init__(model, eps, bn=bn, seed=seed)
        self.library_version = pyautoattack_version()
        if self.library_version is None:
            raise IgamError(INSTALL_HINT)
        if version not in VERSIONS:
            raise IgamError(f"AutoAttack version '{version}' does not exist; use one of "
                            f"{', '.join(VERSIONS)}.")
        comps = VERSIONS[version] if components is None else tuple(components)
        bad = [c for c in comps if c not in COMPONENTS]
        if bad or not comps:
            raise IgamError(f"Unknown AutoAttack component(s) {bad or '(none)'}; use "
                            f"{', '.join(COMPONENTS)}.")
        for key, v in (("n_iter", n_iter), ("n_queries", n_queries), ("batch_size", batch_size)):
            if v is not None and int(v) < 1:
                raise IgamError(f"AutoAttack {key}={v} must be at least 1.")
        self.version, self.components = version, comps
        self.name = preset_name(version, comps)
        self.n_iter, self.n_queries = n_iter, n_queries
        self.batch_size = batch_size
        self.num_classes: int | None = None
        self.targets: dict[str, int] = {}
        if num_classes is not None:
            self._set_classes(int(num_classes))
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.progress = progress
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget the statistics of earlier calls (flags, per-component counts, resumed batches)."""
        self.flags: list[str] = []
        self.counts: dict[str, int] = {"n": 0, "clean": 0, **{c: 0 for c in self.components}}
        self.resumed_batches = 0
        self._fingerprint: str | None = None

    def _set_classes(self, k: int) -> None:
        self.targets = check_classes(self.name, self.components, k)
        self.num_classes = k

    def _flag(self, msg: str) -> None:
        if msg not in self.flags:
            self.flags.append(msg)

    # ------------------------------------------------------------------ the reference object
    def _reference(self, device: torch.device, seed: int, component: str) -> Any:
        """A pyautoattack.AutoAttack configured by its own `version`, restricted to one component, with the
        reduced target count and the overrides applied."""
        from pyautoattack import AutoAttack as Reference

        with capture_log([]):  # it logs "setting parameters for ... version"
            aa = Reference(self.model, norm="Linf", eps=float(self.eps), version=self.version, seed=seed,
                           device=device)
        aa.attacks_to_run = [component]
        for c, n in self.targets.items():
            (aa.apgd_targeted if c == "apgd-t" else aa.fab).n_target_classes = n
        if self.n_iter is not None:
            for apgd in (aa.apgd, aa.apgd_targeted):  # as APGDAttack.__init__ derives them from n_iter
                apgd.n_iter = apgd.n_iter_orig = int(self.n_iter)
                apgd.n_iter_2 = max(int(0.22 * apgd.n_iter), 1)
                apgd.n_iter_min = max(int(0.06 * apgd.n_iter), 1)
                apgd.size_decr = max(int(0.03 * apgd.n_iter), 1)
            aa.fab.n_iter = int(self.n_iter)
        if self.n_queries is not None:
            aa.square.n_queries = int(self.n_queries)
        return aa

    def component_settings(self) -> dict[str, dict[str, Any]]:
        """What each component runs with, read off the configured pyautoattack objects."""
        aa = self._reference(torch.device("cpu"), self.seed, self.components[0])
        out: dict[str, dict[str, Any]] = {}
        for c in self.components:
            if c in ("apgd-ce", "apgd-dlr"):
                a = aa.apgd
                out[c] = {"loss": c[5:], "n_iter": a.n_iter, "n_restarts": a.n_restarts,
                          "eot_iter": a.eot_iter, "rho": a.thr_decr}
            elif c == "apgd-t":
                a = aa.apgd_targeted
                out[c] = {"loss": "dlr-targeted", "n_iter": a.n_iter, "n_restarts": a.n_restarts,
                          "n_target_classes": a.n_target_classes, "eot_iter": a.eot_iter, "rho": a.thr_decr}
            elif c in ("fab", "fab-t"):
                a = aa.fab
                # run_standard_evaluation sets FAB's restarts to 1 before FAB-T
                out[c] = {"targeted": c == "fab-t", "n_iter": a.n_iter,
                          "n_restarts": 1 if c == "fab-t" else a.n_restarts, "alpha_max": a.alpha_max,
                          "eta": a.eta, "beta": a.beta}
                if c == "fab-t":
                    out[c]["n_target_classes"] = a.n_target_classes
            else:
                a = aa.square
                out[c] = {"n_queries": a.n_queries, "p_init": a.p_init, "n_restarts": a.n_restarts,
                          "loss": a.loss}
        return out

    def component_passes(self, component: str, n: int, settings: dict[str, Any] | None = None) -> int:
        """An upper bound on the model's forward passes of one component on n images (pyautoattack's own
        checks included; counted on pyautoattack 0.2.0 with nothing broken, when every pass runs): per
        chunk of `batch_size` images, APGD one pass per iteration and EOT draw per restart (and target
        class), FAB two, Square one per query."""
        s = (settings or self.component_settings())[component]
        chunks = -(-max(1, int(n)) // int(self.batch_size or max(1, int(n))))
        runs = int(s.get("n_restarts", 1)) * int(s.get("n_target_classes", 1))
        if component.startswith("apgd"):
            per = runs * int(s.get("eot_iter", 1)) * (int(s["n_iter"]) + 2) + 3
        elif component.startswith("fab"):
            per = runs * (2 * int(s["n_iter"]) + 3) + 3
        else:
            per = runs * int(s["n_queries"]) + 5
        return chunks * per + 8

    def passes(self, n: int) -> int:
        """The components' passes (`component_passes`) plus the clean forward of each batch."""
        settings = self.component_settings()
        return 1 + sum(self.component_passes(c, n, settings) for c in self.components)

    def static_settings(self) -> dict[str, Any]:
        """Everything that determines the result (the resume state is only reused when these match)."""
        reduced = {c: {"n_target_classes": n, "published": PUBLISHED_TARGETS}
                   for c, n in self.targets.items() if n < PUBLISHED_TARGETS}
        return {**super().settings(), "attack": "autoattack", "name": self.name, "norm": "Linf",
                "library": LIBRARY, "library_version": self.library_version, "version": self.version,
                "components": list(self.components), "component_settings": self.component_settings(),
                "complete": self.components == VERSIONS[self.version],
                "as_published": self.n_iter is None and self.n_queries is None and not reduced,
                "num_classes": self.num_classes, "reduced": reduced or None, "seed": self.seed}

    def settings(self) -> dict[str, Any]:
        """static_settings() plus what the calls so far found: `robust_after` (images still correct after
        each component, cumulative, over all calls), AutoAttack's `flags`, `resumed_batches`."""
        n = self.counts["n"]
        if n and "square" in self.components and len(self.components) > 1:  # AutoAttack's final check
            from pyautoattack import checks

            sink: list[logging.LogRecord] = []
            acc = {"clean": self.counts["clean"] / n, **{c: self.counts[c] / n for c in self.components}}
            with capture_log(sink):
                checks.check_square_sr(acc, logger=logging.getLogger("auto-attack"))
            for r in sink:
                if r.levelno >= logging.WARNING:
                    self._flag(r.getMessage())
        return {**self.static_settings(), "robust_after": dict(self.counts), "flags": list(self.flags),
                "flags_doc": FLAGS_DOC, "resumed_batches": self.resumed_batches,
                "batch_size": self.batch_size,
                "log": self.log_path.name if self.log_path is not None and self.log_path.exists() else None}

    # ------------------------------------------------------------------ resume state
    def _state_file(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "state.json"

    def _load_state(self) -> dict[str, Any]:
        path = self._state_file()
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        fresh = {"format": 1, "model": self._fingerprint,
                 "settings": json.loads(json.dumps(self.static_settings(), default=str)), "batches": {}}
        if not path.exists():
            return fresh
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            state = None
        if not isinstance(state, dict) or {k: state.get(k) for k in ("format", "model", "settings")} != \
                {k: fresh[k] for k in ("format", "model", "settings")}:
            self._say(f"{self.name}: the resume state in {self.state_dir} is for other weights or settings; "
                      "starting afresh")
            shutil.rmtree(self.state_dir, ignore_errors=True)
            return fresh
        return state

    def _save_batch(self, state: dict[str, Any], key: str, entry: dict[str, Any], x: torch.Tensor,
                    x_adv: torch.Tensor) -> None:
        from safetensors.torch import save

        idx = (x_adv != x).flatten(1).any(1).nonzero().flatten().cpu()
        data = {"idx": idx.to(torch.int64), "x_adv": x_adv[idx.to(x_adv.device)].detach().cpu().contiguous()}
        atomic_write_bytes(self.state_dir / f"{key}.safetensors", save(data))  # type: ignore[operator]
        state["batches"][key] = entry
        write_json(self._state_file(), state)

    def _load_batch(self, state: dict[str, Any], key: str, x: torch.Tensor) -> torch.Tensor | None:
        from safetensors.torch import load

        try:
            data = load((self.state_dir / f"{key}.safetensors").read_bytes())  # type: ignore[operator]
        except Exception:  # missing or torn: redo the batch
            state["batches"].pop(key, None)
            return None
        x_adv = x.clone()
        x_adv[data["idx"].to(x.device)] = data["x_adv"].to(x.device, x.dtype)
        return x_adv

    def clear_state(self) -> None:
        """Delete the resume state (igam evaluate does this once the result is in eval.json)."""
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # ------------------------------------------------------------------ the attack
    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def _record_log(self, records: list[logging.LogRecord], context: str) -> None:
        for r in records:
            if r.levelno >= logging.WARNING:
                msg = r.getMessage()
                if msg not in self.flags:
                    self._say(f"{self.name}: AutoAttack flag: {msg}")
                self._flag(msg)
        if self.log_path is not None and records:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            append_text(self.log_path, "".join(f"{stamp} {context} {r.levelname}: {r.getMessage()}\n"
                                               for r in records))

    def _batch_key(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> str:
        h = hashlib.sha256(x.detach().cpu().numpy().tobytes())
        h.update(y.detach().cpu().numpy().tobytes())
        h.update(str(seed).encode())
        return h.hexdigest()[:20]

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        xf = x.float()
        with torch.no_grad():
            logits = self.model(xf)
        if self.num_classes is None:
            self._set_classes(int(logits.shape[1]))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=x.device))
        x_adv, robust = xf.clone(), logits.argmax(1) == y
        entry: dict[str, Any] = {"done": [], "counts": {"clean": int(robust.sum())}, "flags": []}
        state, key = None, ""
        if self.state_dir is not None:
            state, key = self._load_state(), self._batch_key(xf, y, seed)
            old = state["batches"].get(key)
            restored = self._load_batch(state, key, xf) if old else None
            if old and restored is not None:
                x_adv, entry = restored, old
                robust = torch.tensor(old["robust"], dtype=torch.bool, device=x.device)
                for msg in old["flags"]:
                    self._flag(msg)
                self.resumed_batches += 1
                if len(old["done"]) < len(self.components):
                    self._say(f"{self.name}: resuming a batch of {len(x)} after {', '.join(old['done'])}")
        if x.device.type == "cuda":
            devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()]
        else:  # it also seeds CUDA: keep an initialised CUDA generator as it was
            devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        prog = progress.current()
        settings = self.component_settings() if prog.total else None
        for c in self.components:
            if c in entry["done"]:
                prog.tick(self.component_passes(c, len(x), settings) if settings else 0)
                continue
            idx = robust.nonzero().flatten()
            if len(idx):
                t0 = time.time()
                records: list[logging.LogRecord] = []
                prog.status("component", c.upper())
                with (torch.random.fork_rng(devices=devices), capture_log(records),  # it seeds the global RNG
                      prog.span(self.component_passes(c, len(x), settings) if settings else 0)):
                    aa = self._reference(x.device, seed, c)
                    adv, y_adv = aa.run_standard_evaluation(xf[idx], y[idx],
                                                            batch_size=self.batch_size or len(idx))
                self._record_log(records, f"{self.name} {c}")
                entry["flags"] = sorted({*entry["flags"],
                                         *(r.getMessage() for r in records if r.levelno >= logging.WARNING)})
                broken = y_adv.to(y.device) != y[idx]
                x_adv[idx[broken]] = adv[broken].to(x_adv.device, x_adv.dtype)
                robust[idx[broken]] = False
                self._say(f"{self.name}: {c.upper()}: {int(robust.sum())}/{len(x)} images still correct "
                          f"({time.time() - t0:.1f} s)")
            else:
                prog.tick(self.component_passes(c, len(x), settings) if settings else 0)
            entry["counts"][c] = int(robust.sum())
            entry["done"] = [*entry["done"], c]
            if state is not None:
                entry["robust"] = robust.tolist()
                self._save_batch(state, key, entry, xf, x_adv)
        prog.status("component", None)
        self.counts["n"] += len(x)
        for k, v in entry["counts"].items():
            self.counts[k] += v
        # pyautoattack works in float32; restate the contract exactly in x's dtype
        return project(x_adv.to(x.dtype), x, self.eps)
