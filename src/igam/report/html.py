"""`igam report`: one self-contained HTML page for a run or an experiment directory (runs as
subdirectories). Everything is inline: CSS in a <style> block, pictures as data:image/png;base64, so the
file can be mailed, archived or opened offline.

A run page has the run's summary, evaluation table (eval.json, with per-class accuracy and the masking
and admission checks), its robustness curve (robustness_curve.json from `igam evaluate --eps-sweep`),
metrics (metrics.json), training curves, an input-gradient grid (paper Figs. 1, 4) and its configuration.
An experiment page has the experiment's results.md / results.json when present, a table of all runs,
overlaid robustness and training curves, one gradient grid per input shape and each run's details.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import markdown as markdown_lib

from igam.attacks import column_name, default_eps
from igam.config import Config
from igam.errors import IgamError
from igam.files import PACKAGE_VERSION, atomic_write_text
from igam.records import read_eval, worst_case
from igam.report.common import png_bytes, run_labels
from igam.report.curves import curves_figure
from igam.report.gradients import run_gradient_figure
from igam.report.landscape import run_landscapes
from igam.report.robustness import read_curve, robustness_figure
from igam.runs import Run
from igam.summary import order_attacks
from igam.units import eps_text

CSS = resources.files("igam.report").joinpath("report.css").read_text(encoding="utf-8")

ATTACK_ORDER = ("clean", "fgsm")


# ---------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """Everything a report shows about one run, read once."""

    dir: Path
    label: str
    meta: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    curve: dict[str, Any] | None = None  # robustness_curve.json
    curve_error: str = ""  # why a robustness_curve.json could not be read

    @property
    def attacks(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.eval.items() if isinstance(v, dict) and "accuracy" in v}

    @property
    def has_model(self) -> bool:
        return (self.dir / Run.WEIGHTS).exists()


def read_run(run_dir: Path, label: str | None = None, log: Callable[[str], None] = print) -> RunInfo:
    """A run's files for its report; damaged records of eval.json and metrics.json are left out with a
    warning through `log` (`records.read_eval`, `Run.read_metrics`)."""
    run = Run(run_dir)
    info = RunInfo(run_dir, label or run_dir.name, run.meta)
    info.config = run.config
    info.metrics = run.read_metrics(log)
    info.eval = read_eval(run, log)
    try:
        info.curve = read_curve(run_dir)
    except IgamError as e:  # a damaged curve file costs its section, not the report
        info.curve_error = str(e)
    return info


def find_runs(path: Path) -> list[Path]:
    """Run directories (holding meta.json) directly under `path`, or one level further down."""
    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    runs = [p for p in children if (p / Run.META).exists()]
    for p in children:
        if p not in runs:
            runs += sorted(q for q in p.iterdir() if q.is_dir() and (q / Run.META).exists())
    return runs


# ---------------------------------------------------------------------------------------------
# formatting
def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def is_acc_key(key: str) -> bool:
    k = key.lower().rsplit(".", 1)[-1]
    return k in ("acc", "accuracy") or k.endswith("_acc") or k.startswith("acc_") or k.endswith("_accuracy")


CHECK_KEYS = ("pass", "passed", "ok", "success")


def fmt(v: Any, key: str = "", checks: bool = False, pct: bool = True) -> str:
    """A value as HTML text: accuracies in %, floats to 4 significant digits; booleans under a key like
    'passed' as a coloured pass/fail, others as true/false (bold in check tables, checks=True)."""
    if isinstance(v, bool):
        if key.lower().rsplit(".", 1)[-1] in CHECK_KEYS:
            return f'<span class="{"ok" if v else "bad"}">{"pass" if v else "fail"}</span>'
        return f"<strong>{str(v).lower()}</strong>" if checks else str(v).lower()
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        if is_acc_key(key) and 0.0 <= v <= 1.0:
            return f"{100 * v:.2f}" + ("&thinsp;%" if pct else "")
        if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-3):
            return f"{v:.3e}"
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list | tuple):
        return esc(", ".join(str(x) for x in v)) if all(not isinstance(x, dict | list) for x in v) \
            else f"<code>{esc(json.dumps(v, default=str))}</code>"
    if isinstance(v, dict):
        return f"<code>{esc(json.dumps(v, default=str))}</code>"
    return esc(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def table(headers: list[str], rows: list[list[Any]], keys: list[str] | None = None,
          best: set[int] | None = None, raw: set[int] | None = None, checks: bool = False,
          wide: set[int] | None = None, groups: dict[int, list[Any]] | None = None) -> str:
    """An HTML table; numbers right-aligned and formatted by `fmt` with the column's key; the largest
    value of each column in `best` is bold, compared only among the rows whose `groups[j]` entries are
    equal (comparable runs: same dataset and eps), and only where two or more compare; columns in `raw`
    hold ready HTML; text in `wide` columns wraps."""
    keys = keys or headers
    best_cells: set[tuple[int, int]] = set()
    for j in best or ():
        group = (groups or {}).get(j) or [None] * len(rows)
        for g in set(map(repr, group)):
            members = [i for i, r in enumerate(rows) if repr(group[i]) == g and j < len(r) and _is_num(r[j])]
            if len(members) > 1:
                top = max(rows[i][j] for i in members)
                best_cells |= {(i, j) for i in members if rows[i][j] == top}
    numeric = {j for j in range(len(headers)) if any(j < len(r) and _is_num(r[j]) for r in rows)}
    head = "".join(f'<th class="num">{esc(h)}</th>' if j in numeric else f"<th>{esc(h)}</th>"
                   for j, h in enumerate(headers))
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            cls = ["wide"] if wide and j in wide else []
            if _is_num(v) or (v is None and j in numeric):
                cls.append("num")
                if (i, j) in best_cells:
                    cls.append("best")
            text = v if raw and j in raw else fmt(v, keys[j] if j < len(keys) else "", checks, pct=False)
            cells.append(f'<td class="{" ".join(cls)}">{text}</td>' if cls else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return wrap_table(head, "".join(body), compact=len(headers) > 8)


def wrap_table(head_cells: str, body_rows: str, compact: bool = False) -> str:
    """A table in a horizontally scrolling wrapper; `compact` (many columns): smaller type and padding, so
    that it fits a 1280 px window."""
    cls = ' class="compact"' if compact else ""
    return (f'<div class="wrap"><table{cls}><thead><tr>{head_cells}</tr></thead><tbody>{body_rows}</tbody>'
            "</table></div>")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def kv_table(d: dict[str, Any], headers: tuple[str, str] = ("key", "value"), numbers: bool = True,
             checks: bool = False) -> str:
    """Two columns, key and value; numbers right-aligned when `numbers` (metrics), else left (settings)."""
    rows = "".join(f'<tr><td class="key">{esc(k)}</td>'
                   f'<td class="{"num" if numbers and _is_num(v) else "wide"}">{fmt(v, k, checks)}</td></tr>'
                   for k, v in d.items())
    return (f'<div class="wrap"><table><thead><tr><th>{esc(headers[0])}</th><th>{esc(headers[1])}</th></tr>'
            f"</thead><tbody>{rows}</tbody></table></div>")


def generic(obj: Any, checks: bool = False) -> str:
    """Any JSON-like object as HTML: a dict of dicts as a table (one row per key), a dict as key/value
    rows, a list of dicts as a table, anything else as preformatted JSON."""
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        cols = list(dict.fromkeys(k for v in obj.values() for k in v))
        rows = [[k, *[v.get(c) for c in cols]] for k, v in obj.items()]
        return table(["check" if checks else "", *cols], rows, ["", *cols], checks=checks)
    if isinstance(obj, dict):
        return kv_table(flatten(obj), checks=checks)
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        cols = list(dict.fromkeys(k for v in obj for k in v))
        return table(cols, [[v.get(c) for c in cols] for v in obj], checks=checks)
    return f"<pre>{esc(json.dumps(obj, indent=2, default=str))}</pre>"


def markdown(text: str) -> str:
    """Markdown (results.md) as HTML through Python-Markdown: tables, fenced code; headings moved two levels
    down (h1 -> h3, under the page's own); raw HTML in the text shown as text, never interpreted."""
    md = markdown_lib.Markdown(extensions=["tables", "fenced_code", "toc"],
                               extension_configs={"toc": {"baselevel": 3}})
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    html = md.convert(text).replace("<table>", '<div class="wrap"><table>')
    html = html.replace("</table>", "</table></div>")
    return f'<div class="md">{html}</div>'


def img_tag(png: bytes, alt: str, caption: str = "") -> str:
    """An inline PNG (base64), shown at about its physical size (150 dpi -> 96 CSS px per inch)."""
    import struct

    width = struct.unpack(">I", png[16:20])[0] if png[:8] == b"\x89PNG\r\n\x1a\n" else 0
    w = f' width="{round(width * 96 / 150)}"' if width else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (f'<figure><img{w} alt="{esc(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">{cap}</figure>')


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


# ---------------------------------------------------------------------------------------------
# sections
def ordered_attacks(runs: list[RunInfo]) -> list[str]:
    """eval.json keys in reading order: clean, FGSM, then attacks by strength (steps), variants with
    @eps=/@bn= after their base attack, radii in increasing order (igam.summary.order_attacks)."""
    return order_attacks([a for r in runs for a in r.attacks])


def attack_title(a: str) -> str:
    """'pgd20@eps=4/255' -> 'PGD20 (eps 4/255)', 'square1000' -> 'Square1000', 'clean' -> 'Clean': the
    terminal table's headers (igam.summary.column_title), radii written as `fmt_eps` writes them."""
    base, *variants = a.split("@")
    shown = []
    for v in variants:
        if v.startswith("eps="):
            num, _, den = v[4:].partition("/")
            try:
                shown.append(f"eps {fmt_eps(float(num) / (float(den) if den else 1.0))}")
                continue
            except ValueError:
                pass
        shown.append("train BN" if v == "bn=train" else v)
    return column_name(base) + (f" ({', '.join(shown)})" if shown else "")


def fmt_eps(eps: Any) -> Any:
    """A radius written one way everywhere (igam.units.eps_text): 0.0313725 -> '8/255', 0.3 -> '0.3',
    0.0157 -> '4/255'; anything that is not a number unchanged."""
    return eps_text(float(eps)) if _is_num(eps) else eps


ATTACK_FIELDS = (("eps", "eps"), ("steps", "steps"), ("step_size", "step"), ("restarts", "restarts"),
                 ("queries", "queries"), ("loss", "loss"), ("bn", "BatchNorm"), ("seed", "seed"),
                 ("time_s", "time (s)"))


def eval_section(run: RunInfo) -> str:
    """The attack table of eval.json and its masking checks."""
    attacks = run.attacks
    if not attacks:
        return note("No eval.json yet: `igam evaluate RUN --attacks clean,fgsm,pgd20` fills this table.")

    def field_of(rec: dict[str, Any], key: str) -> Any:
        spec = rec.get("attack") if isinstance(rec.get("attack"), dict) else {}
        v = rec.get(key, spec.get(key))
        return fmt_eps(v) if key in ("eps", "step_size") else v

    order = ordered_attacks([run])
    fields = [(k, h) for k, h in ATTACK_FIELDS if any(field_of(attacks[a], k) is not None for a in order)]
    per_class = any(isinstance(attacks[a].get("per_class"), dict) for a in order)
    classes = ["mean over classes (%)", "worst class (%)", "worst class"] if per_class else []
    rows = [[attack_title(a), attacks[a]["accuracy"], *(per_class_cells(attacks[a]) if per_class else []),
             attacks[a].get("n"), *[field_of(attacks[a], k) for k, _ in fields]] for a in order]
    out = table(["attack", "accuracy (%)", *classes, "n", *[h for _, h in fields]], rows,
                ["", "accuracy", *(["accuracy", "accuracy", ""] if per_class else []), "n",
                 *[k for k, _ in fields]])
    if per_class:
        out += per_class_html({a: attacks[a] for a in order})
    for k, v in run.eval.items():
        if k in attacks:
            continue
        if k == "masking_checks" and isinstance(v, dict) and isinstance(v.get("checks"), dict):
            out += "<h3>Gradient-masking checks</h3>" + masking_html(v)
        else:
            out += f"<h3>{esc(k.replace('_', ' ').capitalize())}</h3>" + generic(v, checks="check" in k)
    return out


def per_class_cells(rec: dict[str, Any]) -> list[Any]:
    """[mean over classes, worst class accuracy, 'index name'] of an eval.json record (dashes without)."""
    pc = rec.get("per_class") if isinstance(rec.get("per_class"), dict) else {}
    worst = pc.get("worst_class")
    names = pc.get("classes") if isinstance(pc.get("classes"), list) else []
    label = (f"{worst} ({names[worst]})" if isinstance(worst, int) and 0 <= worst < len(names) else worst)
    mean, low = pc.get("mean"), pc.get("worst")
    return [float(mean) if _is_num(mean) else None, float(low) if _is_num(low) else None, label]


def per_class_html(records: dict[str, dict[str, Any]]) -> str:
    """A folded table: accuracy (%) per true class (rows) under each attack (columns), with image counts."""
    pcs = {a: r["per_class"] for a, r in records.items() if isinstance(r.get("per_class"), dict)
           and isinstance(r["per_class"].get("accuracy"), list)}
    if not pcs:
        return ""
    k = max(len(pc["accuracy"]) for pc in pcs.values())
    first = next(iter(pcs.values()))
    names = first.get("classes") if isinstance(first.get("classes"), list) else []
    counts = first.get("count") if isinstance(first.get("count"), list) else []
    rows = []
    for c in range(k):
        cells = [pc["accuracy"][c] if c < len(pc["accuracy"]) and _is_num(pc["accuracy"][c]) else None
                 for pc in pcs.values()]
        rows.append([f"{c} {names[c]}" if c < len(names) else str(c), counts[c] if c < len(counts) else None,
                     *[float(v) if v is not None else None for v in cells]])
    return ("<details><summary>Per-class accuracy (the mean over classes weights every class alike; the "
            "worst class is the lowest row)</summary>"
            + table(["class", "images", *[f"{attack_title(a)} (%)" for a in pcs]], rows,
                    ["", "n", *["accuracy"] * len(pcs)])
            + "</details>")


def verdict_html(passed: Any) -> str:
    """pass / fail / not run, coloured."""
    return ('<span class="ok">pass</span>' if passed is True else '<span class="bad">fail</span>'
            if passed is False else '<span class="sub">not run</span>')


def curve_html(runs: list[RunInfo]) -> str:
    """The robustness curves of the runs that have one (robustness_curve.json): one figure (runs overlaid)
    and a table of accuracy (%) per eps, with the sweep's masking verdicts."""
    curves = {r.label: r.curve for r in runs if r.curve}
    out = "".join(note(f"{r.label}: {r.curve_error}") for r in runs if r.curve_error)
    if not curves:
        return out
    fig = robustness_figure(curves, title="Robustness curve" + ("s" if len(curves) > 1 else ""))
    out += img_tag(png_bytes(fig), "robustness curves",
                   "Accuracy against the L<sub>&infin;</sub> radius eps (<code>igam evaluate "
                   "--eps-sweep</code>): at eps 0 the clean accuracy; an image counts as robust when it is "
                   "classified correctly clean and attacked. Dotted: the worst class. The grey line marks "
                   "the large eps, where accuracy must reach about 0% (else the attacks are failing: "
                   "gradient masking).")
    many = len(curves) > 1
    cols = [(label, c) for label, data in curves.items() for c in data["curves"]]
    eps_rows: dict[float, str] = {}
    for _, c in cols:
        for p in c["points"]:
            eps_rows.setdefault(float(p["eps"]), str(p.get("eps_text", p["eps"])))
    rows = []
    for e, text in sorted(eps_rows.items()):
        row: list[Any] = ["0 (clean)" if e == 0 else text]
        for _, c in cols:
            acc = [p["accuracy"] for p in c["points"] if abs(float(p["eps"]) - e) <= 1e-12]
            row.append(float(acc[0]) if acc else None)
        rows.append(row)
    heads = [(f"{label}: " if many else "") + f"{c.get('label', c.get('attack'))} (%)" for label, c in cols]
    out += table(["eps", *heads], rows, ["", *["accuracy"] * len(cols)])
    for label, data in curves.items():
        checks = data.get("checks") if isinstance(data.get("checks"), dict) else {}
        verdicts = [f"{esc(k.replace('_', ' '))}: {verdict_html(v.get('passed'))} "
                    f"({esc(v.get('detail', ''))})" for k, v in checks.items() if isinstance(v, dict)]
        if verdicts:
            out += f'<p class="sub">{esc(label) + ": " if many else ""}{"; ".join(verdicts)}.</p>'
    return out


def masking_html(mc: dict[str, Any]) -> str:
    """The verdicts of `igam evaluate --checks`: a summary line, one row per check, the observations."""
    failed = mc.get("failed") or []
    eps = fmt_eps(mc.get("eps"))
    verdicts = [v.get("passed") if isinstance(v, dict) else v for v in mc["checks"].values()]
    skipped = sum(v is None for v in verdicts)
    if mc.get("passed") and not failed:
        text = "All checks passed" if not skipped else f"All {len(verdicts) - skipped} checks that ran passed"
        head = f'<p><span class="ok">{text}</span>' + (f" ({skipped} not run)" if skipped else "")
    else:
        head = f'<p><span class="bad">Failed: {esc(", ".join(map(str, failed)) or "?")}</span>'

    head += f" &middot; nominal eps {fmt(eps, 'eps')} &middot; sweeps on {fmt(mc.get('check_n'))} images.</p>"
    rows = []
    for name, v in mc["checks"].items():
        v = v if isinstance(v, dict) else {"passed": v}
        p = v.get("passed")
        verdict = ('<span class="ok">pass</span>' if p is True else '<span class="bad">fail</span>'
                   if p is False else '<span class="sub">not run</span>')
        rows.append([esc(name.replace("_", " ")), verdict, esc(v.get("detail", ""))])
    out = head + table(["check", "result", "detail"], rows, raw={0, 1, 2}, wide={2})
    obs = mc.get("observations")
    if isinstance(obs, list) and obs and all(isinstance(o, dict) for o in obs):
        cols = list(dict.fromkeys(k for o in obs for k in o))
        out += ("<details><summary>Attack results the checks used</summary>"
                + table(cols, [[fmt_eps(o.get(c)) if c in ("eps", "step_size") else o.get(c) for c in cols]
                              for o in obs])
                + "</details>")
    return out


def masking_summary(run: RunInfo) -> str:
    """'3/3 passed (3 of 7 ran)' for the results table (coloured), or a dash."""
    mc = run.eval.get("masking_checks")
    if not isinstance(mc, dict):
        return "&ndash;"
    checks = mc.get("checks") if isinstance(mc.get("checks"), dict) else {}
    verdicts = [v.get("passed") for v in checks.values()
                if isinstance(v, dict) and v.get("passed") is not None]
    ok = bool(mc.get("passed", all(verdicts))) and all(verdicts)
    text = (f"{sum(bool(v) for v in verdicts)}/{len(verdicts)} passed ({len(verdicts)} of {len(checks)} ran)"
            if verdicts else "not run" if checks else "passed" if ok else "failed")
    return f'<span class="{"ok" if ok else "bad"}">{text}</span>'


def metrics_section(run: RunInfo) -> str:
    if not run.metrics:
        return note("No metrics.json yet (the run has not finished).")
    parts = []
    final, train = run.metrics.get("final"), run.metrics.get("train")
    if isinstance(final, dict) and final:
        parts.append("<h3>Last evaluation during training</h3>" + kv_table(final, ("metric", "value")))
    if isinstance(train, dict) and train:
        parts.append("<h3>Last training-log row</h3>" + kv_table(train, ("metric", "value")))
    rest = {k: v for k, v in run.metrics.items() if k not in ("final", "train")}
    if rest:
        parts.append("<h3>Other</h3>" + kv_table(flatten(rest), ("metric", "value")))
    return '<div class="cols">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"


def config_section(run: RunInfo) -> str:
    if not run.config:
        return note("No config.yaml in this run.")
    defaults = Config().to_dict()
    changed = {k: v for k, v in run.config.items() if k not in defaults or defaults[k] != v}
    out = ("<p>Keys that differ from the defaults:</p>" + kv_table(changed, ("key", "value"), numbers=False)
           if changed else "<p>All keys have their default values.</p>")
    return out + ("<details><summary>Full configuration (config.yaml)</summary>"
                  + kv_table(run.config, ("key", "value"), numbers=False) + "</details>")


def meta_table(run: RunInfo) -> str:
    m = run.meta
    model = m.get("model", {}) or {}
    data = m.get("data", {}) or {}
    rows = {"status": m.get("status"), "method": m.get("method"),
            "model": f"{model.get('name')} (width {model.get('width') or 'default'}, activation "
                     f"{model.get('activation')}, normalise {model.get('normalize')})",
            "dataset": f"{data.get('dataset')} ({'x'.join(map(str, data.get('shape', [])))}, "
                       f"{data.get('num_classes')} classes)",
            "teacher": m.get("teacher"), "adapter": m.get("adapter"), "seed": m.get("seed"),
            "steps": m.get("steps"), "steps per epoch": m.get("steps_per_epoch"), "augment": m.get("augment"),
            "device": f"{m.get('device')} x {m.get('world_size', 1)}", "igam version": m.get("version"),
            "git commit": str(m.get("git_commit"))[:12], "torch": m.get("torch")}
    return kv_table({k: v for k, v in rows.items() if v not in (None, "", "None")}, ("field", "value"),
                    numbers=False)


def run_eps(run: RunInfo) -> float | None:
    """The run's eps: its dataset's usual radius (0.3 for 1x28x28 inputs, 8/255 otherwise), at which
    `igam evaluate` attacks without --eps; without a recorded input shape, the masking checks' nominal eps.
    None when neither is known."""
    shape = (run.meta.get("data") or {}).get("shape")
    if isinstance(shape, list) and len(shape) == 3:
        return float(default_eps(tuple(shape))[0])
    mc = run.eval.get("masking_checks")
    return float(mc["eps"]) if isinstance(mc, dict) and _is_num(mc.get("eps")) else None


def headline(run: RunInfo) -> dict[str, Any] | None:
    """The field's headline of a run: per image, the worst case over the attacks of eval.json at the run's
    eps (`run_eps`; eval-mode BatchNorm), on the images most of them ran on; records without per-image
    results count with their accuracy (the lowest). Returns {accuracy in [0, 1], eps, n, attacks}, or None
    when no attack ran at that eps."""
    eps = run_eps(run)
    if eps is None:
        return None
    at = {k: r for k, r in run.attacks.items() if "@bn=train" not in k and _is_num(r.get("eps"))
          and abs(float(r["eps"]) - eps) < 1e-9}
    if not at:
        return None
    sizes = [r.get("n") for r in at.values()]
    n = max(set(sizes), key=lambda v: (sizes.count(v), v if isinstance(v, int) else 0))
    at = {k: r for k, r in at.items() if r.get("n") == n}
    bits = {k: r for k, r in at.items() if isinstance(r.get("correct"), str)}
    acc = worst_case(bits)["accuracy"] if bits else None  # type: ignore[index]
    rest = [float(r["accuracy"]) for k, r in at.items() if k not in bits]
    acc = min([a for a in (acc, *rest) if a is not None])
    return {"accuracy": acc, "eps": eps, "n": n, "attacks": order_attacks(list(at))}


def cards(run: RunInfo) -> str:
    """The summary at the top of a run's page: clean accuracy and the headline (the worst case over the
    attacks run at the run's eps) from eval.json; without one, the last evaluation during training."""
    items = []  # (data-key, title, value, unit)
    clean = run.attacks.get("clean")
    if clean is not None:
        items.append(("clean", "Clean", f"{100 * clean['accuracy']:.2f}",
                      f"% accuracy, n = {clean.get('n', '?')}"))
    head = headline(run)
    if head is not None:
        over = ", ".join(attack_title(a) for a in head["attacks"])
        items.append(("headline", f"Robust at eps {fmt_eps(head['eps'])}", f"{100 * head['accuracy']:.2f}",
                      f"% accuracy, n = {head['n']}; worst case over {over}"))
    if not items:
        final = run.metrics.get("final", {}) if isinstance(run.metrics.get("final"), dict) else {}
        for k, v in final.items():
            if is_acc_key(k) and _is_num(v):
                items.append((k, f"{k.removesuffix('_acc')} (train-time eval)", f"{100 * v:.2f}",
                              "% accuracy; no eval.json yet"))
    if run.meta.get("steps"):
        items.append(("steps", "steps", str(run.meta["steps"]), f"{run.meta.get('status', '')}"))
    return '<div class="cards">' + "".join(
        f'<div class="card" data-key="{esc(key)}"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
        f'<div class="u">{esc(u)}</div></div>' for key, k, v, u in items) + "</div>"


def curves_html(runs: list[RunInfo], title: str) -> str:
    try:
        fig = curves_figure({r.label: r.dir for r in runs}, title=title)
    except IgamError as e:
        return note(str(e))
    return img_tag(png_bytes(fig), "training curves",
                   "Per-step training metrics (log.csv, averaged over each logging interval) and the test "
                   "accuracy of every evaluation during training (eval_log.csv). Only logged quantities "
                   "are drawn; L<sub>adv</sub> and L<sub>diff</sub> are eqs. 14 and 13 of the paper.")


def gradients_html(runs: list[RunInfo], n: int, seed: int, data_dir: str | None, device: str,
                   log: Callable[[str], None]) -> str:
    """One gradient grid per input shape (runs of one shape share test images)."""
    with_model = [r for r in runs if r.has_model]
    missing = [r.label for r in runs if not r.has_model]
    out = note(f"No model.safetensors yet for: {', '.join(missing)}.") if missing else ""
    groups: dict[tuple, list[RunInfo]] = {}
    for r in with_model:
        groups.setdefault(tuple(r.meta["data"]["shape"]), []).append(r)
    for shape, group in groups.items():
        try:
            fig = run_gradient_figure([r.dir for r in group], n=n, seed=seed, data_dir=data_dir,
                                      device=device, log=log)
        except IgamError as e:
            log(f"igam report: gradient grid skipped: {e}")
            out += note(f"Gradient grid for inputs {'x'.join(map(str, shape))} skipped: {e}")
            continue
        out += img_tag(png_bytes(fig), "input gradients",
                       "Input gradients of the cross-entropy at the true label w.r.t. the [0, 1] input, as "
                       "in the paper's Figs. 1 and 4: robust models give salient gradients that resemble the "
                       "image, standard models noisy ones. Below each gradient: the model's prediction "
                       "(green: correct, red: wrong).")
    return out


def landscape_html(run: RunInfo, index: int, data_dir: str | None, device: str) -> str:
    try:
        _, fig = run_landscapes([run.dir], index, data_dir=data_dir, device=device)
    except IgamError as e:
        return note(f"Loss landscape skipped: {e}")
    return img_tag(png_bytes(fig), "loss landscape", "Cross-entropy and decision regions around one test "
                   "image along the adversarial and a random direction, as in the paper's Fig. 7.")


def page(title: str, kicker: str, subtitle: str, body: str) -> str:
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f'<header class="top"><div class="kicker">{esc(kicker)}</div><h1>{esc(title)}</h1>'
            f'<div class="sub">{subtitle}</div></header>{body}'
            f"<footer>Written by igam {PACKAGE_VERSION} on {now}. Input Gradient Adversarial Matching "
            f"(Chan, Tay &amp; Ong, CVPR 2020). Self-contained: no external resources.</footer>"
            f"</main></body></html>\n")


def run_subtitle(run: RunInfo) -> str:
    m = run.meta
    return " &middot; ".join(esc(s) for s in (
        f"method {m.get('method')}", f"model {m.get('model', {}).get('name')}",
        f"dataset {m.get('data', {}).get('dataset')}", f"seed {m.get('seed')}", f"status {m.get('status')}"))


# ---------------------------------------------------------------------------------------------
def run_report(run: RunInfo, n: int, seed: int, data_dir: str | None, device: str, gradients: bool,
               landscape_index: int | None, log: Callable[[str], None]) -> str:
    body = cards(run)
    body += "<h2>Evaluation</h2>" + eval_section(run)
    if run.curve or run.curve_error:
        body += "<h2>Robustness curve</h2>" + curve_html([run])
    body += "<h2>Metrics</h2>" + metrics_section(run)
    body += "<h2>Training curves</h2>" + curves_html([run], f"Training curves: {run.label}")
    if gradients:
        body += "<h2>Input gradients</h2>" + gradients_html([run], n, seed, data_dir, device, log)
    if landscape_index is not None and run.has_model:
        body += "<h2>Loss landscape</h2>" + landscape_html(run, landscape_index, data_dir, device)
    body += "<h2>Run</h2>" + meta_table(run)
    body += "<h2>Configuration</h2>" + config_section(run)
    return page(run.label, "igam run report", run_subtitle(run), body)


def results_table(runs: list[RunInfo]) -> str:
    """One row per run: what it is, then accuracies (train-time evaluation, then each eval.json attack) in %.
    Descriptive columns that are the same for every run move to one line above the table."""
    attacks = ordered_attacks(runs)
    finals = list(dict.fromkeys(k for r in runs for k, v in (r.metrics.get("final") or {}).items()
                                if is_acc_key(k) and _is_num(v)))
    info = {"method": [r.meta.get("method") for r in runs],
            "model": [r.meta.get("model", {}).get("name") for r in runs],
            "dataset": [r.meta.get("data", {}).get("dataset") for r in runs],
            "seed": [r.meta.get("seed") for r in runs], "status": [r.meta.get("status") for r in runs],
            "steps": [r.meta.get("steps") for r in runs]}
    shared = {k: v[0] for k, v in info.items() if len(runs) > 1 and len(set(map(str, v))) == 1}
    varying = [k for k in info if k not in shared]
    headers = ["run", *varying, *[f"train-time {k.removesuffix('_acc')} (%)" for k in finals],
               *[f"{attack_title(a)} (%)" for a in attacks], "masking checks"]
    keys = ["", *varying, *finals, *["accuracy"] * len(attacks), ""]
    rows = []
    for i, r in enumerate(runs):
        rows.append([r.label, *[info[k][i] for k in varying],
                     *[(r.metrics.get("final") or {}).get(k) for k in finals],
                     *[r.attacks.get(a, {}).get("accuracy") for a in attacks], masking_summary(r)])
    first = 1 + len(varying)
    # "best" compares comparable runs only: the same dataset, and for an attack the same eps
    groups = {first + f: [(info["dataset"][i],) for i in range(len(runs))] for f in range(len(finals))}
    for a_i, a in enumerate(attacks):
        radii = [r.attacks.get(a, {}).get("eps") for r in runs]
        groups[first + len(finals) + a_i] = [(info["dataset"][i], round(float(e), 9) if _is_num(e) else None)
                                             for i, e in enumerate(radii)]
    out = ""
    if shared:
        out += ("<p>All runs: " + ", ".join(f"{esc(k)} <strong>{esc(v)}</strong>" for k, v in shared.items())
                + ".</p>")
    out += table(headers, rows, keys, best=set(range(first, first + len(finals) + len(attacks))),
                 raw={len(headers) - 1}, groups=groups, wide={0, len(headers) - 1})
    sizes = {a: "/".join(map(str, sorted({r.attacks[a].get("n") for r in runs if a in r.attacks}, key=str)))
             for a in attacks}
    if sizes:
        ns = (f"n = {next(iter(sizes.values()))} for every attack" if len(set(sizes.values())) == 1
              else "; ".join(f"{attack_title(a)} n = {v}" for a, v in sizes.items()))
        out += (f'<p class="sub">Test images per attack (eval.json): {esc(ns)}. '
                "Train-time columns come from the last evaluation during training (eval_n images). "
                "In each accuracy column the best value among comparable runs (same dataset and eps) is "
                "bold.</p>")
    return out


def experiment_report(root: Path, runs: list[RunInfo], n: int, seed: int, data_dir: str | None, device: str,
                      gradients: bool, log: Callable[[str], None]) -> str:
    body = ""
    if (root / "results.md").exists():
        body += "<h2>Results</h2>" + markdown((root / "results.md").read_text())
    if (root / "results.json").exists():
        try:
            data = json.loads((root / "results.json").read_text())
            body += ("<details><summary>results.json</summary><pre>"
                     + esc(json.dumps(data, indent=2, default=str)) + "</pre></details>")
        except json.JSONDecodeError as e:
            body += note(f"results.json is not valid JSON ({e}).")
    for png in sorted(root.glob("*.png")):  # e.g. tradeoff.png from `igam run`
        data = png.read_bytes()
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 8 << 20:
            body += img_tag(data, png.stem, f"{esc(png.name)} (from the experiment directory)")
    body += "<h2>Runs</h2>" + results_table(runs)
    if any(r.curve or r.curve_error for r in runs):
        body += "<h2>Robustness curves</h2>" + curve_html(runs)
    body += "<h2>Training curves</h2>" + curves_html(runs, f"Training curves: {root.name}")
    if gradients:
        body += "<h2>Input gradients</h2>" + gradients_html(runs, n, seed, data_dir, device, log)
    body += "<h2>Each run</h2>"
    for r in runs:
        body += (f"<details><summary>{esc(r.label)} &middot; {run_subtitle(r)}</summary>"
                 f"<h3>Evaluation</h3>{eval_section(r)}<h3>Run</h3>{meta_table(r)}"
                 f"<h3>Configuration</h3>{config_section(r)}</details>")
    subtitle = f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {esc(root)}"
    return page(root.name or str(root), "igam experiment report", subtitle, body)


def write_report(path_or_dir: str | Path, out: str | Path | None = None, *, n: int = 8, seed: int = 0,
                 data_dir: str | None = None, device: str = "cpu", gradients: bool = True,
                 landscape_index: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Write one self-contained HTML report for a run directory or an experiment directory (whose
    subdirectories are runs) and return its path (default: PATH/report.html)."""
    path = Path(path_or_dir).resolve()
    if not path.is_dir():
        raise IgamError(f"'{path}' does not exist or is not a directory; give a run directory or an "
                        "experiment directory whose subdirectories are runs.")
    out = Path(out) if out is not None else path / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise IgamError(f"Report output '{out}' should end in .html.")
    if (path / Run.META).exists():
        text = run_report(read_run(path, log=log), n, seed, data_dir, device, gradients, landscape_index, log)
    else:
        dirs = find_runs(path)
        if not dirs:
            raise IgamError(f"'{path}' is neither a run directory (no meta.json) nor an experiment directory "
                            "(no subdirectory holds a meta.json).")
        runs = [read_run(d, label, log) for d, label in zip(dirs, run_labels(dirs))]
        text = experiment_report(path, runs, n, seed, data_dir, device, gradients, log)
    atomic_write_text(out, text)
    out.chmod(0o644)  # a report is for sharing (the atomic temp file starts private)
    return out
